"""IsoFLOP sweeps: for each FLOP budget C and model size N, train a decoder on D = C / F(N) tokens.

F(N) is the exact training FLOPs per token the platform counts (`core/flops.py`: every
matmul of forward + backward, attention included, LM head included); 6N is reported
beside it. Every run is an ordinary EHR pretraining run (the same trainer, data and
checkpoints as `mlx-med train --config configs/ehr/pretrain.py`) with its own cosine
schedule fitted to its own length, in WORKDIR/runs/<run id>/. The data (cohort,
vocabulary, token cache) is prepared once in WORKDIR/data/ and shared by every run.

Sizes follow one documented rule (`model_for_width`): the grid lists widths d_model;
depth = clip(round(d_model / aspect_ratio), min_layers, max_layers); heads = d_model /
head_dim; kv heads = heads / kv_group; mlp = mlp_ratio * d_model rounded up to 16.

`run_sweep` is resumable: a finished run (result.json) is skipped, an interrupted one
resumes from its newest checkpoint. `emit_jobs` writes one command per pending run for
a cluster. The results table WORKDIR/runs.csv has one row per run (columns in
`RUN_COLUMNS`), rewritten atomically after every run.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import logging
import math
import os
import shlex
import time
from typing import Any, Sequence

import ml_collections

from mlx_med.core import flops as flops_lib
from mlx_med.core import trainer
from mlx_med.core.lm_task import DecoderLMTask
from mlx_med.core.transformer import DecoderConfig

log = logging.getLogger("mlx_med.scaling")

RUN_COLUMNS = ("run", "budget", "num_layers", "d_model", "num_heads", "params", "params_nonembed",
               "flops_per_token", "tokens", "compute", "compute_6nd", "steps", "train_loss", "val_loss",
               "wall_s", "status")


class SweepError(ValueError):
  """A sweep that cannot be planned or run as configured (one-line message)."""


@dataclasses.dataclass(frozen=True)
class PlannedRun:
  run_id: str
  budget: float
  model: DecoderConfig
  steps: int
  flops_per_token: float
  params: int
  params_nonembed: int

  @property
  def tokens(self) -> int:
    return self.steps * self.tokens_per_step

  tokens_per_step: int = 0


def model_for_width(d_model: int, sweep: ml_collections.ConfigDict, base_model: ml_collections.ConfigDict,
                    vocab_size: int, seq_len: int) -> DecoderConfig:
  """The size rule of the sweep (see the module docstring)."""
  head_dim = int(sweep.head_dim)
  if d_model % head_dim:
    raise SweepError(f"sweep.widths has d_model={d_model}, not a multiple of sweep.head_dim={head_dim}")
  heads = d_model // head_dim
  kv_group = int(sweep.kv_group)
  if heads % kv_group:
    raise SweepError(f"d_model={d_model} gives {heads} heads, not divisible by sweep.kv_group={kv_group}")
  layers = min(max(round(d_model / float(sweep.aspect_ratio)), int(sweep.min_layers)), int(sweep.max_layers))
  mlp = int(math.ceil(float(sweep.mlp_ratio) * d_model / 16) * 16)
  values = dict(base_model)
  values.update(vocab_size=vocab_size, num_layers=layers, d_model=d_model, num_heads=heads,
                num_kv_heads=heads // kv_group, mlp_dim=mlp, head_dim=None, max_seq_len=seq_len)
  return DecoderConfig.from_config(values)


def count_params(cfg: DecoderConfig) -> tuple[int, int]:
  """(all parameters, parameters without the embedding table and LM head)."""
  d, hd = cfg.d_model, cfg.resolved_head_dim
  attn = d * hd * (cfg.num_heads + 2 * cfg.num_kv_heads) + cfg.num_heads * hd * d
  if cfg.qkv_bias:
    attn += hd * (cfg.num_heads + 2 * cfg.num_kv_heads)
  if cfg.qk_norm:
    attn += 2 * hd
  layer = attn + 3 * d * cfg.mlp_dim + 2 * d
  nonembed = cfg.num_layers * layer + d  # + final norm
  embed = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
  return nonembed + embed, nonembed


def _run_id(budget: float, cfg: DecoderConfig) -> str:
  return f"C{budget:.2e}_L{cfg.num_layers}_d{cfg.d_model}".replace("+", "")


def plan(config: ml_collections.ConfigDict, vocab_size: int) -> list[PlannedRun]:
  """Every (budget, width) run with its exact token budget; refuses budgets too small for a model."""
  sweep, seq_len, batch = config.sweep, int(config.data.seq_len), int(config.train.batch_size)
  budgets = [float(b) for b in sweep.budgets]
  widths = [int(w) for w in sweep.widths]
  if not budgets or not widths:
    raise SweepError("sweep.budgets and sweep.widths must each list at least one value")
  if len(widths) < 3:
    raise SweepError(f"sweep.widths lists {len(widths)} sizes; an IsoFLOP parabola needs at least 3")
  runs = []
  for budget in sorted(budgets):
    for width in sorted(widths):
      cfg = model_for_width(width, sweep, config.model, vocab_size, seq_len)
      fpt = flops_lib.train_flops_per_token(cfg, seq_len)
      steps = int(round(budget / fpt / (batch * seq_len)))
      if steps < int(sweep.min_steps):
        raise SweepError(
            f"budget {budget:.3g} FLOPs gives the d_model={width} model ({fpt:.3g} FLOPs/token) only {steps} steps of "
            f"{batch}x{seq_len} tokens (sweep.min_steps={int(sweep.min_steps)}); raise the budget to at least "
            f"{int(sweep.min_steps) * batch * seq_len * fpt:.3g} or drop the larger widths")
      params, nonembed = count_params(cfg)
      runs.append(PlannedRun(_run_id(budget, cfg), budget, cfg, steps, fpt, params, nonembed, batch * seq_len))
  return runs


def run_config(config: ml_collections.ConfigDict, run: PlannedRun, data_paths: tuple[str, str, str]
               ) -> ml_collections.ConfigDict:
  """The EHR pretraining config of one run: the sweep's data, this run's model and length."""
  meds_root, vocab_path, cache_dir = data_paths
  cfg = ml_collections.ConfigDict(copy.deepcopy(config.to_dict()))
  cfg.task = "ehr_pretrain"
  del cfg["sweep"]
  if "evaluation" in cfg:
    del cfg["evaluation"]
  cfg.data.update(meds_root=meds_root, vocab_path=vocab_path, cache_dir=cache_dir)
  m = run.model
  cfg.model.update(num_layers=m.num_layers, d_model=m.d_model, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                   mlp_dim=m.mlp_dim, vocab_size=m.vocab_size)
  t = cfg.train
  t.steps = run.steps
  t.warmup_steps = max(1, min(int(config.train.warmup_steps), run.steps // 10))
  t.eval_every = run.steps  # one full evaluation at the end (eval_batches=0: the whole split)
  t.ckpt_every = max(int(config.train.ckpt_every), 1)
  t.log_every = max(1, min(int(config.train.log_every), run.steps))
  return cfg


def read_runs(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  for row in rows:
    for k, v in row.items():
      if k not in ("run", "status") and v not in ("", None):
        row[k] = float(v)
  return rows


def write_runs(path: str, rows: Sequence[dict]) -> None:
  columns = list(RUN_COLUMNS) + sorted({k for r in rows for k in r} - set(RUN_COLUMNS))
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: row.get(k, "") for k in columns})
  os.replace(tmp, path)


def _row(run: PlannedRun, result: dict | None) -> dict:
  row = {"run": run.run_id, "budget": run.budget, "num_layers": run.model.num_layers, "d_model": run.model.d_model,
         "num_heads": run.model.num_heads, "params": run.params, "params_nonembed": run.params_nonembed,
         "flops_per_token": run.flops_per_token, "tokens": run.tokens, "compute": run.tokens * run.flops_per_token,
         "compute_6nd": 6.0 * run.params_nonembed * run.tokens, "steps": run.steps, "status": "pending"}
  if result:
    row.update(result)
  return row


class Sweep:
  """A sweep in WORKDIR: its plan, shared data and per-run results."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, progress: bool = True):
    self.config, self.workdir, self.progress = config, os.path.abspath(workdir), progress
    self.data_dir = os.path.join(self.workdir, "data")
    self.runs_csv = os.path.join(self.workdir, "runs.csv")
    self._data = None

  # Data is prepared once, with the pretraining code, under WORKDIR/data.
  def data(self):
    if self._data is None:
      from mlx_med.ehr import pretrain
      data_cfg = ml_collections.ConfigDict(copy.deepcopy(self.config.to_dict()))
      self._data = pretrain.prepare_data(data_cfg, self.data_dir, self.progress)
    return self._data

  def data_paths(self) -> tuple[str, str, str]:
    from mlx_med.ehr import pretrain
    return tuple(os.path.abspath(p) for p in pretrain.resolve_paths(self.config, self.data_dir))

  def vocab_size(self) -> int:
    from mlx_med.ehr import pretrain
    return pretrain.padded_vocab_size(self.config, self.data().tokenizer.vocab_size)

  def plan(self) -> list[PlannedRun]:
    return plan(self.config, self.vocab_size())

  def run_dir(self, run: PlannedRun) -> str:
    return os.path.join(self.workdir, "runs", run.run_id)

  def result(self, run: PlannedRun) -> dict | None:
    path = os.path.join(self.run_dir(run), "result.json")
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def rows(self, runs: Sequence[PlannedRun] | None = None) -> list[dict]:
    return [_row(r, self.result(r)) for r in (runs or self.plan())]

  def train_one(self, run: PlannedRun, allow_config_change: bool = False,
                callbacks: Sequence[trainer.StepCallback] = ()) -> dict:
    data = self.data()
    cfg = run_config(self.config, run, self.data_paths())
    workdir = self.run_dir(run)
    start = time.perf_counter()
    task = DecoderLMTask(run.model, seq_len=int(cfg.data.seq_len))
    run_trainer = trainer.Trainer(cfg, workdir, task, data.train_source, data.eval_source, progress=self.progress,
                                  allow_config_change=allow_config_change, callbacks=callbacks)
    result = run_trainer.run()
    train_loss, val_loss = result.final_loss, result.eval_loss
    if train_loss is None or val_loss is None:  # the run had finished training before an interruption
      rows = trainer.metrics_lib.read_metrics(run_trainer.metrics_path)
      train_loss = next((r["loss"] for r in reversed(rows) if "loss" in r), None)
      val_loss = (run_trainer.evaluate() or {}).get("eval_loss")
    out = {"train_loss": train_loss, "val_loss": val_loss, "wall_s": time.perf_counter() - start, "status": "done"}
    evaluation = self.config.get("evaluation")
    if evaluation is not None and evaluation.get("tasks"):
      out.update(self.evaluate_one(run))
    tmp = os.path.join(workdir, "result.json.tmp")
    with open(tmp, "w") as f:
      json.dump(out, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(workdir, "result.json"))
    return out

  def evaluate_one(self, run: PlannedRun) -> dict:
    """Clinical-utility columns auroc.<task>.<evaluator> for one finished run."""
    from mlx_med.ehr import evaluate
    e = self.config.evaluation
    report = evaluate.evaluate_run(self.run_dir(run), tasks=tuple(e.tasks), evaluators=tuple(e.evaluators),
                                   num_trajectories=int(e.num_trajectories), max_examples=int(e.max_examples) or None,
                                   seed=int(self.config.seed))
    cols = {}
    for task, per_task in report["tasks"].items():
      for evaluator in e.evaluators:
        if evaluator in per_task:
          cols[f"auroc.{task}.{evaluator}"] = per_task[evaluator]["auroc"]
      if per_task.get("oracle_auroc") is not None:
        cols[f"auroc.{task}.oracle"] = per_task["oracle_auroc"]
    return cols

  def run(self, only: Sequence[str] = (), allow_config_change: bool = False,
          callbacks: Sequence[trainer.StepCallback] = ()) -> list[dict]:
    """Trains every pending run of the plan (or only the named ones); returns the table."""
    runs = self.plan()
    known = {r.run_id for r in runs}
    unknown = sorted(set(only) - known)
    if unknown:
      raise SweepError(f"--only {unknown}: not runs of this sweep; known: {sorted(known)}")
    todo = [r for r in runs if (not only or r.run_id in only)]
    done = [r for r in todo if self.result(r) is not None]
    if done:
      log.info("%d of %d runs already finished; skipping them", len(done), len(todo))
    pending = [r for r in todo if self.result(r) is None]
    start = time.perf_counter()
    for i, run in enumerate(pending):
      eta = ""
      if i:
        eta = f", ETA {((time.perf_counter() - start) / i) * (len(pending) - i) / 60:.1f} min"
      log.info("run %d/%d %s: %d layers x %d, %s params (%s non-embedding), %d steps = %.3g tokens%s", i + 1,
               len(pending), run.run_id, run.model.num_layers, run.model.d_model, f"{run.params:,}",
               f"{run.params_nonembed:,}", run.steps, run.tokens, eta)
      self.train_one(run, allow_config_change, callbacks)
      write_runs(self.runs_csv, self.rows(runs))
    rows = self.rows(runs)
    write_runs(self.runs_csv, rows)
    return rows

  def emit_jobs(self, path: str, config_spec: str, overrides: Sequence[str]) -> int:
    """One `mlx-med scaling run ... --only RUN` line per pending run (for a cluster's job array)."""
    runs = self.plan()
    quoted = " ".join(shlex.quote(f"--config.{o}") for o in overrides)
    base = f"mlx-med scaling run --config {shlex.quote(config_spec)} --workdir {shlex.quote(self.workdir)}"
    base += f" {quoted}" if quoted else ""
    lines = [f"{base} --only {r.run_id}" for r in runs if self.result(r) is None]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write("".join(line + "\n" for line in lines))
    os.replace(tmp, path)
    write_runs(self.runs_csv, self.rows(runs))
    return len(lines)


def describe_plan(runs: Sequence[PlannedRun]) -> str:
  lines = []
  for r in runs:
    lines.append(f"{r.run_id}: L={r.model.num_layers} d={r.model.d_model} N={r.params:,} "
                 f"(non-emb {r.params_nonembed:,}) steps={r.steps} D={r.tokens:.3g} "
                 f"F/token={r.flops_per_token:.3g} (6N={6 * r.params_nonembed:.3g})")
  return "\n".join(lines)


def config_summary(config: ml_collections.ConfigDict) -> dict[str, Any]:
  s = config.sweep
  return {"budgets": [float(b) for b in s.budgets], "widths": [int(w) for w in s.widths],
          "seq_len": int(config.data.seq_len), "batch_size": int(config.train.batch_size)}
