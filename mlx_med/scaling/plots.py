"""PNG plots of an IsoFLOP sweep and its fits (the dict `fit.fit_scaling` returns), written to WORKDIR/plots/.

  isoflop_curves.png          loss vs N per budget, the fitted parabolas and their minima
  optimal_n_d_vs_compute.png  N_opt and D_opt vs C: the budgets' minima, the power laws with their 95%
                              exponent intervals, and the EHR paper's (0.58 / 0.44) and Chinchilla's
                              (0.5 / 0.5) exponents as reference slopes
  loss_vs_compute.png         every run's loss vs its compute, the budgets' parabola minima and the
                              approach-3 compute-optimal frontier
  auroc_vs_compute.png        AUROC vs compute per task and evaluator, with the fitted trends
  auroc_vs_val_loss.png       AUROC vs validation loss, likewise (both only when auroc columns exist)

Each file is drawn with the Agg backend (no display needed) and written under a temporary name, then
renamed, so a reader never sees half a PNG.
"""

from __future__ import annotations

import math
import os

import numpy as np

from mlx_med.scaling import fit as fit_lib

PLOT_NAMES = ("isoflop_curves.png", "optimal_n_d_vs_compute.png", "loss_vs_compute.png",
              "auroc_vs_compute.png", "auroc_vs_val_loss.png")
EVALUATOR_MARKERS = {"zero_shot": "o", "probe": "s", "baseline": "^"}


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: str) -> str:
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  _pyplot().close(fig)
  os.replace(tmp, path)
  return path


def _budget_colours(budgets):
  import matplotlib
  cmap = matplotlib.colormaps["viridis"]
  k = max(len(budgets) - 1, 1)
  return {b: cmap(0.9 * i / k) for i, b in enumerate(budgets)}


def _budget_label(c: float) -> str:
  return f"C = {c:.2g} FLOPs"


def plot_isoflops(path: str, runs: list[dict], fits: dict, loss_label: str) -> str:
  plt = _pyplot()
  per_budget = {p["budget"]: p for p in fits["approach2"]["per_budget"]}
  groups = fit_lib.group_by_budget(runs)
  colours = _budget_colours(list(groups))
  fig, ax = plt.subplots(figsize=(7, 5))
  for budget, group in groups.items():
    colour = colours[budget]
    n = np.array([r["n"] for r in group])
    ax.scatter(n, [r["loss"] for r in group], color=colour, s=25, zorder=3, label=_budget_label(budget))
    p = per_budget.get(budget)
    if p is None:
      continue
    lo, hi = math.log(n.min()) - 0.25, math.log(n.max()) + 0.25
    x = np.linspace(lo, hi, 100)
    ax.plot(np.exp(x), np.polyval(p["coef"], x), color=colour, lw=1.2)
    ax.scatter([p["n_opt"]], [p["loss_opt"]], marker="*", s=160, zorder=4, edgecolor="black", linewidth=0.6,
               color=colour if p["interior"] else "white")
  ax.scatter([], [], marker="*", s=160, color="grey", edgecolor="black", linewidth=0.6, label="parabola minimum")
  ax.scatter([], [], marker="*", s=160, color="white", edgecolor="black", linewidth=0.6,
             label="minimum outside the sizes trained")
  ax.set_xscale("log")
  ax.set_xlabel("parameters N (non-embedding)" if fits["settings"]["n_key"] == "params_nonembed" else "parameters N")
  ax.set_ylabel(loss_label)
  ax.set_title("IsoFLOP curves (approach 2: parabola in ln N per budget)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def _power_law_panel(ax, per_budget: list[dict], used: list[float], key: str, coef, exponent, ci,
                     references: list[tuple[str, float, str]], ylabel: str, symbol: str) -> None:
  c_all = np.array([p["budget"] for p in per_budget])
  y_all = np.array([p[key] for p in per_budget])
  inside = np.array([p["budget"] in used for p in per_budget])
  ax.scatter(c_all[inside], y_all[inside], color="C0", zorder=3, label="budget minimum (used in the fit)")
  if (~inside).any():
    ax.scatter(c_all[~inside], y_all[~inside], facecolor="white", edgecolor="C0", zorder=3,
               label="budget minimum (not used: outside its grid)")
  c_line = np.geomspace(c_all.min() / 2, c_all.max() * 2, 50)
  if coef is not None:
    log_k, slope = coef
    ax.plot(c_line, np.exp(log_k) * c_line ** slope, color="C0",
            label=f"fit: {symbol} ∝ C^{slope:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
    # The least-squares line passes through the centroid of the used points in log-log; the interval's
    # slopes are drawn through the same point.
    c_used = np.array([p["budget"] for p in per_budget if p["budget"] in used])
    y_used = np.array([p[key] for p in per_budget if p["budget"] in used])
    lc, ly = np.log(c_used).mean(), np.log(y_used).mean()
    if ci:
      lower = np.exp(ly + ci[0] * (np.log(c_line) - lc))
      upper = np.exp(ly + ci[1] * (np.log(c_line) - lc))
      ax.fill_between(c_line, np.minimum(lower, upper), np.maximum(lower, upper), color="C0", alpha=0.15,
                      label="95% bootstrap interval of the exponent")
  else:
    lc, ly = np.log(c_all).mean(), np.log(y_all).mean()
  for label, slope, style in references:
    ax.plot(c_line, np.exp(ly + slope * (np.log(c_line) - lc)), color="grey", ls=style, lw=1,
            label=f"{label}: C^{slope:g}")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("compute budget C (FLOPs)")
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)


