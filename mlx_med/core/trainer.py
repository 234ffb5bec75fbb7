"""The one training loop of the project, for every model family (a `Task`).

`Trainer(config, workdir, task, train_source, eval_source)` is used in three parts:

* `setup()`  — mesh and sharding rules from the config, the optimizer, the train
  state created sharded by a jitted init (or restored from the newest checkpoint
  in `workdir`), one `jax.jit` train step with in/out shardings and donated state,
  the eval step, the grain loader and the Orbax checkpointer;
* `step(batch)` — one update on a host batch (a dict of numpy arrays, exactly the
  task's `batch_axes` keys); an RL loop calls this with batches it makes itself;
* `run()` — the loop: steps, metrics (metrics.jsonl, TensorBoard, a progress bar
  with throughput and ETA), periodic eval, checkpoints every `ckpt_every` steps,
  a checkpoint at the next step boundary on SIGTERM or Ctrl-C (then
  `TrainingInterrupted`), and `callbacks` after each step.

Sources are random-access (`__len__`, `__getitem__` -> a dict of numpy arrays). A train source
may carry a `train_transform` attribute: a per-example random transform (a grain
`RandomMapTransform` or a callable `(record, rng) -> example`, `core.data.RandomTransform`) that
the train loader applies after shuffling and repeating, so training augmentation draws anew every
epoch and resumes exactly; the source's records are then what the transform takes. Evaluation
never transforms: an eval source returns finished examples.

`train(...)` does all three. Restarted with the same command, a run resumes from
its newest checkpoint (state and data-iterator position) and ends bitwise equal to
an uninterrupted run. A workdir belongs to one run (`claim_workdir`), and a run
that cannot fit in device memory is refused before anything is compiled
(`mlx_med.core.memory`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mlx_med.core import checkpoint as ckpt_lib
from mlx_med.core import data as data_lib
from mlx_med.core import flops as flops_lib
from mlx_med.core import memory as memory_lib
from mlx_med.core import metrics as metrics_lib
from mlx_med.core import optim
from mlx_med.core import params as params_lib
from mlx_med.core import sharding as sharding_lib
from mlx_med.core.task import Task
from mlx_med.core.train_step import init_train_state, make_eval_step, make_train_step

log = logging.getLogger("mlx_med.train")

# (trainer, step) -> None, called after each step (and its checkpoint, if any).
StepCallback = Callable[["Trainer", int], None]


class NonFiniteLossError(RuntimeError):
  """Raised after `max_nan_streak` consecutive steps with NaN/Inf loss or gradients."""


class TrainingInterrupted(KeyboardInterrupt):
  """SIGINT (Ctrl-C) or SIGTERM stopped the run after it saved a checkpoint; rerun to resume.

  A KeyboardInterrupt, so that `except Exception` in a caller does not swallow the stop.

  `exit_code` (128 + signal number: 130 for SIGINT, 143 for SIGTERM) is what `mlx-med
  train` exits with, non-zero so that schedulers requeue the job instead of marking it done.
  """

  def __init__(self, signal_name: str, signum: int, step: int, checkpoint_dir: str):
    self.signal_name, self.step, self.checkpoint_dir = signal_name, step, checkpoint_dir
    self.exit_code = 128 + signum
    super().__init__(f"{signal_name}: stopped after step {step}; last checkpoint: step {step} in {checkpoint_dir}; "
                     "run the same command again to resume")


class ConfigMismatchError(ValueError):
  """The workdir holds a run made with another config (one line naming the differing keys)."""


# Keys that change how a run is driven, not what it computes; `allow_config_change`
# lets a resumed run change them (e.g. train.steps to train longer).
RESUMABLE_CHANGES = frozenset({
    "train.steps", "train.log_every", "train.eval_every", "train.eval_batches", "train.eval_batch_size",
    "train.ckpt_every", "train.keep_checkpoints", "train.async_checkpointing", "train.max_nan_streak",
    "train.check_memory", "data.worker_count", "peak_flops_per_device",
    # loops that drive the trainer themselves (mlx_med.rl): their length and intervals
    "rl.iterations", "rl.ckpt_every", "eval.every", "eval.max_examples", "eval.batch_size",
})


def _flatten(tree: Any, prefix: str = "") -> dict:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def claim_workdir(config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool = False) -> None:
  """A workdir belongs to one run: its config.json is written at the first start and
  compared on every restart. A difference is refused with one line naming the keys;
  `allow_config_change` accepts differences in RESUMABLE_CHANGES only."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"--workdir {workdir!r} is a file, not a directory; choose a directory path "
                     "(it is created if missing)")
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    old, new = _flatten(stored), _flatten(current)
    changed = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>"))
    if not changed:
      return
    blocking = [k for k in changed if not (allow_config_change and k in RESUMABLE_CHANGES)]
    if blocking:
      shown = ", ".join(f"{k} ({old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r})" for k in blocking[:6])
      more = f" and {len(blocking) - 6} more" if len(blocking) > 6 else ""
      hint = ("; --allow-config-change accepts these loop settings" if all(k in RESUMABLE_CHANGES for k in blocking)
              else "; use a new --workdir for a different run, or repeat the original overrides")
      raise ConfigMismatchError(f"{workdir} belongs to a run with another config: {shown}{more}{hint}")
    log.warning("resuming %s with changed settings: %s", workdir, ", ".join(changed))
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)


