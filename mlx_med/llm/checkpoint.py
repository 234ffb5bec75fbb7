"""Hugging Face checkpoint directories <-> sharded parameter trees, and Orbax conversion.

Loading never materialises the whole model on every device: each parameter is built
with `jax.make_array_from_callback` against its target `NamedSharding`, and the
callback reads only that device's slice from the memory-mapped safetensors file
(transposing / regrouping heads on the slice). Layers are stacked on the fly into
the decoder's scanned layout [L, ...].

Layout mapping (HF -> ours; HF linear weights are [out, in]):
  q/k/v_proj.weight [H*hd, D]  -> kernel [D, H, hd]     ("in_heads")
  q/k/v_proj.bias   [H*hd]     -> bias   [H, hd]        ("heads_bias")
  o_proj.weight     [D, H*hd]  -> kernel [H, hd, D]     ("out_heads")
  mlp / lm_head     [out, in]  -> kernel [in, out]      ("linear")
  embeddings, norms            -> unchanged             ("copy")
Rotary embeddings use the same half-split layout in both, so no permutation is needed.

Saving streams one (layer-)tensor at a time to host and disk, writes into a temporary
directory next to the target and renames it into place, so a crash never leaves a
half-written model where a reader expects a whole one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mlx_med.core import params as params_lib
from mlx_med.core import sharding as sharding_lib
from mlx_med.core.fileio import replace_dir
from mlx_med.core.transformer import DecoderConfig, as_dtype, layers_are_stacked, unstack_layers
from mlx_med.llm import hf_config as hf_config_lib
from mlx_med.llm.safetensors_io import CheckpointError, SafetensorsFile, write_safetensors

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Non-weight files that travel with a model directory (tokenizer, chat template, defaults).
SIDECAR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "chat_template.json", "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                 "added_tokens.json")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints store; recomputed here


@dataclasses.dataclass(frozen=True)
class _Entry:
  path: tuple[str, ...]  # our parameter path
  hf_name: str  # HF tensor name; "{i}" is the layer index for stacked entries
  kind: str  # copy | linear | in_heads | heads_bias | out_heads
  stacked: bool


def _plan(cfg: DecoderConfig) -> list[_Entry]:
  e = [_Entry(("embed", "embedding"), "model.embed_tokens.weight", "copy", False)]
  layer = "model.layers.{i}."
  for proj in ("q_proj", "k_proj", "v_proj"):
    e.append(_Entry(("layers", "attn", proj, "kernel"), layer + f"self_attn.{proj}.weight", "in_heads", True))
    if cfg.qkv_bias:
      e.append(_Entry(("layers", "attn", proj, "bias"), layer + f"self_attn.{proj}.bias", "heads_bias", True))
  e.append(_Entry(("layers", "attn", "o_proj", "kernel"), layer + "self_attn.o_proj.weight", "out_heads", True))
  if cfg.qk_norm:
    e.append(_Entry(("layers", "attn", "q_norm", "scale"), layer + "self_attn.q_norm.weight", "copy", True))
    e.append(_Entry(("layers", "attn", "k_norm", "scale"), layer + "self_attn.k_norm.weight", "copy", True))
  e.append(_Entry(("layers", "input_norm", "scale"), layer + "input_layernorm.weight", "copy", True))
  e.append(_Entry(("layers", "post_attn_norm", "scale"), layer + "post_attention_layernorm.weight", "copy", True))
  for proj in ("gate_proj", "up_proj", "down_proj"):
    e.append(_Entry(("layers", "mlp", proj, "kernel"), layer + f"mlp.{proj}.weight", "linear", True))
  e.append(_Entry(("final_norm", "scale"), "model.norm.weight", "copy", False))
  if not cfg.tie_embeddings:
    e.append(_Entry(("lm_head", "kernel"), "lm_head.weight", "linear", False))
  return e


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """HF tensor shape for one (un-stacked) parameter of ours."""
  if kind == "copy":
    return shape
  if kind == "linear":
    return (shape[1], shape[0])
  if kind == "in_heads":
    d, h, hd = shape
    return (h * hd, d)
  if kind == "heads_bias":
    h, hd = shape
    return (h * hd,)
  if kind == "out_heads":
    h, hd, d = shape
    return (d, h * hd)
  raise AssertionError(kind)


def _read_region(source: np.ndarray, kind: str, shape: tuple[int, ...], region: tuple[slice, ...]) -> np.ndarray:
  """Our-layout block `region` (slices of `shape`) read from an HF-layout (memmapped) tensor."""
  if kind == "copy":
    return np.asarray(source[region])
  if kind == "linear":
    a, b = region
    return np.asarray(source[b, a]).T
  if kind == "in_heads":
    d, h, e = region
    hd = shape[2]
    block = np.asarray(source[h.start * hd:h.stop * hd, d])
    return block.reshape(h.stop - h.start, hd, -1)[:, e, :].transpose(2, 0, 1)
  if kind == "heads_bias":
    h, e = region
    hd = shape[1]
    return np.asarray(source[h.start * hd:h.stop * hd]).reshape(h.stop - h.start, hd)[:, e]
  if kind == "out_heads":
    h, e, d = region
    hd = shape[1]
    block = np.asarray(source[d, h.start * hd:h.stop * hd])
    return block.reshape(-1, h.stop - h.start, hd)[:, :, e].transpose(1, 2, 0)
  raise AssertionError(kind)


def _to_hf_layout(kind: str, x: np.ndarray) -> np.ndarray:
  if kind == "copy":
    return x
  if kind == "linear":
    return x.T
  if kind == "in_heads":
    return x.reshape(x.shape[0], -1).T
  if kind == "heads_bias":
    return x.reshape(-1)
  if kind == "out_heads":
    return x.reshape(-1, x.shape[-1]).T
  raise AssertionError(kind)


class HFWeights:
  """The tensors of an HF directory (one file or an index of shards), opened lazily.

  `reads` records (tensor name, region shape) of every read, which lets tests prove
  that a sharded load never reads a whole tensor for one device.
  """

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    index_path = os.path.join(model_dir, INDEX_NAME)
    single_path = os.path.join(model_dir, SINGLE_NAME)
    if os.path.isfile(index_path):
      try:
        with open(index_path, encoding="utf-8") as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from None
      for name, shard in sorted(weight_map.items()):
        if not os.path.isfile(os.path.join(model_dir, shard)):
          raise CheckpointError(f"{index_path} maps tensor {name!r} to shard {shard!r}, which does not exist "
                                f"in {model_dir}")
      self.weight_map = dict(weight_map)
    elif os.path.isfile(single_path):
      self.weight_map = {name: SINGLE_NAME for name in SafetensorsFile(single_path).keys()}
    else:
      others = sorted(f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth")))
      hint = f" (found {others}: pickled weights are not read; convert them to safetensors)" if others else ""
      raise CheckpointError(f"{model_dir}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")
    self._files: dict[str, SafetensorsFile] = {}
    self.reads: list[tuple[str, tuple[int, ...]]] = []

  def _file(self, shard: str) -> SafetensorsFile:
    if shard not in self._files:
      self._files[shard] = SafetensorsFile(os.path.join(self.model_dir, shard))
    return self._files[shard]

  def names(self) -> list[str]:
    return list(self.weight_map)

  def tensor(self, name: str) -> np.ndarray:
    shard = self.weight_map[name]
    f = self._file(shard)
    if name not in f:
      raise CheckpointError(f"the index maps tensor {name!r} to {shard!r}, but that file does not contain it")
    return f.tensor(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return self._file(self.weight_map[name]).shape(name)

  def describe(self, name: str) -> str:
    return f"{name!r} (in {self.weight_map.get(name, '?')})"


class RenamedHFWeights:
  """The decoder's tensors inside a larger directory under other names (a vision-language
  model's language model: `model.language_model.layers.0...` or `language_model.model.layers.0...`).

  `names` maps the decoder's own HF names (`model.layers.0...`, `lm_head.weight`) to the
  names in `weights`; only those tensors are visible, so `load_hf_params(...,
  weights=RenamedHFWeights(...))` checks and loads the language model alone.
  """

  def __init__(self, weights: HFWeights, names: dict[str, str]):
    self.base = weights
    self.model_dir = weights.model_dir
    self.mapping = dict(names)
    self.reads = weights.reads

  def names(self) -> list[str]:
    return list(self.mapping)

  def tensor(self, name: str) -> np.ndarray:
    return self.base.tensor(self.mapping[name])

  def shape(self, name: str) -> tuple[int, ...]:
    return self.base.shape(self.mapping[name])

  def describe(self, name: str) -> str:
    return self.base.describe(self.mapping.get(name, name))


def _check_tensors(weights: HFWeights, cfg: DecoderConfig, plan: list[_Entry], abstract: Any) -> None:
  """Fails before loading anything if a tensor is missing, extra or of the wrong shape."""
  expected: dict[str, tuple[int, ...]] = {}
  for entry in plan:
    shape = tuple(_get(abstract, entry.path).shape)
    if entry.stacked:
      for i in range(cfg.num_layers):
        expected[entry.hf_name.format(i=i)] = _hf_shape(entry.kind, shape[1:])
    else:
      expected[entry.hf_name] = _hf_shape(entry.kind, shape)
  present = set(weights.names())
  missing = [n for n in expected if n not in present]
  if missing:
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    raise CheckpointError(f"{weights.model_dir}: missing tensor {missing[0]!r}{more} "
                          f"(config.json says {cfg.num_layers} layers, tie_word_embeddings={cfg.tie_embeddings})")
  ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
  unexpected = sorted(n for n in present - set(expected)
                      if n not in ignorable and not n.endswith(_IGNORED_SUFFIXES))
  if unexpected:
    raise CheckpointError(f"{weights.model_dir}: unexpected tensors {unexpected[:5]}"
                          f"{' ...' if len(unexpected) > 5 else ''}: the checkpoint does not match config.json "
                          "(an unsupported architecture feature?)")
  for name, shape in expected.items():
    found = weights.shape(name)
    if tuple(found) != tuple(shape):
      raise CheckpointError(f"tensor {weights.describe(name)} has shape {list(found)}, expected {list(shape)} "
                            "from config.json")


def _normalise(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
  out = []
  for dim, s in enumerate(index):
    start, stop, step = s.indices(shape[dim])
    if step != 1:
      raise ValueError("strided shards are not supported")
    out.append(slice(start, stop))
  out.extend(slice(0, d) for d in shape[len(out):])
  return tuple(out)


def load_hf_params(model_dir: str, cfg: DecoderConfig, rules: Optional[sharding_lib.ShardingRules] = None,
                   weights: Optional[HFWeights] = None) -> Any:
  """Parameters of `cfg` from an HF directory, placed with `param_shardings(cfg, rules)` when rules are given.

  The layer layout follows `cfg.scan_layers` (stacked "layers", or layers_0.. for
  inference); the stacked leaves are read, then split one leaf at a time.
  """
  if not cfg.scan_layers:
    stacked = load_hf_params(model_dir, dataclasses.replace(cfg, scan_layers=True), rules, weights)
    params = unstack_layers(stacked, cfg.num_layers, donate=True)
    if rules is not None:
      params = jax.device_put(params, params_lib.param_shardings(cfg, rules))
    return params
  weights = weights or HFWeights(model_dir)
  plan = _plan(cfg)
  abstract = params_lib.abstract_params(cfg)
  _check_tensors(weights, cfg, plan, abstract)
  shardings = params_lib.param_shardings(cfg, rules) if rules is not None else None
  target_dtype = np.dtype(as_dtype(cfg.param_dtype))
  out: dict = {}
  for entry in plan:
    leaf = _get(abstract, entry.path)
    shape = tuple(leaf.shape)

    def read(region: tuple[slice, ...], entry=entry, shape=shape) -> np.ndarray:
      if entry.stacked:
        layers, inner = region[0], region[1:]
        blocks = []
        for i in range(layers.start, layers.stop):
          name = entry.hf_name.format(i=i)
          blocks.append(_read_region(weights.tensor(name), entry.kind, shape[1:], inner))
          weights.reads.append((name, blocks[-1].shape))
        block = np.stack(blocks)
      else:
        block = _read_region(weights.tensor(entry.hf_name), entry.kind, shape, region)
        weights.reads.append((entry.hf_name, block.shape))
      return np.ascontiguousarray(block.astype(target_dtype))

    if shardings is None:
      value = jnp.asarray(read(_normalise((), shape)))
    else:
      cache: dict[tuple, np.ndarray] = {}

      def callback(index, read=read, shape=shape, cache=cache):
        region = _normalise(index, shape)
        key = tuple((s.start, s.stop) for s in region)
        if key not in cache:  # replicated shards ask for the same region on several devices
          cache[key] = read(region)
        return cache[key]

      value = jax.make_array_from_callback(shape, _get(shardings, entry.path), callback)
      cache.clear()
    _set(out, entry.path, value)
  return out


# ------------------------------------------------------------------------ saving


def _to_host(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _parse_size(size: int | str) -> int:
  if isinstance(size, int):
    return size
  text = size.strip().upper()
  for suffix, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3),
                       ("B", 1)):
    if text.endswith(suffix):
      return int(float(text[:-len(suffix)]) * mult)
  return int(text)


def _hf_tensor_stream(params: Any, cfg: DecoderConfig, dtype: np.dtype):
  """(hf name, shape, producer) for every tensor, in checkpoint order."""
  items = []
  plan = _plan(cfg)
  for entry in [p for p in plan if not p.stacked and p.path[0] == "embed"]:
    leaf = _get(params, entry.path)
    items.append((entry.hf_name, _hf_shape(entry.kind, tuple(leaf.shape)),
                  lambda leaf=leaf, kind=entry.kind: _to_hf_layout(kind, _to_host(leaf))))
  stacked = layers_are_stacked(params)
  for i in range(cfg.num_layers):
    for entry in [p for p in plan if p.stacked]:
      if stacked:
        leaf = _get(params, entry.path)
        shape, take = tuple(leaf.shape[1:]), (lambda leaf=leaf, i=i: _to_host(leaf[i]))
      else:  # layers_0, layers_1, ... (scan_layers=False)
        leaf = _get(params, (f"layers_{i}",) + tuple(entry.path[1:]))
        shape, take = tuple(leaf.shape), (lambda leaf=leaf: _to_host(leaf))
      items.append((entry.hf_name.format(i=i), _hf_shape(entry.kind, shape),
                    lambda take=take, kind=entry.kind: _to_hf_layout(kind, take())))
  for entry in [p for p in plan if not p.stacked and p.path[0] != "embed"]:
    leaf = _get(params, entry.path)
    items.append((entry.hf_name, _hf_shape(entry.kind, tuple(leaf.shape)),
                  lambda leaf=leaf, kind=entry.kind: _to_hf_layout(kind, _to_host(leaf))))
  return [(name, shape, dtype, producer) for name, shape, producer in items]


def hf_tensor_stream(params: Any, cfg: DecoderConfig, dtype: Any) -> list:
  """(HF name, shape, dtype, producer) for every decoder tensor, in checkpoint order: what
  `save_hf_checkpoint` writes, for a caller that writes the decoder inside a larger
  directory (renaming the tensors and adding its own). `producer()` returns the host array."""
  return _hf_tensor_stream(params, cfg, np.dtype(as_dtype(dtype) if isinstance(dtype, str) else dtype))


_TORCH_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16",
                      np.dtype(np.float16): "float16"}


def save_hf_checkpoint(out_dir: str, params: Any, cfg: DecoderConfig, *, hf_config: Optional[dict] = None,
                       model_type: Optional[str] = None, dtype: Optional[str] = None,
                       max_shard_size: int | str = "5GB", copy_files_from: Optional[str] = None,
                       overwrite: bool = False) -> str:
  """Writes an HF directory (config.json + safetensors, sharded with an index when large).

  hf_config: the original config.json dict to keep unrelated fields (token ids, ...).
  dtype: tensor dtype on disk (default: the parameters' dtype).
  copy_files_from: a model directory whose tokenizer / chat template / generation
    config files are copied along.
  Only process 0 writes on a multi-host run; every process must call this (gathers).
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
  disk_dtype = np.dtype(as_dtype(dtype or cfg.param_dtype))
  tensors = _hf_tensor_stream(params, cfg, disk_dtype)
  limit = _parse_size(max_shard_size)
  shards: list[list] = [[]]
  size = 0
  for item in tensors:
    nbytes = disk_dtype.itemsize * int(np.prod(item[1], dtype=np.int64))
    if shards[-1] and size + nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += nbytes
  writer = jax.process_index() == 0
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent) if writer else None
  try:
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
      fname = SINGLE_NAME if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
      arrays = (producer() for _, _, _, producer in shard)
      if writer:
        total += write_safetensors(os.path.join(tmp, fname), [(n, s, d) for n, s, d, _ in shard], arrays)
      else:
        for _ in arrays:  # still take part in the gathers
          pass
      weight_map.update({name: fname for name, _, _, _ in shard})
    if not writer:
      return out_dir
    if len(shards) > 1:
      with open(os.path.join(tmp, INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    config = hf_config_lib.hf_config_from_decoder(cfg, model_type=model_type, base=hf_config,
                                                  torch_dtype=_TORCH_DTYPE_NAMES.get(disk_dtype, "float32"))
    write_config_and_sidecars(tmp, config, copy_files_from)
    replace_dir(tmp, out_dir)
    tmp = None
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


# ------------------------------------------------------------------------- Orbax

_ORBAX_PARAMS = "params"
_ORBAX_META = "mlx_med_llm.json"


def write_config_and_sidecars(directory: str, config: dict, copy_files_from: Optional[str] = None,
                              sidecars: Sequence[str] = SIDECAR_FILES) -> None:
  """config.json into `directory` (a checkpoint being written), plus the tokenizer/generation files
  (`sidecars`) that exist in `copy_files_from`."""
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  if copy_files_from:
    for name in sidecars:
      src = os.path.join(copy_files_from, name)
      if os.path.isfile(src):
        shutil.copy2(src, os.path.join(directory, name))


def _config_to_json(cfg: DecoderConfig) -> dict:
  values = dataclasses.asdict(cfg)
  if values["rope_scaling"] is not None:
    values["rope_scaling"] = dict(values["rope_scaling"])
  return values


def save_orbax(path: str, params: Any, cfg: DecoderConfig, *, hf_config: Optional[dict] = None) -> str:
  """Parameters as an Orbax checkpoint (`path/params`) plus the configs as JSON beside them."""
  import orbax.checkpoint as ocp

  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(path, _ORBAX_PARAMS), params)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(path, _ORBAX_META), "w", encoding="utf-8") as f:
      json.dump({"decoder_config": _config_to_json(cfg), "hf_config": hf_config}, f, indent=2, sort_keys=True)
  return path


