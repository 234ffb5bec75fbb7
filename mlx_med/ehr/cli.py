"""`mlx-med ehr ...` commands: synth, tokenize, validate, evaluate.

The main console script calls `register(subparsers)`; each command's `func` takes the parsed
args and returns an exit code. Bad input prints one line to stderr and exits with status 2
(SystemExit), so the code reaches the shell even if the caller ignores the return value.

Also runnable alone: `python -m mlx_med.ehr.cli validate --meds-root DIR`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXIT_BAD_INPUT = 2


def _bad_input(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  raise SystemExit(EXIT_BAD_INPUT)


def _fmt(x: float | None) -> str:
  return "n/a" if x is None else f"{x:.3f}"


def _cmd_synth(args: argparse.Namespace) -> int:
  from mlx_med.ehr.synth import generate_cohort

  if args.subjects < 1:
    _bad_input(f"--subjects must be >= 1, got {args.subjects}")
  try:
    summary = generate_cohort(args.subjects, args.seed, args.out, chunk_size=args.chunk_size, overwrite=args.overwrite, progress=not args.quiet)
  except FileExistsError as e:
    _bad_input(str(e))
  print(f"wrote {summary['num_subjects']} subjects, {summary['num_events']} events, {summary['num_codes_used']} codes to {args.out} in {summary['generation_seconds']} s")
  for task, per_split in summary["tasks"].items():
    held = per_split["held_out"]
    print(f"  {task}: rows={per_split['all']['num_rows']} prevalence={_fmt(per_split['all']['prevalence'])} best_auroc(held_out)={_fmt(held['best_auroc'])}")
  return 0


def _cmd_tokenize(args: argparse.Namespace) -> int:
  import dataclasses

  from mlx_med.ehr.dataset import tokenize_split
  from mlx_med.ehr.meds import MEDSFormatError, MEDSReader
  from mlx_med.ehr.tokenizer import TimelineTokenizer, TokenizerConfig

  try:
    reader = MEDSReader(args.meds_root)
    config = dataclasses.replace(TokenizerConfig(), min_count=args.min_count, num_value_bins=args.value_bins)
    if args.no_hierarchy:
      config = dataclasses.replace(config, code_hierarchy=())
    start = time.perf_counter()
    tokenizer = TimelineTokenizer(config).fit(reader, split=args.fit_split, progress=not args.quiet)
    tokenizer.save(args.out)
    fit_s = time.perf_counter() - start
    print(f"vocabulary: {tokenizer.vocab_size} tokens -> {args.out} (fitted on '{args.fit_split}' in {fit_s:.1f} s)")
    print("  " + json.dumps(tokenizer.fit_summary))
    if args.cache_dir:
      for split in reader.split_names:
        stream, info = tokenize_split(reader, tokenizer, split, args.cache_dir, progress=not args.quiet)
        print(f"  {split}: {len(stream)} subjects, {int(stream.offsets[-1])} tokens in {info['seconds']} s -> {info['cache_path']}")
        print("    " + json.dumps(info["encode"]))
  except MEDSFormatError as e:
    _bad_input(str(e))
  return 0


def _cmd_validate(args: argparse.Namespace) -> int:
  from mlx_med.ehr.meds import MEDSFormatError, MEDSReader

  try:
    summary = MEDSReader(args.meds_root).validate(progress=not args.quiet)
  except MEDSFormatError as e:
    _bad_input(str(e))
  print(summary.format())
  print("valid MEDS")
  return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
  from mlx_med.ehr.evaluate import EVAL_FILE, EVALUATORS, evaluate_run
  from mlx_med.ehr.meds import MEDSFormatError
  from mlx_med.ehr.tokenizer import VocabFormatError

  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
  evaluators = [e.strip() for e in args.evaluators.split(",") if e.strip()]
  if args.max_examples is not None and args.max_examples < 1:
    _bad_input(f"--max-examples must be >= 1, got {args.max_examples}")
  if not Path(args.workdir).is_dir():
    _bad_input(f"--workdir {args.workdir}: not a directory; fix: pass the workdir of a finished `mlx-med train --config configs/ehr/pretrain.py` run")
  try:
    out = evaluate_run(args.workdir, tasks=tasks, labels_dir=args.labels, meds_root=args.meds_root, evaluators=evaluators,
                       num_trajectories=args.trajectories, max_new_tokens=args.max_new_tokens, max_examples=args.max_examples,
                       bootstrap=args.bootstrap, seed=args.seed, progress=not args.quiet)
  except (MEDSFormatError, VocabFormatError, ValueError) as e:
    _bad_input(str(e))
  for task, entry in out["tasks"].items():
    print(f"{task}: n={entry['n']} prevalence={_fmt(entry['prevalence'])} oracle_auroc={_fmt(entry['oracle_auroc'])}")
    for name in EVALUATORS:
      r = entry.get(name)
      if r is None:
        continue
      if "skipped" in r:
        print(f"  {name}: skipped ({r['skipped']})")
        continue
      ci = lambda v: "n/a" if v is None else f"[{v[0]:.3f}, {v[1]:.3f}]"  # noqa: E731
      print(f"  {name}: AUROC {_fmt(r['auroc'])} {ci(r['auroc_ci'])}  AUPRC {_fmt(r['auprc'])} {ci(r['auprc_ci'])}")
  print(f"wrote {Path(args.workdir) / EVAL_FILE} in {out['settings']['seconds']} s")
  return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
  """Adds the `ehr` command (with synth / tokenize / validate / evaluate) to a subparsers object."""
  ehr = subparsers.add_parser("ehr", help="EHR data: synthetic MEDS cohorts, validation, tokenization")
  sub = ehr.add_subparsers(dest="ehr_command", required=True)

  synth = sub.add_parser("synth", help="generate a synthetic MEDS cohort with task labels")
  synth.add_argument("--subjects", type=int, required=True, help="number of subjects")
  synth.add_argument("--seed", type=int, default=0)
  synth.add_argument("--out", type=Path, required=True, help="MEDS root to create")
  synth.add_argument("--chunk-size", type=int, default=5000, help="subjects per generated shard")
  synth.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  synth.add_argument("--quiet", action="store_true", help="no progress bar")
  synth.set_defaults(func=_cmd_synth)

  tok = sub.add_parser("tokenize", help="fit a timeline vocabulary on the train split (optionally cache token streams)")
  tok.add_argument("--meds-root", type=Path, required=True)
  tok.add_argument("--out", type=Path, required=True, help="vocabulary JSON to write")
  tok.add_argument("--min-count", type=int, default=5, help="codes rarer than this in train map to [UNK]")
  tok.add_argument("--value-bins", type=int, default=10, help="quantile bins per numeric code")
  tok.add_argument("--no-hierarchy", action="store_true", help="do not split ICD-10-CM codes into chapter/category tokens")
  tok.add_argument("--fit-split", default="train", help="split to fit on (keep 'train' outside of tests)")
  tok.add_argument("--cache-dir", type=Path, default=None, help="also tokenize every split into this cache")
  tok.add_argument("--quiet", action="store_true")
  tok.set_defaults(func=_cmd_tokenize)

  val = sub.add_parser("validate", help="check a MEDS root and print what it holds")
  val.add_argument("--meds-root", type=Path, required=True)
  val.add_argument("--quiet", action="store_true")
  val.set_defaults(func=_cmd_validate)

  ev = sub.add_parser("evaluate", help="clinical utility of a trained run: zero-shot, linear probe and count baseline -> eval.json")
  ev.add_argument("--workdir", type=Path, required=True, help="a finished `mlx-med train --config configs/ehr/pretrain.py` run")
  ev.add_argument("--tasks", default=None, help="comma-separated: mortality,readmission,long_stay (default), or file stems under --labels (default: all)")
  ev.add_argument("--labels", type=Path, default=None, help="folder of MEDS label parquet files, one per task (file stem = task, as ACES writes them)")
  ev.add_argument("--meds-root", type=Path, default=None, help="MEDS root the run was trained on (default: the run's data.meds_root or its synthetic cohort)")
  ev.add_argument("--evaluators", default="zero_shot,probe,baseline")
  ev.add_argument("--trajectories", type=int, default=20, help="zero-shot futures sampled per label row")
  ev.add_argument("--max-new-tokens", type=int, default=None, help="zero-shot trajectory limit (default: half the model's context)")
  ev.add_argument("--max-examples", type=int, default=None, help="cap on label rows per split (fixed-seed sample)")
  ev.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples for the 95%% intervals")
  ev.add_argument("--seed", type=int, default=0)
  ev.add_argument("--quiet", action="store_true")
  ev.set_defaults(func=_cmd_evaluate)
  return ehr


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="mlx-med")
  register(parser.add_subparsers(dest="command", required=True))
  args = parser.parse_args(argv)
  return args.func(args)


if __name__ == "__main__":
  sys.exit(main(["ehr", *sys.argv[1:]]))
