"""Intervals every capability reports: Wilson intervals for accuracies, percentile bootstrap
intervals for means, and paired bootstrap differences between two systems scored on the same items.

One implementation each, shared by the MCQA/RL evaluations, the segmentation metrics and the
vision-language experiments (they re-export these names). NumPy only; deterministic given `seed`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

Z_95 = 1.959963984540054  # two-sided 95% standard normal quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
  """Wilson score interval of a binomial proportion (95% for the default z); (nan, nan) when n = 0."""
  if n <= 0:
    return float("nan"), float("nan")
  if not 0 <= successes <= n:
    raise ValueError(f"successes must be in [0, n={n}], got {successes}")
  p = successes / n
  z2 = z * z
  denom = 1.0 + z2 / n
  center = (p + z2 / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
  return max(0.0, center - half), min(1.0, center + half)


def _bootstrap_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
  """[n_boot] means of resamples (with replacement) of `values`, drawn in chunks to bound memory."""
  n = values.size
  chunk = max(1, (1 << 22) // max(n, 1))
  out = np.empty(n_boot, np.float64)
  for start in range(0, n_boot, chunk):
    stop = min(start + chunk, n_boot)
    idx = rng.integers(0, n, size=(stop - start, n))
    out[start:stop] = values[idx].mean(axis=1)
  return out


def bootstrap_mean_ci(values: Any, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
  """Mean of the finite `values` and its percentile bootstrap interval.

  NaN values are dropped first (and counted as `n_undefined`). Returns {"mean", "lo", "hi", "n",
  "n_undefined"}; with no finite value the figures are NaN. Deterministic given `seed`.
  """
  if int(n_boot) < 1:
    raise ValueError(f"n_boot={n_boot}; give at least 1 bootstrap resample (1000 is usual)")
  v = np.asarray(values, np.float64).reshape(-1)
  finite = v[np.isfinite(v)]
  out = {"mean": math.nan, "lo": math.nan, "hi": math.nan, "n": int(finite.size),
         "n_undefined": int(v.size - finite.size)}
  if finite.size == 0:
    return out
  means = _bootstrap_means(finite, int(n_boot), np.random.default_rng(seed))
  alpha = (1.0 - level) / 2.0
  lo, hi = np.percentile(means, [100 * alpha, 100 * (1 - alpha)])
  out.update(mean=float(finite.mean()), lo=float(lo), hi=float(hi))
  return out


def paired_difference(a: Any, b: Any, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, Any]:
  """Mean of a - b over the same items with a paired percentile bootstrap interval.

  `a` and `b` are per-item values in the same item order (Dice of one checkpoint under two attention
  modes, 0/1 correctness of two input conditions on the same questions). Items where either value is
  NaN are dropped and counted (`n_excluded`). Returns {"mean", "lo", "hi", "n", "n_excluded",
  "mean_a", "mean_b"}; an interval excluding 0 marks a difference the resampling supports at that level.
  """
  x = np.asarray(a, np.float64).reshape(-1)
  y = np.asarray(b, np.float64).reshape(-1)
  if x.shape != y.shape:
    raise ValueError(f"paired difference needs the same images on both sides; got {x.size} and {y.size} values")
  ok = np.isfinite(x) & np.isfinite(y)
  stats = bootstrap_mean_ci(x[ok] - y[ok], n_boot=n_boot, seed=seed, level=level)
  return {"mean": stats["mean"], "lo": stats["lo"], "hi": stats["hi"], "n": stats["n"],
          "n_excluded": int(x.size - ok.sum()),
          "mean_a": float(x[ok].mean()) if ok.any() else math.nan,
          "mean_b": float(y[ok].mean()) if ok.any() else math.nan}
