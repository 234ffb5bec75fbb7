"""GRPO iteration throughput: our pure-JAX loop against TRL's `GRPOTrainer` (torch, CPU).

  python bench/grpo_throughput.py [--prompts 8] [--group 4] [--prompt-len 128] [--completion-len 64]
                                  [--iters 4] [--warmup 1] [--no-trl-compile] [--json OUT.jsonl]
  python bench/grpo_throughput.py --gpu [--json OUT.jsonl]     # ~0.5B Qwen2 shape, ours only

One iteration = one generation batch of P prompts x G completions (temperature 1.0), the
reward of each completion, group advantages, the reference model's log-probabilities
(beta > 0 on both sides, so the reference forward is included), the policy's forward and
backward over all P x G sequences and one AdamW update. Throughput is prompts/s = P /
(seconds per steady-state iteration); the first `--warmup` iterations (compilation on our
side, allocator warm-up on TRL's; TRL under torch.compile gets one more, as generation's
growing shapes are traced again on the second call) are left out.

The same checkpoint on both sides, built at start in a temporary directory: a byte-level
BPE tokenizer trained here with `tokenizers` (ChatML template, the reasoning tags as added
tokens) and a random Qwen2 written by transformers' `save_pretrained` (safetensors; tiny on
CPU: hidden 128, 4 layers, 4 heads / 2 KV heads, MLP 384, tied embeddings). TRL loads the
directory by path; ours loads it through `mlx_med.llm` (`RLRunner`'s `model.path`).

Same work on both sides:
- prompts: P*k multiple-choice questions written to a MedQA-format JSONL file whose chat
  prompts (the config's template, rendered by the checkpoint's chat template) are all
  exactly `--prompt-len` tokens (filler words pad each question; checked by encoding), so
  neither side pads prompts;
- completions: exactly `--completion-len` tokens on both sides. TRL gets
  `generation_kwargs={"min_new_tokens": L}` with `max_completion_length=L` (transformers then
  masks the end-of-turn token until L tokens exist); ours runs with `rl.ignore_eos` (no stop
  token), so every row runs to `rl.max_new_tokens`.
  Each side checks afterwards that every iteration's mean completion length is exactly L;
- rewards: the same python functions on the decoded completions: X-Reasoner's 0/1 answer
  reward from `mlx_med.rl.functions` (weight 1) plus `length_parity` (weight 0.1, 1 when the
  text has an odd number of characters), which keeps a random policy's groups from having
  all-equal rewards, so advantages are non-zero and nothing can be skipped;
- attention: each side's ordinary best on the platform: transformers' default (sdpa) for
  TRL; ours `--attention auto`, which is the blocked `cpu` backend of mlx_med.core.attention
  on a CPU (17-36% less fwd+bwd time than the dense `xla` backend at 32 x 192-384 tokens)
  and `xla` on a GPU (`--attention xla` times the dense one on a CPU too);
- loss: token-level PPO-clip (eps_low 0.2, eps_high 0.28), k3 KL with beta 0.04, GRPO
  advantages, one optimizer step per generation batch (TRL: per-device batch = P*G,
  gradient accumulation 1, steps_per_generation 1, num_iterations 1; ours:
  `train.batch_size` = P*G, `rl.num_iterations` = 1), so on both sides the update is exactly
  on-policy and neither recomputes the behaviour policy's log-probabilities.

Timing: after the warm-up of each side, our iterations are interleaved with TRL's (one of
ours after each TRL step, from a TrainerCallback, outside TRL's timed spans), so both see
the same load on a shared machine. Medians count (the best is printed too); each TRL
variant's ratio is its median over the median of our iterations interleaved with it.

TRL is timed eager and with `torch_compile=True`, each at every `--threads` intra-op
thread count (default 1 and the cores this process may run on, what XLA:CPU uses): its
strongest ordinary CPU settings (vLLM is GPU-only). The fastest variant counts for the
ratio and all are printed. On a shared 2-core machine one torch thread is usually fastest:
with two, every small op of token-by-token generation waits at an OpenMP barrier for a
thread the OS may have descheduled, and steps swing from ~5 s to ~40 s. The machine may be shared, so the load average (os.getloadavg) is printed before
and after. A JSON line with every figure goes to `--json` (default
bench/out/grpo_throughput.jsonl).

`--gpu` builds a Qwen2.5-0.5B-shaped random checkpoint (hidden 896, 24 layers, 14 heads /
2 KV heads, MLP 4864, vocabulary 151936, tied; 494M parameters), bf16 compute over fp32
parameters, and times our loop only (TRL on a GPU would be compared with vLLM, which this
image does not have). It exits 1 when JAX sees no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _torch_side_imports() -> None:
  """transformers' image utilities import torchvision, whose compiled ops a CPU torch lacks (tests/torch_peers.py)."""
  from torch_peers import import_torchvision
  try:
    import_torchvision()
  except ImportError:  # no torchvision at all: transformers then skips it
    pass

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
REASONING = ["<think>", "</think>", "<answer>", "</answer>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_WORD_TEXT = ("patient fever cough pain rash fatigue nausea headache dyspnea swelling chronic acute renal hepatic "
         "cardiac pulmonary infection therapy drug dose diagnosis treatment likely most which following presents "
         "with history of examination shows elevated reduced normal blood pressure heart rate oxygen level test "
         "result positive negative woman man year old child adult week day month since after before during "
         "contraindicated indicated first line management next step best answer option reason think step "
         "the a an of to in is are was be and or not for on by as at it this that then than from each your final "
         "letter give put inside tags question options choose correct one only you should please reasoning process "
         "assistant user system first between end begin explain briefly tag enclosed respectively")
