"""Long-CoT SFT: chat tokenizer, assistant-only masks, packing, packed-loss equality, run_sft -> HF dir."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mlx_med.rl import sft
from mlx_med.rl.tokenizer import REASONING_TOKENS, train_chat_tokenizer

CORPUS = [
    "system\nYou are a careful clinician.\n",
    "user\nA patient has fever, cough and chest pain. Which disease is most likely?\n",
    "assistant\n<think>Fever and cough point to pneumonia.</think><answer>B</answer>\n",
    "Drug amoxicillin treats pneumonia. Drug salbutamol treats asthma.",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tok") / "tokenizer")
  train_chat_tokenizer(CORPUS * 10, out, vocab_size=400)
  return out


@pytest.fixture(scope="module")
def tok(tok_dir):
  from mlx_med.llm.tokenizer import ChatTokenizer

  return ChatTokenizer.from_dir(tok_dir)


def _fresh(tok_dir, template: str):
  """A separately loaded copy of the tokenizer with another chat template."""
  from mlx_med.llm.tokenizer import ChatTokenizer

  other = ChatTokenizer.from_dir(tok_dir)
  other.hf.chat_template = template
  return other


# ------------------------------------------------------------------ tokenizer


def test_chat_tokenizer_round_trip_and_transformers_load(tok, tok_dir, tmp_path):
  from transformers import AutoTokenizer

  assert sorted(os.listdir(tok_dir)) == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]
  assert not [n for n in os.listdir(os.path.dirname(tok_dir)) if ".tmp-" in n or ".old-" in n]
  texts = ["Fever  and\tcough\n\n", "naïve café — 37.5 °C 😀", "<think>pneumonia</think>\n<answer>B</answer>",
           " leading and trailing spaces ", "unseen words: zygomatic xerostomia"]
  for text in texts:
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
  # Special tokens have fixed ids; the reasoning tags are single, non-special ids that survive decoding.
  assert [tok.hf.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
  for tag in REASONING_TOKENS:
    (tag_id,) = tok.token_ids_of(tag)
    assert tok.decode([tag_id], skip_special_tokens=True) == tag
  assert tok.decode([1, 2, 0], skip_special_tokens=True) == ""
  assert tok.eos_token_ids == (2,) and tok.pad_token_id == 0
  messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"},
              {"role": "assistant", "content": "<think>t</think><answer>A</answer>"}]
  assert tok.render_chat(messages[:2]) == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n"
                                           "<|im_start|>assistant\n")
  assert tok.render_chat(messages, add_generation_prompt=False).endswith(
      "<|im_start|>assistant\n<think>t</think><answer>A</answer><|im_end|>\n")
  # transformers loads the same tokenizer from local files.
  hf = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
  assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
  for text in texts:
    assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text, add_special_tokens=False)
  assert hf.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True) == tok.render_chat(
      messages[:2])
  # The directory is replaced as a whole; a directory holding other files is refused.
  foreign = tmp_path / "model"
  foreign.mkdir()
  (foreign / "model.safetensors").write_text("x")
  with pytest.raises(FileExistsError, match="holds other files"):
    train_chat_tokenizer(CORPUS, str(foreign), vocab_size=300)
  with pytest.raises(ValueError, match="vocab_size=100"):
    train_chat_tokenizer(CORPUS, str(tmp_path / "small"), vocab_size=100)


# ------------------------------------------------------------------ masking


def test_two_turn_mask_counts_assistant_tokens_and_end_of_turn(tok):
  enc = lambda s: tok.encode(s, add_special_tokens=False)
  messages = [{"role": "system", "content": "You are a careful clinician."},
              {"role": "user", "content": "Which disease?"},
              {"role": "assistant", "content": "<think>fever and cough</think><answer>B</answer>"},
              {"role": "user", "content": "And the drug?"},
              {"role": "assistant", "content": "amoxicillin"}]
  ids, mask = sft.tokenize_conversation(tok, messages)
  assert ids.dtype == np.int32 and mask.dtype == np.float32 and ids.shape == mask.shape
  im_end = 2
  prompt1 = enc("<|im_start|>system\nYou are a careful clinician.<|im_end|>\n<|im_start|>user\nWhich disease?"
                "<|im_end|>\n<|im_start|>assistant\n")
  reply1 = enc("<think>fever and cough</think><answer>B</answer>")
  prompt2 = enc("\n<|im_start|>user\nAnd the drug?<|im_end|>\n<|im_start|>assistant\n")
  reply2 = enc("amoxicillin")
  expected_ids = prompt1 + reply1 + [im_end] + prompt2 + reply2 + [im_end] + enc("\n")
  expected_mask = ([0] * len(prompt1) + [1] * (len(reply1) + 1) + [0] * len(prompt2) + [1] * (len(reply2) + 1)
                   + [0])
  assert ids.tolist() == expected_ids
  assert mask.tolist() == expected_mask
  # exactly the two replies and their end-of-turn tokens are counted
  assert ids[mask == 1].tolist() == reply1 + [im_end] + reply2 + [im_end]
  assert tok.decode(ids[mask == 1], skip_special_tokens=False) == (
      "<think>fever and cough</think><answer>B</answer><|im_end|>amoxicillin<|im_end|>")
  # the prompt part is what the sampler would encode for generation
  assert ids[:len(prompt1)].tolist() == tok.encode_chat(messages[:2])
  # truncation keeps the start
  short_ids, short_mask = sft.tokenize_conversation(tok, messages, max_len=len(prompt1) + 3)
  assert short_ids.tolist() == expected_ids[:len(prompt1) + 3]
  assert short_mask.tolist() == expected_mask[:len(prompt1) + 3]


def test_mask_follows_another_template(tok_dir):
  """A Llama-3-shaped template: BOS text, a header followed by a blank line, end of turn with nothing after it."""
  template = ("{{ '<|endoftext|>' }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n\n{{ m['content'] }}"
              "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}")
  other = _fresh(tok_dir, template)
  enc = lambda s: other.encode(s, add_special_tokens=False)
  messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "fever"}]
  ids, mask = sft.tokenize_conversation(other, messages)
  prompt = enc("<|endoftext|><|im_start|>user\n\nQ<|im_end|><|im_start|>assistant\n\n")
  assert ids.tolist() == prompt + enc("fever") + [2]
  assert mask.tolist() == [0] * len(prompt) + [1] * (len(enc("fever")) + 1)


def test_prefix_unstable_template_is_refused(tok_dir):
  """Like Qwen3's template: earlier assistant turns lose their reasoning once a later turn follows."""
  template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
              "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] }}"
              "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  other = _fresh(tok_dir, template)
  one_turn = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>t</think>A"}]
  _, mask = sft.tokenize_conversation(other, one_turn)  # a single turn renders stably
  assert mask.sum() > 0
  with pytest.raises(sft.ChatTemplateError, match="not prefix-stable"):
    sft.tokenize_conversation(other, one_turn + [{"role": "user", "content": "Q2"},
                                                 {"role": "assistant", "content": "B"}])
  with pytest.raises(sft.ChatTemplateError, match="no chat template"):
    sft.tokenize_conversation(_fresh(tok_dir, None), one_turn)


