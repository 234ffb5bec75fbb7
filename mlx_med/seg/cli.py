"""`mlx-med seg ...`: train, predict with, evaluate and compare text-prompted segmentation models.

  mlx-med seg train --config configs/seg/boltzformer.py:smoke --workdir RUN [--config.a.b=v ...]
      Real data: --config.data.root=PATH --config.data.format=msd|dicom|png. Rerunning resumes.
  mlx-med seg predict --workdir RUN --images PATH [PATH ...] --prompt TEXT --out DIR [--attention MODE]
      One mask per input: PNG for 2D images, NIfTI (same affine and header) for NIfTI volumes.
  mlx-med seg evaluate --workdir RUN [--attention MODE] [--split test] [--out DIR]
      Dice, IoU and 95% Hausdorff distance per image; means with bootstrap 95% intervals overall,
      per size bucket (< 0.1%, 0.1-1%, > 1% of the image) and per prompt.
  mlx-med seg compare --config CONFIG --workdir DIR [--modes boltzmann,threshold,full] [--checkpoint RUN]
      Trains one model per attention mode at equal steps (or evaluates one checkpoint under each)
      and reports Dice by size bucket, attention FLOPs per image and wall time, with plots.

Images and masks stay on this machine. Bad input prints one line and exits with status 2.
"""

from __future__ import annotations


def _cmd_train(args, overrides) -> int:
  from mlx_med.core import config as config_lib
  from mlx_med.seg import train as train_lib

  config = config_lib.get_config(args.config, overrides)
  if config.get("task") != "boltzformer":
    raise config_lib.ConfigError(f"{args.config}: config.task={config.get('task')!r}; `mlx-med seg train` takes a "
                                 "segmentation config (configs/seg/boltzformer.py)")
  train_lib.run(config, args.workdir, progress=not args.no_progress, allow_config_change=args.allow_config_change)
  return 0


def _cmd_predict(args) -> int:
  from mlx_med.seg import predict as predict_lib

  written = predict_lib.predict_files(args.workdir, args.images, args.prompt, args.out, threshold=args.threshold,
                                      attention=args.attention)
  paths = written[0] if isinstance(written, tuple) else written
  print(f"wrote {len(paths)} mask(s) to {args.out}")
  return 0


def _cmd_evaluate(args) -> int:
  from mlx_med.seg import evaluate as eval_lib

  result = eval_lib.evaluate_run(args.workdir, attention=args.attention, split=args.split, out_dir=args.out,
                                 max_images=args.max_images, n_boot=args.n_boot)
  print(result["summary_markdown"])
  print(f"report: {result['paths']['report']}")
  return 0


def _cmd_compare(args, overrides) -> int:
  from mlx_med.core import config as config_lib
  from mlx_med.seg import compare as compare_lib

  config = config_lib.get_config(args.config, overrides)
  modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
  result = compare_lib.compare(config, args.workdir, modes, checkpoint=args.checkpoint,
                               eval_only_modes=tuple(m.strip() for m in args.eval_only.split(",") if m.strip()),
                               progress=not args.no_progress)
  print(result["markdown"])
  for name, path in result["paths"].items():
    print(f"{name}: {path}")
  return 0


def register(subparsers) -> None:
  seg = subparsers.add_parser("seg", help="text-prompted segmentation: BoltzFormer train / predict / evaluate / compare")
  sub = seg.add_subparsers(dest="seg_command", required=True)

  train = sub.add_parser("train", help="run or resume a segmentation config",
                         description="Overrides: --config.section.key=value (unknown keys are errors).")
  train.add_argument("--config", required=True, help="configs/seg/boltzformer.py[:variant]")
  train.add_argument("--workdir", required=True)
  train.add_argument("--no-progress", action="store_true")
  train.add_argument("--allow-config-change", action="store_true", help="see `mlx-med train --help`")
  train.set_defaults(func=_cmd_train, accepts_overrides=True)

  pred = sub.add_parser("predict", help="masks for images (PNG) or NIfTI volumes (NIfTI, same affine)")
  pred.add_argument("--workdir", required=True, help="a `seg train` run directory")
  pred.add_argument("--images", required=True, nargs="+", help="PNG / JPEG / DICOM / NIfTI files")
  pred.add_argument("--prompt", required=True, help='the target, e.g. "lung nodule in CT scan"')
  pred.add_argument("--out", required=True, help="output directory")
  pred.add_argument("--threshold", type=float, default=0.5)
  pred.add_argument("--attention", default=None, help="override the attention mode of the run")
  pred.set_defaults(func=_cmd_predict)

  ev = sub.add_parser("evaluate", help="Dice / IoU / HD95 per image, by size bucket and prompt, bootstrap CIs")
  ev.add_argument("--workdir", required=True, help="a `seg train` run directory")
  ev.add_argument("--attention", default=None, help="evaluate the checkpoint under another attention mode")
  ev.add_argument("--split", default=None, help="the split to evaluate (default: the run's eval split)")
  ev.add_argument("--out", default=None, help="report directory (default: <workdir>/eval_<mode>)")
  ev.add_argument("--max-images", type=int, default=0, help="0 = every image of the split")
  ev.add_argument("--n-boot", type=int, default=1000)
  ev.set_defaults(func=_cmd_evaluate)

  cmp_ = sub.add_parser("compare", help="boltzmann vs threshold vs full at equal steps: Dice by size, FLOPs, time",
                        description="Overrides: --config.section.key=value apply to every run.")
  cmp_.add_argument("--config", required=True, help="configs/seg/boltzformer.py[:variant]")
  cmp_.add_argument("--workdir", required=True, help="one sub-directory per mode is created here")
  cmp_.add_argument("--modes", default="boltzmann,threshold,full", help="modes to train (comma-separated)")
  cmp_.add_argument("--eval-only", default="", help="modes to evaluate on the first trained mode's checkpoint")
  cmp_.add_argument("--checkpoint", default=None, help="evaluate this run under every mode instead of training")
  cmp_.add_argument("--no-progress", action="store_true")
  cmp_.set_defaults(func=_cmd_compare, accepts_overrides=True)
