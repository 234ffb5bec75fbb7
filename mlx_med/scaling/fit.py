"""Scaling-law fits of an IsoFLOP sweep: compute-optimal model and data size, loss surface, clinical utility.

Input is the sweep's runs table (one row per (budget, size) run; columns in `REQUIRED_COLUMNS` plus optional
`auroc.<task>.<evaluator>`), as a list of dicts whose values may be numbers or the strings read from runs.csv.
Only rows with status "done" are fitted (a table without a status column counts every row as done).

Approach 2 (Hoffmann et al. 2022, "Chinchilla"): for every budget C, a least-squares parabola of the loss in
x = ln N; its vertex is N_opt(C), and D_opt(C) = C / flops_per_token(N_opt), flops_per_token interpolated
linearly in (ln N, ln flops_per_token) between the budget's own runs (C / (6 N_opt) when the table has no
flops_per_token column; `d_opt_method` says which). The power laws ln N_opt = log_k + a ln C and
ln D_opt = log_k + b ln C are least-squares lines over the budgets whose vertex lies inside their own size
range ("interior": true); a vertex outside that range is an extrapolation, so such a budget is flagged and,
unless `interior_only=False`, left out of the power law. 95% intervals: percentile bootstrap that resamples
the runs of every budget with replacement and refits everything (fixed seed, so the figures are reproducible).

Known limits of approach 2, measured on noise-free synthetic surfaces by others: the parabola is only a
second-order approximation of an asymmetric IsoFLOP curve, so a wide size grid, a grid not centred on the
optimum, or alpha far from beta bias N_opt; a bias that is the same factor at every budget moves log_k but
not the exponent. Approach 3 has no such bias, which is why both are reported.

Approach 3 (Chinchilla's parametric fit): L(N, D) = E + A / N^alpha + B / D^beta, fitted by minimising the sum
over runs of Huber_delta(LSE(a - alpha ln N, b - beta ln D, e) - ln L) with delta = 1e-3, from a grid of
starting points with scipy's L-BFGS-B and an exact gradient (the objective is a sum, not a mean, and the
tolerances are tight: a replication of the original fit traced its early stopping to a badly scaled
objective). E = exp(e), A = exp(a), B = exp(b); with C = 6 N D the optimum is N_opt ∝ C^(beta/(alpha+beta)),
D_opt ∝ C^(alpha/(alpha+beta)), reported as `a` and `b`.

Utility: for every auroc.<task>.<evaluator> column, least-squares lines of AUROC against log10(compute),
log10(N) and the validation loss, with Pearson's r.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

REQUIRED_COLUMNS = ("run", "budget")
HUBER_DELTA = 1e-3
# Starting points of approach 3: Chinchilla's grid (4,500 points). Each is scored by the objective (one
# vectorised pass) and L-BFGS-B runs from the best APPROACH3_STARTS of them: running it from all 4,500
# takes minutes. On simulated sweeps (3-4 budgets x 5-7 sizes, 0.3-1% noise) the best-scored 19 or more
# starts all reached the global minimum, while about a third of random grid points stopped in local ones.
STARTS_GRID = {
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}
APPROACH3_STARTS = 32
# References drawn beside the fit: the EHR scaling paper (MIMIC-IV) and Chinchilla.
PAPER_EXPONENTS = {"a": 0.58, "b": 0.44}
CHINCHILLA_EXPONENTS = {"a": 0.5, "b": 0.5}


# ---------------------------------------------------------------------------------------------- input checks


def _number(row: dict, key: str, *, positive: bool = True) -> float:
  run = row.get("run", "?")
  if key not in row or row[key] is None or (isinstance(row[key], str) and not row[key].strip()):
    raise ValueError(f"run {run}: the runs table has no value in column {key!r}; "
                     f"rerun the sweep's summary or drop the run (columns: {sorted(row)}).")
  try:
    value = float(row[key])
  except (TypeError, ValueError):
    raise ValueError(f"run {run}: column {key!r} = {row[key]!r} is not a number.") from None
  if not math.isfinite(value):
    raise ValueError(f"run {run}: column {key!r} is {value} (diverged or unfinished run?); "
                     f"fix the run or mark it status=failed.")
  if positive and value <= 0:
    raise ValueError(f"run {run}: column {key!r} = {value:g} must be > 0.")
  return value


def auroc_columns(rows: Iterable[dict]) -> list[str]:
  """The auroc.<task>.<evaluator> columns present in any row, sorted."""
  names = set()
  for row in rows:
    names.update(k for k in row if k.startswith("auroc.") and k.count(".") >= 2)
  return sorted(names)


def finished_runs(rows: list[dict], *, loss_key: str = "val_loss", n_key: str = "params_nonembed") -> list[dict]:
  """The "done" rows, with the columns the fits use checked and converted to float.

  Each returned dict has budget, n, loss, flops_per_token (None when the table has no such column), tokens
  and compute (None when absent), and the auroc columns (None when empty), plus the original run id.
  """
  if not isinstance(rows, (list, tuple)) or not rows:
    raise ValueError("the runs table is empty; run the sweep first (mlx-med scaling run).")
  done = [r for r in rows if str(r.get("status", "done")).strip() == "done"]
  if not done:
    raise ValueError(f"none of the {len(rows)} runs has status 'done'; finish the sweep before fitting.")
  for key in (*REQUIRED_COLUMNS, n_key, loss_key):
    missing = [r.get("run", "?") for r in done if key not in r]
    if missing:
      raise ValueError(f"the runs table has no column {key!r} (e.g. run {missing[0]}); "
                       f"it needs {', '.join((*REQUIRED_COLUMNS, n_key, loss_key))}.")
  has_fpt = all(r.get("flops_per_token") not in (None, "") for r in done)
  aurocs = auroc_columns(done)
  out = []
  for r in done:
    item = {
        "run": str(r["run"]),
        "budget": _number(r, "budget"),
        "n": _number(r, n_key),
        "loss": _number(r, loss_key),
        "flops_per_token": _number(r, "flops_per_token") if has_fpt else None,
        "tokens": _number(r, "tokens") if r.get("tokens") not in (None, "") else None,
        "compute": _number(r, "compute") if r.get("compute") not in (None, "") else None,
    }
    for col in aurocs:
      v = r.get(col)
      if v is None or (isinstance(v, str) and not v.strip()):
        item[col] = None
      else:
        item[col] = _number(r, col, positive=False)
        if not 0.0 <= item[col] <= 1.0:
          raise ValueError(f"run {item['run']}: column {col!r} = {item[col]:g} is not an AUROC in [0, 1].")
    out.append(item)
  return out


def group_by_budget(runs: list[dict]) -> dict[float, list[dict]]:
  """Runs per budget (ascending), each list sorted by N; a budget needs >= 3 distinct sizes."""
  groups: dict[float, list[dict]] = {}
  for r in runs:
    groups.setdefault(r["budget"], []).append(r)
  for budget, group in groups.items():
    group.sort(key=lambda r: r["n"])
    sizes = sorted({r["n"] for r in group})
    if len(sizes) < 3:
      raise ValueError(f"budget {budget:.3g} has {len(sizes)} finished size(s) "
                       f"({', '.join(f'{n:.3g}' for n in sizes)}); a parabola needs >= 3 — add sizes to "
                       f"that budget's grid or drop the budget.")
  return dict(sorted(groups.items()))


# ------------------------------------------------------------------------------------------------ approach 2


def _one_blas_thread():
  """The fits are thousands of tiny linear-algebra calls (5 unknowns, a few dozen runs): a multi-threaded
  BLAS spends far longer waking its threads than computing, 20x longer on a busy 2-core machine."""
  import scipy.optimize  # noqa: F401  (loads scipy's own BLAS, which the limit only reaches once loaded)
  try:
    from threadpoolctl import threadpool_limits
  except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn, a core dependency
    return contextlib.nullcontext()
  return threadpool_limits(limits=1, user_api="blas")


def fit_parabola(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float | None]:
  """Least-squares y = c2 x^2 + c1 x + c0; returns ([c2, c1, c0], vertex x or None when not convex)."""
  coef = np.polyfit(np.asarray(x, float), np.asarray(y, float), 2)
  c2, c1, _ = coef
  return coef, (float(-c1 / (2 * c2)) if c2 > 0 else None)


def _interp_loglog(x: np.ndarray, y: np.ndarray, x0: float) -> float:
  """Piecewise-linear ln y over ln x at ln x0, continuing the end segments outside the range."""
  lx, ly = np.log(x), np.log(y)
  i = int(np.clip(np.searchsorted(lx, np.log(x0)), 1, len(lx) - 1))
  t = (math.log(x0) - lx[i - 1]) / (lx[i] - lx[i - 1])
  return float(math.exp(ly[i - 1] + t * (ly[i] - ly[i - 1])))


def _budget_optimum(budget: float, group: list[dict]) -> dict:
  x = np.log([r["n"] for r in group])
  y = np.array([r["loss"] for r in group])
  coef, vertex = fit_parabola(x, y)
  if vertex is None:  # concave or flat: no minimum, report the best run so plots have a point
    best = group[int(np.argmin(y))]
    n_opt, loss_opt, interior, convex = best["n"], best["loss"], False, False
  else:
    n_opt, loss_opt = math.exp(vertex), float(np.polyval(coef, vertex))
    interior, convex = bool(x.min() <= vertex <= x.max()), True
  if group[0]["flops_per_token"] is not None:
    # Sizes may repeat within a budget (reruns); interpolate over the distinct ones.
    by_n = {r["n"]: r["flops_per_token"] for r in group}
    ns = np.array(sorted(by_n))
    fpt = _interp_loglog(ns, np.array([by_n[n] for n in ns]), n_opt)
  else:
    fpt = 6.0 * n_opt
  return {"budget": budget, "n_opt": n_opt, "d_opt": budget / fpt, "loss_opt": loss_opt,
          "coef": [float(c) for c in coef], "interior": interior, "convex": convex,
          "num_runs": len(group), "n_range": [float(group[0]["n"]), float(group[-1]["n"])]}


def fit_power_law(c: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  """Least-squares ln y = log_k + slope ln c; returns (log_k, slope)."""
  slope, log_k = np.polyfit(np.log(c), np.log(y), 1)
  return float(log_k), float(slope)


def _power_laws(per_budget: list[dict], interior_only: bool) -> tuple[list[dict], tuple | None, tuple | None]:
  used = [p for p in per_budget if p["convex"] and (p["interior"] or not interior_only)]
  if len({p["budget"] for p in used}) < 2:
    return used, None, None
  c = np.array([p["budget"] for p in used])
  return (used, fit_power_law(c, np.array([p["n_opt"] for p in used])),
          fit_power_law(c, np.array([p["d_opt"] for p in used])))


def _bootstrap(groups: dict[float, list[dict]], budgets: list[float], replicates: int,
               seed: int) -> tuple[np.ndarray, int]:
  """(a, b) from `replicates` resamples of each used budget's runs; returns the kept pairs and the dropped count.

  A resample with fewer than 3 distinct sizes in a budget is drawn again (the parabola needs them); a
  replicate where any budget's parabola has no minimum is dropped and counted.
  """
  rng = np.random.default_rng(seed)
  kept, dropped = [], 0
  for _ in range(replicates):
    optima = []
    for budget in budgets:
      group = groups[budget]
      for _attempt in range(1000):
        sample = [group[i] for i in rng.integers(0, len(group), len(group))]
        if len({r["n"] for r in sample}) >= 3:
          break
      else:  # pragma: no cover - needs a budget whose sizes almost all coincide
        raise ValueError(f"budget {budget:.3g}: cannot draw a resample with 3 distinct sizes.")
      sample.sort(key=lambda r: r["n"])
      optima.append(_budget_optimum(budget, sample))
    if not all(p["convex"] for p in optima):
      dropped += 1
      continue
    c = np.array(budgets)
    kept.append((fit_power_law(c, np.array([p["n_opt"] for p in optima]))[1],
                 fit_power_law(c, np.array([p["d_opt"] for p in optima]))[1]))
  return np.array(kept).reshape(-1, 2), dropped


def approach2(runs: list[dict], *, bootstrap: int = 1000, seed: int = 0, interior_only: bool = True) -> dict:
  groups = group_by_budget(runs)
  per_budget = [_budget_optimum(b, g) for b, g in groups.items()]
  has_fpt = all(r["flops_per_token"] is not None for r in runs)
  used, n_law, d_law = _power_laws(per_budget, interior_only)
  out: dict[str, Any] = {
      "per_budget": per_budget,
      "d_opt_method": ("C / flops_per_token(N_opt), flops_per_token interpolated in ln N within the budget"
                       if has_fpt else "C / (6 N_opt) (the runs table has no flops_per_token column)"),
      "power_law_budgets": [p["budget"] for p in used],
      "power_law_rule": ("budgets whose parabola vertex lies inside their size range" if interior_only
                         else "every budget whose parabola has a minimum, interior or not"),
      "a": None, "a_ci": None, "b": None, "b_ci": None, "n_opt_coef": None, "d_opt_coef": None,
      "bootstrap": {"replicates": int(bootstrap), "kept": 0, "dropped_no_minimum": 0, "seed": int(seed),
                    "method": "percentile; runs resampled with replacement within each budget"},
      "warnings": [],
  }
  outside = [p["budget"] for p in per_budget if not p["interior"]]
  if outside:
    out["warnings"].append(
        "budget(s) " + ", ".join(f"{b:.3g}" for b in outside) + " have their loss minimum outside the sizes "
        "trained (or no minimum): widen or shift those budgets' size grids"
        + (" (left out of the power law)." if interior_only else "."))
  if n_law is None:
    out["warnings"].append(f"only {len(used)} budget(s) usable for the power law; it needs >= 2, so a and b "
                           f"are not fitted.")
    return out
  out["n_opt_coef"], out["a"] = list(n_law), n_law[1]
  out["d_opt_coef"], out["b"] = list(d_law), d_law[1]
  if bootstrap > 0:
    with _one_blas_thread():
      pairs, dropped = _bootstrap(groups, [p["budget"] for p in used], bootstrap, seed)
    out["bootstrap"].update(kept=len(pairs), dropped_no_minimum=int(dropped))
    if len(pairs) >= 20:
      out["a_ci"] = [float(v) for v in np.percentile(pairs[:, 0], [2.5, 97.5])]
      out["b_ci"] = [float(v) for v in np.percentile(pairs[:, 1], [2.5, 97.5])]
    else:
      out["warnings"].append(f"only {len(pairs)} bootstrap replicates had a minimum in every budget; "
                             f"no intervals reported.")
  return out


# ------------------------------------------------------------------------------------------------ approach 3


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
  """Huber value and derivative, elementwise."""
  small = np.abs(r) <= delta
  value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
  return value, np.clip(r, -delta, delta)


def chinchilla_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray,
                         delta: float = HUBER_DELTA) -> tuple[float, np.ndarray]:
  """Sum of Huber(LSE(a - alpha ln N, b - beta ln D, e) - ln L) and its gradient; theta = (a, b, e, alpha, beta)."""
  a, b, e, alpha, beta = theta
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
  top = terms.max(axis=0)
  weights = np.exp(terms - top)
  total = weights.sum(axis=0)
  lse = top + np.log(total)
  weights /= total
  value, dr = _huber(lse - log_loss, delta)
  grad = np.array([np.sum(dr * weights[0]), np.sum(dr * weights[1]), np.sum(dr * weights[2]),
                   -np.sum(dr * weights[0] * log_n), -np.sum(dr * weights[1] * log_d)])
  return float(value.sum()), grad


def _start_grid(grid: dict) -> np.ndarray:
  return np.array(list(itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"])), float)


def _score_starts(thetas: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray,
                  delta: float) -> np.ndarray:
  """The objective at every row of thetas (k, 5) in one vectorised pass."""
  a, b, e, alpha, beta = (thetas[:, i:i + 1] for i in range(5))
  terms = np.stack(np.broadcast_arrays(a - alpha * log_n, b - beta * log_d, e))
  lse = np.logaddexp.reduce(terms, axis=0)
  return _huber(lse - log_loss, delta)[0].sum(axis=1)


def approach3(n: np.ndarray, d: np.ndarray, loss: np.ndarray, *, starts: dict | None = None,
              num_starts: int | None = APPROACH3_STARTS, delta: float = HUBER_DELTA) -> dict:
  """Chinchilla's parametric fit of L(N, D): L-BFGS-B from the best-scored starts; the lowest objective wins.

  `starts` is a grid like STARTS_GRID; `num_starts=None` runs the optimiser from every grid point.
  """
  from scipy.optimize import minimize

  log_n, log_d, log_loss = np.log(n), np.log(d), np.log(loss)
  grid = _start_grid(starts or STARTS_GRID)
  scores = _score_starts(grid, log_n, log_d, log_loss, delta)
  order = np.argsort(scores, kind="stable")
  chosen = grid[order[:num_starts]] if num_starts else grid[order]
  best = None
  with _one_blas_thread():
    for theta0 in chosen:
      res = minimize(chinchilla_objective, theta0, args=(log_n, log_d, log_loss, delta), jac=True,
                     method="L-BFGS-B", options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
      if np.all(np.isfinite(res.x)) and np.isfinite(res.fun) and (best is None or res.fun < best.fun):
        best = res
  if best is None:
    raise ValueError("approach 3: the optimiser found no finite fit from any starting point; check the losses.")
  a, b, e, alpha, beta = (float(v) for v in best.x)
  total = alpha + beta
  return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta,
          "a": beta / total if total > 0 else None, "b": alpha / total if total > 0 else None,
          "huber_delta": delta, "loss": float(best.fun), "starts_scored": len(grid),
          "starts_optimised": len(chosen), "converged": bool(best.success), "d_key": "tokens",
          "exponents_assume": "C = 6 N D"}


def chinchilla_optimum(fit3: dict, compute: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(N_opt, D_opt, L_opt) of an approach-3 surface under C = 6 N D (closed form)."""
  alpha, beta, big_a, big_b = fit3["alpha"], fit3["beta"], fit3["A"], fit3["B"]
  g = (alpha * big_a / (beta * big_b)) ** (1.0 / (alpha + beta))
  c6 = np.asarray(compute, float) / 6.0
  n_opt = g * c6 ** (beta / (alpha + beta))
  d_opt = c6 / n_opt
  return n_opt, d_opt, fit3["E"] + big_a / n_opt ** alpha + big_b / d_opt ** beta