def check_memory(config: ml_collections.ConfigDict, task: Task, what: str | None = None) -> memory_lib.MemoryEstimate:
  """Estimates the run's memory from abstract shapes (nothing compiled or allocated) and
  raises MemoryBudgetError when it cannot fit; skipped with train.check_memory=False."""
  t = config.train
  _, rules = mesh_from_config(config)
  optimizer, _ = optim.make_optimizer(t)
  abstract, shardings = state_shardings(task, optimizer, rules, int(config.seed), float(t.get("ema_decay", 0.0)) > 0)
  return _check_state_memory(t, task, abstract, shardings, rules, what)


def _check_state_memory(t, task, abstract, shardings, rules, what=None) -> memory_lib.MemoryEstimate:
  est = memory_lib.estimate(task, abstract, shardings, rules.named(("batch",)), int(t.batch_size), int(t.grad_accum))
  if bool(t.get("check_memory", True)):
    memory_lib.check_fits(est, what=what or f"{task.describe()} at train.batch_size={int(t.batch_size)}")
  return est


@dataclasses.dataclass
class TrainResult:
  final_step: int
  final_loss: float | None
  eval_loss: float | None
  workdir: str
  state: Any = None
  eval_metrics: dict | None = None


def mesh_from_config(config) -> tuple[jax.sharding.Mesh, sharding_lib.ShardingRules]:
  shape = {k: int(v) for k, v in config.mesh.shape.items()}
  mesh = sharding_lib.make_mesh(shape)
  rules = sharding_lib.rules_from_config(mesh, config.mesh.get("rules", ()))
  return mesh, rules


def state_shardings(task: Task, optimizer: optax.GradientTransformation, rules, seed: int, ema: bool = False):
  """Abstract train state and its NamedShardings (params by logical axes; moments and EMA like params)."""
  p_shard = params_lib.param_shardings(task, rules)
  abstract_params = params_lib.abstract_params(task)
  abstract_state = jax.eval_shape(lambda p: init_train_state(p, optimizer, seed, ema), abstract_params)
  replicated = rules.replicated()
  opt_shard = _like_params(abstract_state["opt_state"], abstract_params, p_shard, replicated)
  shardings = {k: replicated for k in abstract_state}
  shardings["params"] = p_shard
  shardings["opt_state"] = opt_shard
  if ema:
    shardings["ema_params"] = p_shard
  return abstract_state, shardings


