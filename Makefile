# The two commands a new user needs: `make demo` and `make test`.
# Each creates .venv on first use and installs what it needs; nothing else is done by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test bench clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[hf,serve,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m mlx_med.demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) bench/train_throughput.py

clean-venv:
	rm -rf $(VENV)