def test_template_that_drops_the_reasoning_is_refused(tok_dir):
  """Like DeepSeek-R1's distill template: every assistant turn loses what precedes </think>."""
  template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
              "{% if m['role'] == 'assistant' %}{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}"
              "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  other = _fresh(tok_dir, template)
  with pytest.raises(sft.ChatTemplateError, match="drops or rewrites"):
    sft.tokenize_conversation(other, [{"role": "user", "content": "Q"},
                                      {"role": "assistant", "content": "<think>t</think>A"}])
  # whitespace the template adds or strips is not a rewrite (Qwen3 puts newlines around the reasoning)
  spaced = template.replace("m['content'].split('</think>')[-1]", "m['content'].replace('>', '>\n')")
  ids, mask = sft.tokenize_conversation(_fresh(tok_dir, spaced), [{"role": "user", "content": "Q"},
                                                                  {"role": "assistant", "content": "<think>t</think>A"}])
  assert other.decode(ids[mask == 1], skip_special_tokens=False) == "<think>\nt</think>\nA<|im_end|>"


# ------------------------------------------------------------------ packing


def test_pack_first_fit_segments_positions_targets():
  a = (np.arange(10, 15), np.array([0, 0, 1, 1, 1]))
  b = (np.arange(20, 23), np.array([0, 1, 1]))
  c = (np.arange(30, 36), np.array([0, 0, 0, 1, 1, 0]))
  d = (np.arange(40, 42), np.array([0, 1]))
  too_long = (np.arange(50, 60), np.array([0] * 7 + [1, 1, 1]))  # truncated to 8: counted target at 7 kept
  nothing = (np.arange(60, 64), np.array([1, 0, 0, 0]))  # the first token is never predicted: dropped
  single = (np.array([70]), np.array([1]))  # dropped
  rows = sft.pack([a, b, c, nothing, d, too_long, single], 8, pad_id=0)
  assert rows.stats == {"examples": 7, "rows": 3, "truncated": 1, "dropped": 2, "tokens": 24,
                        "counted_tokens": 9.0, "fill": 1.0}
  # first-fit in order: a(5)+b(3) | c(6)+d(2) | too_long(8)
  r0, r1, r2 = rows
  assert r0["inputs"].tolist() == [10, 11, 12, 13, 14, 20, 21, 22]
  assert r0["segment_ids"].tolist() == [1, 1, 1, 1, 1, 2, 2, 2]
  assert r0["positions"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
  assert r0["targets"].tolist() == [11, 12, 13, 14, 0, 21, 22, 0]  # never across a segment
  assert r0["loss_mask"].tolist() == [0, 1, 1, 1, 0, 1, 1, 0]
  assert r1["inputs"].tolist() == [30, 31, 32, 33, 34, 35, 40, 41]
  assert r1["segment_ids"].tolist() == [1] * 6 + [2, 2]
  assert r1["targets"].tolist() == [31, 32, 33, 34, 35, 0, 41, 0]
  assert r1["loss_mask"].tolist() == [0, 0, 1, 1, 0, 0, 1, 0]
  assert r2["inputs"].tolist() == list(range(50, 58)) and r2["loss_mask"].tolist() == [0] * 6 + [1, 0]
  assert set(r0) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
  assert r0["inputs"].dtype == np.int32 and r0["loss_mask"].dtype == np.float32


def test_pack_pads_and_fills_earlier_rows_first():
  seqs = [(np.arange(1, 7), np.ones(6)), (np.arange(1, 6), np.ones(5)), (np.arange(1, 4), np.ones(3))]
  rows = sft.pack(seqs, 10, pad_id=9)
  # 6 -> row 0 (4 free), 5 -> row 1 (5 free), 3 -> row 0 (first row with room)
  assert len(rows) == 2
  assert rows[0]["segment_ids"].tolist() == [1] * 6 + [2] * 3 + [0]
  assert rows[1]["segment_ids"].tolist() == [1] * 5 + [0] * 5
  assert rows[1]["inputs"].tolist() == [1, 2, 3, 4, 5] + [9] * 5
  assert rows[1]["targets"].tolist() == [2, 3, 4, 5] + [9] * 6
  assert rows[1]["positions"].tolist() == [0, 1, 2, 3, 4] + [0] * 5
  assert rows[1]["loss_mask"].tolist() == [1, 1, 1, 1] + [0] * 6
  source = sft.SFTSource(rows)
  assert len(source) == 2 and source[1]["inputs"].tolist() == rows[1]["inputs"].tolist()
  assert sft.steps_for_epochs(10, 4, 4) == 10 and sft.steps_for_epochs(3, 8, 1) == 1
  assert sft.steps_for_epochs(9, 4, 1.5) == 4


def test_packed_row_loss_equals_sum_of_separate_losses():
  import jax
  from tiny import TINY, tiny_params

  from mlx_med.core.lm_task import DecoderLMTask

  rng = np.random.default_rng(0)
  seqs = []
  for n in (5, 7, 3):
    mask = (rng.random(n) < 0.7).astype(np.float32)
    mask[-1] = 1.0
    seqs.append((rng.integers(1, TINY.vocab_size, n).astype(np.int32), mask))
  task = DecoderLMTask(TINY)
  params = tiny_params()
  loss = jax.jit(lambda p, b: task.loss(p, b, None, train=False)[:2])
  (packed,) = sft.pack(seqs, 18, pad_id=0)
  assert packed["segment_ids"].tolist() == [1] * 5 + [2] * 7 + [3] * 3 + [0] * 3
  packed_sum, packed_count = loss(params, {k: v[None] for k, v in packed.items()})
  separate_sum, separate_count = 0.0, 0.0
  for ids, mask in seqs:
    n = ids.size
    alone = {"inputs": ids[None], "targets": np.concatenate([ids[1:], [0]])[None].astype(np.int32),
             "segment_ids": np.ones((1, n), np.int32), "positions": np.arange(n, dtype=np.int32)[None],
             "loss_mask": np.concatenate([mask[1:], [0]])[None].astype(np.float32)}
    s, c = loss(params, alone)
    separate_sum += float(s)
    separate_count += float(c)
  assert float(packed_count) == separate_count == sum(float(m[1:].sum()) for _, m in seqs)
  np.testing.assert_allclose(float(packed_sum), separate_sum, rtol=1e-5)


# ------------------------------------------------------------------ data files


def test_load_conversations_layouts_and_bad_rows(tmp_path):
  path = tmp_path / "chats.jsonl"
  rows = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
          {"prompt": [{"role": "user", "content": "Q2"}], "completion": [{"role": "assistant", "content": "B"}]}]
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  convs = sft.load_conversations(str(path))
  assert convs[1] == [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B"}]
  bad_rows = {
      "{not json": "not valid JSON",
      json.dumps({"text": "hi"}): "no 'messages' key",
      json.dumps({"messages": [{"role": "user", "content": "Q"}]}): "no assistant message",
      json.dumps({"messages": [{"role": "user", "content": 3}]}): "string 'role' and 'content'",
  }
  for bad, what in bad_rows.items():
    path.write_text(json.dumps(rows[0]) + "\n" + bad + "\n")
    with pytest.raises(sft.ConversationFormatError) as info:
      sft.load_conversations(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}:2: ") and what in message and "\n" not in message


def test_synthetic_conversations_end_with_the_reference_solution(tok):
  config = sft.default_config()
  config.data.update({"template": "medrlvr"})
  config.data.synthetic.update({"n_train": 12, "n_eval": 4})
  train, held_out, facts = sft.synthetic_conversations(config.data)
  assert len(train) == 12 and len(held_out) == 4 and facts
  for conversation in train + held_out:
    roles = [m["role"] for m in conversation]
    assert roles == ["system", "user", "assistant"]
    reply = conversation[-1]["content"]
    assert reply.startswith("<think>") and reply.endswith("</answer>")
    ids, mask = sft.tokenize_conversation(tok, conversation)
    counted = ids[mask == 1].tolist()
    assert counted == tok.encode(reply, add_special_tokens=False) + [2]


# ------------------------------------------------------------------ run_sft -> HF directory


def _write_jsonl(path, n: int, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  diseases = ["pneumonia", "asthma", "migraine", "gout"]
  with open(path, "w") as f:
    for i in range(n):
      k = int(rng.integers(len(diseases)))
      messages = [{"role": "system", "content": "Answer with the letter."},
                  {"role": "user", "content": f"Case {i}: which disease is {diseases[k]}? A) {diseases[0]} "
                                              f"B) {diseases[1]} C) {diseases[2]} D) {diseases[3]}"},
                  {"role": "assistant", "content": f"<think>The case names {diseases[k]}.</think>"
                                                   f"<answer>{'ABCD'[k]}</answer>"}]
      f.write(json.dumps({"messages": messages}) + "\n")
  return str(path)


def _metric_steps(workdir: str) -> list[int]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["step"] for line in f]


def _smoke_config(data_path: str, **train):
  config = sft.default_config()
  config.data.format = "jsonl"
  config.data.path = data_path
  config.data.seq_len = 128
  config.model.tokenizer_vocab_size = 320
  config.model.decoder.update({"num_layers": 2, "d_model": 32, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 64})
  config.train.update({"steps": 3, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "eval_every": 0,
                       "ckpt_every": 3, "async_checkpointing": False})
  config.train.update(train)
  return config


def test_run_sft_smoke_exports_a_transformers_model(tmp_path):
  import torch
  from torch_peers import import_torchvision

  import_torchvision()  # transformers' model classes import torchvision, whose PyPI wheel needs this on CPU torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  data = _write_jsonl(tmp_path / "train.jsonl", 40)
  workdir = str(tmp_path / "run")
  out = sft.run_sft(_smoke_config(data), workdir, progress=False)
  assert out == os.path.join(workdir, "hf")
  for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "generation_config.json"):
    assert os.path.isfile(os.path.join(out, name)), name
  steps = _metric_steps(workdir)
  assert max(steps) == 3
  hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
  model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
  assert model.config.eos_token_id == hf_tok.eos_token_id == 2 and model.config.pad_token_id == 0
  prompt = hf_tok.apply_chat_template([{"role": "user", "content": "Which disease?"}], tokenize=False,
                                      add_generation_prompt=True)
  ids = torch.tensor([hf_tok(prompt, add_special_tokens=False)["input_ids"]])
  with torch.no_grad():
    logits = model(ids).logits
  assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
  assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(hf_tok)


