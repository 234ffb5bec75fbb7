"""The training loop shared by every decoder workload (EHR pretraining, LLM SFT, ...).

One `jax.jit` step with explicit in/out shardings and donated state; params and
optimizer state are created sharded; grain feeds per-host batches; Orbax saves
state + iterator every `ckpt_every` steps and the loop resumes from the newest
checkpoint in `workdir` when restarted with the same command. Metrics go to
metrics.jsonl and TensorBoard, progress to a bar with tokens/s and ETA.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mlx_med.core import checkpoint as ckpt_lib
from mlx_med.core import data as data_lib
from mlx_med.core import flops as flops_lib
from mlx_med.core import metrics as metrics_lib
from mlx_med.core import optim
from mlx_med.core import params as params_lib
from mlx_med.core import sharding as sharding_lib
from mlx_med.core.train_step import init_train_state, make_eval_step, make_train_step
from mlx_med.core.transformer import DecoderConfig

log = logging.getLogger("mlx_med.train")

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


class NonFiniteLossError(RuntimeError):
  """Raised after `max_nan_streak` consecutive steps with NaN/Inf loss or gradients."""


@dataclasses.dataclass
class TrainResult:
  final_step: int
  final_loss: float | None
  eval_loss: float | None
  workdir: str
  state: Any = None


def mesh_from_config(config) -> tuple[jax.sharding.Mesh, sharding_lib.ShardingRules]:
  shape = {k: int(v) for k, v in config.mesh.shape.items()}
  mesh = sharding_lib.make_mesh(shape)
  rules = sharding_lib.rules_from_config(mesh, config.mesh.get("rules", ()))
  return mesh, rules


def state_shardings(model_cfg: DecoderConfig, optimizer: optax.GradientTransformation, rules, seed: int):
  """Abstract train state and its NamedShardings (params by logical axes; moments like params)."""
  p_shard = params_lib.param_shardings(model_cfg, rules)
  abstract_params = params_lib.abstract_params(model_cfg)
  abstract_state = jax.eval_shape(lambda p: init_train_state(p, optimizer, seed), abstract_params)
  replicated = rules.replicated()
  opt_shard = optax.tree_map_params(
      optimizer, lambda _, s: s, abstract_state["opt_state"], p_shard,
      transform_non_params=lambda _: replicated)
  shardings = {k: replicated for k in abstract_state}
  shardings["params"] = p_shard
  shardings["opt_state"] = opt_shard
  return abstract_state, shardings


def batch_shardings(rules) -> dict:
  return {k: rules.named(("batch", "length")) for k in BATCH_KEYS}


def plot_loss_curve(metrics_path: str, out_png: str) -> str | None:
  """Train (and eval) loss vs step as a PNG; returns its path."""
  if not os.path.exists(metrics_path):
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = metrics_lib.read_metrics(metrics_path)
  train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), float)]
  evals = [(r["step"], r["eval_loss"]) for r in rows if isinstance(r.get("eval_loss"), float)]
  fig, ax = plt.subplots(figsize=(6, 4))
  if train:
    ax.plot(*zip(*train), label="train loss")
  if evals:
    ax.plot(*zip(*evals), "o-", label="eval loss")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  tmp = out_png + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, out_png)
  return out_png


def evaluate(eval_step, params, source, config, rules, shardings) -> float | None:
  if source is None or len(source) == 0:
    return None
  t = config.train
  loader = data_lib.make_loader(source, int(t.eval_batch_size or t.batch_size), seed=0, shuffle=False, num_epochs=1)
  total, count = 0.0, 0.0
  for i, batch in enumerate(loader):
    if t.eval_batches > 0 and i >= t.eval_batches:
      break
    out = eval_step(params, data_lib.to_global(batch, shardings))
    total += float(out["loss_sum"])
    count += float(out["tokens"])
  return total / count if count else None


def train(config: ml_collections.ConfigDict, workdir: str, model_cfg: DecoderConfig, train_source,
          eval_source=None, progress: bool = True) -> TrainResult:
  """Trains (or resumes) in `workdir`. `config.train`, `config.mesh`, `config.seed` are read."""
  t = config.train
  os.makedirs(workdir, exist_ok=True)
  mesh, rules = mesh_from_config(config)
  optimizer, schedule = optim.make_optimizer(t)
  if t.batch_size % t.grad_accum:
    raise ValueError(f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}")

  abstract_state, state_sh = state_shardings(model_cfg, optimizer, rules, int(config.seed))
  b_sh = batch_shardings(rules)

  init_fn = jax.jit(lambda: init_train_state(_init_params_unjitted(model_cfg, int(config.seed)), optimizer,
                                             int(config.seed)), out_shardings=state_sh)
  step_fn = jax.jit(make_train_step(model_cfg, optimizer, schedule, int(t.grad_accum), rules),
                    in_shardings=(state_sh, b_sh), out_shardings=(state_sh, None), donate_argnums=(0,))
  eval_fn = jax.jit(make_eval_step(model_cfg, rules), in_shardings=(state_sh["params"], b_sh))

  loader = data_lib.make_loader(train_source, int(t.batch_size), seed=int(config.seed),
                                worker_count=int(config.data.get("worker_count", 0)) if "data" in config else 0)
  iterator = iter(loader)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(t.keep_checkpoints),
                                       save_every=int(t.ckpt_every), async_save=bool(t.async_checkpointing))
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  start = checkpointer.latest_step()
  if start is not None:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh)
    state = checkpointer.restore(start, abstract, iterator)
    metrics_lib.truncate_metrics_after(metrics_path, start)
    log.info("resumed from step %d in %s", start, checkpointer.directory)
  else:
    start = 0
    state = init_fn()
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  seq_len = int(getattr(train_source, "seq_len", 0)) or None
  flops_per_token = flops_lib.train_flops_per_token(model_cfg, seq_len) if seq_len else None
  peak = float(config.get("peak_flops_per_device", 0.0)) or flops_lib.device_peak_flops(model_cfg.dtype)
  n_params = params_lib.count_params(state["params"])
  if jax.process_index() == 0:
    log.info("model: %s parameters; mesh %s; %s train FLOPs/token", f"{n_params:,}", dict(mesh.shape),
             f"{flops_per_token:.3g}" if flops_per_token else "?")

  writer = metrics_lib.MetricsWriter(workdir)
  bar = metrics_lib.Progress(int(t.steps), initial=start, enabled=progress)
  stop_requested = {"flag": False}

  def on_sigterm(signum, frame):  # preemption: checkpoint at the next step boundary
    stop_requested["flag"] = True

  previous_handler = None
  try:
    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
  except ValueError:  # not in the main thread
    pass

  last_loss, eval_loss = None, None
  fault_kill_step = int(os.environ["MLX_MED_FAULT_KILL_AT_STEP"]) if os.environ.get("MLX_MED_FAULT_KILL_AT_STEP") else None
  pending = None  # metrics of the previous step, read one step late to keep dispatch async
  window_start, window_steps = time.perf_counter(), 0
  step = start
  try:
    while step < t.steps:
      batch = data_lib.to_global(next(iterator), b_sh)
      state, metrics = step_fn(state, batch)
      step += 1
      window_steps += 1
      if step == start + 1:  # leave compilation out of the throughput figures
        jax.block_until_ready(metrics)
        window_start, window_steps = time.perf_counter(), 0
      if pending is not None:
        _check_finite(pending, int(t.max_nan_streak))
      pending = metrics
      if step % t.log_every == 0 or step == t.steps:
        host = jax.device_get(metrics)
        _check_finite(host, int(t.max_nan_streak))
        now = time.perf_counter()
        elapsed = max(now - window_start, 1e-9)
        tokens_per_s = window_steps * int(t.batch_size) * (seq_len or 0) / elapsed if window_steps else 0.0
        row = {k: host[k] for k in ("loss", "grad_norm", "lr", "nan_skips") if k in host}
        row["tokens_per_s"] = tokens_per_s
        mfu = flops_lib.mfu(tokens_per_s, model_cfg, seq_len, jax.device_count(), peak) if seq_len else None
        if mfu is not None:
          row["mfu"] = mfu
        writer.write(step, row)
        last_loss = float(host["loss"])
        bar.update(step, tokens_per_s, loss=last_loss)
        window_start, window_steps = time.perf_counter(), 0
      if t.eval_every > 0 and (step % t.eval_every == 0 or step == t.steps) and eval_source is not None:
        eval_loss = evaluate(eval_fn, state["params"], eval_source, config, rules, b_sh)
        if eval_loss is not None:
          writer.write(step, {"eval_loss": eval_loss})
        window_start, window_steps = time.perf_counter(), 0
      checkpointer.save(step, state, iterator, force=(step == t.steps) or stop_requested["flag"])
      if fault_kill_step is not None and step == fault_kill_step:
        # Fault injection for the resume test: die like a preempted VM would, after the
        # last checkpoint is durable but with unsaved steps since.
        checkpointer.wait()
        os.kill(os.getpid(), signal.SIGKILL)
      if stop_requested["flag"]:
        log.warning("SIGTERM: saved step %d; exiting so the job can be restarted", step)
        break
    if pending is not None:
      _check_finite(jax.device_get(pending), int(t.max_nan_streak))
  finally:
    checkpointer.close()
    bar.close()
    writer.flush()
    writer.close()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
  checksum = float(jax.jit(lambda p: sum(jnp.sum(x.astype(jnp.float64) if jax.config.jax_enable_x64 else x)
                                          for x in jax.tree.leaves(p)))(state["params"]))
  print(f"[process {jax.process_index()}] final step {step} loss {last_loss} params_checksum {checksum!r}",
        flush=True)
  if jax.process_index() == 0:
    plot_loss_curve(metrics_path, os.path.join(workdir, "loss_curve.png"))
  return TrainResult(step, last_loss, eval_loss, workdir, state)


def _init_params_unjitted(model_cfg: DecoderConfig, seed: int):
  import flax.linen as nn
  from mlx_med.core.transformer import Decoder
  tokens = jnp.zeros((1, 8), jnp.int32)
  return nn.unbox(Decoder(model_cfg).init(jax.random.key(seed), tokens))["params"]


def _check_finite(metrics, max_streak: int) -> None:
  streak = int(np.asarray(metrics["nan_streak"]))
  if max_streak > 0 and streak >= max_streak:
    raise NonFiniteLossError(
        f"{streak} consecutive steps had NaN/Inf loss or gradients (train.max_nan_streak={max_streak}); "
        "lower train.lr, raise train.warmup_steps, or check the input data")