WORDS = tuple(_WORD_TEXT.split())

TINY = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2}
QWEN2_0_5B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "vocab_size": 151936}


# ----------------------------------------------------------------------------- shared checkpoint

def write_tokenizer(directory: str, vocab_size: int = 1024, seed: int = 0) -> int:
  """A byte-level BPE with a ChatML template trained on random medical-ish sentences; returns its size."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  rng = random.Random(seed)
  corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))) + rng.choice([".", "?"])
            for _ in range(2000)]
  corpus += [f"{c}. {w}" for c in "ABCDE" for w in WORDS]
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(corpus, trainer)
  tok.add_tokens(REASONING)
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
               "chat_template": CHAT_TEMPLATE, "model_max_length": 4096}, f)
  return tok.get_vocab_size()


def build_checkpoint(directory: str, *, shape: dict, seed: int = 0, max_positions: int = 1024,
                     dtype: str = "float32") -> dict:
  """Tokenizer + a random Qwen2 (transformers `save_pretrained`, safetensors) in `directory`; returns facts."""
  _torch_side_imports()
  import torch
  import transformers

  n_vocab = write_tokenizer(directory)
  from transformers import AutoTokenizer
  hf_tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
  shape = dict(shape)
  vocab = max(shape.pop("vocab_size", 0), n_vocab)
  vocab = -(-vocab // 64) * 64  # like Qwen, a model vocabulary padded beyond the tokenizer's
  cfg = transformers.Qwen2Config(vocab_size=vocab, max_position_embeddings=max_positions, rms_norm_eps=1e-6,
                                 tie_word_embeddings=True, bos_token_id=None, eos_token_id=hf_tok.eos_token_id,
                                 pad_token_id=hf_tok.pad_token_id, **shape)
  torch.manual_seed(seed)
  with torch.device("cpu"):
    model = transformers.Qwen2ForCausalLM(cfg).to(getattr(torch, dtype)).eval()
  model.generation_config.eos_token_id = hf_tok.eos_token_id
  model.generation_config.pad_token_id = hf_tok.pad_token_id
  model.save_pretrained(directory)
  n_params = sum(p.numel() for p in model.parameters())
  del model
  return {"params": int(n_params), "vocab": int(vocab), "tokenizer_vocab": int(n_vocab), **shape}


# ----------------------------------------------------------------------------- prompts of an exact length

def _question(rng: random.Random, n_words: int) -> str:
  return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize()


def make_examples(n: int, prompt_len: int, render, encode, *, seed: int = 0) -> list[dict]:
  """n MedQA-format rows whose rendered chat prompt encodes to exactly `prompt_len` tokens.

  `render(example_dict) -> prompt text` (template + chat template), `encode(text) -> ids`.
  The question is grown word by word, then by single punctuation characters (each adds at
  most one byte-level token) until the length is exact.
  """
  rng = random.Random(seed)
  rows = []
  for i in range(n):
    options = {c: _question(rng, 2) for c in "ABCD"}
    row = {"question": "", "options": options, "answer_idx": rng.choice("ABCD"), "meta_info": "bench"}
    row["answer"] = options[row["answer_idx"]]

    def length(q: str, row: dict = row) -> int:
      row["question"] = q
      return len(encode(render(row)))

    words: list[str] = []
    base = length("Q?")
    if base > prompt_len:
      raise SystemExit(f"--prompt-len {prompt_len} is shorter than the template itself ({base} tokens); "
                       f"use at least {base + 4}")
    while True:
      words.append(rng.choice(WORDS))
      if length(" ".join(words) + "?") > prompt_len:
        words.pop()
        break
    q = " ".join(words)
    for ch in ",;:!-" * 8:
      if length(q + "?") >= prompt_len:
        break
      q += ch
    if length(q + "?") != prompt_len:
      raise RuntimeError(f"could not pad question {i} to exactly {prompt_len} tokens (got {length(q + '?')})")
    row["question"] = q + "?"
    row["id"] = f"bench-{i}"
    rows.append(dict(row))
  return rows


def write_medqa(rows: list[dict], path: str) -> str:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    keys = ("question", "answer", "options", "meta_info", "answer_idx")
    f.writelines(json.dumps({k: r[k] for k in keys}) + "\n" for r in rows)
  os.replace(tmp, path)
  return path


# ----------------------------------------------------------------------------- the rewards

PARITY_WEIGHT = 0.1


def length_parity(completion: str, example) -> float:
  """1.0 when the completion has an odd number of characters: a cheap reward that varies within
  every group of a random policy, so advantages are not all zero on either side."""
  del example
  return float(len(completion) % 2)


def rewards() -> list[tuple[str, callable, float]]:
  """(name, fn, weight): X-Reasoner's 0/1 answer reward from our registry, plus `length_parity`."""
  from mlx_med.rl import functions
  try:
    functions.register("reward", "bench_length_parity")(length_parity)
  except ValueError:  # registered already by this process
    pass
  return [("xreasoner", functions.get("reward", "xreasoner"), 1.0),
          ("bench_length_parity", length_parity, PARITY_WEIGHT)]


