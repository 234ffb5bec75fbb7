"""`mlx-med`: the command line of the project.

  mlx-med train --config configs/ehr/pretrain.py:smoke --workdir runs/smoke [--config.a.b=v ...]
  mlx-med ehr synth|tokenize|validate ...
  mlx-med serve --model HF_DIR
  mlx-med seg train|predict|evaluate|compare ...
  mlx-med vlm semclip|train|train-psi|eval|icl ...
  mlx-med apps synth|abstract|review|metascale|train ...
"""

from __future__ import annotations

import argparse
import ast
import glob
import importlib
import logging
import os
import sys
import textwrap

from mlx_med import __version__

# Each config names its task; the task's `run(config, workdir, args)` does the work.
TASKS = {
    "ehr_pretrain": "mlx_med.ehr.pretrain:run",
    "medimageinsight": "mlx_med.embed.train:run",
    "rl": "mlx_med.rl.learner:run",
    "rl_sft": "mlx_med.rl.sft:run_sft",
    "boltzformer": "mlx_med.seg.train:run",
}

# Capability packages that add sub-commands through `register(subparsers)`.
SUBCOMMAND_MODULES = ("mlx_med.ehr.cli", "mlx_med.llm.cli", "mlx_med.scaling.cli", "mlx_med.embed.cli",
                      "mlx_med.rl.cli", "mlx_med.seg.cli", "mlx_med.vlm.cli", "mlx_med.apps.cli")


def _train(args, overrides: list[str]) -> int:
  from mlx_med.core import config as config_lib
  from mlx_med.core import distributed

  distributed.maybe_initialize(args.distributed, args.coordinator, args.num_processes, args.process_id)
  config = config_lib.get_config(args.config, overrides)
  task = config.get("task")
  if task not in TASKS:
    raise config_lib.ConfigError(f"{args.config}: config.task={task!r} is not one of {sorted(TASKS)}")
  module_name, _, fn_name = TASKS[task].partition(":")
  run = getattr(importlib.import_module(module_name), fn_name)
  from mlx_med.core.memory import MemoryBudgetError
  try:
    run(config, args.workdir, progress=not args.no_progress, allow_config_change=args.allow_config_change)
  except MemoryBudgetError as e:
    raise config_lib.ConfigError(f"{args.config}: {e}") from e
  return 0


class _NoBackendProbeInfo(logging.Filter):
  """Drops JAX's INFO records about platforms it probed and did not find.

  On a machine without a TPU, JAX logs "Unable to initialize backend 'tpu': ...
  libtpu.so ..." at INFO when it looks for one; that is expected, not a problem.
  Warnings and errors pass, and so does everything under -v.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not str(record.msg).startswith("Unable to initialize backend")


def quiet_backend_probe_logs() -> None:
  logger = logging.getLogger("jax._src.xla_bridge")
  if not any(isinstance(f, _NoBackendProbeInfo) for f in logger.filters):
    logger.addFilter(_NoBackendProbeInfo())


def config_catalog(root: str | None = None) -> str:
  """The shipped experiment configs with their variants, read from each file's docstring.

  A config documents itself: the docstring's first line says what it runs and a
  "Variants:" line names the `:variant` arguments its get_config accepts.
  """
  root = root or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  lines = []
  for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
    if os.path.basename(path).startswith("_"):
      continue
    try:
      with open(path, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    except (OSError, SyntaxError):
      continue
    shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else path
    summary = doc.strip().splitlines()[0] if doc.strip() else ""
    variants = _documented_variants(doc)
    lines.append(f"  {shown}  {summary}")
    lines.extend(textwrap.wrap(f"variants: {variants}", width=96, initial_indent="      ",
                               subsequent_indent="        "))
  if not lines:
    return ""
  return "configs (--config PATH:VARIANT):\n" + "\n".join(lines)


def _documented_variants(doc: str) -> str:
  """The names after a docstring's "Variants:" line: on that line, or the first word of each
  indented line below it (a list of `name  description` rows), up to a blank line."""
  lines = doc.splitlines()
  for i, line in enumerate(lines):
    if line.strip().lower().startswith("variants:"):
      inline = line.split(":", 1)[1].strip()
      if inline:
        return inline
      names = []
      indent = None
      for row in lines[i + 1:]:
        if not row.strip():
          break
        width = len(row) - len(row.lstrip())
        indent = width if indent is None else indent
        if width == indent:
          names.append(row.split()[0])
      return ", ".join(names) or "(none documented)"
  return "(none documented)"


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="mlx-med", description="mlx_med: medical foundation models in JAX")
  parser.add_argument("--version", action="version", version=f"mlx-med {__version__}")
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  sub = parser.add_subparsers(dest="command", required=True)

  train = sub.add_parser("train", help="train or resume an experiment from a config file",
                         description="Overrides: --config.section.key=value (unknown keys are errors).",
                         epilog=config_catalog(), formatter_class=argparse.RawDescriptionHelpFormatter)
  train.add_argument("--config", required=True, help="path/to/config.py[:variant]")
  train.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard, plots")
  train.add_argument("--no-progress", action="store_true",
                     help="no progress bar: one plain log line per train.log_every steps (for batch jobs)")
  train.add_argument("--allow-config-change", action="store_true",
                     help="resume a workdir although loop settings changed (train.steps, log/eval/ckpt "
                          "intervals); changes to the model, data or optimizer are always refused")
  train.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (pods, SLURM)")
  train.add_argument("--coordinator", help="host:port of process 0 for a manual multi-process run")
  train.add_argument("--num-processes", type=int)
  train.add_argument("--process-id", type=int)
  train.set_defaults(func=_train, accepts_overrides=True)

  for module_name in SUBCOMMAND_MODULES:
    try:
      module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
      if e.name != module_name:
        raise
      continue
    module.register(sub)
  return parser


def main(argv: list[str] | None = None) -> int:
  from mlx_med.core.config import ConfigError, split_config_args

  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    overrides, rest = split_config_args(argv)
  except ConfigError as e:
    print(f"mlx-med: error: {e}", file=sys.stderr)
    return 2
  parser = build_parser()
  args = parser.parse_args(rest)
  logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  if not args.verbose:  # Orbax logs every checkpoint phase at INFO through absl
    logging.getLogger("absl").setLevel(logging.WARNING)
    quiet_backend_probe_logs()
  accepts_overrides = getattr(args, "accepts_overrides", False)
  if overrides and not accepts_overrides:
    parser.error("--config.* overrides apply to `train`, `scaling run`, `embed train`, `rl train`, `seg train`, `seg compare` "
                 "`vlm semclip|train|train-psi` and `apps metascale|train` only")
  try:
    if accepts_overrides:
      return args.func(args, overrides)
    return int(args.func(args) or 0)
  except (ConfigError, ValueError, FileNotFoundError) as e:
    # Bad input: one clear line, no traceback (-v shows it).
    if args.verbose:
      raise
    print(f"mlx-med: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:
    # The training loop turns Ctrl-C / SIGTERM into TrainingInterrupted (a KeyboardInterrupt) after
    # saving a checkpoint: its message says where to resume. Elsewhere Ctrl-C just stops.
    if args.verbose:
      raise
    print(f"mlx-med: {e or 'interrupted (Ctrl-C)'}", file=sys.stderr)
    return int(getattr(e, "exit_code", 130))


if __name__ == "__main__":
  sys.exit(main())
