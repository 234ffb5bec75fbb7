"""Exact top-k search over embeddings, in JAX, sharded over devices.

`ExactIndex` holds an [N, E] database of embeddings with one id per row (usually the image's
path) and answers `search(queries, k) -> (scores [Q, k], indices [Q, k])` exactly, the way
FAISS's flat indexes do:

- metric "cosine": rows and queries are L2-normalised; score = cosine similarity, descending.
- metric "ip": raw inner product, descending (FAISS `IndexFlatIP`).
- metric "l2": squared Euclidean distance ||q||^2 - 2 q.x + ||x||^2 (clamped at 0), ascending
  (FAISS `IndexFlatL2`, which also reports squared distances).

Ties are broken by the lower row index, for every metric and any device count.

Why this shape: the database is the large operand (100k x 1024 fp32 is 400 MB), so it is split
along N over a one-axis device mesh ("db") and never moves; the queries are replicated. Each
device scores its rows against a batch of queries with fp32 accumulation (the database may be
stored in bf16 to halve its memory), keeps its own top-k, and the k-per-device candidates are
all-gathered and merged by a second top-k. `lax.top_k` puts the lower position first among
equal values, and the gathered candidates are laid out in shard order with each shard's list
already in index order, so the merge keeps the lower-index rule. Rows added to pad N to a
multiple of the device count score -inf and are never returned (k > N is an error).

The mesh axis uses the Explicit axis type on purpose: the only computation is one `shard_map`
whose in/out specs state every placement, and with sharding-in-types an input placed otherwise
is an error instead of a silent reshard of the database.

`prefilter=True` (float32 databases) keeps a bf16 copy of the rows on the devices as well and
searches it first: each device takes its top `prefilter_k` rows by the bf16 product (twice the
matmul rate of fp32 on CPUs with AVX512-BF16, and on accelerators), rescores them with the fp32
rows and merges. The result is certified per query: with t the best bf16 key any device left
out and m a rigorous bound on |fp32 key - bf16 key| (from the query's and the database's bf16
rounding errors, Cauchy-Schwarz, plus fp32 accumulation), a query whose k-th exact key exceeds
t + m cannot have lost a row to the prefilter. Queries that fail the test are searched again
by the plain fp32 program, so results equal the plain search's (up to fp32 summation order in
the scores); `last_certified_fraction` says how many passed.

Queries go through in batches of a fixed set of shapes (powers of two up to `batch_size`, the
last batch padded), so a search compiles at most log2(batch_size) programs per k and reuses them.

On disk (`save(dir)` / `ExactIndex.load(dir)`): `embeddings.npy` (as stored: normalised for
cosine; bf16 is saved as its uint16 bit pattern), `ids.json` and `meta.json` (format, version,
metric, count, dim, dtype). A save writes a temporary directory and renames it into place.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mlx_med.core.fileio import replace_dir

FORMAT = "mlx_med.exact_index"
VERSION = 1
METRICS = ("cosine", "ip", "l2")
DTYPES = ("float32", "bfloat16")
AXIS = "db"
_EPS = 1e-12
_RESCORE_BYTES = 128 << 20


class IndexInputError(ValueError):
  """Bad input to an ExactIndex (one-line message naming what is wrong and how to fix it)."""


def _normalise(x: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(norms, _EPS)


def _as_matrix(x: np.ndarray | Sequence, what: str, dim: int | None) -> np.ndarray:
  x = np.asarray(x, dtype=np.float32)
  if x.ndim == 1:
    x = x[None, :]
  if x.ndim != 2:
    raise IndexInputError(f"{what} must be a 2-D array [count, dim]; got shape {x.shape}")
  if dim is not None and x.shape[1] != dim:
    raise IndexInputError(f"{what} have dimension {x.shape[1]} but the index holds dimension {dim}; "
                      "embed them with the same model as the index")
  if not np.all(np.isfinite(x)):
    bad = int(np.flatnonzero(~np.all(np.isfinite(x), axis=1))[0])
    raise IndexInputError(f"{what} row {bad} holds NaN or inf; drop or recompute that embedding")
  return x


def make_index_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis mesh ("db", Explicit) over `devices` (default: all local devices)."""
  devices = list(devices) if devices is not None else jax.devices()
  return Mesh(np.asarray(devices, dtype=object), (AXIS,), axis_types=(jax.sharding.AxisType.Explicit,))