def test_run_sft_from_hf_dir_starts_from_its_weights(tmp_path):
  """With lr 0 the exported model equals the one it started from (load -> train layout -> export round trip);
  train.epochs sets the number of steps."""
  import torch
  from torch_peers import import_torchvision

  import_torchvision()
  from hf_tiny import make_hf_model, save_model_dir, write_tokenizer
  from transformers import AutoModelForCausalLM

  tok_dir = str(tmp_path / "tok")
  vocab = write_tokenizer(tok_dir)
  src = save_model_dir(make_hf_model("qwen2", vocab_size=vocab), str(tmp_path / "base"), tok_dir)
  data = _write_jsonl(tmp_path / "train.jsonl", 12)
  config = _smoke_config(data, lr=0.0, weight_decay=0.0, steps=100, epochs=2.0, ckpt_every=100)
  config.model.path = src
  config.data.seq_len = 256  # this tokenizer splits finely: no conversation is truncated
  workdir = str(tmp_path / "run")
  out = sft.run_sft(config, workdir, progress=False)
  steps = _metric_steps(workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    planned = json.load(f)["train"]["steps"]
  assert max(steps) == planned < 100  # 12 conversations packed into a few rows, 2 epochs at batch 8
  before = AutoModelForCausalLM.from_pretrained(src, local_files_only=True).state_dict()
  after = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).state_dict()
  assert sorted(before) == sorted(after)
  for name, tensor in before.items():
    torch.testing.assert_close(after[name], tensor, rtol=0, atol=0, msg=name)