# ----------------------------------------------------------------------------- TRL

def trl_side(model_dir: str, rows: list[dict], render, args, *, compiled: bool, threads: int, workdir: str,
             between=None) -> dict:
  """Seconds per steady-state GRPOTrainer iteration (P prompts x G completions + one update).

  `between()`, when given, runs after every TRL step, outside TRL's timed spans (our
  iterations interleaved with TRL's, so both sides see the same machine load).
  """
  _torch_side_imports()
  import datasets
  import torch
  import transformers
  import trl

  torch.set_num_threads(threads)

  def as_trl(name, fn):
    def trl_reward(prompts, completions, answer_idx, options, **_):
      return [fn(c, {"answer": a, "options": o}) for c, a, o in zip(completions, answer_idx, options)]
    trl_reward.__name__ = name
    return trl_reward
  funcs = rewards()

  data = datasets.Dataset.from_list([{"prompt": render(r), "answer_idx": r["answer_idx"], "options": r["options"]}
                                     for r in rows])
  spans: list[float] = []
  lengths: list[float] = []
  mark = [0.0]

  class Timer(transformers.TrainerCallback):
    def on_train_begin(self, targs, state, control, **kw):
      mark[0] = time.perf_counter()

    def on_step_end(self, targs, state, control, **kw):
      spans.append(time.perf_counter() - mark[0])
      if between is not None and len(spans) > warmup:
        between()
      mark[0] = time.perf_counter()

  P, G, L = args.prompts, args.group, args.completion_len
  warmup = args.warmup + (1 if compiled else 0)  # torch.compile traces generation's growing shapes twice
  steps = warmup + args.iters
  cfg = trl.GRPOConfig(
      output_dir=os.path.join(workdir, f"trl_{'compiled' if compiled else 'eager'}_t{threads}"),
      per_device_train_batch_size=P * G, gradient_accumulation_steps=1, steps_per_generation=1,
      num_generations=G, max_completion_length=L, generation_kwargs={"min_new_tokens": L},
      temperature=1.0, top_p=1.0, top_k=0, beta=args.beta, num_iterations=1, epsilon=0.2, epsilon_high=0.28,
      reward_weights=[w for _, _, w in funcs], loss_type="dapo", scale_rewards="group", learning_rate=3e-6, lr_scheduler_type="constant",
      max_steps=steps, use_vllm=False, report_to="none", logging_strategy="no", save_strategy="no",
      bf16=False, fp16=False, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
      torch_compile=compiled, log_completions=False, shuffle_dataset=False)
  trainer = trl.GRPOTrainer(model=model_dir, reward_funcs=[as_trl(n, f) for n, f, _ in funcs], args=cfg, train_dataset=data,
                            callbacks=[Timer()])
  orig = trainer._generate_and_score_completions

  def spy(inputs):
    out = orig(inputs)
    lengths.append(float(out["completion_mask"].sum(1).float().mean()))
    return out
  trainer._generate_and_score_completions = spy
  trainer.train()
  per_iter = spans[warmup:]
  if len(per_iter) != args.iters:
    raise RuntimeError(f"TRL ran {len(spans)} steps, expected {steps}")
  if any(abs(x - L) > 1e-6 for x in lengths):
    raise RuntimeError(f"TRL completions were not all {L} tokens long (means per iteration: {lengths})")
  return {"s_per_iter": _median(per_iter), "best_s": min(per_iter), "all_s": per_iter, "trl": trl.__version__,
          "torch": torch.__version__, "transformers": transformers.__version__, "compiled": compiled,
          "threads": threads}