def plot_optimal_n_d(path: str, fits: dict) -> str:
  plt = _pyplot()
  a2 = fits["approach2"]
  used = set(a2.get("power_law_budgets") or [])
  paper, chin = fit_lib.PAPER_EXPONENTS, fit_lib.CHINCHILLA_EXPONENTS
  fig, (ax_n, ax_d) = plt.subplots(1, 2, figsize=(11, 4.5))
  _power_law_panel(ax_n, a2["per_budget"], used, "n_opt", a2.get("n_opt_coef"), a2.get("a"), a2.get("a_ci"),
                   [("EHR paper", paper["a"], "--"), ("Chinchilla", chin["a"], ":")],
                   "compute-optimal parameters N_opt", "N_opt")
  _power_law_panel(ax_d, a2["per_budget"], used, "d_opt", a2.get("d_opt_coef"), a2.get("b"), a2.get("b_ci"),
                   [("EHR paper", paper["b"], "--"), ("Chinchilla", chin["b"], ":")],
                   "compute-optimal tokens D_opt", "D_opt")
  ax_n.set_title("N_opt vs compute (approach 2)")
  ax_d.set_title("D_opt vs compute (approach 2)")
  fig.tight_layout()
  return _save(fig, path)


def plot_loss_vs_compute(path: str, runs: list[dict], fits: dict, loss_label: str) -> str:
  plt = _pyplot()
  import matplotlib
  compute = np.array([r["compute"] if r["compute"] is not None else r["budget"] for r in runs])
  n = np.array([r["n"] for r in runs])
  fig, ax = plt.subplots(figsize=(7, 5))
  points = ax.scatter(compute, [r["loss"] for r in runs], c=n, cmap="viridis", s=25, zorder=3,
                      norm=matplotlib.colors.LogNorm(vmin=n.min(), vmax=max(n.max(), n.min() * 1.01)),
                      label="runs")
  fig.colorbar(points, ax=ax, label="parameters N")
  per_budget = [p for p in fits["approach2"]["per_budget"] if p["convex"]]
  if per_budget:
    ax.plot([p["budget"] for p in per_budget], [p["loss_opt"] for p in per_budget], "k*-", ms=10, lw=1,
            label="IsoFLOP minima (approach 2)", zorder=4)
  fit3 = fits.get("approach3")
  if fit3 and fit3.get("alpha") and fit3.get("beta") and fit3["alpha"] > 0 and fit3["beta"] > 0:
    c_line = np.geomspace(compute.min() / 2, compute.max() * 2, 100)
    _, _, frontier = fit_lib.chinchilla_optimum(fit3, c_line)
    ax.plot(c_line, frontier, color="C3", lw=1.5,
            label=f"approach 3 frontier: E={fit3['E']:.3g}, α={fit3['alpha']:.2f}, β={fit3['beta']:.2f}")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("training compute C (FLOPs)")
  ax.set_ylabel(loss_label)
  ax.set_title("Loss vs compute and the compute-optimal frontier")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  return _save(fig, path)


