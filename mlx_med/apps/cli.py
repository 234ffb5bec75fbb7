"""`mlx-med apps ...`: medical LLM applications over any client (local model, `mlx-med serve`, vLLM, Azure).

  mlx-med apps synth --out DIR [--patients N] [--seed S]
      A synthetic oncology cohort: notes.jsonl (several dated notes per patient: clinic, pathology,
      radiology) and labels.jsonl (gold values of the 15 attributes).
  mlx-med apps abstract --notes DIR --attributes CONFIG --out FILE (--model DIR | --base-url URL) [...]
      UniMedAbstractor: one universal prompt template, one attribute per config entry; retrieval of
      the relevant chunks, per-note extraction under a JSON schema, aggregation across time.
      --labels FILE adds accuracy and micro/macro-F1 per attribute with bootstrap intervals;
      --review-db PATH queues low-confidence values for a reviewer.
  mlx-med apps review (list|accept|correct|export|stats) --db PATH ...
      The human-review queue (SQLite): list what waits, accept or correct it, export reviewed
      items as new examples.
  mlx-med apps metascale --config configs/apps/metascale.py:smoke --workdir RUN (--model DIR | --base-url URL)
      METASCALE test-time scaling (meta-thoughts, UCB1, genetic evolution) against plain sampling and
      best-of-N at an equal budget, judged pairwise.
  mlx-med apps train --config configs/apps/uma_model.py:smoke --workdir RUN
      The small embedded model trained on the synthetic abstraction task (RUN/hf is servable).

A command taking a model logs every call in its output folder (llm_calls.jsonl: prompt hash, model,
tokens, latency, cost; no patient text unless --log-text). Bad input prints one line and exits 2.
"""

from __future__ import annotations

import argparse


def _passthrough(module: str, fn: str):
  def run(args) -> int:
    import importlib

    return int(getattr(importlib.import_module(module), fn)(list(args.rest)) or 0)
  return run


def _cmd_synth(args) -> int:
  from mlx_med.apps import oncology

  notes, gold = oncology.generate_cohort(args.patients, seed=args.seed)
  oncology.write_cohort(args.out, notes, gold)
  print(f"{len(gold)} patients, {len(notes)} notes -> {args.out}/notes.jsonl, {args.out}/labels.jsonl")
  return 0


def _cmd_train(args, overrides) -> int:
  from mlx_med.apps import train
  from mlx_med.core import config as config_lib

  config = config_lib.get_config(args.config, overrides)
  hf_dir = train.train_uma_model(config, args.workdir, progress=not args.no_progress)
  print(f"model trained; serve it with: mlx-med serve --model {hf_dir}")
  return 0


def _cmd_metascale(args, overrides) -> int:
  from mlx_med.apps import metascale
  from mlx_med.apps.clients import client_from_args
  from mlx_med.core import config as config_lib

  config = config_lib.get_config(args.config, overrides)
  # --model / --base-url replace the config's client section; the judge defaults to the same model.
  client = client_from_args(args, args.workdir, tag="metascale")
  paths = metascale.run_experiment(config, args.workdir, client=client)
  for name, path in paths.items():
    print(f"{name}: {path}")
  return 0


def register(subparsers) -> None:
  apps = subparsers.add_parser("apps", help="LLM applications: UniMedAbstractor, METASCALE, the review queue",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = apps.add_subparsers(dest="apps_command", required=True)

  s = sub.add_parser("synth", help="write a synthetic oncology cohort with gold labels")
  s.add_argument("--out", required=True)
  s.add_argument("--patients", type=int, default=50)
  s.add_argument("--seed", type=int, default=0)
  s.set_defaults(func=_cmd_synth)

  # These parse their own arguments (`mlx-med apps abstract --help` shows them).
  for name, module, fn, what in (
      ("abstract", "mlx_med.apps.uma", "abstract_main", "UniMedAbstractor over a folder of notes"),
      ("review", "mlx_med.apps.review", "review_main", "the human-review queue: list, accept, correct, export")):
    p = sub.add_parser(name, help=what, add_help=False, prefix_chars="\0")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_passthrough(module, fn))

  from mlx_med.apps.clients import add_client_arguments

  m = sub.add_parser("metascale", help="METASCALE against plain sampling and best-of-N at an equal budget",
                     description="Overrides: --config.section.key=value (unknown keys are errors). Without "
                                 "--model/--base-url the config's client section names the model.")
  m.add_argument("--config", required=True, help="configs/apps/metascale.py[:variant]")
  m.add_argument("--workdir", required=True, help="report.json, report.md, plots and the call log")
  add_client_arguments(m, required=False)
  m.set_defaults(func=_cmd_metascale, accepts_overrides=True)

  t = sub.add_parser("train", help="train (or resume) the small embedded abstraction model",
                     description="Overrides: --config.section.key=value (unknown keys are errors).")
  t.add_argument("--config", required=True, help="configs/apps/uma_model.py[:variant]")
  t.add_argument("--workdir", required=True)
  t.add_argument("--no-progress", action="store_true")
  t.set_defaults(func=_cmd_train, accepts_overrides=True)
