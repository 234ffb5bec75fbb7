"""report.md of a scaling study: the fitted exponents beside the paper's and Chinchilla's,
the compute-optimal runs, and each clinical AUROC beside the oracle and the count baseline."""

from __future__ import annotations

import math
import os
from typing import Sequence

PAPER = {"a": 0.58, "b": 0.44}  # Exploring Scaling Laws for EHR Foundation Models (MIMIC-IV)
CHINCHILLA = {"a": 0.50, "b": 0.50}  # Hoffmann et al. 2022, approach 2 (about 0.50 / 0.50)


def _f(x, spec=".3f") -> str:
  """A number formatted, or n/a for a missing (None, "", NaN) value."""
  if x is None or x == "" or (isinstance(x, float) and not math.isfinite(x)):
    return "n/a"
  return format(float(x), spec)


def _ci(ci) -> str:
  return f"[{_f(ci[0])}, {_f(ci[1])}]" if ci else ""


def build_report(rows: Sequence[dict], fits: dict, plots: Sequence[str], workdir: str, summary: dict | None = None
                 ) -> str:
  done = [r for r in rows if r.get("status") == "done"]
  a2, a3 = fits.get("approach2", {}), fits.get("approach3", {})
  lines = ["# EHR scaling study", "", f"Workdir: `{workdir}`", ""]
  if summary:
    lines += [f"Sweep: {len(summary['budgets'])} FLOP budgets x {len(summary['widths'])} widths, sequence length "
              f"{summary['seq_len']}, batch {summary['batch_size']}; {len(done)} of {len(rows)} runs finished.", ""]
  lines += ["## Compute-optimal scaling", "",
            "| | N_opt ∝ C^a | D_opt ∝ C^b |", "|---|---|---|",
            f"| this study, approach 2 (IsoFLOP parabolas), 95% bootstrap CI | {_f(a2.get('a'))} {_ci(a2.get('a_ci'))} | "
            f"{_f(a2.get('b'))} {_ci(a2.get('b_ci'))} |",
            f"| this study, approach 3 (L = E + A/N^α + B/D^β) | {_f(a3.get('a'))} | {_f(a3.get('b'))} |",
            f"| EHR scaling-law paper (MIMIC-IV) | {PAPER['a']:.2f} | {PAPER['b']:.2f} |",
            f"| Chinchilla | {CHINCHILLA['a']:.2f} | {CHINCHILLA['b']:.2f} |", ""]
  per_budget = a2.get("per_budget", [])
  if per_budget:
    lines += ["IsoFLOP minima (parabola of validation loss in ln N):", "",
              "| budget C (FLOPs) | N_opt | D_opt (tokens) | loss at minimum | minimum inside the grid |",
              "|---|---|---|---|---|"]
    for b in per_budget:
      lines.append(f"| {b['budget']:.3g} | {_f(b.get('n_opt'), ',.0f')} | {_f(b.get('d_opt'), '.3g')} | "
                   f"{_f(b.get('loss_opt'), '.4f')} | {'yes' if b.get('interior') else '**no**'} |")
    lines.append("")
  if a3:
    lines += [f"Approach 3 fit: E = {_f(a3.get('E'), '.4f')}, A = {_f(a3.get('A'), '.4g')}, B = {_f(a3.get('B'), '.4g')}, "
              f"α = {_f(a3.get('alpha'))}, β = {_f(a3.get('beta'))}.", ""]

  auroc_cols = sorted({k for r in done for k in r if k.startswith("auroc.")})
  tasks = sorted({k.split(".")[1] for k in auroc_cols})
  if tasks:
    lines += ["## Clinical utility", "",
              "AUROC on held_out per run (zero-shot: share of sampled future timelines reaching the outcome; "
              "probe: logistic regression on the frozen representation; baseline: logistic regression on code "
              "counts; oracle: the generator's true probability).", ""]
    for task in tasks:
      evaluators = [k.split(".")[2] for k in auroc_cols if k.split(".")[1] == task and not k.endswith(".oracle")]
      header = "| run | N | C | val loss | " + " | ".join(evaluators) + " | oracle |"
      lines += [f"### {task}", "", header, "|" + "---|" * (4 + len(evaluators) + 1)]
      for r in sorted(done, key=lambda r: (r["budget"], r["params"])):
        cells = " | ".join(_f(r.get(f"auroc.{task}.{e}")) for e in evaluators)
        lines.append(f"| {r['run']} | {r['params']:,.0f} | {r['compute']:.3g} | {_f(r.get('val_loss'), '.4f')} | "
                     f"{cells} | {_f(r.get(f'auroc.{task}.oracle'))} |")
      lines.append("")
    utility = fits.get("utility", {})
    if utility:
      lines += ["Trends across the sweep (least squares; r = Pearson correlation):", "",
                "| task.evaluator | AUROC per decade of compute | r | AUROC per nat of validation loss | r |",
                "|---|---|---|---|---|"]
      for key, t in sorted(utility.items()):
        c, v = t.get("vs_log_compute", {}), t.get("vs_val_loss", {})
        lines.append(f"| {key} | {_f(c.get('slope'), '+.3f')} | {_f(c.get('r'), '.2f')} | {_f(v.get('slope'), '+.3f')} | "
                     f"{_f(v.get('r'), '.2f')} |")
      lines.append("")
  if plots:
    lines += ["## Plots", ""]
    for p in plots:
      rel = os.path.relpath(p, workdir)
      lines += [f"![{os.path.basename(p)}]({rel})", ""]
  return "\n".join(lines)


def write_report(workdir: str, rows: Sequence[dict], fits: dict, plots: Sequence[str], summary: dict | None = None
                 ) -> str:
  path = os.path.join(workdir, "report.md")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(build_report(rows, fits, plots, workdir, summary))
  os.replace(tmp, path)
  return path
