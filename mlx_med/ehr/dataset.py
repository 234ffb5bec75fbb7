"""Token streams on disk and fixed-length pretraining examples that never mix two patients.

Pipeline: MEDS root -> (fit vocabulary on train) -> tokenize a split once into a cached
token stream (npy files, memory-mapped on reuse) -> a grain-compatible random-access source
of fixed-length examples.

Each example is a dict of numpy arrays of length L (= seq_len):
  inputs      int32   tokens fed to the model
  targets     int32   next tokens (inputs shifted by one within a row)
  segment_ids int32   1, 2, 3... per patient piece in the row, 0 on padding
  positions   int32   restart at 0 at the start of each segment
  loss_mask   float32 1 where the target is the next token of the same segment, else 0

Boundary preservation: a row holds whole "pieces" of one patient's timeline each; long
timelines are cut into pieces of at most L+1 tokens that overlap by one token, so every
next-token transition inside a timeline is a target exactly once and no transition ever
crosses from one patient to another (those positions get loss_mask 0, and attention can be
blocked with segment_ids).

Two layouts:
  window  one piece per row, padded: simple, wasteful for short timelines.
  packed  several pieces per row, placed by best-fit-decreasing bin packing: dense rows,
          segment_ids tell the model where each patient starts.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mlx_med.ehr.meds import TIME_NULL, TRAIN_SPLIT, MEDSReader
from mlx_med.ehr.tokenizer import PAD_ID, EncodeStats, TimelineTokenizer, TokenizerConfig

CACHE_VERSION = "1"
PACKING_MODES = ("packed", "window")


def default_cache_dir() -> Path:
  """$MLX_MED_CACHE/ehr_tokens, else ~/.cache/mlx_med/ehr_tokens."""
  return Path(os.environ.get("MLX_MED_CACHE", Path.home() / ".cache" / "mlx_med")) / "ehr_tokens"


@dataclasses.dataclass
class TokenStream:
  """All subjects of one split, tokenized and concatenated.

  Subject i owns tokens[offsets[i]:offsets[i+1]] and the same slice of times (int64
  microseconds; TIME_NULL for the prefix, INT64_MAX for [TIMELINE_END]).
  """

  tokens: np.ndarray
  times: np.ndarray
  offsets: np.ndarray
  subject_ids: np.ndarray
  directory: Path | None = None  # set when memory-mapped from the cache
  _sorted: tuple[np.ndarray, np.ndarray] | None = dataclasses.field(default=None, repr=False)

  def __getstate__(self) -> dict[str, Any]:
    # grain worker processes receive the source by pickling; a cached stream travels as its
    # path and is re-mapped there, instead of copying hundreds of MB of tokens.
    if self.directory is not None:
      return {"directory": str(self.directory)}
    return dict(self.__dict__)

  def __setstate__(self, state: dict[str, Any]) -> None:
    if set(state) == {"directory"}:
      state = dict(TokenStream.load(Path(state["directory"])).__dict__)
    self.__dict__.update(state)

  def __len__(self) -> int:
    return len(self.subject_ids)

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  def subject(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
    return np.asarray(self.tokens[lo:hi]), np.asarray(self.times[lo:hi])

  def index_of(self, subject_ids: np.ndarray) -> np.ndarray:
    """Row of each subject id in this stream, -1 where absent."""
    subject_ids = np.asarray(subject_ids, np.int64)
    if len(self.subject_ids) == 0:
      return np.full(len(subject_ids), -1, np.int64)
    if self._sorted is None:
      order = np.argsort(self.subject_ids, kind="stable")
      self._sorted = (np.asarray(self.subject_ids)[order], order)
    keys, order = self._sorted
    pos = np.clip(np.searchsorted(keys, subject_ids), 0, len(keys) - 1)
    return np.where(keys[pos] == subject_ids, order[pos], -1)

  def save(self, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("tokens", "times", "offsets", "subject_ids"):
      np.save(directory / f"{name}.npy", getattr(self, name))

  @classmethod
  def load(cls, directory: Path, mmap: bool = True) -> TokenStream:
    mode = "r" if mmap else None
    return cls(
      tokens=np.load(directory / "tokens.npy", mmap_mode=mode),
      times=np.load(directory / "times.npy", mmap_mode=mode),
      offsets=np.load(directory / "offsets.npy"),
      subject_ids=np.load(directory / "subject_ids.npy"),
      directory=directory if mmap else None,
    )


def tokenize_split(
  reader: MEDSReader,
  tokenizer: TimelineTokenizer,
  split: str | None = TRAIN_SPLIT,
  cache_dir: str | os.PathLike[str] | None = None,
  progress: bool = False,
) -> tuple[TokenStream, dict[str, Any]]:
  """Tokenizes one split once and caches it; later calls with the same data+vocab reuse it.

  The cache key hashes the vocabulary (config, tokens, bins), the split name and the data
  fingerprint (shard names, sizes, mtimes), so a changed cohort or vocabulary never reads a
  stale stream. Written to a temporary directory and renamed into place.

  Returns:
    (stream, info) where info has the encode counts, the cache path and whether it was a hit.
  """
  key_src = f"{CACHE_VERSION}|{tokenizer.fingerprint()}|{split}|{reader.fingerprint()}"
  key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
  cache_root = Path(cache_dir) if cache_dir is not None else None
  target = cache_root / f"{split or 'all'}-{key}" if cache_root is not None else None
  if target is not None and (target / "info.json").is_file():
    info = json.loads((target / "info.json").read_text())
    info["cache_hit"] = True
    return TokenStream.load(target), info

  start = time.perf_counter()
  stats = EncodeStats()
  parts = []
  batches: Any = reader.iter_batches(split)
  if progress:
    from tqdm.auto import tqdm

    batches = tqdm(batches, desc=f"tokenize ({split})", unit="shard")
  for batch in batches:
    encoded = tokenizer.encode_batch(batch)
    stats.merge(encoded.stats)
    parts.append(encoded)
  if parts:
    sizes = np.array([len(p.tokens) for p in parts], np.int64)
    bases = np.cumsum(sizes) - sizes
    stream = TokenStream(
      tokens=np.concatenate([p.tokens for p in parts]),
      times=np.concatenate([p.times for p in parts]),
      offsets=np.concatenate([p.offsets[:-1] + b for p, b in zip(parts, bases)] + [np.array([sizes.sum()])]).astype(np.int64),
      subject_ids=np.concatenate([p.subject_ids for p in parts]),
    )
  else:
    stream = TokenStream(np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int64))
  info: dict[str, Any] = {
    "split": split,
    "encode": stats.to_dict(),
    "seconds": round(time.perf_counter() - start, 3),
    "cache_path": str(target) if target is not None else None,
    "cache_hit": False,
  }
  if target is not None:
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
      stream.save(tmp)
      (tmp / "info.json").write_text(json.dumps(info, indent=1))
      if target.exists():  # another process finished first; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
      else:
        os.replace(tmp, target)
    finally:
      if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    stream = TokenStream.load(target)
  return stream, info


def _pieces(lengths: np.ndarray, offsets: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Cuts each timeline into pieces of <= seq_len+1 tokens overlapping by one token.

  Returns (subject index, start offset in the stream, length) per piece. A timeline of n
  tokens has n-1 transitions; piece k covers tokens [k*L, k*L+L+1), so pieces share their
  boundary token and every transition belongs to exactly one piece.
  """
  usable = lengths >= 2
  num = np.where(usable, -(-(lengths - 1) // seq_len), 0)
  subj = np.repeat(np.arange(len(lengths)), num)
  k = np.arange(int(num.sum())) - np.repeat(np.cumsum(num) - num, num)
  start = offsets[subj] + k * seq_len
  length = np.minimum(seq_len + 1, lengths[subj] - k * seq_len)
  return subj, start.astype(np.int64), length.astype(np.int64)


def _best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
  """Packs items into bins of `capacity`: each item (longest first) goes to the fullest bin
  that still fits it. Full-size items take a bin alone without entering the search."""
  order = np.lexsort((np.arange(len(lengths)), -lengths))
  rows: list[list[int]] = []
  open_bins: list[tuple[int, int]] = []  # (remaining capacity, row), sorted
  for item in order.tolist():
    size = int(lengths[item])
    if size >= capacity:
      rows.append([item])
      continue
    i = bisect.bisect_left(open_bins, (size, -1))
    if i < len(open_bins):
      remaining, row = open_bins.pop(i)
      rows[row].append(item)
      remaining -= size
    else:
      row = len(rows)
      rows.append([item])
      remaining = capacity - size
    if remaining >= 2:  # a piece needs two tokens to hold a transition
      bisect.insort(open_bins, (remaining, row))
  return rows


class PretrainingSource:
  """Grain-compatible random-access source of fixed-length next-token examples.

  `len(source)` rows; `source[i]` is a deterministic dict of numpy arrays (see module doc).
  Use it as `grain.MapDataset.source(source).shuffle(seed).batch(B)`.
  """

  def __init__(self, stream: TokenStream, seq_len: int, packing: str = "packed"):
    if packing not in PACKING_MODES:
      raise ValueError(f"packing must be one of {PACKING_MODES}, got '{packing}'")
    if seq_len < 2:
      raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    self.stream = stream
    self.seq_len = seq_len
    self.packing = packing
    self.piece_subject, self.piece_start, self.piece_length = _pieces(stream.lengths, stream.offsets, seq_len)
    if packing == "window":
      rows = [[i] for i in range(len(self.piece_length))]
    else:
      rows = _best_fit_decreasing(self.piece_length, seq_len + 1)
    self.row_offsets = np.zeros(len(rows) + 1, np.int64)
    self.row_offsets[1:] = np.cumsum([len(r) for r in rows])
    self.row_pieces = np.array([p for r in rows for p in r], np.int64)

  def __len__(self) -> int:
    return len(self.row_offsets) - 1

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not -len(self) <= index < len(self):
      raise IndexError(f"row {index} out of range for {len(self)} rows")
    index = index % len(self)
    L = self.seq_len
    buf = np.full(L + 1, PAD_ID, np.int32)
    seg = np.zeros(L + 1, np.int32)
    pos = np.zeros(L + 1, np.int32)
    cursor = 0
    for j, piece in enumerate(self.row_pieces[self.row_offsets[index] : self.row_offsets[index + 1]].tolist()):
      start, length = int(self.piece_start[piece]), int(self.piece_length[piece])
      buf[cursor : cursor + length] = self.stream.tokens[start : start + length]
      seg[cursor : cursor + length] = j + 1
      pos[cursor : cursor + length] = np.arange(length)
      cursor += length
    segment_ids = seg[:L]
    return {
      "inputs": buf[:L].copy(),
      "targets": buf[1:].copy(),
      "segment_ids": segment_ids.copy(),
      "positions": pos[:L].copy(),
      "loss_mask": ((segment_ids > 0) & (segment_ids == seg[1:])).astype(np.float32),
    }

  def row_subjects(self, index: int) -> np.ndarray:
    """Subject ids of the pieces in row `index`, in segment order (for checks and debugging)."""
    pieces = self.row_pieces[self.row_offsets[index] : self.row_offsets[index + 1]]
    return np.asarray(self.stream.subject_ids)[self.piece_subject[pieces]]

  @property
  def stats(self) -> dict[str, Any]:
    rows = len(self)
    targets = int((self.piece_length - 1).sum())
    return {
      "packing": self.packing,
      "seq_len": self.seq_len,
      "rows": rows,
      "pieces": int(len(self.piece_length)),
      "subjects": int(len(self.stream)),
      "subjects_too_short": int((self.stream.lengths < 2).sum()),
      "target_tokens": targets,
      "fill_fraction": round(targets / max(rows * self.seq_len, 1), 4),
    }

  def __repr__(self) -> str:
    s = self.stats
    return f"PretrainingSource(rows={s['rows']}, seq_len={s['seq_len']}, packing={s['packing']}, fill={s['fill_fraction']})"


# --------------------------------------------------------------------------- task examples


def history_before(tokens: np.ndarray, times: np.ndarray, prediction_time_us: int) -> np.ndarray:
  """A subject's tokens known at `prediction_time` (inclusive, as in the MEDS label schema).

  Times never decrease along a timeline, so this is one searchsorted; [TIMELINE_END] has
  time INT64_MAX and so is never included (it would leak that no further events follow).
  """
  if len(tokens) != len(times):
    raise ValueError(f"history_before: {len(tokens)} tokens but {len(times)} times; pass one subject's "
                     "(tokens, times) pair as TokenStream.subject returns it")
  cut = int(np.searchsorted(times, np.int64(prediction_time_us), side="right"))
  return np.asarray(tokens[:cut])


@dataclasses.dataclass
class TaskExamples:
  """Histories at prediction times, right-padded to a fixed length, with their labels.

  Attributes:
    inputs: int32 [N, L], PAD after `lengths`.
    lengths: int32 [N] real tokens per row (the model reads its prediction at lengths-1).
    labels: bool [N].
    subject_ids, prediction_times: int64 [N] (prediction time in microseconds).
    true_probability: float64 [N] when the labels carry the generator's truth, else None.
    truncated: bool [N] where the history was longer than L and was left-truncated.
    skipped_rows: label rows whose subject is not in the stream (e.g. another split).
  """

  inputs: np.ndarray
  lengths: np.ndarray
  labels: np.ndarray
  subject_ids: np.ndarray
  prediction_times: np.ndarray
  true_probability: np.ndarray | None
  truncated: np.ndarray
  skipped_rows: int


def build_task_examples(stream: TokenStream, labels: pa.Table, seq_len: int, keep_prefix: bool = True) -> TaskExamples:
  """Builds one example per label row: the subject's history up to its prediction time.

  Histories longer than `seq_len` keep their last tokens; with `keep_prefix` the static
  prefix (sex, birth, age) is kept in front when it takes at most half the row, because
  demographics matter for every task and would otherwise be cut first.
  """
  subject_ids = labels.column("subject_id").to_numpy().astype(np.int64)
  pred = labels.column("prediction_time").cast(pa.timestamp("us")).cast(pa.int64()).to_numpy()
  label = labels.column("boolean_value").to_numpy(zero_copy_only=False).astype(bool)
  truth = labels.column("true_probability").to_numpy() if "true_probability" in labels.column_names else None
  rows = stream.index_of(subject_ids)
  keep = rows >= 0
  n = int(keep.sum())
  inputs = np.full((n, seq_len), PAD_ID, np.int32)
  lengths = np.zeros(n, np.int32)
  truncated = np.zeros(n, bool)
  for out_i, (row, t) in enumerate(zip(rows[keep].tolist(), pred[keep].tolist())):
    tokens, times = stream.subject(row)
    hist = history_before(tokens, times, t)
    if len(hist) > seq_len:
      truncated[out_i] = True
      prefix_len = int(np.searchsorted(times, TIME_NULL, side="right"))
      if keep_prefix and prefix_len <= seq_len // 2:
        hist = np.concatenate([hist[:prefix_len], hist[len(hist) - (seq_len - prefix_len) :]])
      else:
        hist = hist[-seq_len:]
    inputs[out_i, : len(hist)] = hist
    lengths[out_i] = len(hist)
  return TaskExamples(
    inputs=inputs,
    lengths=lengths,
    labels=label[keep],
    subject_ids=subject_ids[keep],
    prediction_times=pred[keep],
    true_probability=None if truth is None else truth[keep],
    truncated=truncated,
    skipped_rows=int((~keep).sum()),
  )


# ----------------------------------------------------------------------------- one call


@dataclasses.dataclass
class DataSummary:
  """Everything the data path counted, for the run log: nothing is filtered silently."""

  meds: dict[str, Any]
  vocab: dict[str, Any]
  encoding: dict[str, Any]
  examples: dict[str, Any]

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def format(self) -> str:
    v, e, x = self.vocab, self.encoding.get("encode", {}), self.examples
    return "\n".join(
      [
        f"MEDS {self.meds.get('root')}: shards={self.meds.get('shards')} split '{self.meds.get('split')}' "
        f"subjects={self.meds.get('split_subjects_with_data')} (without split: {self.meds.get('subjects_without_split')}, "
        f"in split without data: {self.meds.get('split_subjects_without_data')})",
        f"vocab: size={v.get('vocab_size')} fitted on '{v.get('split')}' codes_in_vocab={v.get('codes_in_vocab')} "
        f"rare_codes_to_unk={v.get('rare_codes_to_unk')} ({v.get('rare_code_events_to_unk')} events) "
        f"value_bins={v.get('codes_with_value_bins')} source={v.get('source')}",
        f"tokens: {e.get('tokens')} for {e.get('subjects')} subjects / {e.get('events')} events; unk_events={e.get('unk_events')} "
        f"values_without_bins={e.get('values_without_bins')} text_values_not_tokenized={e.get('text_values_not_tokenized')} "
        f"gaps_capped={e.get('gaps_capped')}; cache={'hit' if self.encoding.get('cache_hit') else 'miss'} "
        f"({self.encoding.get('seconds')} s)",
        f"examples: {x.get('rows')} rows x {x.get('seq_len')} ({x.get('packing')}), fill={x.get('fill_fraction')}, "
        f"target_tokens={x.get('target_tokens')}, subjects_too_short={x.get('subjects_too_short')}",
      ]
    )


def build_pretraining_data(
  meds_root: str | os.PathLike[str],
  vocab_path: str | os.PathLike[str] | None = None,
  seq_len: int = 512,
  packing: str = "packed",
  split: str = TRAIN_SPLIT,
  cache_dir: str | os.PathLike[str] | None = None,
  min_count: int | None = None,
  tokenizer_config: TokenizerConfig | None = None,
  progress: bool = True,
  *,
  num_value_bins: int | None = None,
  hierarchical_codes: bool | None = None,
) -> tuple[PretrainingSource, TimelineTokenizer, DataSummary]:
  """MEDS root -> (grain source of examples for `split`, tokenizer, summary).

  The vocabulary is loaded from `vocab_path` when that file exists; otherwise it is fitted on
  the TRAIN split (whatever `split` is, so tuning/held-out never shape it) and saved to
  `vocab_path` if one is given. The split's token stream is cached under `cache_dir`
  (default: default_cache_dir()).

  Args:
    meds_root: MEDS root directory.
    vocab_path: vocabulary JSON to load, or to create when missing; None fits in memory.
    seq_len: L, the model's sequence length; examples carry L inputs and L targets.
    packing: "packed" (several patients per row, segment_ids) or "window" (one per row).
    split: which split's examples to build ("train", "tuning", "held_out").
    cache_dir: where token streams are cached.
    min_count: rare-code threshold when fitting; must match a loaded vocabulary's if given.
    tokenizer_config: full tokenizer options when fitting (the arguments below and
      min_count override its fields).
    progress: tqdm bars for fitting and tokenizing.
    num_value_bins: quantile bins per numeric code; must match a loaded vocabulary's if given.
    hierarchical_codes: split ICD-10-CM codes into chapter/category tokens; must match a
      loaded vocabulary's if given.
  """
  reader = MEDSReader(meds_root)
  base = tokenizer_config or TokenizerConfig()
  requested: dict[str, Any] = {}
  if min_count is not None:
    requested["min_count"] = int(min_count)
  if num_value_bins is not None:
    requested["num_value_bins"] = int(num_value_bins)
  if hierarchical_codes is not None:
    requested["code_hierarchy"] = (base.code_hierarchy or TokenizerConfig().code_hierarchy) if hierarchical_codes else ()
  vocab_file = Path(vocab_path) if vocab_path is not None else None
  if vocab_file is not None and vocab_file.is_file():
    tokenizer = TimelineTokenizer.load(vocab_file)
    clash = [f"{k}={getattr(tokenizer.config, k)!r} (asked {v!r})" for k, v in requested.items() if getattr(tokenizer.config, k) != v]
    if clash:
      raise ValueError(
        f"{vocab_file}: vocabulary was fitted with {', '.join(clash)}; "
        "fix: drop those arguments, or point vocab_path at a new file to refit"
      )
    source_note = f"loaded {vocab_file}"
  else:
    config = dataclasses.replace(base, **requested)
    tokenizer = TimelineTokenizer(config).fit(reader, split=TRAIN_SPLIT, progress=progress)
    if vocab_file is not None:
      tokenizer.save(vocab_file)
    source_note = f"fitted, saved to {vocab_file}" if vocab_file is not None else "fitted (not saved)"
  stream, info = tokenize_split(reader, tokenizer, split, cache_dir if cache_dir is not None else default_cache_dir(), progress)
  source = PretrainingSource(stream, seq_len, packing)
  all_ids = np.concatenate(reader.shard_subjects())
  split_ids = reader.split_subject_ids(split)
  everyone = reader.split_subject_ids(None)
  summary = DataSummary(
    meds={
      "root": str(reader.root),
      "shards": len(reader.shards),
      "split": split,
      "split_subjects_with_data": int(len(stream)),
      "split_subjects_without_data": int((~np.isin(split_ids, all_ids)).sum()),
      "subjects_without_split": int((~np.isin(all_ids, everyone)).sum()),
    },
    vocab={**tokenizer.fit_summary, "vocab_size": tokenizer.vocab_size, "source": source_note, "fingerprint": tokenizer.fingerprint()},
    encoding=info,
    examples=source.stats,
  )
  return source, tokenizer, summary