# ----------------------------------------------------------------------------- ours

def ours_config(model_dir: str, data_path: str, args):
  """configs/rl/xreasoner_grpo.py:smoke pointed at the shared checkpoint and prompts, sized like TRL's run."""
  from mlx_med.core import config as config_lib

  config = config_lib.get_config(str(ROOT / "configs" / "rl" / "xreasoner_grpo.py") + ":smoke")
  P, G = args.prompts, args.group
  config.model.path = model_dir
  config.model.dtype = "bfloat16" if args.gpu else "float32"
  config.model.remat = "full" if args.gpu else "none"
  config.model.attention_backend = args.attention
  config.data.format = "medqa"
  config.data.path = data_path
  config.data.eval_fraction = 0.0
  config.rl.update({
      "num_generations": G, "prompts_per_iteration": P, "max_prompt_len": args.prompt_len,
      "max_new_tokens": args.completion_len, "temperature": 1.0, "top_p": 1.0, "beta": args.beta,
      "kl_estimator": "k3", "eps_low": 0.2, "eps_high": 0.28, "loss_agg": "token-mean", "advantage": "grpo",
      "num_iterations": 1, "drop_zero_variance": False, "think_budget": -1, "ignore_eos": True,
      "rewards": ",".join(f"{n}:{w}" for n, _, w in rewards())})
  config.train.batch_size = P * G  # one minibatch: one optimizer step per generation batch, as TRL's
  config.train.lr = 3e-6
  config.eval.every = 0
  return config


