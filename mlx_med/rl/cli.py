"""`mlx-med rl ...`: long-CoT SFT, GRPO / PPO with verifiable rewards, and MCQA evaluation.

  mlx-med rl train --config configs/rl/medrlvr.py:smoke --workdir runs/medrlvr [--config.a.b=v ...]
      config.task "rl" runs the GRPO / PPO loop (mlx_med.rl.learner); "rl_sft" runs SFT
      (configs/rl/xreasoner_sft.py, mlx_med.rl.sft). Real data:
      --config.data.format=medqa|medmcqa|mmlu_pro --config.data.path=FILE; start from a
      Hugging Face directory with --config.model.path=DIR. Rerunning the command resumes.
  mlx-med rl eval (--model HFDIR | --workdir RUN | --endpoint URL --model-name NAME)
      --data FORMAT:PATH | --data synthetic  [--think-budget N] [--max-new-tokens N] [--out eval.json]
      Accuracy with a 95% interval, format-failure and answer-leak rates, mean response length and
      per-category accuracy; with --think-budget the closing </think> is forced after N tokens
      (X-Reasoner's forced exit).

Questions and answers stay on this machine unless --endpoint names a server you chose. Bad input
prints one line and exits with status 2.
"""

from __future__ import annotations

import sys

EXIT_BAD_INPUT = 2
RUNNERS = {"rl": "mlx_med.rl.learner:run", "rl_sft": "mlx_med.rl.sft:run_sft"}


def _cmd_train(args, overrides) -> int:
  import importlib

  from mlx_med.core import config as config_lib

  config = config_lib.get_config(args.config, overrides)
  task = config.get("task")
  if task not in RUNNERS:
    raise config_lib.ConfigError(f"{args.config}: config.task={task!r}; `mlx-med rl train` takes an RL or SFT config "
                                 "(configs/rl/medrlvr.py, xreasoner_grpo.py, xreasoner_sft.py)")
  module_name, _, fn = RUNNERS[task].partition(":")
  getattr(importlib.import_module(module_name), fn)(config, args.workdir, progress=not args.no_progress,
                                                     allow_config_change=args.allow_config_change)
  return 0


def _cmd_eval(args) -> int:
  from mlx_med.rl import evaluate as eval_lib

  sources = [bool(args.model), bool(args.workdir), bool(args.endpoint)]
  if sum(sources) != 1:
    print("error: give exactly one of --model HFDIR, --workdir RUN or --endpoint URL", file=sys.stderr)
    return EXIT_BAD_INPUT
  eval_lib.eval_command(model=args.model, workdir=args.workdir, endpoint=args.endpoint, model_name=args.model_name,
                        data=args.data, template=args.template, think_budget=args.think_budget,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit,
                        out=args.out)
  return 0


def register(subparsers) -> None:
  rl = subparsers.add_parser("rl", help="RLVR: long-CoT SFT, GRPO / PPO with verifiable rewards, MCQA evaluation")
  sub = rl.add_subparsers(dest="rl_command", required=True)

  train = sub.add_parser("train", help="run or resume an RL (GRPO/PPO) or SFT config",
                         description="Overrides: --config.section.key=value (unknown keys are errors).")
  train.add_argument("--config", required=True, help="configs/rl/medrlvr.py[:variant] and the like")
  train.add_argument("--workdir", required=True)
  train.add_argument("--no-progress", action="store_true")
  train.add_argument("--allow-config-change", action="store_true", help="see `mlx-med train --help`")
  train.set_defaults(func=_cmd_train, accepts_overrides=True)

  ev = sub.add_parser("eval", help="MCQA accuracy, format-failure and answer-leak rates of a policy")
  ev.add_argument("--model", help="a Hugging Face model directory")
  ev.add_argument("--workdir", help="an `rl train` run directory (its exported policy, <workdir>/hf)")
  ev.add_argument("--endpoint", help="an OpenAI-compatible base URL (e.g. http://localhost:8000/v1)")
  ev.add_argument("--model-name", default=None, help="the model name to ask the endpoint for")
  ev.add_argument("--data", required=True,
                  help="FORMAT:PATH with FORMAT medqa|medmcqa|mmlu_pro|synthetic_jsonl, or 'synthetic' "
                       "(the held-out split of --workdir's synthetic run)")
  ev.add_argument("--template", default="medrlvr", help="prompt template: medrlvr | xreasoner | plain")
  ev.add_argument("--think-budget", type=int, default=None, help="force </think> after N generated tokens")
  ev.add_argument("--max-new-tokens", type=int, default=512)
  ev.add_argument("--batch-size", type=int, default=32)
  ev.add_argument("--limit", type=int, default=0, help="evaluate the first N questions only (0 = all)")
  ev.add_argument("--out", default=None, help="eval.json path (default: next to the model / run)")
  ev.set_defaults(func=_cmd_eval)