def _bucket(remaining: int, batch_size: int) -> int:
  """The batch shape for `remaining` queries: a power of two, at most batch_size."""
  return min(batch_size, 1 << max(0, math.ceil(math.log2(max(remaining, 1)))))


def _layout(count: int, shards: int, block_rows: int) -> tuple[int, int]:
  """(blocks per shard, rows per block) covering `count` rows on `shards` devices.

  Each shard's rows are scored block by block, so the [batch, rows] score matrix never exceeds
  [batch, block_rows] (100k rows x 1024 queries would otherwise be 400 MB of fp32 scores).
  Blocks are sized evenly (a multiple of 8 rows) so that padding stays small.
  """
  n_local = max(1, -(-count // shards))
  blocks = -(-n_local // block_rows)
  rows = -(-n_local // blocks)
  rows = -(-rows // 8) * 8
  return blocks, rows


def _blocked_topk(queries, q_sq, db, sqnorm, offset, n_valid, *, metric: str, kk: int, blocks: int, rows: int):
  """Per-block top-`kk` keys and global row indices of one shard: [B, blocks * min(kk, rows)] each.

  The key is the dot product (cosine/ip) or the negated squared distance (l2), so that one
  top_k (largest first) serves every metric. Candidates come out in block (= index) order.
  """
  kk = min(kk, rows)

  def score_block(block, block_sq, first_row):
    # fp32 operands: HIGHEST keeps accelerators from rounding them to bf16/tf32 (a no-op on CPU);
    # bf16 operands are what they are. Accumulation is fp32 either way.
    precision = jax.lax.Precision.HIGHEST if block.dtype == jnp.float32 else None
    dots = jax.lax.dot_general(queries.astype(block.dtype), block, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)  # [B, rows]
    key = -jnp.maximum(q_sq - 2.0 * dots + block_sq[None, :], 0.0) if metric == "l2" else dots
    row_ids = first_row + jnp.arange(rows, dtype=jnp.int32)
    key = jnp.where((row_ids < n_valid)[None, :], key, -jnp.inf)  # padding rows never win
    top, local = jax.lax.top_k(key, kk)  # lower index first among ties
    return top, local.astype(jnp.int32) + first_row

  if blocks == 1:
    return score_block(db, sqnorm, offset)

  def step(_, xs):
    b, block, block_sq = xs
    return None, score_block(block, block_sq, offset + b * rows)

  _, (top, idx) = jax.lax.scan(step, None, (jnp.arange(blocks, dtype=jnp.int32), db.reshape(blocks, rows, -1),
                                            sqnorm.reshape(blocks, rows)))
  # [blocks, B, kk] -> [B, blocks * kk], in block (= index) order.
  return jnp.moveaxis(top, 0, 1).reshape(top.shape[1], -1), jnp.moveaxis(idx, 0, 1).reshape(idx.shape[1], -1)


def _merge(top, idx, k: int, metric: str):
  """Global top-k from every shard's candidates (gathered in shard = index order)."""
  cand_key = jax.lax.all_gather(top, AXIS, axis=1, tiled=True)
  cand_idx = jax.lax.all_gather(idx, AXIS, axis=1, tiled=True)
  best, pos = jax.lax.top_k(cand_key, k)  # candidates in index order: ties keep the lower index
  found = jnp.take_along_axis(cand_idx, pos, axis=1)
  return best, (-best if metric == "l2" else best), found


@functools.cache
def _search_program(mesh: Mesh, metric: str, k: int, blocks: int, rows: int):
  """jit(shard_map(...)) mapping (db, sqnorm, n_valid, queries) -> (scores, indices).

  db [shards * blocks * rows, E] sharded along rows; queries [B, E] replicated.
  """

  def per_shard(db, sqnorm, n_valid, queries):
    # db [blocks * rows, E]: this device's rows; queries [B, E]: all of them.
    q_sq = jnp.sum(jnp.square(queries.astype(jnp.float32)), axis=1, keepdims=True)
    offset = jax.lax.axis_index(AXIS) * (blocks * rows)
    top, idx = _blocked_topk(queries, q_sq, db, sqnorm, offset, n_valid, metric=metric, kk=k, blocks=blocks, rows=rows)
    _, scores, found = _merge(top, idx, k, metric)
    return scores, found

  mapped = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(AXIS, None), P(AXIS), P(), P()),
                         out_specs=(P(), P()), check_vma=False)
  return jax.jit(mapped)


@functools.cache
def _prefilter_program(mesh: Mesh, metric: str, k: int, kp: int, blocks: int, rows: int):
  """The bf16-prefiltered search: (db32, db16, sqnorm, n_valid, queries, margin) -> (scores, indices, certified).

  Each shard keeps its top-`kp` rows by the bf16 product, rescores them with its fp32 rows, and
  the exact top-k merge as in `_search_program`. A query is certified when the k-th exact key
  beats every shard's kp-th bf16 key by more than `margin` (the rounding bound): then no row
  left out by the prefilter can belong to the top k.
  """
  n_local = blocks * rows
  kp_local = min(kp, blocks * min(kp, rows))

  def per_shard(db32, db16, sqnorm, n_valid, queries, margin):
    q_sq = jnp.sum(jnp.square(queries), axis=1, keepdims=True)
    offset = jax.lax.axis_index(AXIS) * n_local
    top16, idx16 = _blocked_topk(queries, q_sq, db16, sqnorm, offset, n_valid, metric=metric, kk=kp, blocks=blocks,
                                 rows=rows)
    keys16, pos = jax.lax.top_k(top16, kp_local)
    cand = jnp.take_along_axis(idx16, pos, axis=1)  # [B, kp_local] global rows
    # The best key a row outside the candidates can have (none outside when all rows are in).
    outside = keys16[:, -1] if kp_local < n_local else jnp.full(keys16.shape[:1], -jnp.inf)
    local = jnp.clip(cand - offset, 0, n_local - 1)
    exact = jnp.einsum("be,bke->bk", queries, db32[local], precision=jax.lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32)
    if metric == "l2":
      exact = -jnp.maximum(q_sq - 2.0 * exact + sqnorm[local], 0.0)
    exact = jnp.where(cand < n_valid, exact, -jnp.inf)
    cand, exact = jax.lax.sort((cand, exact), dimension=1, num_keys=1)  # index order, for the tie rule
    top, pos = jax.lax.top_k(exact, min(k, kp_local))
    best, scores, found = _merge(top, jnp.take_along_axis(cand, pos, axis=1), k, metric)
    certified = best[:, -1] > jax.lax.pmax(outside, AXIS) + margin
    return scores, found, certified

  mapped = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(AXIS, None), P(AXIS, None), P(AXIS), P(), P(), P()),
                         out_specs=(P(), P(), P()), check_vma=False)
  return jax.jit(mapped)


class ExactIndex:
  """Exact top-k search (cosine / inner product / squared L2) sharded over devices.

  Args:
    embeddings: [N, E] float array (may be empty: [0, E] with `dim`, or None with `dim`).
    ids: one string per row (e.g. image paths); default the row numbers as strings.
    metric: "cosine" | "ip" | "l2".
    dtype: storage dtype of the database, "float32" or "bfloat16" (scores accumulate in fp32).
    devices: the devices to shard over (default all local devices).
    batch_size: most queries per device program (a power of two).
    block_rows: most database rows scored at once on a device (bounds the score matrix).
    prefilter: for a float32 database, also keep a bf16 copy on the devices and search it first
      (certified; see the module docstring). Same results; faster where bf16 products are.
    prefilter_k: candidates per device that the prefilter rescores in fp32 (at least k). More
      certify more queries on tightly clustered embeddings (each failure costs an fp32 search)
      but cost more top-k and rescoring work; `last_certified_fraction` reports the share.
    dim: embedding dimension, needed only when `embeddings` is None.
  """

  def __init__(self, embeddings: np.ndarray | None = None, ids: Sequence[str] | None = None, *, metric: str = "cosine",
               dtype: str = "float32", devices: Sequence[jax.Device] | None = None, batch_size: int = 1024,
               dim: int | None = None, block_rows: int = 16384, prefilter: bool = False, prefilter_k: int = 32):
    if metric not in METRICS:
      raise IndexInputError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if dtype not in DTYPES:
      raise IndexInputError(f"unknown index dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if batch_size < 1 or batch_size & (batch_size - 1):
      raise IndexInputError(f"batch_size must be a power of two; got {batch_size}")
    self.metric = metric
    self.dtype = dtype
    self.batch_size = batch_size
    if block_rows < 8:
      raise IndexInputError(f"block_rows must be at least 8; got {block_rows}")
    self.block_rows = block_rows
    if prefilter and dtype != "float32":
      raise IndexInputError("prefilter=True needs dtype='float32' (a bf16 database is already what the prefilter reads)")
    self.prefilter, self.prefilter_k = bool(prefilter), int(prefilter_k)
    self.last_certified_fraction: float | None = None
    self.mesh = make_index_mesh(devices)
    if embeddings is None:
      if dim is None:
        raise IndexInputError("an empty ExactIndex needs dim=<embedding dimension>")
      embeddings = np.zeros((0, dim), np.float32)
    x = _as_matrix(embeddings, "embeddings", dim)
    self.dim = int(x.shape[1])
    self._rows = np.zeros((0, self.dim), self._np_dtype)
    self._sqnorm = np.zeros((0,), np.float32)
    self.ids: list[str] = []
    self._device: tuple[jax.Array, jax.Array] | None = None
    self.add(x, ids)

  # ----------------------------------------------------------------------------- building

  @property
  def _np_dtype(self):
    return jnp.bfloat16 if self.dtype == "bfloat16" else np.float32

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def num_shards(self) -> int:
    return self.mesh.devices.size

  def add(self, embeddings: np.ndarray, ids: Sequence[str] | None = None) -> None:
    """Appends rows; `ids` default to their row numbers."""
    x = _as_matrix(embeddings, "embeddings", self.dim)
    if ids is None:
      ids = [str(i) for i in range(len(self.ids), len(self.ids) + len(x))]
    ids = [str(i) for i in ids]
    if len(ids) != len(x):
      raise IndexInputError(f"got {len(x)} embeddings but {len(ids)} ids; give one id (e.g. a path) per row")
    if self.metric == "cosine":
      x = _normalise(x)
    stored = x.astype(self._np_dtype)
    # Norms of the stored values, so that l2 distances use exactly the vectors being multiplied.
    sq = np.sum(np.square(stored.astype(np.float32)), axis=1)
    self._rows = np.concatenate([self._rows, stored]) if len(self._rows) else stored
    self._sqnorm = np.concatenate([self._sqnorm, sq]) if len(self._sqnorm) else sq
    self.ids.extend(ids)
    self._device = None

  @property
  def embeddings(self) -> np.ndarray:
    """The stored rows as float32 (normalised for cosine)."""
    return np.asarray(self._rows, np.float32)

  def _device_arrays(self) -> tuple[jax.Array, jax.Array, tuple[int, int]]:
    shards = self.num_shards
    layout = _layout(len(self), shards, self.block_rows)
    if self._device is None:
      pad = shards * layout[0] * layout[1] - len(self)
      rows = np.concatenate([self._rows, np.zeros((pad, self.dim), self._rows.dtype)]) if pad else self._rows
      sq = np.concatenate([self._sqnorm, np.zeros((pad,), np.float32)]) if pad else self._sqnorm
      row_sharding = NamedSharding(self.mesh, P(AXIS, None))
      self._device = (jax.device_put(rows, row_sharding), jax.device_put(sq, NamedSharding(self.mesh, P(AXIS))))
      if self.prefilter:
        rows16 = rows.astype(jnp.bfloat16)
        self._device16 = jax.device_put(rows16, row_sharding)
        # Largest row norm and largest bf16 rounding error of a row (float64, for the margin).
        rows64 = rows.astype(np.float64)
        self._x_max = float(np.sqrt(np.max(np.sum(rows64 ** 2, axis=1))))
        self._x16_max = float(np.sqrt(np.max(np.sum(rows16.astype(np.float64) ** 2, axis=1))))
        self._err_max = float(np.sqrt(np.max(np.sum((rows64 - rows16.astype(np.float64)) ** 2, axis=1))))
    return self._device[0], self._device[1], layout

  def _margins(self, q: np.ndarray) -> np.ndarray:
    """Per query, a bound on |exact key - bf16 key| + fp32 rounding, over every row.

    q.x - bf16(q).bf16(x) = (q - bf16(q)).x + bf16(q).(x - bf16(x)), each bounded by Cauchy-Schwarz
    with the query's own rounding error and the database's largest; fp32 accumulation of either
    product adds at most gamma_E * |q| |x| (gamma_E = E u / (1 - E u), u = 2^-24), counted twice
    over. The l2 key is -(|q|^2 - 2 q.x + |x|^2): twice the dot bound plus the rounding of the sum.
    """
    q64 = q.astype(np.float64)
    q16 = q.astype(jnp.bfloat16).astype(np.float64)
    q_norm, q16_norm = np.linalg.norm(q64, axis=1), np.linalg.norm(q16, axis=1)
    u = 2.0 ** -24
    gamma = self.dim * u / (1 - self.dim * u)
    dot = (np.linalg.norm(q64 - q16, axis=1) * self._x_max + q16_norm * self._err_max
           + 2 * gamma * (q16_norm * self._x16_max + q_norm * self._x_max))
    if self.metric == "l2":
      return (2 * dot + 8 * u * (q_norm + self._x_max) ** 2).astype(np.float32)
    return dot.astype(np.float32)

  # ------------------------------------------------------------------------------ search

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows for each query: (scores [Q, k] float32, indices [Q, k] int64).

    Scores are similarities (descending) for cosine/ip and squared distances (ascending) for l2.
    """
    if len(self) == 0:
      raise IndexInputError("the index is empty; add embeddings before searching")
    if not isinstance(k, (int, np.integer)) or k < 1:
      raise IndexInputError(f"k must be a positive integer; got {k!r}")
    if k > len(self):
      raise IndexInputError(f"k={k} is larger than the index ({len(self)} rows); ask for at most {len(self)}")
    q = _as_matrix(queries, "queries", self.dim)
    if self.metric == "cosine":
      q = _normalise(q)
    db, sq, (blocks, rows) = self._device_arrays()
    replicated = NamedSharding(self.mesh, P())
    n_valid = jax.device_put(np.int32(len(self)), replicated)
    plain = _search_program(self.mesh, self.metric, int(k), blocks, rows)
    if self.prefilter:
      kp = max(self.prefilter_k, int(k))
      program = _prefilter_program(self.mesh, self.metric, int(k), kp, blocks, rows)
      margins = self._margins(q)
      # The fp32 rescoring gathers [batch, kp, E] rows per device: keep that under ~128 MB.
      cap = max(8, 1 << int(math.log2(max(1, _RESCORE_BYTES // (kp * self.dim * 4)))))
      first_batch = min(self.batch_size, cap)
    else:
      first_batch = self.batch_size
    pending = []
    for start, size in self._batches(len(q), first_batch):
      chunk = self._pad(q[start:start + size], size)
      if self.prefilter:
        m = self._pad(margins[start:start + size, None], size)[:, 0]
        out = program(db, self._device16, sq, n_valid, jax.device_put(chunk, replicated), jax.device_put(m, replicated))
      else:
        out = plain(db, sq, n_valid, jax.device_put(chunk, replicated))
      pending.append((min(size, len(q) - start), out))
    scores = np.concatenate([np.asarray(out[0])[:n] for n, out in pending])
    indices = np.concatenate([np.asarray(out[1])[:n] for n, out in pending]).astype(np.int64)
    if self.prefilter:
      certified = np.concatenate([np.asarray(out[2])[:n] for n, out in pending])
      self.last_certified_fraction = float(certified.mean())
      redo = np.flatnonzero(~certified)
      # Queries the prefilter could not certify get the plain fp32 search.
      for start, size in self._batches(len(redo)):
        rows_ = redo[start:start + size]
        s_, i_ = plain(db, sq, n_valid, jax.device_put(self._pad(q[rows_], size), replicated))
        scores[rows_] = np.asarray(s_)[:len(rows_)]
        indices[rows_] = np.asarray(i_)[:len(rows_)]
    return scores, indices

  def _batches(self, count: int, batch_size: int | None = None):
    start = 0
    while start < count:
      size = _bucket(count - start, batch_size or self.batch_size)
      yield start, size
      start += size

  @staticmethod
  def _pad(x: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)]) if len(x) < size else x

  def search_ids(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    """Like `search`, with each hit as (id, score)."""
    scores, indices = self.search(queries, k)
    return [[(self.ids[j], float(s)) for j, s in zip(row_i, row_s)] for row_i, row_s in zip(indices, scores)]

  # ---------------------------------------------------------------------------- persistence

  def save(self, directory: str | os.PathLike[str]) -> Path:
    """Writes the index to `directory` (replacing an index saved there before)."""
    target = Path(directory)
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / "meta.json").exists())):
      raise IndexInputError(f"{target} exists and is not an index directory; choose a new or empty directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
      shutil.rmtree(tmp)
    tmp.mkdir()
    rows = self._rows.view(np.uint16) if self.dtype == "bfloat16" else self._rows
    np.save(tmp / "embeddings.npy", rows)
    (tmp / "ids.json").write_text(json.dumps(self.ids))
    meta = {"format": FORMAT, "version": VERSION, "metric": self.metric, "dtype": self.dtype, "count": len(self),
            "dim": self.dim}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    replace_dir(tmp, target)
    return target

  @classmethod
  def load(cls, directory: str | os.PathLike[str], *, devices: Sequence[jax.Device] | None = None,
           batch_size: int = 1024, block_rows: int = 16384, prefilter: bool = False,
           prefilter_k: int = 32) -> ExactIndex:
    """Reads an index written by `save`, checking its format, version and shapes.

    The search options (devices, batch_size, block_rows, prefilter) are chosen at load time.
    """
    root = Path(directory)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
      raise IndexInputError(f"{root} is not an index directory (no meta.json); build one with `mlx-med embed index build`")
    try:
      meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
      raise IndexInputError(f"{meta_path} is not valid JSON ({err.msg}); rebuild the index") from None
    if meta.get("format") != FORMAT:
      raise IndexInputError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}; rebuild the index")
    if meta.get("version") != VERSION:
      raise IndexInputError(f"{meta_path} is version {meta.get('version')!r}, this code reads version {VERSION}; "
                        "rebuild the index with this version")
    for key in ("metric", "dtype", "count", "dim"):
      if key not in meta:
        raise IndexInputError(f"{meta_path} lacks {key!r}; rebuild the index")
    emb_path, ids_path = root / "embeddings.npy", root / "ids.json"
    for path in (emb_path, ids_path):
      if not path.is_file():
        raise IndexInputError(f"{path} is missing; the index directory is incomplete, rebuild it")
    try:
      rows = np.load(emb_path, allow_pickle=False)
    except ValueError as err:
      raise IndexInputError(f"{emb_path} is not a readable .npy file ({err}); rebuild the index") from None
    expected = (meta["count"], meta["dim"])
    if rows.shape != expected:
      raise IndexInputError(f"{emb_path} has shape {rows.shape} but meta.json says {expected}; rebuild the index")
    if meta["dtype"] == "bfloat16":
      if rows.dtype != np.uint16:
        raise IndexInputError(f"{emb_path} has dtype {rows.dtype}, expected uint16 bits of bfloat16; rebuild the index")
      rows = rows.view(jnp.bfloat16)
    elif rows.dtype != np.float32:
      raise IndexInputError(f"{emb_path} has dtype {rows.dtype}, expected float32; rebuild the index")
    try:
      ids = json.loads(ids_path.read_text())
    except json.JSONDecodeError as err:
      raise IndexInputError(f"{ids_path} is not valid JSON ({err.msg}); rebuild the index") from None
    if not isinstance(ids, list) or len(ids) != meta["count"]:
      raise IndexInputError(f"{ids_path} holds {len(ids) if isinstance(ids, list) else 'no list of'} ids but the index has "
                        f"{meta['count']} rows; rebuild the index")
    if prefilter and meta["dtype"] != "float32":
      prefilter = False  # a bf16 index is already what the prefilter would read
    index = cls(None, metric=meta["metric"], dtype=meta["dtype"], devices=devices, batch_size=batch_size,
                dim=int(meta["dim"]), block_rows=block_rows, prefilter=prefilter, prefilter_k=prefilter_k)
    # Rows are stored as saved (already normalised for cosine): no renormalisation, bit-exact.
    index._rows = np.ascontiguousarray(rows)
    index._sqnorm = np.sum(np.square(index._rows.astype(np.float32)), axis=1)
    index.ids = [str(i) for i in ids]
    return index
