"""Supervised fine-tuning on chat conversations (long chains of thought), on the shared trainer.

X-Reasoner's first stage and the warm start of the GRPO demo: a decoder learns to
answer like the assistant turns of chat conversations. Three pieces:

* `tokenize_conversation` renders a conversation with the tokenizer's *own* chat
  template and marks which tokens the loss counts: the content of every assistant
  turn and the end-of-turn token after it (so the model learns to stop), never the
  system / user turns or the assistant header. It renders growing prefixes of the
  conversation and tokenizes the pieces between them, which works for any template
  whose renderings of a conversation's prefixes are prefixes of each other (ChatML /
  Qwen2.5, Llama 3, ...). The prompt pieces are tokenized exactly as the sampler
  tokenizes a prompt, so training sees the token boundaries generation will see. A
  template that rewrites earlier turns (Qwen3's drops the reasoning of past turns) is
  refused with `ChatTemplateError` rather than masked wrongly.
* `pack` puts the tokenized conversations into rows of `seq_len` tokens, greedy
  first-fit, with segment ids 1..k (the decoder never attends across segments),
  positions restarting at 0 per segment, and targets that never cross a segment.
* `run_sft(config, workdir)` trains `DecoderLMTask` through `mlx_med.core.trainer`
  (resumable, metrics, checkpoints) from a Hugging Face directory or a decoder built
  from the config, on a JSONL of conversations or the synthetic MCQA task, and exports
  the final (EMA, when kept) parameters as a Hugging Face directory `<workdir>/hf`
  that transformers, `mlx-med serve` and the RL loop load.

The loss is the token-mean over counted tokens of the whole batch (the trainer's
`loss_sum / weight`), as TRL's SFT trainer computes it.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from mlx_med.core import trainer as trainer_lib
from mlx_med.core.config import default_mesh_config, default_train_config
from mlx_med.core.fileio import read_jsonl_objects
from mlx_med.core.lm_task import TOKEN_BATCH_KEYS, DecoderLMTask
from mlx_med.core.transformer import DecoderConfig
from mlx_med.llm.tokenizer import ChatTokenizer
from mlx_med.rl import setup as setup_lib

log = logging.getLogger("mlx_med.rl.sft")

DATA_FORMATS = ("synthetic", "jsonl")


class ChatTemplateError(ValueError):
  """The chat template cannot give assistant-only loss masks (one line: why, and what to do)."""


class ConversationFormatError(ValueError):
  """A bad row of a conversations file: "<file>:<line>: <what is wrong>; <how to fix>"."""


# ------------------------------------------------------------------ tokenization


def _special_ids(tokenizer: ChatTokenizer) -> set[int]:
  """Ids of the tokenizer's special added tokens (role markers, end of turn, ...) and its eos ids."""
  ids = {int(i) for i, tok in getattr(tokenizer.hf, "added_tokens_decoder", {}).items()
         if getattr(tok, "special", False)}
  return ids | set(tokenizer.eos_token_ids)


def _extend(done: str, text: str, what: str) -> str:
  """The part of `text` after `done`; `done` must be its prefix (the template is prefix-stable)."""
  if text.startswith(done):
    return text[len(done):]
  k = 0
  while k < min(len(done), len(text)) and done[k] == text[k]:
    k += 1
  raise ChatTemplateError(
      f"the chat template is not prefix-stable: rendering {what} does not start with the rendering of the messages "
      f"before it (they differ at character {k}: {done[k:k + 30]!r} vs {text[k:k + 30]!r}); assistant-only loss "
      "masks need a template that renders earlier turns the same whatever follows (e.g. ChatML): fix the "
      "template (tokenizer_config.json chat_template) or train on single-turn conversations it renders stably")