def load_orbax(path: str, rules: Optional[sharding_lib.ShardingRules] = None,
               cfg: Optional[DecoderConfig] = None) -> tuple[Any, DecoderConfig, Optional[dict]]:
  """(params, cfg, hf_config) from `save_orbax`; params restored straight into their shardings."""
  import orbax.checkpoint as ocp

  path = os.path.abspath(path)
  meta_path = os.path.join(path, _ORBAX_META)
  if not os.path.isfile(meta_path):
    raise CheckpointError(f"{path}: no {_ORBAX_META}; not written by mlx_med.llm.checkpoint.save_orbax")
  with open(meta_path, encoding="utf-8") as f:
    meta = json.load(f)
  cfg = cfg or DecoderConfig.from_config(meta["decoder_config"])
  abstract = params_lib.abstract_params(cfg)
  if rules is not None:
    shardings = params_lib.param_shardings(cfg, rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  else:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
  params = ocp.StandardCheckpointer().restore(os.path.join(path, _ORBAX_PARAMS), abstract)
  return params, cfg, meta.get("hf_config")


def hf_to_orbax(model_dir: str, orbax_dir: str, *, dtype: str = "float32",
                rules: Optional[sharding_lib.ShardingRules] = None) -> str:
  """Converts an HF directory into an Orbax checkpoint for training."""
  hf = hf_config_lib.read_hf_config(model_dir)
  cfg = hf_config_lib.decoder_config_from_hf(hf, dtype=dtype)
  params = load_hf_params(model_dir, cfg, rules)
  return save_orbax(orbax_dir, params, cfg, hf_config=hf)


def orbax_to_hf(orbax_dir: str, out_dir: str, *, dtype: Optional[str] = None, copy_files_from: Optional[str] = None,
                max_shard_size: int | str = "5GB", overwrite: bool = False) -> str:
  """Converts an Orbax checkpoint from `save_orbax` back into an HF directory."""
  params, cfg, hf = load_orbax(orbax_dir)
  return save_hf_checkpoint(out_dir, params, cfg, hf_config=hf, dtype=dtype, copy_files_from=copy_files_from,
                            max_shard_size=max_shard_size, overwrite=overwrite)
