"""Reader and validator for MEDS (Medical Event Data Standard, v0.4) datasets.

A MEDS root looks like::

  ROOT/data/**/*.parquet            events: subject_id, time, code, numeric_value[, text_value, ...]
  ROOT/metadata/subject_splits.parquet   subject_id, split (train / tuning / held_out)
  ROOT/metadata/codes.parquet       optional: code, description, parent_codes
  ROOT/metadata/dataset.json        optional: dataset_name, meds_version, ...

Why pyarrow (and not polars) here: validation has to look at the exact Arrow types written to
each file (timestamp unit, float width, dictionary-encoded strings), which pyarrow exposes
from the parquet footer without reading data; and the tokenizer wants dictionary-encoded
codes plus plain numpy arrays, which pyarrow hands over with little copying. Nothing here
needs a query engine, so one dependency path keeps behaviour predictable.

Why everything is returned per shard, grouped by subject, as numpy arrays: the tokenizer
works on a whole shard at once with vectorised numpy, which is what lets a 100k-subject
cohort tokenize in seconds; a per-subject Python object would cost minutes.

Errors are one line (MEDSFormatError) that name the file, the column, the first bad row and
a fix. They never include event contents (codes, values, times), only row indices and
subject ids, so they are safe to paste into logs and issues.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

BIRTH_CODE = "MEDS_BIRTH"
DEATH_CODE = "MEDS_DEATH"
TRAIN_SPLIT = "train"
TUNING_SPLIT = "tuning"
HELD_OUT_SPLIT = "held_out"
STANDARD_SPLITS = (TRAIN_SPLIT, TUNING_SPLIT, HELD_OUT_SPLIT)

DATA_DIR = "data"
SPLITS_FILE = os.path.join("metadata", "subject_splits.parquet")
CODES_FILE = os.path.join("metadata", "codes.parquet")
DATASET_FILE = os.path.join("metadata", "dataset.json")

# Static (time-less) events carry this sentinel instead of a null time, so a time column is a
# plain int64 array (microseconds since 1970) that sorts static events first.
TIME_NULL = np.iinfo(np.int64).min
_UNIT_TO_MICROS = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": None}


class MEDSFormatError(ValueError):
  """Bad MEDS input. The message is one line: file, column, first bad row, and how to fix it."""


def _fail(path: Path | str, problem: str, fix: str) -> MEDSFormatError:
  return MEDSFormatError(f"{path}: {problem}; fix: {fix}")


@dataclasses.dataclass(frozen=True)
class SubjectEvents:
  """One subject's events, sorted by time with static (time-less) events first.

  Attributes:
    subject_id: MEDS subject id.
    times: int64 microseconds since the Unix epoch; TIME_NULL for static events.
    codes: object array of code strings.
    numeric_values: float32, NaN where the event has no numeric value.
  """

  subject_id: int
  times: np.ndarray
  codes: np.ndarray
  numeric_values: np.ndarray

  def __len__(self) -> int:
    return len(self.codes)


@dataclasses.dataclass
class EventBatch:
  """All events of the subjects of one shard (optionally one split), grouped by subject.

  Codes are dictionary-encoded: `code_table[code_index[i]]` is event i's code. Consumers map
  the (small) code table once and then index, which is why this is the unit of work.

  Attributes:
    source: the parquet file the events came from.
    subject_ids: int64 [S], ascending.
    offsets: int64 [S+1]; subject s owns rows offsets[s]:offsets[s+1].
    time_us: int64 [N]; TIME_NULL for static events.
    code_index: int32 [N] into code_table.
    code_table: object [C] of code strings.
    numeric_value: float32 [N]; NaN where absent.
    has_text: bool [N] where the event carries a text_value (text is not tokenized, only
      counted), or None when the shard has no text_value column.
  """

  source: str
  subject_ids: np.ndarray
  offsets: np.ndarray
  time_us: np.ndarray
  code_index: np.ndarray
  code_table: np.ndarray
  numeric_value: np.ndarray
  has_text: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.subject_ids)

  @property
  def num_events(self) -> int:
    return len(self.code_index)

  @property
  def num_text_values(self) -> int:
    return 0 if self.has_text is None else int(self.has_text.sum())

  def subject(self, i: int) -> SubjectEvents:
    lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
    return SubjectEvents(
      subject_id=int(self.subject_ids[i]),
      times=self.time_us[lo:hi],
      codes=self.code_table[self.code_index[lo:hi]],
      numeric_values=self.numeric_value[lo:hi],
    )

  def select(self, keep_subjects: np.ndarray) -> EventBatch:
    """Returns the batch restricted to subjects where the boolean mask `keep_subjects` holds."""
    if keep_subjects.all():
      return self
    counts = np.diff(self.offsets)
    row_mask = np.repeat(keep_subjects, counts)
    kept_counts = counts[keep_subjects]
    return EventBatch(
      source=self.source,
      subject_ids=self.subject_ids[keep_subjects],
      offsets=np.concatenate([[0], np.cumsum(kept_counts)]).astype(np.int64),
      time_us=self.time_us[row_mask],
      code_index=self.code_index[row_mask],
      code_table=self.code_table,
      numeric_value=self.numeric_value[row_mask],
      has_text=None if self.has_text is None else self.has_text[row_mask],
    )


@dataclasses.dataclass
class MEDSSummary:
  """What a validation pass saw. Everything not used downstream is counted here, never dropped quietly."""

  root: str
  num_shards: int = 0
  num_events: int = 0
  num_subjects: int = 0
  num_static_events: int = 0
  num_numeric_values: int = 0
  num_text_values: int = 0
  num_distinct_codes: int = 0
  num_births: int = 0
  num_deaths: int = 0
  split_sizes: dict[str, int] = dataclasses.field(default_factory=dict)
  subjects_without_split: int = 0
  split_subjects_without_data: int = 0
  extra_columns: list[str] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def format(self) -> str:
    splits = ", ".join(f"{k}={v}" for k, v in sorted(self.split_sizes.items()))
    lines = [
      f"MEDS root {self.root}",
      f"  shards={self.num_shards} subjects={self.num_subjects} events={self.num_events} "
      f"distinct_codes={self.num_distinct_codes}",
      f"  static_events={self.num_static_events} numeric_values={self.num_numeric_values} "
      f"text_values={self.num_text_values} (text is not tokenized) births={self.num_births} "
      f"deaths={self.num_deaths}",
      f"  splits: {splits}; subjects_without_split={self.subjects_without_split} "
      f"(never yielded by split iteration); split_subjects_without_data="
      f"{self.split_subjects_without_data}",
    ]
    if self.extra_columns:
      lines.append(f"  extra columns (ignored): {', '.join(self.extra_columns)}")
    lines += [f"  note: {n}" for n in self.notes]
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class _ShardSchema:
  path: Path
  columns: tuple[str, ...]
  time_unit: str
  has_numeric: bool
  has_text: bool


def _type_family_ok(column: str, dtype: pa.DataType) -> bool:
  if pa.types.is_dictionary(dtype):
    dtype = dtype.value_type
  if column == "subject_id":
    return pa.types.is_integer(dtype)
  if column == "time":
    return pa.types.is_timestamp(dtype)
  if column in ("code", "text_value"):
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)
  if column == "numeric_value":
    return pa.types.is_floating(dtype) or pa.types.is_integer(dtype)
  return True


_EXPECTED = {
  "subject_id": "int64",
  "time": "timestamp[us]",
  "code": "string",
  "numeric_value": "float32",
  "text_value": "large_string",
}
_FIX_TYPE = {
  "subject_id": "write subject_id as int64",
  "time": "write time as timestamp[us] (null for static events), e.g. pa.timestamp('us')",
  "code": "write code as a string column",
  "numeric_value": "write numeric_value as float32 (null where absent)",
  "text_value": "write text_value as a (large_)string column",
}


def _first_true(mask: np.ndarray) -> int:
  return int(np.flatnonzero(mask)[0])


class MEDSReader:
  """Reads and validates a MEDS root; iterates subjects of a split shard by shard.

  Construction checks the layout and every shard's schema (parquet footers only, cheap).
  Row-level checks (null codes, time order, subjects split across shards) run while data is
  read, so iterating a split validates exactly what it touches; `validate()` reads all.
  """

  def __init__(self, root: str | os.PathLike[str]):
    self.root = Path(root)
    data_dir = self.root / DATA_DIR
    if not data_dir.is_dir():
      raise _fail(
        data_dir,
        "data directory not found",
        "point at a MEDS root that holds data/**/*.parquet (MEDS 0.4 layout), "
        "e.g. one written by `mlx-med ehr synth`",
      )
    self.shards = sorted(p for p in data_dir.rglob("*.parquet") if p.is_file())
    if not self.shards:
      raise _fail(data_dir, "no parquet shards under data/", "write events as data/<name>.parquet")
    self._schemas = [self._check_schema(p) for p in self.shards]
    self.splits_path = self.root / SPLITS_FILE
    self._split_ids, self._split_names = self._read_splits()
    self.dataset_metadata = self._read_dataset_json()
    self._shard_subjects: list[np.ndarray] | None = None

  # ---------------------------------------------------------------------------- layout checks

  def _check_schema(self, path: Path) -> _ShardSchema:
    try:
      schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises several types for non-parquet content.
      raise _fail(path, f"not a readable parquet file ({type(e).__name__})", "rewrite it with pyarrow or polars") from None
    names = schema.names
    for column in ("subject_id", "time", "code"):
      if column not in names:
        present = ", ".join(names) or "none"
        raise _fail(
          path,
          f"column '{column}' is missing (columns present: {present})",
          f"add '{column}' ({_EXPECTED[column]}) as required by the MEDS 0.4 data schema",
        )
    for column in ("subject_id", "time", "code", "numeric_value", "text_value"):
      if column in names:
        dtype = schema.field(column).type
        if not _type_family_ok(column, dtype):
          raise _fail(path, f"column '{column}' has type {dtype}, expected {_EXPECTED[column]}", _FIX_TYPE[column])
    return _ShardSchema(
      path=path,
      columns=tuple(names),
      time_unit=schema.field("time").type.unit,
      has_numeric="numeric_value" in names,
      has_text="text_value" in names,
    )

  def _read_splits(self) -> tuple[np.ndarray, np.ndarray]:
    """Returns (subject_ids ascending, split name per subject)."""
    path = self.splits_path
    fix = "write metadata/subject_splits.parquet with columns subject_id (int64) and split (string: train/tuning/held_out)"
    if not path.is_file():
      raise _fail(path, "subject splits file not found", fix)
    table = pq.read_table(path)
    for column, ok in (("subject_id", pa.types.is_integer), ("split", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t))):
      if column not in table.column_names:
        raise _fail(path, f"column '{column}' is missing", fix)
      dtype = table.schema.field(column).type
      if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
      if not ok(dtype):
        raise _fail(path, f"column '{column}' has type {dtype}", fix)
      if table.column(column).null_count:
        row = _first_true(table.column(column).is_null().to_numpy(zero_copy_only=False))
        raise _fail(path, f"column '{column}' is null at row {row}", "give every subject a split")
    ids = table.column("subject_id").to_numpy().astype(np.int64)
    names = np.asarray(table.column("split").cast(pa.string()).to_pylist(), dtype=object)
    order = np.argsort(ids, kind="stable")
    ids, names = ids[order], names[order]
    dup = np.flatnonzero(ids[1:] == ids[:-1])
    if len(dup):
      sid = int(ids[dup[0]])
      row = int(order[dup[0] + 1])
      raise _fail(path, f"column 'subject_id' repeats subject_id {sid} at row {row}", "give each subject exactly one split")
    return ids, names

  def _read_dataset_json(self) -> dict[str, Any]:
    path = self.root / DATASET_FILE
    if not path.is_file():
      return {}
    try:
      meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise _fail(path, f"invalid JSON at line {e.lineno}", "write dataset.json as a JSON object (MEDS DatasetMetadataSchema)") from None
    if not isinstance(meta, dict):
      raise _fail(path, "top level is not a JSON object", "write dataset.json as a JSON object")
    return meta

  # -------------------------------------------------------------------------------- metadata

  @property
  def split_names(self) -> list[str]:
    return sorted(set(self._split_names.tolist()))

  def split_subject_ids(self, split: str | None) -> np.ndarray:
    """Ascending subject ids of `split` (all subjects in the splits file if None)."""
    if split is None:
      return self._split_ids
    if split not in set(self._split_names.tolist()):
      raise _fail(self.splits_path, f"column 'split' has no subjects in split '{split}' (present: {', '.join(self.split_names)})", "choose one of the present splits")
    return self._split_ids[self._split_names == split]

  def code_metadata(self) -> pa.Table | None:
    """metadata/codes.parquet as a table, or None when the root has none (it is optional)."""
    path = self.root / CODES_FILE
    if not path.is_file():
      return None
    table = pq.read_table(path)
    if "code" not in table.column_names:
      raise _fail(path, "column 'code' is missing", "write codes.parquet with columns code, description, parent_codes")
    return table

  def fingerprint(self) -> str:
    """Hash of shard names, sizes and mtimes plus the splits file: changes when the data does."""
    h = hashlib.sha256()
    for p in [*self.shards, self.splits_path]:
      st = p.stat()
      h.update(f"{p.relative_to(self.root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]

  # -------------------------------------------------------------------------------- subjects

  def _read_subject_column(self, path: Path) -> np.ndarray:
    col = pq.read_table(path, columns=["subject_id"]).column("subject_id")
    if col.null_count:
      row = _first_true(col.is_null().to_numpy(zero_copy_only=False))
      raise _fail(path, f"column 'subject_id' is null at row {row}", "every event needs a subject_id")
    return col.to_numpy().astype(np.int64, copy=False)

  def shard_subjects(self) -> list[np.ndarray]:
    """Unique subject ids per shard; raises if a subject appears in more than one shard.

    MEDS requires each subject to live in exactly one shard; splitting one would let its
    timeline be tokenized as two patients, so it is an error rather than a silent merge.
    """
    if self._shard_subjects is not None:
      return self._shard_subjects
    uniques = [np.unique(self._read_subject_column(p)) for p in self.shards]
    if uniques:
      all_ids = np.concatenate(uniques)
      shard_of = np.repeat(np.arange(len(uniques)), [len(u) for u in uniques])
      order = np.argsort(all_ids, kind="stable")
      sorted_ids = all_ids[order]
      dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
      if len(dup):
        sid = int(sorted_ids[dup[0]])
        first = self.shards[shard_of[order[dup[0]]]]
        second = self.shards[shard_of[order[dup[0] + 1]]]
        row = _first_true(self._read_subject_column(second) == sid)
        raise _fail(
          second,
          f"column 'subject_id' has subject_id {sid} at row {row}, which also appears in {first}",
          "keep all of a subject's events in one shard (MEDS 0.4 requirement)",
        )
    self._shard_subjects = uniques
    return uniques

  # ------------------------------------------------------------------------------ reading data

  def read_shard(self, index: int) -> EventBatch:
    """Reads, validates and groups one shard (all of its subjects)."""
    meta = self._schemas[index]
    path = meta.path
    columns = ["subject_id", "time", "code"] + (["numeric_value"] if meta.has_numeric else []) + (["text_value"] if meta.has_text else [])
    table = pq.read_table(path, columns=columns, read_dictionary=["code"])
    n = table.num_rows

    subject_col = table.column("subject_id")
    if subject_col.null_count:
      row = _first_true(subject_col.is_null().to_numpy(zero_copy_only=False))
      raise _fail(path, f"column 'subject_id' is null at row {row}", "every event needs a subject_id")
    sid = subject_col.to_numpy().astype(np.int64, copy=False)

    # Codes: one dictionary for the whole shard, null check on the indices.
    code_chunked = table.column("code")
    if not pa.types.is_dictionary(code_chunked.type):
      code_chunked = pc.dictionary_encode(code_chunked)
    code_chunked = code_chunked.unify_dictionaries()
    if code_chunked.null_count:
      row = _first_true(code_chunked.is_null().to_numpy(zero_copy_only=False))
      raise _fail(path, f"column 'code' is null at row {row} (subject_id {sid[row]})", "drop or recode events that have no code")
    if code_chunked.num_chunks:
      code_table = np.asarray(code_chunked.chunk(0).dictionary.to_pylist(), dtype=object)
      code_index = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in code_chunked.chunks]).astype(np.int32, copy=False) if n else np.zeros(0, np.int32)
    else:
      code_table, code_index = np.zeros(0, dtype=object), np.zeros(0, np.int32)

    # Times: int64 microseconds, TIME_NULL for static events, whatever unit was written.
    time_col = table.column("time")
    raw = pc.cast(time_col, pa.int64())
    is_null = raw.is_null().to_numpy(zero_copy_only=False) if raw.null_count else np.zeros(n, bool)
    t = pc.fill_null(raw, 0).to_numpy().astype(np.int64, copy=True)
    scale = _UNIT_TO_MICROS[meta.time_unit]
    if scale is None:
      t //= 1000
    elif scale != 1:
      t *= scale
    t[is_null] = TIME_NULL

    if meta.has_numeric:
      values = pc.fill_null(pc.cast(table.column("numeric_value"), pa.float32()), np.nan).to_numpy().astype(np.float32, copy=False)
    else:
      values = np.full(n, np.nan, np.float32)
    has_text = None
    if meta.has_text:
      has_text = table.column("text_value").is_valid().to_numpy(zero_copy_only=False)

    # Group by subject. MEDS wants each subject contiguous; if rows are interleaved we stable
    # sort by subject (keeping each subject's own order) rather than reject the file.
    row_number = None
    if n and np.any(sid[1:] < sid[:-1]):
      order = np.argsort(sid, kind="stable")
      sid, t, code_index, values, row_number = sid[order], t[order], code_index[order], values[order], order
      has_text = None if has_text is None else has_text[order]

    same = sid[1:] == sid[:-1]
    prev_null, cur_null = t[:-1] == TIME_NULL, t[1:] == TIME_NULL
    bad = same & ((cur_null & ~prev_null) | (~cur_null & ~prev_null & (t[1:] < t[:-1])))
    if bad.any():
      i = _first_true(bad) + 1
      row = int(row_number[i]) if row_number is not None else i
      raise _fail(
        path,
        f"column 'time' is not sorted within subject_id {sid[i]} (first bad row {row})",
        "sort each subject's events by time, static (null-time) events first",
      )

    starts = np.flatnonzero(np.concatenate([[True], ~same])) if n else np.zeros(0, np.int64)
    offsets = np.concatenate([starts, [n]]).astype(np.int64)
    return EventBatch(
      source=str(path),
      subject_ids=sid[starts],
      offsets=offsets,
      time_us=t,
      code_index=code_index,
      code_table=code_table,
      numeric_value=values,
      has_text=has_text,
    )

  def iter_batches(self, split: str | None = None, shard_indices: Sequence[int] | None = None) -> Iterator[EventBatch]:
    """Yields one EventBatch per shard holding subjects of `split` (all subjects if None).

    Shards with none of the split's subjects are skipped without reading their events.
    Subjects absent from the splits file are not yielded for a named split (they are
    counted by `validate()`).
    """
    wanted = self.split_subject_ids(split) if split is not None else None
    per_shard = self.shard_subjects()
    for i in range(len(self.shards)) if shard_indices is None else shard_indices:
      if wanted is not None and not np.isin(per_shard[i], wanted, assume_unique=True).any():
        continue
      batch = self.read_shard(i)
      if wanted is not None:
        batch = batch.select(np.isin(batch.subject_ids, wanted, assume_unique=True))
      if len(batch):
        yield batch

  def iter_subjects(self, split: str | None = None) -> Iterator[SubjectEvents]:
    """Yields each subject of `split` in shard order. Convenient; `iter_batches` is faster."""
    for batch in self.iter_batches(split):
      for i in range(len(batch)):
        yield batch.subject(i)

  def num_subjects(self, split: str | None = None) -> int:
    wanted = self.split_subject_ids(split)
    return int(sum(np.isin(s, wanted, assume_unique=True).sum() for s in self.shard_subjects()))

  def validate(self, progress: bool = False) -> MEDSSummary:
    """Reads every shard, runs all checks, and returns counts of what is there."""
    summary = MEDSSummary(root=str(self.root))
    summary.num_shards = len(self.shards)
    per_shard = self.shard_subjects()
    data_ids = np.concatenate(per_shard) if per_shard else np.zeros(0, np.int64)
    summary.num_subjects = int(len(data_ids))
    summary.split_sizes = {name: int((self._split_names == name).sum()) for name in self.split_names}
    summary.subjects_without_split = int((~np.isin(data_ids, self._split_ids)).sum())
    summary.split_subjects_without_data = int((~np.isin(self._split_ids, data_ids)).sum())
    extra = set()
    for meta in self._schemas:
      extra.update(c for c in meta.columns if c not in _EXPECTED)
      if meta.time_unit != "us":
        summary.notes.append(f"{meta.path.name}: time stored as timestamp[{meta.time_unit}], read as microseconds")
    summary.extra_columns = sorted(extra)
    if not self.dataset_metadata:
      summary.notes.append("metadata/dataset.json missing or empty")
    unknown = [s for s in self.split_names if s not in STANDARD_SPLITS]
    if unknown:
      summary.notes.append(f"non-standard split names: {', '.join(unknown)}")
    codes: set[str] = set()
    iterator: Any = range(len(self.shards))
    if progress:
      from tqdm.auto import tqdm

      iterator = tqdm(iterator, desc="validate MEDS", unit="shard")
    for i in iterator:
      batch = self.read_shard(i)
      summary.num_events += batch.num_events
      static = batch.time_us == TIME_NULL
      summary.num_static_events += int(static.sum())
      summary.num_numeric_values += int((~np.isnan(batch.numeric_value)).sum())
      summary.num_text_values += batch.num_text_values
      used = np.unique(batch.code_index)
      table = batch.code_table[used]
      codes.update(table.tolist())
      counts = np.bincount(batch.code_index, minlength=len(batch.code_table))
      for code, count in ((BIRTH_CODE, "num_births"), (DEATH_CODE, "num_deaths")):
        hit = np.flatnonzero(batch.code_table == code)
        if len(hit):
          setattr(summary, count, getattr(summary, count) + int(counts[hit].sum()))
    summary.num_distinct_codes = len(codes)
    return summary


def write_table_atomic(table: pa.Table, path: Path) -> None:
  """Writes a parquet file under a temporary name and renames it, so readers never see half a file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  pq.write_table(table, tmp)
  os.replace(tmp, path)