def tokenize_conversation(tokenizer: ChatTokenizer, messages: Sequence[Mapping[str, Any]], *,
                          max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(ids [n] int32, loss_mask [n] float32) of one conversation rendered by the tokenizer's template.

  loss_mask is 1 on the tokens of every assistant turn up to and including its end-of-turn
  token (the last special token the template writes for that turn, e.g. `<|im_end|>` or
  `<|eot_id|>`), 0 elsewhere: system and user turns, the assistant header, and what the
  template writes after the end-of-turn token (ChatML's newline). Truncated to `max_len`.
  A template that is not prefix-stable, or that drops part of an assistant message
  (whitespace aside), raises ChatTemplateError.
  """
  messages = [dict(m) for m in messages]
  if not messages:
    raise ValueError("tokenize_conversation: the conversation has no messages")
  if not tokenizer.has_chat_template:
    raise ChatTemplateError("the tokenizer has no chat template (tokenizer_config.json chat_template); use a chat "
                            "model's tokenizer or one from mlx_med.rl.tokenizer.train_chat_tokenizer")
  special = _special_ids(tokenizer)

  def render(prefix: list[dict], generation_prompt: bool) -> str:
    try:
      return tokenizer.render_chat(prefix, add_generation_prompt=generation_prompt)
    except ChatTemplateError:
      raise
    except Exception as e:  # a template that cannot render this prefix (e.g. a conversation opening with assistant)
      raise ChatTemplateError(f"the chat template cannot render the first {len(prefix)} messages of this "
                              f"conversation ({type(e).__name__}: {e}); assistant-only masks render every prefix "
                              "of the conversation: start it with a system or user turn") from e

  pieces: list[tuple[str, bool]] = []  # (text, is an assistant turn)
  done = ""
  for i, message in enumerate(messages):
    if message.get("role") == "assistant":
      header = render(messages[:i], True)
      pieces.append((_extend(done, header, f"messages[:{i}] with the generation prompt"), False))
      done = header
      full = render(messages[:i + 1], False)
      reply = _extend(done, full, f"messages[:{i + 1}] (assistant turn {i})")
      content = message.get("content")
      if isinstance(content, str) and "".join(content.split()) not in "".join(reply.split()):
        raise ChatTemplateError(
            f"the chat template does not render message {i} (assistant) as given: it drops or rewrites part of it "
            f"(e.g. the reasoning before </think>), rendered {reply[:60]!r}; the model would learn the rewritten "
            "text: use a template that keeps assistant content (tokenizer_config.json chat_template)")
      pieces.append((reply, True))
    else:
      full = render(messages[:i + 1], False)
      pieces.append((_extend(done, full, f"messages[:{i + 1}]"), False))
    done = full

  ids: list[int] = []
  mask: list[float] = []
  for text, assistant in pieces:
    if not text:
      continue
    piece = tokenizer.encode(text, add_special_tokens=False)
    counted = 0
    if assistant:
      ends = [j for j, t in enumerate(piece) if t in special]
      counted = ends[-1] + 1 if ends else len(piece)
    ids.extend(piece)
    mask.extend([1.0] * counted + [0.0] * (len(piece) - counted))
  ids_arr, mask_arr = np.asarray(ids, np.int32), np.asarray(mask, np.float32)
  if max_len is not None:
    ids_arr, mask_arr = ids_arr[:max_len], mask_arr[:max_len]
  return ids_arr, mask_arr


# ------------------------------------------------------------------ packing


class PackedRows(list):
  """The rows `pack` returns (a list of dicts), with `stats`: examples, rows, truncated,
  dropped (nothing left to learn: fewer than 2 tokens or no counted target), tokens,
  counted_tokens and fill (share of row tokens that are not padding)."""

  stats: dict


def _first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
  """Greedy first-fit: each item goes to the first row with room; O(n log n) with a max-tree
  over the rows' free space (rows not opened yet are free and lie to the right)."""
  n = len(lengths)
  size = 1
  while size < max(n, 1):
    size *= 2
  free = [capacity] * (2 * size)
  rows: list[list[int]] = []
  for item, length in enumerate(lengths):
    node = 1
    while node < size:
      node = 2 * node if free[2 * node] >= length else 2 * node + 1
    row = node - size
    if row == len(rows):
      rows.append([])
    rows[row].append(item)
    free[node] -= length
    node //= 2
    while node:
      free[node] = max(free[2 * node], free[2 * node + 1])
      node //= 2
  return rows


def pack(examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, *, pad_id: int) -> PackedRows:
  """Rows of `seq_len` tokens with `DecoderLMTask`'s keys from (ids, loss_mask) examples.

  Greedy first-fit in the given order. In each row, segment k (1-based) holds one
  example: positions 0..n-1, `targets[t] = ids[t + 1]` and `loss_mask[t] = mask[t + 1]`
  (the mask says which tokens are predicted); a segment's last token predicts nothing
  (target pad_id, mask 0). Padding is segment 0 with mask 0. Examples longer than
  `seq_len` keep their first `seq_len` tokens; examples with nothing left to predict are
  dropped. Both are counted in `.stats` and logged.
  """
  if seq_len < 2:
    raise ValueError(f"seq_len={seq_len}: a row needs at least 2 tokens")
  kept: list[tuple[np.ndarray, np.ndarray]] = []
  truncated = dropped = 0
  for k, (ids, mask) in enumerate(examples):
    ids, mask = np.asarray(ids, np.int32).reshape(-1), np.asarray(mask, np.float32).reshape(-1)
    if ids.shape != mask.shape:
      raise ValueError(f"pack: example {k} has {ids.size} ids but {mask.size} mask values")
    if ids.size > seq_len:
      truncated += 1
      ids, mask = ids[:seq_len], mask[:seq_len]
    if ids.size < 2 or not mask[1:].any():
      dropped += 1
      continue
    kept.append((ids, mask))
  rows = PackedRows()
  for members in _first_fit([ids.size for ids, _ in kept], seq_len):
    row = {"inputs": np.full(seq_len, pad_id, np.int32), "targets": np.full(seq_len, pad_id, np.int32),
           "segment_ids": np.zeros(seq_len, np.int32), "positions": np.zeros(seq_len, np.int32),
           "loss_mask": np.zeros(seq_len, np.float32)}
    start = 0
    for segment, item in enumerate(members, start=1):
      ids, mask = kept[item]
      n = ids.size
      span = slice(start, start + n)
      row["inputs"][span] = ids
      row["targets"][start:start + n - 1] = ids[1:]
      row["segment_ids"][span] = segment
      row["positions"][span] = np.arange(n, dtype=np.int32)
      row["loss_mask"][start:start + n - 1] = mask[1:]
      start += n
    rows.append(row)
  tokens = sum(ids.size for ids, _ in kept)
  rows.stats = {"examples": len(examples), "rows": len(rows), "truncated": truncated, "dropped": dropped,
                "tokens": tokens, "counted_tokens": float(sum(r["loss_mask"].sum() for r in rows)),
                "fill": tokens / max(len(rows) * seq_len, 1)}
  if truncated or dropped:
    log.warning("packing: %d of %d conversations truncated to %d tokens, %d dropped (nothing left to learn)",
                truncated, len(examples), seq_len, dropped)
  return rows


class SFTSource:
  """Packed rows as a random-access source for the core trainer (`len`, `[i]` -> dict of arrays)."""

  def __init__(self, rows: Sequence[Mapping[str, np.ndarray]]):
    if not rows:
      stats = getattr(rows, "stats", None)
      why = (f"all {stats['examples']} conversations were dropped ({stats['truncated']} truncated to the row "
             "length with no assistant token left); raise data.seq_len" if stats and stats["examples"]
             else "the data is empty")
      raise ValueError(f"SFTSource: no rows to train on: {why}")
    self.arrays = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in TOKEN_BATCH_KEYS}
    self.stats = dict(getattr(rows, "stats", {}))

  @classmethod
  def from_conversations(cls, tokenizer: ChatTokenizer, conversations: Sequence[Sequence[Mapping]], seq_len: int,
                         ) -> SFTSource:
    return cls(pack([tokenize_conversation(tokenizer, c) for c in conversations], seq_len,
                    pad_id=tokenizer.pad_token_id))

  def __len__(self) -> int:
    return int(self.arrays["inputs"].shape[0])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self.arrays.items()}


