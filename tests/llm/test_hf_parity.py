"""Parity with transformers (torch, CPU, fp32) on tiny random checkpoints of each family.

For each model: logits of a left-padded batch within 1e-4 of transformers run on each
prompt alone; greedy generation token-identical for 32 new tokens; and our saved
directory loads in transformers with bit-identical logits.
"""

import numpy as np
import pytest
import torch
import transformers

from hf_tiny import PARITY_MODELS, make_hf_model
from mlx_med.core.sampler import Sampler, SamplingParams
from mlx_med.llm import checkpoint, hf_config
from mlx_med.llm.model import LocalLM

PROMPTS = [[5, 17, 3, 88, 41, 200, 7], [9, 2, 60, 33, 71, 12, 50, 8, 19, 44, 6, 150], [70, 71, 300]]


@pytest.fixture(scope="module", params=sorted(PARITY_MODELS))
def case(request, tmp_path_factory):
  kind, overrides = PARITY_MODELS[request.param]
  model = make_hf_model(kind, **overrides)
  directory = str(tmp_path_factory.mktemp(request.param))
  model.save_pretrained(directory)
  cfg = hf_config.decoder_config_from_hf(hf_config.read_hf_config(directory))
  params = checkpoint.load_hf_params(directory, cfg)
  return request.param, model, directory, cfg, params


def _reference_logits(model, prompt):
  with torch.no_grad():
    return model(torch.tensor([prompt])).logits[0].numpy()


def test_padded_batch_logits_match(case):
  name, model, _, cfg, params = case
  lm = LocalLM(cfg, params, tokenizer=None)
  ours = lm.logits(PROMPTS)
  for prompt, got in zip(PROMPTS, ours, strict=True):
    np.testing.assert_allclose(got, _reference_logits(model, prompt), atol=1e-4, rtol=0, err_msg=name)


def test_greedy_generation_is_token_identical(case):
  name, model, _, cfg, params = case
  outs = Sampler(cfg).generate(params, PROMPTS, SamplingParams(max_new_tokens=32, temperature=0.0))
  for prompt, out in zip(PROMPTS, outs, strict=True):
    with torch.no_grad():
      ref = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert out.tokens == ref, name


def test_saved_directory_loads_in_transformers_with_identical_logits(case, tmp_path):
  name, model, source, cfg, params = case
  out = checkpoint.save_hf_checkpoint(str(tmp_path / "saved"), params, cfg,
                                      hf_config=hf_config.read_hf_config(source))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert type(reloaded) is type(model)
  for prompt in PROMPTS:
    np.testing.assert_array_equal(_reference_logits(reloaded, prompt), _reference_logits(model, prompt),
                                  err_msg=name)
