"""`LocalLM` and `ChatTokenizer`: chat template, stop ids, the think-budget hook, mesh sharding."""

import numpy as np

from mlx_med.llm.model import LocalLM
from mlx_med.llm.tokenizer import ChatTokenizer

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "fever and cough?"}]


def test_chat_template_and_special_ids(qwen2_dir):
  tok = ChatTokenizer.from_dir(qwen2_dir)
  text = tok.render_chat(MESSAGES)
  assert text == ("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nfever and cough?<|im_end|>\n"
                  "<|im_start|>assistant\n")
  ids = tok.encode_chat(MESSAGES)
  assert ids == tok.encode(text, add_special_tokens=False)
  assert ids[0] == tok.hf.convert_tokens_to_ids("<|im_start|>") and ids.count(ids[0]) == 3
  assert tok.eos_token_ids == (2,)  # <|im_end|>, from the tokenizer and generation_config.json
  assert len(tok.token_ids_of("</think>")) == 1
  assert tok.decode(tok.encode("<think>fever</think>")) == "<think>fever</think>"


def test_think_budget_forces_the_closing_tag(local_lm):
  close = local_lm.tokenizer.token_ids_of("</think>")
  free = local_lm.chat([MESSAGES], max_tokens=12, temperature=0.0, logprobs=2)[0]
  forced = local_lm.chat([MESSAGES], max_tokens=12, temperature=0.0, logprobs=2, think_budget=4)[0]
  assert forced.token_ids[:4] == free.token_ids[:4]
  if close[0] not in free.token_ids[:4]:
    assert forced.token_ids[4] == close[0] and forced.forced[4]
    assert "</think>" in forced.text
  assert sum(forced.forced) <= 1


def test_mesh_sharded_model_generates_the_same(qwen2_dir, local_lm):
  sharded = LocalLM.from_pretrained(qwen2_dir, mesh_shape={"data": -1, "fsdp": 1, "tensor": 2},
                                    min_batch_bucket=8, min_prompt_bucket=32)
  assert not sharded.cfg.scan_layers  # LocalLM's default: per-layer parameters and cache
  assert sharded.params["layers_0"]["mlp"]["up_proj"]["kernel"].addressable_shards[0].data.shape[-1] == \
      local_lm.cfg.mlp_dim // 2
  a = sharded.chat([MESSAGES, MESSAGES[1:]], max_tokens=6, temperature=0.0, logprobs=2)
  b = local_lm.chat([MESSAGES, MESSAGES[1:]], max_tokens=6, temperature=0.0, logprobs=2)
  assert [g.token_ids for g in a] == [g.token_ids for g in b]
  np.testing.assert_allclose(a[0].logprobs, b[0].logprobs, atol=1e-4)


def test_incremental_text_matches_full_decode(qwen2_dir):
  from mlx_med.core.sampler import IncrementalText

  tok = ChatTokenizer.from_dir(qwen2_dir)
  text = "Fièvre 39°C — toux sèche 🤒, patient <think>stable</think> ok"
  ids = tok.encode(text, add_special_tokens=False)
  inc = IncrementalText(tok.decode)
  seen = []
  for k in range(0, len(ids), 3):
    seen.append(inc.add(ids[k:k + 3]))
  assert seen[-1] == tok.decode(ids) == text
  assert all(seen[-1].startswith(s) for s in seen)  # never retracts what it showed
  assert all("\ufffd" not in s for s in seen)