class Ours:
  """Our `RLRunner` on the shared checkpoint and prompts; `step()` times one iteration."""

  def __init__(self, model_dir: str, data_path: str, args, *, workdir: str):
    from mlx_med.rl import learner

    self.args = args
    config = ours_config(model_dir, data_path, args)
    self.runner = learner.RLRunner(config, os.path.join(workdir, "ours"), progress=False,
                                   log_fn=lambda m: None).setup()
    self.spans: list[tuple[float, float, float]] = []  # (iteration, rollout, update) seconds
    self.lengths: list[float] = []

  def step(self) -> None:
    t0 = time.perf_counter()
    m = self.runner.iteration()
    self.spans.append((time.perf_counter() - t0, m["time/rollout_s"], m["time/update_s"]))
    self.lengths.append(m["response_length"])

  def warmup(self) -> None:
    for _ in range(self.args.warmup):
      self.step()
      print(f"ours warm-up iteration (compiles): {self.spans[-1][0]:.1f}s", flush=True)
    self.spans.clear()

  def result(self) -> dict:
    import jax

    L = self.args.completion_len
    if any(abs(x - L) > 1e-6 for x in self.lengths):
      raise RuntimeError(f"our completions were not all {L} tokens long (means: {self.lengths})")
    per_iter = [s[0] for s in self.spans]
    mid = sorted(range(len(per_iter)), key=per_iter.__getitem__)[len(per_iter) // 2]
    return {"s_per_iter": _median(per_iter), "best_s": min(per_iter), "all_s": per_iter,
            "rollout_s": self.spans[mid][1], "update_s": self.spans[mid][2], "jax": jax.__version__,
            "backend": jax.default_backend(), "compiled": None}


def _median(xs: list[float]) -> float:
  xs = sorted(xs)
  n = len(xs)
  return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


# ----------------------------------------------------------------------------- main

def _cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _load() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--prompts", type=int, default=0, help="P: prompts per iteration (CPU 8, --gpu 8)")
  p.add_argument("--group", type=int, default=0, help="G: completions per prompt (CPU 4, --gpu 8)")
  p.add_argument("--prompt-len", type=int, default=0, help="tokens per chat prompt, exact (CPU 128, --gpu 128)")
  p.add_argument("--completion-len", type=int, default=0, help="tokens per completion, exact (CPU 64, --gpu 256)")
  p.add_argument("--iters", type=int, default=0, help="timed iterations per side, median counts (CPU 4, --gpu 3)")
  p.add_argument("--warmup", type=int, default=1, help="untimed first iterations per side")
  p.add_argument("--beta", type=float, default=0.04, help="KL weight (> 0 includes the reference forward)")
  p.add_argument("--threads", default="", help="torch intra-op thread counts to time TRL at, comma-separated "
                 "(default: 1 and the cores XLA uses; the fastest counts)")
  p.add_argument("--attention", default="auto", help="our decoder attention backend (auto: the blocked 'cpu' "
                 "backend on a CPU, 'xla' on a GPU; TRL uses transformers' default, sdpa)")
  p.add_argument("--no-trl-compile", action="store_true", help="skip TRL under torch.compile")
  p.add_argument("--no-trl", action="store_true", help="time ours only")
  p.add_argument("--no-ours", action="store_true", help="time TRL only")
  p.add_argument("--gpu", action="store_true", help="~0.5B Qwen2-shaped checkpoint, ours only, needs a GPU")
  p.add_argument("--layers", type=int, default=0, help="override the checkpoint's layer count (0 = its shape's)")
  p.add_argument("--allow-cpu", action="store_true", help="let --gpu run on a CPU (a dry run of that path; "
                 "use with --layers 2 and small sizes)")
  p.add_argument("--json", default=str(ROOT / "bench" / "out" / "grpo_throughput.jsonl"))
  args = p.parse_args(argv)
  defaults = (8, 8, 128, 256, 3) if args.gpu else (8, 4, 128, 64, 4)
  for name, value in zip(("prompts", "group", "prompt_len", "completion_len", "iters"), defaults):
    if getattr(args, name) <= 0:
      setattr(args, name, value)
  if args.group < 2:
    raise SystemExit("--group must be >= 2 (GRPO compares the completions of a group)")
  threads = sorted({int(t) for t in args.threads.split(",") if t.strip()} or {1, _cores()})
  if args.gpu:
    import jax
    if jax.default_backend() != "gpu" and not args.allow_cpu:
      print(f"--gpu: JAX's default backend is {jax.default_backend()!r}, not 'gpu'", file=sys.stderr)
      return 1
    args.no_trl = True

  load_before = _load()
  print(f"load average before: {load_before} ({_cores()} cores visible)")
  workdir = tempfile.mkdtemp(prefix="grpo_bench_")
  try:
    model_dir = os.path.join(workdir, "model")
    t0 = time.perf_counter()
    shape = dict(QWEN2_0_5B if args.gpu else TINY)
    if args.layers:
      shape["num_hidden_layers"] = args.layers
    facts = build_checkpoint(model_dir, shape=shape,
                             max_positions=max(1024, args.prompt_len + args.completion_len),
                             dtype="bfloat16" if args.gpu else "float32")
    print(f"checkpoint: {facts} ({time.perf_counter() - t0:.1f}s)")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    render = make_renderer(tok)
    rows = make_examples(args.prompts * 4, args.prompt_len, render,
                         lambda t: tok(t, add_special_tokens=False)["input_ids"])
    data_path = write_medqa(rows, os.path.join(workdir, "prompts.jsonl"))
    reward_name = " + ".join(f"{w} x {n}" for n, _, w in rewards())
    results = {}
    ours = None
    if not args.no_ours:
      ours = Ours(model_dir, data_path, args, workdir=workdir)
      ours.warmup()
    between = ours.step if ours is not None else None
    if args.no_trl:
      for i in range(args.iters):
        ours.step()
        total, roll, upd = ours.spans[-1]
        print(f"ours iteration {i + 1}/{args.iters}: {total:.3f}s (rollout {roll:.3f}s, update {upd:.3f}s)",
              flush=True)
    else:
      variants = [(f"trl_{'compiled' if c else 'eager'}_t{t}", c, t) for c in (False, True) for t in threads
                  if not (c and args.no_trl_compile)]
      for name, compiled, n_threads in variants:
        first = len(ours.spans) if ours is not None else 0
        try:
          results[name] = trl_side(model_dir, rows, render, args, compiled=compiled, threads=n_threads,
                                   workdir=workdir, between=between)
        except Exception as e:  # torch.compile failing is a result to report, not a crash
          if not compiled:
            raise
          print(f"TRL with torch_compile=True failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
          continue
        if ours is not None:  # our iterations that ran between this variant's steps
          results[name]["ours_paired_s"] = _median([x[0] for x in ours.spans[first:]])
    if ours is not None:
      results = {"ours": ours.result(), **results}
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  load_after = _load()

  P, G = args.prompts, args.group
  print(f"\nGRPO iteration: P={P} prompts x G={G}, prompt {args.prompt_len} + completion {args.completion_len} "
        f"tokens, beta={args.beta}, reward {reward_name}; torch threads {threads}; our attention {args.attention}")
  print(f"{'side':<18}{'s/iter':>10}{'best s':>9}{'prompts/s':>12}{'seq/s':>9}  runs")
  for name, r in results.items():
    r["prompts_per_s"] = P / r["s_per_iter"]
    print(f"{name:<18}{r['s_per_iter']:>10.3f}{r['best_s']:>9.3f}{r['prompts_per_s']:>12.2f}"
          f"{P * G / r['s_per_iter']:>9.1f}  {len(r['all_s'])}")
  if "ours" in results:
    o = results["ours"]
    print(f"ours, median iteration: rollout {o['rollout_s']:.3f}s, update {o['update_s']:.3f}s")
  record = {"bench": "grpo_throughput", "gpu": args.gpu, "prompts": P, "group": G, "prompt_len": args.prompt_len,
            "completion_len": args.completion_len, "beta": args.beta, "threads": threads, "iters": args.iters,
            "attention": args.attention, "checkpoint": facts, "load_before": load_before, "load_after": load_after, "results": results}
  trls = {k: r for k, r in results.items() if k.startswith("trl") and "ours_paired_s" in r}
  for name, r in trls.items():
    r["ratio"] = r["s_per_iter"] / r["ours_paired_s"]
    print(f"ours / {name}: {r['ratio']:.2f}x (TRL median {r['s_per_iter']:.3f}s / ours' median "
          f"{r['ours_paired_s']:.3f}s over the iterations interleaved with it)")
  if trls:
    best = min(trls, key=lambda k: trls[k]["s_per_iter"])
    record["ratio_vs_trl"] = trls[best]["ratio"]
    record["trl_reference"] = best
    print(f"ratio ours / TRL ({best}, the faster TRL): {trls[best]['ratio']:.2f}x")
  print(f"load average after: {load_after}")
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "a") as f:
    f.write(json.dumps(record) + "\n")
  print(f"wrote {args.json}")
  return 0


def make_renderer(tok):
  """example dict -> chat prompt text, through our templates when they exist (X-Reasoner's)."""
  try:
    from mlx_med.rl import data as rl_data
  except ImportError:
    rl_data = None

  def render(row: dict) -> str:
    if rl_data is not None:
      ex = rl_data.MCQAExample(id=row.get("id", "x"), question=row["question"], options=row["options"],
                               answer=row["answer_idx"])
      messages = rl_data.build_messages(ex, "xreasoner")
    else:
      opts = "\n".join(f"{k}. {v}" for k, v in row["options"].items())
      messages = [{"role": "user", "content": f"{row['question']}\n{opts}\nThink step by step, then give the "
                                              "final letter in <answer></answer>."}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  return render


if __name__ == "__main__":
  sys.exit(main())
