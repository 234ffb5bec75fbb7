"""`mlx-med vlm ...`: the SemCLIP experiment, the small VLM and psi, multimodal MCQA evaluation, the ICL study.

  mlx-med vlm semclip --config configs/vlm/semclip.py:smoke --workdir RUN [--config.a.b=v ...]
      Trains psi and the small VLM (or points at a served one) and reports accuracy at an equal
      visual-token budget: full image, random crop, SemCLIP crop, SemCLIP tokens, oracle crop.
  mlx-med vlm train --config configs/vlm/semclip.py:smoke --workdir RUN
      Only the small LLaVA-style VLM (exported to RUN/hf: `mlx-med serve --model RUN/hf` serves it).
  mlx-med vlm train-psi --config configs/vlm/semclip.py:smoke --workdir RUN
      Only psi, the question-crop relevance model (distant supervision, contrastive).
  mlx-med vlm eval --model HFDIR|URL --data FORMAT:PATH [--think-budget N] [--out DIR]
      Multiple-choice accuracy per subject with 95% intervals over local MMMU / OmniMedVQA / V* files,
      X-Reasoner prompt, forced exit after N thinking tokens.
  mlx-med vlm icl --model [NAME=]HFDIR|URL[@SIZE] [--model ...] [--data synthetic|FORMAT:PATH]
      Multimodal in-context learning: demonstration selection (random / text / image / both),
      perturbed demonstrations, flipped and arbitrary labels, by shots and model size.

Images stay on this machine unless --model is a URL you gave. Bad input prints one line and exits 2.
Rerunning a training command resumes it.
"""

from __future__ import annotations


def _config(args, overrides):
  from mlx_med.core import config as config_lib

  config = config_lib.get_config(args.config, overrides)
  if config.get("task") != "semclip":
    raise config_lib.ConfigError(f"{args.config}: config.task={config.get('task')!r}; `mlx-med vlm {args.vlm_command}` "
                                 "takes a SemCLIP config (configs/vlm/semclip.py)")
  return config


def _cmd_semclip(args, overrides) -> int:
  from mlx_med.vlm import experiment

  config = _config(args, overrides)
  experiment.run_semclip_experiment(config, args.workdir, progress=not args.no_progress)  # prints the table
  print(f"results: {args.workdir}/results.json, table.md, accuracy.png")
  return 0


def _cmd_train(args, overrides) -> int:
  from mlx_med.vlm import train

  config = _config(args, overrides)
  run = train.train_vlm(config, args.workdir, progress=not args.no_progress,
                        allow_config_change=args.allow_config_change)
  print(f"VLM trained; Hugging Face export: {getattr(run, 'hf_dir', args.workdir + '/hf')}")
  return 0


def _cmd_train_psi(args, overrides) -> int:
  from mlx_med.vlm import semclip

  config = _config(args, overrides)
  semclip.train_psi(config.psi, args.workdir, progress=not args.no_progress,
                    allow_config_change=args.allow_config_change)
  print(f"psi trained in {args.workdir}")
  return 0


def _cmd_eval(args) -> int:
  from mlx_med.vlm import mcqa

  mcqa.eval_command(args.model, args.data, args.think_budget, out=args.out, template=args.template,
                    max_tokens=args.max_tokens, temperature=args.temperature, limit=args.limit,
                    concurrency=args.concurrency, served_model=args.served_model)
  return 0


def _ints(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(x) for x in text.split(",") if x.strip())
  except ValueError:
    raise ValueError(f"{text!r} is not a comma-separated list of integers (e.g. 0,1,2,4)") from None


def _names(text: str) -> tuple[str, ...]:
  return tuple(x.strip() for x in text.split(",") if x.strip())


def _cmd_icl(args) -> int:
  from mlx_med.vlm import icl

  kwargs = {}
  if args.strategies:
    kwargs["strategies"] = _names(args.strategies)
  if args.perturbations:
    kwargs["perturbations"] = _names(args.perturbations)
  if args.label_modes:
    kwargs["label_modes"] = _names(args.label_modes)
  icl.icl_command(args.model, args.data, shots=_ints(args.shots), n_queries=args.n_queries, n_pool=args.n_pool,
                  seed=args.seed, embedder=args.embedder, out=args.out, max_tokens=args.max_tokens,
                  concurrency=args.concurrency, **kwargs)
  return 0


def register(subparsers) -> None:
  vlm = subparsers.add_parser("vlm", help="vision-language: SemCLIP, the small VLM, MCQA evaluation, the ICL study")
  sub = vlm.add_subparsers(dest="vlm_command", required=True)

  for name, fn, what in (("semclip", _cmd_semclip, "the SemCLIP experiment (trains psi and the VLM; resumable)"),
                         ("train", _cmd_train, "train (or resume) the small LLaVA-style VLM"),
                         ("train-psi", _cmd_train_psi, "train (or resume) psi, the crop relevance model")):
    p = sub.add_parser(name, help=what, description="Overrides: --config.section.key=value (unknown keys are errors).")
    p.add_argument("--config", required=True, help="configs/vlm/semclip.py[:variant]")
    p.add_argument("--workdir", required=True)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--allow-config-change", action="store_true", help="see `mlx-med train --help`")
    p.set_defaults(func=fn, accepts_overrides=True)

  ev = sub.add_parser("eval", help="multiple-choice accuracy of a VLM over local MMMU / OmniMedVQA / V* files")
  ev.add_argument("--model", required=True, help="a local Hugging Face VLM directory, or an OpenAI-compatible base URL")
  ev.add_argument("--data", required=True, help="FORMAT:PATH with FORMAT mmmu, omnimedvqa or vstar")
  ev.add_argument("--think-budget", type=int, default=None, help="force </think> after this many thinking tokens")
  ev.add_argument("--out", default="vlm_eval", help="output folder for report.json and table.md")
  ev.add_argument("--template", default="xreasoner")
  ev.add_argument("--max-tokens", type=int, default=1024)
  ev.add_argument("--temperature", type=float, default=0.0)
  ev.add_argument("--limit", type=int, default=None, help="evaluate the first N questions only")
  ev.add_argument("--concurrency", type=int, default=1, help="parallel requests to a served model")
  ev.add_argument("--served-model", default=None, help="model name at the URL (default: the first it lists)")
  ev.set_defaults(func=_cmd_eval)

  ic = sub.add_parser("icl", help="the multimodal in-context-learning study over one or more VLMs")
  ic.add_argument("--model", action="append", required=True,
                  help="[NAME=]HFDIR|URL[@SIZE] (repeat for several models; SIZE = parameters, for the size plot)")
  ic.add_argument("--data", default="synthetic", help="synthetic (default) or FORMAT:PATH of local MCQA files")
  ic.add_argument("--strategies", default="", help="comma list of random,text,image,both (default: all)")
  ic.add_argument("--shots", default="0,1,2,4")
  ic.add_argument("--perturbations", default="", help="comma list (default: all)")
  ic.add_argument("--label-modes", default="", help="comma list of original,flipped,arbitrary (default: all)")
  ic.add_argument("--n-queries", type=int, default=24)
  ic.add_argument("--n-pool", type=int, default=36)
  ic.add_argument("--seed", type=int, default=0)
  ic.add_argument("--embedder", default=None, help="an `mlx-med embed` run or CLIP/SigLIP directory for similarities")
  ic.add_argument("--out", default="vlm_icl")
  ic.add_argument("--max-tokens", type=int, default=16)
  ic.add_argument("--concurrency", type=int, default=1)
  ic.set_defaults(func=_cmd_icl)