def _auroc_series(runs: list[dict]) -> dict[str, list[tuple[str, str]]]:
  """task -> [(column, evaluator)] for every auroc.<task>.<evaluator> column."""
  tasks: dict[str, list[tuple[str, str]]] = {}
  for col in fit_lib.auroc_columns(runs):
    task, evaluator = col[len("auroc."):].rsplit(".", 1)
    tasks.setdefault(task, []).append((col, evaluator))
  return tasks


def plot_auroc(path: str, runs: list[dict], fits: dict, *, against: str, loss_label: str) -> str:
  """AUROC vs log10 compute (`against="compute"`) or vs the validation loss (`against="val_loss"`)."""
  plt = _pyplot()
  tasks = _auroc_series(runs)
  fig, axes = plt.subplots(1, len(tasks), figsize=(4.8 * len(tasks), 4.2), squeeze=False)
  trend_key = "vs_log_compute" if against == "compute" else "vs_val_loss"
  for ax, (task, series) in zip(axes[0], tasks.items()):
    for i, (col, evaluator) in enumerate(series):
      have = [r for r in runs if r.get(col) is not None]
      if not have:
        continue
      if against == "compute":
        x = np.array([r["compute"] if r["compute"] is not None else r["budget"] for r in have])
      else:
        x = np.array([r["loss"] for r in have])
      y = np.array([r[col] for r in have])
      colour = f"C{i}"
      trend = fits.get("utility", {}).get(col[len("auroc."):], {}).get(trend_key, {})
      label = evaluator
      if trend.get("slope") is not None:
        lo, hi = x.min(), x.max()
        if against == "compute":
          xs = np.geomspace(lo, hi, 50)
          ax.plot(xs, trend["intercept"] + trend["slope"] * np.log10(xs), color=colour, lw=1)
        else:
          xs = np.linspace(lo, hi, 50)
          ax.plot(xs, trend["intercept"] + trend["slope"] * xs, color=colour, lw=1)
        unit = "per decade" if against == "compute" else "per nat"
        label += f" ({trend['slope']:+.3f} {unit}" + (f", r={trend['r']:.2f})" if trend.get("r") is not None else ")")
      ax.scatter(x, y, color=colour, marker=EVALUATOR_MARKERS.get(evaluator, "D"), s=25, label=label, zorder=3)
    if against == "compute":
      ax.set_xscale("log")
      ax.set_xlabel("training compute C (FLOPs)")
    else:
      ax.set_xlabel(loss_label)
      ax.invert_xaxis()  # lower loss to the right, like more compute
    ax.set_ylabel("AUROC")
    ax.set_title(task)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
  fig.suptitle("Clinical utility vs " + ("compute" if against == "compute" else "validation loss"))
  fig.tight_layout()
  return _save(fig, path)


def plot_all(workdir: str, rows: list[dict], fits: dict) -> list[str]:
  """Every plot that the runs table supports, in WORKDIR/plots/; returns the PNG paths."""
  settings = fits.get("settings", {})
  loss_key = settings.get("loss_key", "val_loss")
  runs = fit_lib.finished_runs(rows, loss_key=loss_key, n_key=settings.get("n_key", "params_nonembed"))
  loss_label = {"val_loss": "validation loss (nats/token)", "train_loss": "train loss (nats/token)"}.get(
      loss_key, loss_key)
  out_dir = os.path.join(workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  names = dict(zip(("isoflop", "optimal", "loss", "auroc_c", "auroc_l"), PLOT_NAMES))
  paths = [
      plot_isoflops(os.path.join(out_dir, names["isoflop"]), runs, fits, loss_label),
      plot_optimal_n_d(os.path.join(out_dir, names["optimal"]), fits),
      plot_loss_vs_compute(os.path.join(out_dir, names["loss"]), runs, fits, loss_label),
  ]
  if fit_lib.auroc_columns(runs):
    paths.append(plot_auroc(os.path.join(out_dir, names["auroc_c"]), runs, fits, against="compute",
                            loss_label=loss_label))
    paths.append(plot_auroc(os.path.join(out_dir, names["auroc_l"]), runs, fits, against="val_loss",
                            loss_label=loss_label))
  return paths