def steps_for_epochs(num_rows: int, batch_size: int, epochs: float) -> int:
  """Optimizer steps for `epochs` passes over `num_rows` packed rows at `batch_size` rows a step
  (the loader repeats the shuffled rows, so a step may straddle two epochs): ceil(rows x epochs / batch)."""
  if num_rows <= 0 or batch_size <= 0 or epochs <= 0:
    raise ValueError(f"steps_for_epochs: rows={num_rows}, batch_size={batch_size}, epochs={epochs} must be positive")
  return max(1, math.ceil(num_rows * epochs / batch_size))


# ------------------------------------------------------------------ data


def _check_messages(messages: Any, where: str) -> list[dict]:
  if not isinstance(messages, list) or not messages:
    raise ConversationFormatError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
  out = []
  for k, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
      raise ConversationFormatError(f"{where}: message {k} must be an object with string 'role' and 'content' "
                                    f"(got {str(m)[:80]})")
    out.append({"role": m["role"], "content": m["content"]})
  if not any(m["role"] == "assistant" for m in out):
    raise ConversationFormatError(f"{where}: no assistant message, so nothing to learn; add the assistant reply "
                                  "or remove the row")
  return out


def load_conversations(path: str) -> list[list[dict]]:
  """Chat conversations from a JSONL file: one object a line, {"messages": [{"role", "content"}, ...]}
  (the common SFT layout), or {"prompt": [...], "completion": [...]} (TRL's prompt-completion
  layout: the two lists are concatenated). Blank lines are skipped; a bad row raises
  ConversationFormatError naming file and line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"conversations file {path!r} does not exist (expected JSONL with a 'messages' list a line)")
  out = []
  for where, row in read_jsonl_objects(path, "a JSON object with 'messages'", error=ConversationFormatError):
    if "messages" in row:
      out.append(_check_messages(row["messages"], where))
    elif "prompt" in row and "completion" in row:
      if not isinstance(row["prompt"], list) or not isinstance(row["completion"], list):
        raise ConversationFormatError(f"{where}: 'prompt' and 'completion' must be lists of messages")
      out.append(_check_messages(row["prompt"] + row["completion"], where))
    else:
      raise ConversationFormatError(f"{where}: no 'messages' key (keys: {sorted(row)[:6]}); each line needs "
                                    "{\"messages\": [{\"role\": ..., \"content\": ...}, ...]}")
  if not out:
    raise ConversationFormatError(f"{path}: no conversations in the file")
  return out


def synthetic_conversations(d: ml_collections.ConfigDict, workdir: str | None = None
                            ) -> tuple[list[list[dict]], list[list[dict]], list[str]]:
  """(train, held-out, knowledge-base facts) conversations of the synthetic MCQA task: the prompt of
  `d.template` and the reference solution (a short chain of thought, then the answer) as the reply.

  The questions come from `d.synthetic` through `mlx_med.rl.setup.synthetic_task`, so an RL run with
  the same section trains on the same knowledge base and holds out the same questions.
  """
  from mlx_med.rl import data as data_lib
  from mlx_med.rl import setup as setup_lib
  from mlx_med.rl import synth

  s = d.synthetic
  kb, train, held_out = setup_lib.synthetic_task(s, workdir)
  style = str(s.get("answer_style", "letter"))

  def conversation(example, source_kb):
    reply = {"role": "assistant", "content": synth.reference_solution(example, source_kb, style)}
    return list(data_lib.build_messages(example, str(d.template))) + [reply]

  sources = [(e, kb) for e in train]
  error_fraction = float(s.get("teacher_error_fraction", 0.0))
  if error_fraction > 0:
    sources = _imperfect_teacher(kb, train, held_out, s, error_fraction)
  return ([conversation(e, k) for e, k in sources], [conversation(e, kb) for e in held_out],
          list(kb.facts()))


def _imperfect_teacher(kb, train, held_out, s, error_fraction: float) -> list[tuple[Any, Any]]:
  """(question, knowledge base that answers it) for an imperfect teacher's demonstrations.

  A share `teacher_error_rate` of the training demonstrations come from the teacher's copy of the
  knowledge base (`KnowledgeBase.imperfect_teacher`: `teacher_error_fraction` of its facts wrong,
  consistently) -- questions drawn from what the teacher believes, answered by it -- and the rest
  are the true questions with correct solutions. No teacher question equals a held-out one.
  Facts the teacher has wrong are then demonstrated wrongly most of the time: what a verifiable
  reward can correct and more imitation cannot.
  """
  from mlx_med.rl import synth

  teacher = kb.imperfect_teacher(error_fraction, int(s.seed))
  taught, _ = synth.make_mcqa_splits(teacher, n_train=len(train), n_eval=0, seed=int(s.seed) + 1,
                                     num_options=int(s.num_options), two_hop_fraction=float(s.two_hop_fraction))
  held = {(e.question, tuple(e.options.values())) for e in held_out}
  rate = float(s.get("teacher_error_rate", 1.0))
  pick = np.random.default_rng([int(s.seed), 23]).random(len(train)) < rate
  out = []
  for ex, t, use_teacher in zip(train, taught, pick):
    if use_teacher and (t.question, tuple(t.options.values())) not in held:
      out.append((t, teacher))
    else:
      out.append((ex, kb))
  return out


# ------------------------------------------------------------------ config and run


def default_config() -> ml_collections.ConfigDict:
  """Every key `run_sft` reads, with CPU-sized defaults (configs set their own values).

  model.path: a Hugging Face directory to fine-tune (its tokenizer unless model.tokenizer_path);
  otherwise model.decoder (DecoderConfig fields; vocab_size 0 = the tokenizer's, rounded up to
  64; head_dim 0 = d_model // num_heads; max_seq_len 0 = data.seq_len) with the tokenizer of
  model.tokenizer_path, or one trained on the data into <workdir>/tokenizer when that is empty.
  train.epochs > 0 sets train.steps from the number of packed rows (`steps_for_epochs`).
  """
  config = ml_collections.ConfigDict()
  config.task = "rl_sft"
  config.seed = 0
  config.peak_flops_per_device = 0.0
  config.model = ml_collections.ConfigDict({
      "path": "", "tokenizer_path": "", "tokenizer_vocab_size": 1024,
      "dtype": "float32", "param_dtype": "float32", "remat": "none", "attention_backend": "auto",
      "decoder": ml_collections.ConfigDict({
          "vocab_size": 0, "num_layers": 2, "d_model": 64, "num_heads": 4, "num_kv_heads": 2, "mlp_dim": 192,
          "head_dim": 0, "max_seq_len": 0, "rope_theta": 10000.0, "norm_eps": 1e-6, "tie_embeddings": False,
          "qkv_bias": False, "qk_norm": False, "init_std": 0.02}),
  })
  config.data = ml_collections.ConfigDict({
      "format": "synthetic",  # synthetic | jsonl
      "path": "", "eval_path": "",  # jsonl: conversations files ({"messages": [...]} a line)
      "seq_len": 512,
      "template": "xreasoner",  # synthetic: the prompt template (mlx_med.rl.data.TEMPLATES)
      # synthetic: the questions (mlx_med.rl.setup.synthetic_task; the RL configs' section of the same name)
      "synthetic": ml_collections.ConfigDict({"seed": 0, "num_diseases": 24, "n_train": 512, "n_eval": 64,
                                              "num_options": 4, "two_hop_fraction": 0.3,
                                              # the reference answers: the option "letter" or its "text"
                                              "answer_style": "letter",
                                              # > 0: demonstrations from an imperfect teacher (_imperfect_teacher)
                                              "teacher_error_fraction": 0.0, "teacher_error_rate": 1.0}),
      "worker_count": 0,
  })
  config.train = default_train_config()
  config.train.epochs = 0.0
  config.mesh = default_mesh_config()
  return config


def _conversations(config: ml_collections.ConfigDict, workdir: str | None = None) -> tuple[list, list, list[str]]:
  d = config.data
  fmt = str(d.format)
  if fmt == "synthetic":
    return synthetic_conversations(d, workdir)
  if fmt == "jsonl":
    if not d.path:
      raise ValueError("data.format=jsonl needs data.path (a JSONL file of {\"messages\": [...]} rows)")
    train = load_conversations(str(d.path))
    held_out = load_conversations(str(d.eval_path)) if d.eval_path else []
    return train, held_out, []
  raise ValueError(f"data.format={fmt!r}: choose one of {', '.join(DATA_FORMATS)}")


def run_sft(config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True,
            allow_config_change: bool = False) -> str:
  """Trains (or resumes) SFT in `workdir` and exports `<workdir>/hf`; returns that path.

  Steps: conversations (data.format) -> tokenizer -> assistant-only masks -> packed rows ->
  `DecoderLMTask` through `core.trainer.train` (started from model.path's weights when given)
  -> the final parameters (the EMA when train.ema_decay > 0) saved with the tokenizer files.
  """
  os.makedirs(workdir, exist_ok=True)
  seq_len = int(config.data.seq_len)
  train_convs, eval_convs, facts = _conversations(config, workdir)
  texts = facts + [f"{m['role']}\n{m['content']}\n" for c in train_convs for m in c]  # role names too
  tokenizer, tokenizer_dir = setup_lib.resolve_tokenizer(config, workdir, lambda: texts)
  cfg, hf = setup_lib.decoder_config(config, len(tokenizer), seq_len)
  train_source = SFTSource.from_conversations(tokenizer, train_convs, seq_len)
  eval_source = SFTSource.from_conversations(tokenizer, eval_convs, seq_len) if eval_convs else None
  stats = train_source.stats
  log.info("SFT data: %d conversations -> %d rows of %d tokens (fill %.0f%%, %d counted tokens, %d truncated, "
           "%d dropped); %d held-out rows", stats["examples"], stats["rows"], seq_len, 100 * stats["fill"],
           stats["counted_tokens"], stats["truncated"], stats["dropped"],
           len(eval_source) if eval_source is not None else 0)

  config = copy.deepcopy(config)
  epochs = float(config.train.get("epochs", 0.0) or 0.0)
  if epochs > 0:
    steps = steps_for_epochs(len(train_source), int(config.train.batch_size), epochs)
    with config.unlocked():
      config.train.steps = steps
    log.info("train.epochs=%g over %d rows at batch %d: %d steps", epochs, len(train_source),
             int(config.train.batch_size), steps)

  initial_params = None
  if config.model.path:
    from mlx_med.llm.checkpoint import load_hf_params

    path = str(config.model.path)
    initial_params = lambda: load_hf_params(path, cfg, trainer_lib.mesh_from_config(config)[1])
  task = DecoderLMTask(cfg, seq_len=seq_len)
  runner = trainer_lib.Trainer(config, workdir, task, train_source, eval_source, progress=progress,
                               allow_config_change=allow_config_change, initial_params=initial_params)
  runner.run()
  return export_hf(runner.eval_params(), cfg, os.path.join(workdir, "hf"), tokenizer, tokenizer_dir, hf)


def export_hf(params: Any, cfg: DecoderConfig, out_dir: str, tokenizer: ChatTokenizer, tokenizer_dir: str,
              hf_config: dict | None = None) -> str:
  """Writes `params` as a Hugging Face directory with the tokenizer files (replacing `out_dir`)."""
  from mlx_med.llm.checkpoint import save_hf_checkpoint

  base = dict(hf_config or {})
  if not hf_config:  # built here: the token ids come from the tokenizer
    eos = tokenizer.eos_token_ids
    base.update(bos_token_id=tokenizer.hf.bos_token_id, eos_token_id=eos[0] if len(eos) == 1 else list(eos),
                pad_token_id=tokenizer.pad_token_id)
  out = save_hf_checkpoint(out_dir, params, cfg, hf_config=base, copy_files_from=tokenizer_dir, overwrite=True)
  log.info("exported the fine-tuned model to %s", out)
  return out
