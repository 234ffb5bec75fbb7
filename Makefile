# The two commands a new user needs: `make demo` and `make test`.
# Each creates .venv on first use and installs only what it needs; nothing else is done by hand.
#   make demo  -> the core package (jax, flax, ...; no torch, no transformers, no test tools)
#   make test  -> adds the serving stack, transformers, CPU-only PyTorch (the reference the parity
#                 tests compare against) and the test tools; after `make demo` it only adds those.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CORE_STAMP := $(VENV)/.core-stamp
STAMP      := $(VENV)/.installed-stamp
# PyPI's Linux torch wheel depends on the CUDA stack (several GB of nvidia-* wheels). The tests
# need the CPU build only, which PyTorch's own index serves: torch is installed from there first
# (without dependencies), so the pinned requirement is already met when the extras are installed.
# `make test TORCH_INDEX=` skips this and takes torch from your pip configuration instead.
TORCH_INDEX   ?= https://download.pytorch.org/whl/cpu
TORCH_VERSION := $(shell sed -n 's/.*"torch==\([^"]*\)".*/\1/p' pyproject.toml)

SERVE_STAMP := $(VENV)/.serve-stamp

.PHONY: demo ehr-demo embed-demo rl-demo seg-demo vlm-demo apps-demo test bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(CORE_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(STAMP): pyproject.toml $(CORE_STAMP)
ifneq ($(strip $(TORCH_INDEX)),)
	$(PY) -m pip install -q --no-deps --index-url $(TORCH_INDEX) 'torch==$(TORCH_VERSION)'
endif
	$(PY) -m pip install -q -e '.[hf,serve,test]'
	touch $@

demo: $(CORE_STAMP)
	$(PY) -m mlx_med.demo

# One pretraining run at smoke size (a minute or two): synth -> tokenize -> train -> loss curve.
ehr-demo: $(CORE_STAMP)
	$(PY) -m mlx_med.cli train --config configs/ehr/pretrain.py:smoke --workdir runs/ehr_smoke

# MedImageInsight on synthetic multi-domain images: generate -> train the smoke two-tower -> zero-shot
# ROC AUC, image-image search precision@10, operating points and ROC plots in runs/embed_demo.
embed-demo: $(CORE_STAMP)
	$(PY) -m mlx_med.embed.demo --workdir runs/embed_demo

# The serve extra adds transformers (tokenizers and chat templates only; no torch).
$(SERVE_STAMP): pyproject.toml $(CORE_STAMP)
	$(PY) -m pip install -q -e '.[serve]'
	touch $@

# RLVR on synthetic medical MCQA: SFT a ~1M-parameter decoder on an imperfect teacher's chains of
# thought, then GRPO with the verifiable reward; held-out accuracy before/after and the
# training-dynamics plot in runs/rl_demo (CPU, about 10 minutes).
rl-demo: $(SERVE_STAMP)
	$(PY) -m mlx_med.rl.demo --workdir runs/rl_demo

# BoltzFormer on synthetic CT slices: generate -> train the smoke model under boltzmann and threshold
# attention at equal steps -> Dice by size bucket, attention FLOPs and wall time, kept-keys figures in
# runs/seg_demo (CPU, under 20 minutes).
seg-demo: $(CORE_STAMP)
	$(PY) -m mlx_med.seg.demo --workdir runs/seg_demo

# SemCLIP on synthetic V*-style scenes: train psi and a small LLaVA-style VLM at 64 px, then accuracy at
# an equal visual-token budget (full image, random crop, SemCLIP crop, SemCLIP tokens, oracle crop),
# and a small multimodal ICL run against that VLM, in runs/vlm_demo (CPU, under 20 minutes).
vlm-demo: $(SERVE_STAMP)
	$(PY) -m mlx_med.vlm.demo --workdir runs/vlm_demo

# LLM applications on a CPU: train the small embedded model on synthetic oncology notes, serve it
# (continuous batching, JSON-schema-constrained output), run UniMedAbstractor over held-out patients
# (per-attribute F1 with intervals, the review-queue size) and METASCALE at a small budget against
# plain sampling and best-of-N, in runs/apps_demo (CPU, under 15 minutes).
apps-demo: $(SERVE_STAMP)
	$(PY) -m mlx_med.apps.demo --workdir runs/apps_demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=20 tests

bench: $(STAMP)
	$(PY) bench/train_throughput.py

clean-venv:
	rm -rf $(VENV)
