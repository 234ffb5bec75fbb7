"""Experiment configs: `path/to/config.py[:arg]` files plus `--config.a.b=v` overrides.

A config file defines `get_config(arg=None) -> ml_collections.ConfigDict`. We load
it by path (not by import name) so users can point at their own files, lock the
dict so that an override of an unknown key fails loudly, and convert override
strings to the type already held at that key, failing loudly on a mismatch.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any, Iterable, Sequence

import ml_collections


class ConfigError(ValueError):
  """A config file, variant, key or value that cannot be used (one-line message)."""


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `file.py[:arg]` and returns `get_config(arg)`, locked."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist (expected path/to/config.py[:variant])")
  module_name = "_mlx_med_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # a broken config file: say which one
    raise ConfigError(f"config file {path!r} failed to load: {type(e).__name__}: {e}") from e
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config(arg=None)")
  try:
    config = module.get_config(arg or None)
  except ConfigError:
    raise
  except (KeyError, ValueError) as e:
    raise ConfigError(f"config file {path!r} rejected variant {arg!r}: {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}:get_config must return an ml_collections.ConfigDict")
  config.lock()
  return config


def _parse_bool(text: str) -> bool:
  lowered = text.strip().lower()
  if lowered in ("1", "true", "yes", "on"):
    return True
  if lowered in ("0", "false", "no", "off"):
    return False
  raise ValueError(f"not a boolean: {text!r}")


def _convert(key: str, current: Any, text: str) -> Any:
  """Converts `text` to the type of `current` (the value the config already holds).

  A value that does not fit is a one-line error naming the key, the type it wants
  and an example built from the current value.
  """
  kind = type(current).__name__

  def wrong(what: str) -> ConfigError:
    return ConfigError(f"--config.{key}={text}: expected {what} for {key} (the config holds {current!r}; "
                       f"e.g. --config.{key}={current!r})")

  if isinstance(current, bool):
    try:
      return _parse_bool(text)
    except ValueError:
      raise wrong("bool (true/false, yes/no, on/off, 1/0)") from None
  if isinstance(current, int):
    try:
      value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
      value = None
    if isinstance(value, bool) or not isinstance(value, int):
      raise wrong("int (a whole number)")
    return value
  if isinstance(current, float):
    try:
      return float(text.strip())
    except ValueError:
      raise wrong("float (a number such as 0.001, 1e-3 or inf)") from None
  if isinstance(current, str):
    return text
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
      raise wrong(f"{kind} (a Python literal such as {(1, 2) if kind == 'tuple' else [1, 2]})") from None
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return type(current)(value)
  if current is None:
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  raise ConfigError(f"--config.{key}: cannot override a value of type {kind} from the command line")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
  """Applies `a.b=v` strings (without the `--config.` prefix) to a locked config."""
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ConfigError(f"--config.{item}: expected --config.key=value")
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts[:-1]):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ConfigError(f"--config.{key}: unknown key {'.'.join(parts[:depth + 1])!r}; "
                          f"known here: {sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else '-'}")
      node = node[part]
    leaf = parts[-1]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise ConfigError(f"--config.{key}: unknown key {leaf!r}; known here: {known}")
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
      raise ConfigError(f"--config.{key} is a section; set one of its keys: {sorted(current.keys())}")
    value = _convert(key, current, text)
    with node.unlocked():
      node[leaf] = value
  return config


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=v` (or `--config.a.b v`) from other arguments."""
  overrides, rest = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config.") :
      body = arg[len("--config."):]
      if "=" not in body:
        if i + 1 >= len(argv):
          raise ConfigError(f"{arg}: missing value")
        body = f"{body}={argv[i + 1]}"
        i += 1
      overrides.append(body)
    else:
      rest.append(arg)
    i += 1
  return overrides, rest


def get_config(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """`get_config('configs/ehr/pretrain.py:smoke', ['train.steps=10'])`."""
  return apply_overrides(load_config_file(spec), overrides)


def default_train_config() -> ml_collections.ConfigDict:
  """The `train` section every experiment starts from."""
  return ml_collections.ConfigDict(dict(
      steps=1000,
      batch_size=32,  # global, across all hosts
      eval_batch_size=0,  # 0 = batch_size
      grad_accum=1,
      lr=3e-4,
      schedule="cosine",  # cosine | wsd | constant
      warmup_steps=100,
      min_lr_ratio=0.1,
      decay_fraction=0.2,  # wsd only: share of steps spent cooling down
      weight_decay=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      grad_clip=1.0,
      log_every=10,
      eval_every=200,
      eval_batches=20,  # 0 = the whole eval split
      ckpt_every=200,
      keep_checkpoints=3,
      async_checkpointing=True,
      max_nan_streak=5,
      check_memory=True,  # refuse a run whose estimated memory exceeds the device's (mlx_med.core.memory)
      ema_decay=0.0,  # > 0: keep an EMA of the params (e.g. 0.999); eval and export use it
      # name -> {pattern: regex on "/"-joined param paths, lr_scale, weight_decay (-1 = default)}
      param_groups=ml_collections.ConfigDict(),
  ))


def default_mesh_config() -> ml_collections.ConfigDict:
  """Mesh axes (-1 = the rest of the devices) and logical-rule overrides."""
  return ml_collections.ConfigDict(dict(
      shape=ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
      rules=(),
  ))
