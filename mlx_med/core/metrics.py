"""Run metrics: JSONL (always), TensorBoard (tensorboardX), and progress (a bar on a
terminal, or one plain log line per log interval for batch jobs).

Only scalars are logged; no patient records ever reach a log line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np

log = logging.getLogger("mlx_med.train")


class MetricsWriter:
  """Appends {"step": s, **scalars} lines to metrics.jsonl and mirrors them to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True, purge_step: int | None = None):
    """`purge_step`: on resume, the first step that will be logged again. TensorBoard then
    hides the events at and after it from the earlier run (as metrics.jsonl is truncated)."""
    self.enabled = enabled and jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        try:
          from tensorboardX import SummaryWriter
          self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge_step)
        except ImportError:  # TensorBoard is optional; JSONL is the record
          self._tb = None

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for key, value in scalars.items():
      value = float(np.asarray(value))
      row[key] = value if math.isfinite(value) else str(value)
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for key, value in row.items():
        if key != "step" and isinstance(value, float):
          self._tb.add_scalar(key, value, step)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_metrics_after(path: str, step: int) -> None:
  """On resume, drop rows logged after the restored checkpoint (they will be redone)."""
  if not os.path.exists(path):
    return
  rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
  """Step, loss, throughput and ETA: a tqdm bar (`bar=True`), else one plain log line per update."""

  def __init__(self, total: int, initial: int = 0, bar: bool = True, desc: str = "train", unit: str = "tokens"):
    self.active = jax.process_index() == 0
    self.total, self.step = total, initial
    self.rate_label = {"tokens": "tok/s", "examples": "ex/s"}.get(unit, f"{unit}/s")
    self._start_time, self._start_step = None, initial
    self._bar = None
    if self.active and bar:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr,
                       mininterval=1.0, smoothing=0.1)

  def update(self, step: int, units_per_second: float | None = None, **scalars) -> None:
    if not self.active:
      return
    now = time.perf_counter()
    if self._start_time is None:
      self._start_time, self._start_step = now, step
    values = {k: f"{v:.4g}" for k, v in scalars.items()}
    if units_per_second:
      values[self.rate_label] = f"{units_per_second:,.0f}"
    if self._bar is not None:
      self._bar.set_postfix(values, refresh=False)
      self._bar.update(step - self.step)
    else:
      done = step - self._start_step
      eta = (now - self._start_time) / done * (self.total - step) if done > 0 else None
      fields = " ".join(f"{k} {v}" for k, v in values.items())
      log.info("step %d/%d (%d%%) %s%s", step, self.total, 100 * step // max(self.total, 1), fields,
               f" ETA {_duration(eta)}" if eta is not None else "")
    self.step = step

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