def _like_params(tree, abstract_params, p_shard, default):
  """Shardings for an optimizer state: a leaf whose key path ends with a parameter's path
  and has that parameter's shape (Adam moments, masked or per-group states) is sharded
  like the parameter; anything else (counts, scalars) gets `default`."""
  by_path = {}
  for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0], jax.tree.leaves(p_shard)):
    by_path[tuple(map(str, path))] = (leaf.shape, sh)
  depths = sorted({len(k) for k in by_path}, reverse=True)

  def pick(path, leaf):
    keys = tuple(map(str, path))
    for depth in depths:
      hit = by_path.get(keys[-depth:])
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return default

  return jax.tree_util.tree_map_with_path(pick, tree)


def batch_shardings(task: Task, rules) -> dict:
  return {k: rules.named(tuple(axes)) for k, axes in task.batch_axes.items()}


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
  ax.set_ylabel("loss")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  tmp = out_png + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, out_png)
  return out_png


class Trainer:
  """Setup, step and loop for one run in `workdir` (see the module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, task: Task, train_source=None,
               eval_source=None, *, progress: bool = True, callbacks: Sequence[StepCallback] = (),
               allow_config_change: bool = False, initial_params: Callable[[], Any] | None = None):
    self.config, self.workdir, self.task = config, workdir, task
    # () -> a parameter tree (e.g. loaded from a Hugging Face directory) that a fresh run
    # starts from instead of `task.init`; a resumed run restores its checkpoint instead.
    self.initial_params = initial_params
    self.allow_config_change = allow_config_change
    self.train_source, self.eval_source = train_source, eval_source
    self.progress, self.callbacks = progress, list(callbacks)
    self.state = None
    self.start_step = 0
    self._setup_done = False

  # ---------------------------------------------------------------- setup
  def setup(self) -> "Trainer":
    config, t = self.config, self.config.train
    claim_workdir(config, self.workdir, self.allow_config_change)
    if t.batch_size % t.grad_accum:
      raise ValueError(f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}")
    self.seed = int(config.seed)
    self.mesh, self.rules = mesh_from_config(config)
    self.optimizer, self.schedule = optim.make_optimizer(t)
    self.ema_decay = float(t.get("ema_decay", 0.0))
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"train.ema_decay={self.ema_decay} must be in [0, 1) (0 = no EMA)")
    ema = self.ema_decay > 0
    self.abstract_state, self.state_shardings = state_shardings(self.task, self.optimizer, self.rules, self.seed, ema)
    self.batch_shardings = batch_shardings(self.task, self.rules)
    self.memory = _check_state_memory(t, self.task, self.abstract_state, self.state_shardings, self.rules)

    task, optimizer, seed = self.task, self.optimizer, self.seed
    self._init_fn = jax.jit(lambda: init_train_state(nn.unbox(task.init(jax.random.key(seed))), optimizer, seed, ema),
                            out_shardings=self.state_shardings)
    self._step_fn = jax.jit(
        make_train_step(task, optimizer, self.schedule, int(t.grad_accum), self.rules, self.ema_decay),
        in_shardings=(self.state_shardings, self.batch_shardings), out_shardings=(self.state_shardings, None),
        donate_argnums=(0,))
    self._eval_fn = jax.jit(make_eval_step(task, self.rules),
                            in_shardings=(self.state_shardings["params"], self.batch_shardings))

    self.iterator = None
    if self.train_source is not None:
      worker_count = int(config.data.get("worker_count", 0)) if "data" in config else 0
      self.iterator = iter(data_lib.make_loader(self.train_source, int(t.batch_size), seed=self.seed,
                                                worker_count=worker_count,
                                                transform=getattr(self.train_source, "train_transform", None)))
    self.checkpointer = ckpt_lib.Checkpointer(
        os.path.join(self.workdir, "checkpoints"), keep=int(t.keep_checkpoints), save_every=int(t.ckpt_every),
        async_save=bool(t.async_checkpointing))
    self.metrics_path = os.path.join(self.workdir, "metrics.jsonl")
    latest = self.checkpointer.latest_step()
    if latest is not None:
      abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              self.abstract_state, self.state_shardings)
      self.state = self.checkpointer.restore(latest, abstract, self.iterator)
      self.start_step = latest
      metrics_lib.truncate_metrics_after(self.metrics_path, latest)
      log.info("resumed from step %d in %s", latest, self.checkpointer.directory)
    elif self.initial_params is not None:
      start = jax.jit(lambda p: init_train_state(p, optimizer, seed, ema), out_shardings=self.state_shardings,
                      donate_argnums=(0,))
      self.state = start(jax.device_put(nn.unbox(self.initial_params()), self.state_shardings["params"]))
      self.start_step = 0
    else:
      self.state = self._init_fn()
      self.start_step = 0

    self.unit, self.units_per_example = self.task.throughput_unit
    self.flops_per_example = self.task.train_flops_per_example
    peak_dtype = getattr(getattr(self.task, "cfg", None), "dtype", "bfloat16")
    self.peak_flops = float(config.get("peak_flops_per_device", 0.0)) or flops_lib.device_peak_flops(peak_dtype)
    self.num_params = params_lib.count_params(self.state["params"])
    if jax.process_index() == 0:
      log.info("model: %s, %s parameters; mesh %s; %s train FLOPs/example; memory %s", self.task.describe(),
               f"{self.num_params:,}", dict(self.mesh.shape),
               f"{self.flops_per_example:.3g}" if self.flops_per_example else "?", self.memory.describe())
    self._setup_done = True
    return self

  # ---------------------------------------------------------------- step
  def step(self, batch: dict[str, np.ndarray]) -> dict:
    """One update on this host's part of a global batch; returns the step's metrics (device arrays)."""
    global_batch = data_lib.to_global(batch, self.batch_shardings)
    self.state, metrics = self._step_fn(self.state, global_batch)
    return metrics

  def evaluate(self, params=None) -> dict | None:
    """Eval loss and metrics over `eval_source` (at most train.eval_batches batches)."""
    source = self.eval_source
    if source is None or len(source) == 0:
      return None
    t = self.config.train
    params = self.eval_params() if params is None else params
    loader = data_lib.make_loader(source, int(t.eval_batch_size or t.batch_size), seed=0, shuffle=False,
                                  num_epochs=1)
    sums: dict[str, float] = {}
    for i, batch in enumerate(loader):
      if t.eval_batches > 0 and i >= t.eval_batches:
        break
      out = jax.device_get(self._eval_fn(params, data_lib.to_global(batch, self.batch_shardings)))
      for k, v in out.items():
        sums[k] = sums.get(k, 0.0) + float(v)
    weight = sums.pop("weight", 0.0)
    if not weight:
      return None
    return {("eval_loss" if k == "loss_sum" else f"eval_{k}"): v / weight for k, v in sums.items()}

  def eval_params(self):
    """The parameters evaluated and exported: the EMA when train.ema_decay > 0."""
    return self.state.get("ema_params", self.state["params"])

  # ---------------------------------------------------------------- loop
  def run(self) -> TrainResult:
    if not self._setup_done:
      self.setup()
    if self.iterator is None:
      raise ValueError("Trainer.run needs a train_source; call Trainer.step(batch) to feed batches yourself")
    t = self.config.train
    writer = metrics_lib.MetricsWriter(self.workdir, purge_step=self.start_step + 1 if self.start_step else None)
    bar = metrics_lib.Progress(int(t.steps), initial=self.start_step, bar=self.progress, unit=self.unit)
    stop = {"signum": None}

    def on_signal(signum, frame):  # Ctrl-C or preemption: checkpoint at the next step boundary
      stop["signum"] = signum
      log.warning("%s: saving a checkpoint after this step, then stopping (Ctrl-C again aborts without saving)",
                  signal.Signals(signum).name)
      if signal.SIGINT in previous_handlers:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous_handlers = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
      if signal.getsignal(signum) is signal.SIG_IGN:
        continue  # e.g. SIGINT of a background job (`cmd &`, nohup): the caller chose to ignore it
      try:
        previous_handlers[signum] = signal.signal(signum, on_signal)
      except ValueError:  # not in the main thread
        pass

    max_streak = int(t.max_nan_streak)
    last_loss, eval_out = None, None
    pending = None  # metrics of the previous step, read one step late to keep dispatch async
    window_start, window_steps = time.perf_counter(), 0
    step = self.start_step
    units_per_step = int(t.batch_size) * int(self.units_per_example)
    try:
      while step < t.steps:
        metrics = self.step(next(self.iterator))
        step += 1
        window_steps += 1
        if step == self.start_step + 1:  # leave compilation out of the throughput figures
          jax.block_until_ready(metrics)
          window_start, window_steps = time.perf_counter(), 0
        if pending is not None:
          check_finite(pending, max_streak)
        pending = metrics
        if step % t.log_every == 0 or step == t.steps:
          host = jax.device_get(metrics)
          check_finite(host, max_streak)
          elapsed = max(time.perf_counter() - window_start, 1e-9)
          rate = window_steps * units_per_step / elapsed if window_steps else 0.0
          row = {k: v for k, v in host.items() if k not in ("finite", "nan_streak", "weight")}
          row[f"{self.unit}_per_s"] = rate
          if self.flops_per_example and self.peak_flops and window_steps:
            examples_per_s = window_steps * int(t.batch_size) / elapsed
            row["mfu"] = examples_per_s * self.flops_per_example / (self.peak_flops * jax.device_count())
          writer.write(step, row)
          last_loss = float(host["loss"])
          bar.update(step, rate, loss=last_loss)
          window_start, window_steps = time.perf_counter(), 0
        if t.eval_every > 0 and (step % t.eval_every == 0 or step == t.steps) and self.eval_source is not None:
          eval_out = self.evaluate()
          if eval_out is not None:
            writer.write(step, eval_out)
            if jax.process_index() == 0:
              log.info("eval at step %d: %s", step, " ".join(f"{k} {v:.4g}" for k, v in eval_out.items()))
          window_start, window_steps = time.perf_counter(), 0
        saved = self.checkpointer.save(step, self.state, self.iterator, force=step == t.steps)
        for callback in self.callbacks:
          callback(self, step)
        if stop["signum"] is not None:
          if not saved:
            self.checkpointer.save(step, self.state, self.iterator, force=True)
          break
      if pending is not None:
        check_finite(jax.device_get(pending), max_streak)
    finally:
      self.checkpointer.close()
      bar.close()
      writer.flush()
      writer.close()
      for signum, handler in previous_handlers.items():
        signal.signal(signum, handler)
    if stop["signum"] is not None:
      raise TrainingInterrupted(signal.Signals(stop["signum"]).name, stop["signum"], step, self.checkpointer.directory)
    checksum = float(jax.jit(lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(p)))(self.state["params"]))
    print(f"[process {jax.process_index()}] final step {step} loss {last_loss} params_checksum {checksum!r}",
          flush=True)
    if jax.process_index() == 0:
      plot_loss_curve(self.metrics_path, os.path.join(self.workdir, "loss_curve.png"))
    eval_loss = eval_out.get("eval_loss") if eval_out else None
    return TrainResult(step, last_loss, eval_loss, self.workdir, self.state, eval_out)


def train(config: ml_collections.ConfigDict, workdir: str, task: Task, train_source, eval_source=None,
          progress: bool = True, callbacks: Sequence[StepCallback] = (), allow_config_change: bool = False,
          initial_params: Callable[[], Any] | None = None) -> TrainResult:
  """Trains (or resumes) `task` in `workdir`; reads `config.train`, `config.mesh`, `config.seed`.

  Raises TrainingInterrupted after saving a checkpoint when SIGINT or SIGTERM arrives.
  """
  return Trainer(config, workdir, task, train_source, eval_source, progress=progress, callbacks=callbacks,
                 allow_config_change=allow_config_change, initial_params=initial_params).run()


def check_finite(metrics, max_streak: int) -> None:
  streak = int(np.asarray(metrics["nan_streak"]))
  if max_streak > 0 and streak >= max_streak:
    raise NonFiniteLossError(
        f"{streak} consecutive steps had NaN/Inf loss or gradients (train.max_nan_streak={max_streak}); "
        "lower train.lr, raise train.warmup_steps, or check the input data")
