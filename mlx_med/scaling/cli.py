"""`mlx-med scaling run|fit|report`: IsoFLOP sweeps, power-law fits and the study report.

  mlx-med scaling run --config configs/ehr/isoflops.py:smoke --workdir runs/scaling [--config.a.b=v ...]
      trains every pending run (finished runs are skipped, an interrupted one resumes), then fits,
      plots and writes report.md; --only RUN trains one run; --emit-jobs FILE writes one command per
      pending run instead (for a cluster); --plan prints the grid and exits.
  mlx-med scaling fit --workdir DIR      fits.json and plots/ from DIR/runs.csv
  mlx-med scaling report --workdir DIR   fit, plot and write DIR/report.md
"""

from __future__ import annotations

import json
import logging
import os
import sys

log = logging.getLogger("mlx_med.scaling")


def fit_and_report(workdir: str, summary: dict | None = None) -> tuple[str, str, list[str]]:
  """fits.json, plots/*.png and report.md from WORKDIR/runs.csv; returns their paths."""
  from mlx_med.scaling import fit, plots, report, sweep

  runs_csv = os.path.join(workdir, "runs.csv")
  rows = sweep.read_runs(runs_csv)
  if not rows:
    raise FileNotFoundError(f"{runs_csv} not found or empty; run `mlx-med scaling run --workdir {workdir}` first")
  done = [r for r in rows if r.get("status") == "done"]
  if len(done) < len(rows):
    log.warning("%d of %d runs are not finished; fitting the finished ones", len(rows) - len(done), len(rows))
  fits = fit.write_fits(workdir, done)
  pngs = plots.plot_all(workdir, done, fits)
  if summary is None:
    summary_path = os.path.join(workdir, "sweep.json")
    if os.path.exists(summary_path):
      with open(summary_path) as f:
        summary = json.load(f)
  path = report.write_report(workdir, rows, fits, pngs, summary)
  return os.path.join(workdir, "fits.json"), path, pngs


def _cmd_run(args, overrides) -> int:
  from mlx_med.core import config as config_lib
  from mlx_med.scaling import sweep as sweep_lib

  config = config_lib.get_config(args.config, overrides)
  if config.get("task") != "ehr_isoflops":
    raise config_lib.ConfigError(f"{args.config}: config.task={config.get('task')!r}; `mlx-med scaling run` takes an "
                                 "IsoFLOP sweep config such as configs/ehr/isoflops.py:smoke")
  study = sweep_lib.Sweep(config, args.workdir, progress=not args.no_progress)
  os.makedirs(study.workdir, exist_ok=True)
  summary = sweep_lib.config_summary(config)
  if args.plan:
    print(sweep_lib.describe_plan(study.plan()))
    return 0
  if args.emit_jobs:
    n = study.emit_jobs(args.emit_jobs, args.config, overrides)
    print(f"wrote {n} job command(s) to {args.emit_jobs} (data prepared in {study.data_dir}); "
          f"when they are done: mlx-med scaling report --workdir {study.workdir}")
    return 0
  tmp = os.path.join(study.workdir, "sweep.json.tmp")
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=2)
  os.replace(tmp, os.path.join(study.workdir, "sweep.json"))
  rows = study.run(only=args.only or (), allow_config_change=args.allow_config_change)
  if args.only or args.no_report:
    return 0
  fits_path, report_path, pngs = fit_and_report(study.workdir, summary)
  with open(fits_path) as f:
    bad = [b for b in json.load(f).get("approach2", {}).get("per_budget", []) if not b.get("interior")]
  print(f"{len(rows)} runs: {os.path.join(study.workdir, 'runs.csv')}")
  print(f"fits: {fits_path}\nreport: {report_path}\nplots: {os.path.dirname(pngs[0]) if pngs else '-'}")
  if bad:
    budgets = ", ".join(format(b["budget"], ".3g") for b in bad)
    print(f"warning: {len(bad)} budget(s) have their loss minimum at the edge of the size grid ({budgets}): "
          "widen sweep.widths", file=sys.stderr)
  return 0


def _cmd_fit(args) -> int:
  from mlx_med.scaling import fit, plots, sweep as sweep_lib
  rows = [r for r in sweep_lib.read_runs(os.path.join(args.workdir, "runs.csv")) if r.get("status") == "done"]
  if not rows:
    raise FileNotFoundError(f"{os.path.join(args.workdir, 'runs.csv')} has no finished runs")
  fits = fit.write_fits(args.workdir, rows)
  pngs = plots.plot_all(args.workdir, rows, fits)
  a2 = fits.get("approach2", {})
  print(f"a = {a2.get('a')}, b = {a2.get('b')} (approach 2); fits.json and {len(pngs)} plots in {args.workdir}")
  return 0


def _cmd_report(args) -> int:
  _, report_path, _ = fit_and_report(args.workdir)
  print(f"report: {report_path}")
  return 0


def register(subparsers) -> None:
  scaling = subparsers.add_parser("scaling", help="IsoFLOP sweeps, scaling-law fits and reports")
  sub = scaling.add_subparsers(dest="scaling_command", required=True)
  run = sub.add_parser("run", help="train the sweep's pending runs, then fit and report",
                       description="Overrides: --config.section.key=value (unknown keys are errors).")
  run.add_argument("--config", required=True, help="path/to/isoflops.py[:variant]")
  run.add_argument("--workdir", required=True)
  run.add_argument("--only", action="append", metavar="RUN", help="train this run only (repeatable)")
  run.add_argument("--emit-jobs", metavar="FILE", help="write one command per pending run to FILE and exit")
  run.add_argument("--plan", action="store_true", help="print the grid (sizes, steps, tokens, FLOPs) and exit")
  run.add_argument("--no-report", action="store_true", help="train only; no fit or report")
  run.add_argument("--no-progress", action="store_true", help="plain log lines instead of progress bars")
  run.add_argument("--allow-config-change", action="store_true", help="see `mlx-med train --help`")
  run.set_defaults(func=_cmd_run, accepts_overrides=True)
  fit = sub.add_parser("fit", help="fits.json and plots from WORKDIR/runs.csv")
  fit.add_argument("--workdir", required=True)
  fit.set_defaults(func=_cmd_fit)
  rep = sub.add_parser("report", help="fit, plot and write WORKDIR/report.md")
  rep.add_argument("--workdir", required=True)
  rep.set_defaults(func=_cmd_report)
