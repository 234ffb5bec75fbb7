"""`make rl-demo`: SFT a tiny decoder on synthetic medical MCQA, then GRPO raises held-out accuracy.

  python -m mlx_med.rl.demo [--workdir runs/rl_demo]

1. **Questions.** A random knowledge base (diseases, findings, drugs, indications,
   contraindications) and 2000 training / 200 held-out multiple-choice questions over it,
   some needing two hops (findings -> disease -> drug) (`mlx_med.rl.synth`).
2. **SFT** (X-Reasoner's stage 1, `configs/rl/xreasoner_sft.py:demo`): a fresh ~1M-parameter
   decoder and a byte-level BPE tokenizer learn the chat format, short chains of thought
   and the answer block from reference solutions, for a few minutes only.
3. **GRPO** (`configs/rl/xreasoner_grpo.py:demo`, 150 iterations): 8 samples per question at temperature 1,
   the 0/1 answer reward, group-normalised advantages, clip-higher, token-level loss.
4. Held-out accuracy (greedy decoding) before and after GRPO is printed; the training-dynamics
   plot and metrics.jsonl (rows with `step` and `eval/accuracy`) are in `<workdir>/grpo`.

Both stages resume when the command is rerun; a finished stage is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from mlx_med.core.config import get_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs", "rl")
BAR_POINTS = 10.0


def run(workdir: str, progress: bool = True, grpo_overrides: tuple[str, ...] = ()) -> dict:
  from mlx_med.rl import learner, sft

  start = time.perf_counter()
  sft_dir = os.path.join(workdir, "sft")
  grpo_dir = os.path.join(workdir, "grpo")
  hf_dir = os.path.join(sft_dir, "hf")
  if not os.path.isfile(os.path.join(hf_dir, "config.json")):
    print("== stage 1: SFT on reference chains of thought ==", flush=True)
    sft.run_sft(get_config(os.path.join(CONFIGS, "xreasoner_sft.py") + ":demo"), sft_dir, progress=progress)
  else:
    print(f"== stage 1: SFT done ({hf_dir}) ==", flush=True)
  t_sft = time.perf_counter() - start
  print("== stage 2: GRPO with the verifiable answer reward ==", flush=True)
  config = get_config(os.path.join(CONFIGS, "xreasoner_grpo.py") + ":demo",
                      [f"model.path={hf_dir}", *grpo_overrides])
  result = learner.RLRunner(config, grpo_dir, progress=progress, log_fn=lambda m: print(m, flush=True)).run()
  rows = _eval_rows(os.path.join(grpo_dir, "metrics.jsonl"))
  before, after = rows[0], rows[-1]
  gain = 100.0 * (after["eval/accuracy"] - before["eval/accuracy"])
  elapsed = time.perf_counter() - start
  summary = {
      "before": before, "after": after, "gain_points": gain, "bar_points": BAR_POINTS, "met": gain >= BAR_POINTS,
      "sft_seconds": t_sft, "total_seconds": elapsed, "plot": result["plot"], "policy": result["hf_dir"]}
  tmp = os.path.join(workdir, "demo_summary.json.tmp")
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=2)
  os.replace(tmp, os.path.join(workdir, "demo_summary.json"))
  print()
  print(f"held-out accuracy (greedy, n={int(before.get('n', 0)) or 200}): "
        f"{before['eval/accuracy']:.3f} [{before['eval/accuracy_lo']:.3f}, {before['eval/accuracy_hi']:.3f}] after SFT "
        f"-> {after['eval/accuracy']:.3f} [{after['eval/accuracy_lo']:.3f}, {after['eval/accuracy_hi']:.3f}] after "
        f"GRPO: {gain:+.1f} points (bar: +{BAR_POINTS:.0f})")
  print(f"format failure {before['eval/format_failure']:.3f} -> {after['eval/format_failure']:.3f}, "
        f"answer leak {before['eval/answer_leak']:.3f} -> {after['eval/answer_leak']:.3f}")
  print(f"training dynamics plot: {result['plot']}")
  print(f"GRPO policy (Hugging Face directory): {result['hf_dir']}")
  print(f"total {elapsed / 60:.1f} min (SFT {t_sft / 60:.1f} min)")
  return summary


def _eval_rows(path: str) -> list[dict]:
  rows = []
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      if "eval/accuracy" in row:
        rows.append(row)
  if len(rows) < 2:
    raise RuntimeError(f"{path} has fewer than two evaluations; was the run cut short?")
  return rows


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/rl_demo")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  summary = run(args.workdir, progress=not args.no_progress)
  return 0 if summary["met"] else 1


if __name__ == "__main__":
  sys.exit(main())