# ------------------------------------------------------------------------------------------------- utility


def _line(x: np.ndarray, y: np.ndarray) -> dict:
  if len(x) < 3 or np.ptp(x) == 0:
    return {"slope": None, "intercept": None, "r": None, "n": len(x)}
  slope, intercept = np.polyfit(x, y, 1)
  r = float(np.corrcoef(x, y)[0, 1]) if np.ptp(y) > 0 else None
  return {"slope": float(slope), "intercept": float(intercept), "r": r, "n": len(x)}


def utility_trends(runs: list[dict]) -> dict:
  out = {}
  for col in auroc_columns(runs):
    have = [r for r in runs if r.get(col) is not None]
    auroc = np.array([r[col] for r in have])
    compute = np.array([r["compute"] if r["compute"] is not None else r["budget"] for r in have])
    out[col[len("auroc."):]] = {
        "vs_log_compute": _line(np.log10(compute), auroc),
        "vs_log_params": _line(np.log10([r["n"] for r in have]), auroc),
        "vs_val_loss": _line(np.array([r["loss"] for r in have]), auroc),
    }
  return out


# ---------------------------------------------------------------------------------------------------- entry


def fit_scaling(rows: list[dict], *, loss_key: str = "val_loss", n_key: str = "params_nonembed",
                bootstrap: int = 1000, seed: int = 0, interior_only: bool = True,
                starts: dict | None = None, num_starts: int | None = APPROACH3_STARTS) -> dict:
  """Approach 2, approach 3 and utility trends of a runs table (see the module docstring); JSON-able."""
  runs = finished_runs(rows, loss_key=loss_key, n_key=n_key)
  fit2 = approach2(runs, bootstrap=bootstrap, seed=seed, interior_only=interior_only)
  tokens = [r["tokens"] for r in runs]
  warnings = list(fit2["warnings"])
  if all(t is not None for t in tokens):
    fit3 = approach3(np.array([r["n"] for r in runs]), np.array(tokens), np.array([r["loss"] for r in runs]),
                     starts=starts, num_starts=num_starts)
    if len({r["budget"] for r in runs}) < 2:
      # Along one budget D = C / (6 N): N and D move together and alpha, beta cannot be told apart.
      warnings.append("approach 3 on a single budget cannot separate the N and D terms; its parameters are "
                      "not identified (add budgets).")
  else:
    fit3 = None
    warnings.append("the runs table has no tokens column; approach 3 needs it and was skipped.")
  return _jsonable({
      "settings": {"loss_key": loss_key, "n_key": n_key, "compute_key": "budget", "bootstrap": bootstrap,
                   "seed": seed, "interior_only": interior_only},
      "num_runs": len(runs),
      "skipped_runs": [str(r.get("run", "?")) for r in rows if str(r.get("status", "done")).strip() != "done"],
      "approach2": fit2,
      "approach3": fit3,
      "utility": utility_trends(runs),
      "reference_exponents": {"ehr_paper": PAPER_EXPONENTS, "chinchilla": CHINCHILLA_EXPONENTS},
      "warnings": warnings,
  })


def _jsonable(obj):
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (np.floating, float)):
    return float(obj) if math.isfinite(obj) else None
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, np.bool_):
    return bool(obj)
  return obj


def write_fits(workdir: str, rows: list[dict], **kwargs) -> dict:
  """fit_scaling(rows) written to WORKDIR/fits.json (through a temporary file, so readers never see half)."""
  fits = fit_scaling(rows, **kwargs)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "fits.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(fits, f, indent=2, allow_nan=False)
    f.write("\n")
  os.replace(tmp, path)
  return fits
