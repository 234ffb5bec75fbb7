"""Medical LLM applications end to end on a CPU: `make apps-demo`.

  python -m mlx_med.apps.demo [--workdir runs/apps_demo] [--patients N] [--config.train.steps=N ...]

1. trains the small embedded model on UniMedAbstractor's prompts over synthetic oncology notes
   (through the shared trainer; resumable) and exports it as a Hugging Face directory;
2. serves it with `mlx-med serve` (continuous batching) on a loopback port;
3. runs UniMedAbstractor over held-out synthetic patients against that server, every value
   under a JSON-schema constraint (grammar-constrained decoding), low-confidence values into the
   SQLite review queue, and prints accuracy and micro/macro-F1 per attribute with intervals;
4. runs METASCALE at a small budget on synthetic medical prompts against plain sampling and
   best-of-N at an equal budget, judged pairwise by the same model.

This shows the pipeline, not UMA's or METASCALE's findings: the model is a few-million-parameter
decoder that learned one synthetic task. The papers' claims need a real LLM; point the same
commands at one with --base-url (see README, "LLM applications"). Every call is logged (hashes,
tokens, latency; no note text) under the workdir. The demo exits non-zero only on errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL_CONFIG = ROOT / "configs" / "apps" / "uma_model.py"
METASCALE_CONFIG = ROOT / "configs" / "apps" / "metascale.py"
EVAL_SEED = 424_242  # held-out patients: neither the training nor the training-eval generator seed


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", default="runs/apps_demo")
  p.add_argument("--patients", type=int, default=16, help="held-out synthetic patients for UMA")
  p.add_argument("--max-num-seqs", type=int, default=32, help="the server's continuous-batching slots")
  p.add_argument("--skip-metascale", action="store_true")
  p.add_argument("--no-progress", action="store_true")
  args, extra = p.parse_known_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
  for name in ("absl", "httpx", "httpx2", "bm25s", "mlx_med.llm.client", "openai"):
    logging.getLogger(name).setLevel(logging.WARNING)
  from mlx_med.cli import quiet_backend_probe_logs
  quiet_backend_probe_logs()

  from mlx_med.apps import metascale, oncology, train, uma
  from mlx_med.apps.calllog import LoggedClient
  from mlx_med.apps.review import ReviewQueue
  from mlx_med.core import config as config_lib
  from mlx_med.core.fileio import write_jsonl, write_text_atomic
  from mlx_med.llm.client import OpenAIClient
  from mlx_med.llm.server_process import ServerProcess

  overrides, rest = config_lib.split_config_args(list(extra))
  if rest:
    p.error(f"unknown arguments {rest}")
  work = Path(args.workdir)
  work.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()

  print("## 1. The embedded model: a small decoder trained on UMA prompts over synthetic notes")
  config = config_lib.get_config(f"{MODEL_CONFIG}:smoke", overrides)
  hf_dir = train.train_uma_model(config, str(work / "model"), progress=not args.no_progress)
  train_s = time.perf_counter() - start
  print(f"model: {hf_dir} ({train_s:.0f} s)")

  print("\n## 2. Serving it: mlx-med serve --batching continuous")
  server = ServerProcess(hf_dir, "--max-num-seqs", str(args.max_num_seqs), "--served-model-name", "uma-small",
                         log_path=str(work / "serve.log"))
  with server:
    print(f"serving {server.base_url} (log: {server.log_path})")
    base = OpenAIClient("uma-small", base_url=server.base_url, timeout=300.0)

    print("\n## 3. UniMedAbstractor over held-out synthetic patients (JSON-schema-constrained values)")
    uma_dir = work / "uma"
    notes, gold = oncology.generate_cohort(args.patients, seed=EVAL_SEED)
    oncology.write_cohort(uma_dir / "cohort", notes, gold)
    attributes = uma.load_attributes()
    review_path = uma_dir / "review.sqlite"
    if review_path.exists():  # a rerun starts a fresh queue (the demo's reviewers never act)
      for suffix in ("", "-wal", "-shm"):
        Path(f"{review_path}{suffix}").unlink(missing_ok=True)
    review = ReviewQueue(str(review_path), threshold=0.7)
    client = LoggedClient(base, str(uma_dir), tag="uma")
    uma_start = time.perf_counter()
    rows = uma.abstract_patients(client, notes, attributes, review=review, max_workers=2 * args.max_num_seqs)
    uma_s = time.perf_counter() - uma_start
    write_jsonl(uma_dir / "predictions.jsonl", rows)
    evaluation = uma.evaluate(rows, gold, attributes)
    write_text_atomic(uma_dir / "evaluation.json", json.dumps(evaluation, indent=2) + "\n")
    uma.write_report(evaluation, uma_dir / "report.md")
    print(uma.report_markdown(evaluation))
    for name, rows_b in _constant_baselines(gold, attributes).items():
      o = uma.evaluate(rows_b, gold, attributes, n_boot=200)["overall"]
      print(f"baseline {name}: accuracy {o['accuracy']:.3f}, micro-F1 {o['micro_f1']:.3f}, "
            f"macro-F1 {o['macro_f1']:.3f}")
    calls = client.summary()
    stats = review.stats()
    print(f"{len(gold)} patients x {len(attributes)} attributes, {sum(r['calls'] for r in rows)} extraction calls "
          f"in {uma_s:.0f} s; failed (no valid JSON after retries): {sum(r['failed'] for r in rows)}")
    print(f"review queue {review_path}: {stats}")
    print(f"call log {uma_dir}/llm_calls.jsonl: {json.dumps(calls)}")

    if not args.skip_metascale:
      print("\n## 4. METASCALE at a small budget vs plain sampling and best-of-N (equal budget, pairwise judge)")
      ms_config = config_lib.get_config(f"{METASCALE_CONFIG}:smoke")
      ms_dir = work / "metascale"
      # Prompts with a known optimum the small model can reach: held-out abstraction questions, rewarded
      # by the keyword scorer when the reply's JSON holds the gold value.
      with ms_config.unlocked():
        ms_config.eval.prompts = _metascale_prompts(work / "model" / "data" / "eval.jsonl", ms_dir / "prompts.jsonl",
                                                    n=int(ms_config.eval.n_prompts))
        ms_config.metascale.max_tokens = 96
      ms_start = time.perf_counter()
      paths = metascale.run_experiment(ms_config, str(ms_dir),
                                       client=LoggedClient(base, str(ms_dir), tag="metascale"))
      report_md = paths.get("report_md") or str(ms_dir / "report.md")
      if os.path.isfile(report_md):
        print(Path(report_md).read_text())
      print(f"METASCALE: {time.perf_counter() - ms_start:.0f} s; files: {', '.join(map(str, paths.values()))}")
    engine_stats = _server_stats(server.base_url)
    if engine_stats:
      print(f"\nserver batching counters: {json.dumps(engine_stats)}")

  print(f"\napps demo finished in {time.perf_counter() - start:.0f} s (training {train_s:.0f} s); "
        f"everything is in {work}")
  return 0


def _constant_baselines(gold: dict, attributes) -> dict[str, list[dict]]:
  """Prediction rows of two constant answerers, for scale: "unknown" everywhere, and each attribute's
  most common gold value (a prior read off the answers themselves, so an optimistic constant)."""
  import collections

  patients = sorted(gold)
  out = {"'unknown' everywhere": [], "most common gold value per attribute": []}
  for a in attributes:
    common = collections.Counter(gold[p].get(a.name, a.unknown) for p in patients).most_common(1)[0][0]
    for p in patients:
      out["'unknown' everywhere"].append({"patient_id": p, "attribute": a.name, "value": a.unknown})
      out["most common gold value per attribute"].append({"patient_id": p, "attribute": a.name, "value": common})
  return out


def _metascale_prompts(eval_jsonl: Path, out: Path, *, n: int, seed: int = 0) -> str:
  """`n` held-out extraction questions (stated values, distinct attributes) as METASCALE prompts whose
  key point is the gold value as the constrained JSON writes it; returns the JSONL path."""
  import random

  from mlx_med.core.fileio import write_jsonl

  rows = [json.loads(line) for line in eval_jsonl.read_text().splitlines() if line.strip()]
  rows = [r for r in rows if r["value"] != "unknown"]
  random.Random(seed).shuffle(rows)
  picked, seen = [], set()
  for r in rows:
    if r["attribute"] not in seen:
      seen.add(r["attribute"])
      user = next(m["content"] for m in r["messages"] if m["role"] == "user")
      picked.append({"prompt": user, "key_points": [json.dumps({"value": r["value"]})[1:-1]]})
    if len(picked) == n:
      break
  write_jsonl(out, picked)
  return str(out)


def _server_stats(base_url: str) -> dict:
  import httpx

  try:
    return httpx.get(base_url.rsplit("/v1", 1)[0] + "/stats", timeout=5.0).json()
  except (httpx.HTTPError, ValueError):
    return {}


if __name__ == "__main__":
  raise SystemExit(main())
