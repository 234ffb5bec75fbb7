"""ETHOS-style patient-timeline tokenizer: MEDS events -> one int32 token sequence per subject.

Layout of one subject's sequence::

  [TIMELINE_START] <static codes> MEDS_BIRTH [AGE 60-65]
  <gap tokens> <code tokens> [<value token>]   (one group per timed event, in time order)
  ...
  [TIMELINE_END]

* Code tokens: the MEDS code itself, optionally preceded by hierarchy tokens, e.g.
  ICD10CM//E11.9 -> [ICD10CM chapter 04] [ICD10CM category E11] ICD10CM//E11.9. Hierarchy
  tokens let a rare code that falls below `min_count` (and so becomes [UNK]) still say
  "an endocrine diagnosis in E11".
* Value tokens: [Q1]..[Qn], the per-code quantile bin of numeric_value, with bin edges fitted
  on the train split only (fitting on tuning/held-out would leak their distribution).
* Gap tokens: the time since the previous timed event, binned into ETHOS's 13 intervals
  (5m .. 1y); gaps under the smallest bin get no token; gaps of a year or more repeat
  [GAP 1y] once per whole year (capped) and then add a token for the remainder.
* Age at the first timed event after birth, in bins, follows the birth token, which is why
  the birth-to-first-event gap is not written as gap tokens.

Every token also gets a time (int64 microseconds): the event's time for event tokens,
TIME_NULL for the prefix, and INT64_MAX for [TIMELINE_END] (it marks where the extract ends,
not an event, so `history_before` must never see it). Times never decrease along a
sequence, so a prediction-time cut is one searchsorted.

Encoding works on a whole MEDS shard at once with numpy (see `encode_batch`), which is what
makes 10^5 subjects take seconds.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlx_med.ehr.meds import BIRTH_CODE, DEATH_CODE, TIME_NULL, TRAIN_SPLIT, EventBatch, MEDSReader, SubjectEvents

VOCAB_FORMAT = "mlx_med.ehr.timeline_vocab"
VOCAB_SCHEMA_VERSION = 1
TIME_END = np.iinfo(np.int64).max
US_PER_SECOND = 1_000_000

PAD, UNK, TIMELINE_START, TIMELINE_END = "[PAD]", "[UNK]", "[TIMELINE_START]", "[TIMELINE_END]"
AGE_UNKNOWN = "[AGE unknown]"
PAD_ID = 0
_FIXED_SPECIALS = (PAD, UNK, TIMELINE_START, TIMELINE_END, BIRTH_CODE, DEATH_CODE, AGE_UNKNOWN)

# ETHOS's 13 time-interval tokens (lower edge of each bin, in seconds).
ETHOS_TIME_GAP_BINS: tuple[tuple[str, float], ...] = (
  ("5m", 5 * 60.0),
  ("15m", 15 * 60.0),
  ("1h", 3600.0),
  ("2h", 2 * 3600.0),
  ("6h", 6 * 3600.0),
  ("12h", 12 * 3600.0),
  ("1d", 86400.0),
  ("3d", 3 * 86400.0),
  ("1w", 7 * 86400.0),
  ("1mo", 30.4375 * 86400),
  ("3mo", 91.3125 * 86400),
  ("6mo", 182.625 * 86400),
  ("1y", 365.25 * 86400),
)
# Admission / discharge / ICU codes structure the timeline; they are kept whatever their count.
DEFAULT_PROTECTED_PREFIXES = ("HOSPITAL_ADMISSION", "HOSPITAL_DISCHARGE", "ICU_ADMISSION", "ICU_DISCHARGE")

# ICD-10-CM chapters by category range (first, last, chapter number).
_ICD10CM_CHAPTERS = (
  ("A00", "B99", 1), ("C00", "D49", 2), ("D50", "D89", 3), ("E00", "E89", 4), ("F01", "F99", 5),
  ("G00", "G99", 6), ("H00", "H59", 7), ("H60", "H95", 8), ("I00", "I99", 9), ("J00", "J99", 10),
  ("K00", "K95", 11), ("L00", "L99", 12), ("M00", "M99", 13), ("N00", "N99", 14), ("O00", "O9A", 15),
  ("P00", "P96", 16), ("Q00", "Q99", 17), ("R00", "R99", 18), ("S00", "T88", 19), ("U00", "U85", 22),
  ("V00", "Y99", 20), ("Z00", "Z99", 21),
)


class VocabFormatError(ValueError):
  """A vocabulary file that this version cannot read (wrong format or schema version)."""


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """What the tokenizer does; saved inside the vocabulary so a file fully defines encoding.

  Attributes:
    min_count: codes seen fewer times than this in the train split map to [UNK] (counted).
    num_value_bins: quantile bins per numeric code (fitted on train).
    time_gap_bins: (label, lower edge in seconds), ascending; the last is the repeated unit.
    max_gap_repeats: cap on repeats of the last gap token for very long gaps.
    age_bin_years / max_age_years: age-at-start bins; ages >= max get one top bin.
    code_hierarchy: (code prefix, splitter) pairs. Splitters: "icd10cm" (chapter and
      category tokens) or "prefix:1,3" (tokens for the first 1 and 3 characters of the body).
    protected_prefixes: code prefixes (before '//') that are never mapped to [UNK].
  """

  min_count: int = 5
  num_value_bins: int = 10
  time_gap_bins: tuple[tuple[str, float], ...] = ETHOS_TIME_GAP_BINS
  max_gap_repeats: int = 5
  age_bin_years: int = 5
  max_age_years: int = 100
  code_hierarchy: tuple[tuple[str, str], ...] = (("ICD10CM", "icd10cm"),)
  protected_prefixes: tuple[str, ...] = DEFAULT_PROTECTED_PREFIXES

  def __post_init__(self) -> None:
    if self.min_count < 1 or self.num_value_bins < 2 or self.max_gap_repeats < 1 or self.age_bin_years < 1:
      raise ValueError(f"invalid TokenizerConfig {self}: need min_count>=1, num_value_bins>=2, max_gap_repeats>=1, age_bin_years>=1")
    seconds = [s for _, s in self.time_gap_bins]
    if not seconds or any(b <= a for a, b in zip(seconds, seconds[1:])):
      raise ValueError(f"time_gap_bins must be non-empty and strictly increasing, got {self.time_gap_bins}")
    for _, spec in self.code_hierarchy:
      _parse_splitter(spec)

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["time_gap_bins"] = [[str(label), float(seconds)] for label, seconds in self.time_gap_bins]
    d["code_hierarchy"] = [list(x) for x in self.code_hierarchy]
    d["protected_prefixes"] = list(self.protected_prefixes)
    return d

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> TokenizerConfig:
    d = dict(d)
    d["time_gap_bins"] = tuple((str(a), float(b)) for a, b in d["time_gap_bins"])
    d["code_hierarchy"] = tuple((str(a), str(b)) for a, b in d["code_hierarchy"])
    d["protected_prefixes"] = tuple(d["protected_prefixes"])
    return cls(**d)


def _parse_splitter(spec: str) -> tuple[str, tuple[int, ...]]:
  if spec == "icd10cm":
    return "icd10cm", ()
  if spec.startswith("prefix:"):
    try:
      lengths = tuple(int(x) for x in spec[len("prefix:") :].split(","))
    except ValueError:
      lengths = ()
    if lengths and all(x > 0 for x in lengths):
      return "prefix", lengths
  raise ValueError(f"unknown code_hierarchy splitter '{spec}'; use 'icd10cm' or 'prefix:1,3'")


def icd10cm_chapter(category: str) -> int | None:
  """ICD-10-CM chapter number of a 3-character category (e.g. 'E11' -> 4), or None."""
  category = category.upper()
  for first, last, chapter in _ICD10CM_CHAPTERS:
    if first <= category <= last:
      return chapter
  return None


@dataclasses.dataclass(frozen=True)
class DecodedEvent:
  """One event read back from tokens.

  Attributes:
    code: the MEDS code, [UNK], or a structural token ([TIMELINE_START], [AGE 60-65], ...).
    levels: hierarchy tokens that preceded the code token.
    value_bin: 1-based quantile bin of the numeric value, if any.
    value_range: [low, high) of that bin in the code's units (-inf / inf at the ends).
    gap_seconds: [low, high) bounds of the time since the previous timed event, None for the
      prefix and the first timed event.
  """

  code: str
  levels: tuple[str, ...] = ()
  value_bin: int | None = None
  value_range: tuple[float, float] | None = None
  gap_seconds: tuple[float, float] | None = None


@dataclasses.dataclass
class EncodeStats:
  """Counts from encoding: what was mapped to [UNK] or could not be represented."""

  subjects: int = 0
  events: int = 0
  tokens: int = 0
  static_events: int = 0
  unk_events: int = 0
  unk_codes: set[str] = dataclasses.field(default_factory=set)
  values_binned: int = 0
  values_without_bins: int = 0
  text_values_not_tokenized: int = 0
  gaps_capped: int = 0

  def merge(self, other: EncodeStats) -> None:
    for f in dataclasses.fields(self):
      if f.name == "unk_codes":
        self.unk_codes |= other.unk_codes
      else:
        setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["unk_codes"] = len(self.unk_codes)
    return d


@dataclasses.dataclass
class EncodedBatch:
  """Token sequences of the subjects of one EventBatch, concatenated.

  Subject s owns tokens[offsets[s]:offsets[s+1]] (and the same slice of times).
  """

  subject_ids: np.ndarray
  offsets: np.ndarray
  tokens: np.ndarray
  times: np.ndarray
  stats: EncodeStats


@dataclasses.dataclass
class _CodePlan:
  tok_mat: np.ndarray  # [C, max_len] token ids
  tok_len: np.ndarray  # [C]
  value_slot: np.ndarray  # [C] row of the edges table, -1 if no bins
  unk: np.ndarray  # [C] bool: the full code is [UNK]
  birth: np.ndarray  # [C] bool


def _ragged_arange(counts: np.ndarray) -> np.ndarray:
  total = int(counts.sum())
  return np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)


class TimelineTokenizer:
  """Fits a vocabulary on the train split, then encodes / decodes patient timelines."""

  def __init__(self, config: TokenizerConfig | None = None):
    self.config = config or TokenizerConfig()
    self._splitters = {prefix: _parse_splitter(spec) for prefix, spec in self.config.code_hierarchy}
    self.tokens: list[str] = []
    self.kinds: list[str] = []
    self.value_edges: dict[str, np.ndarray] = {}
    self.code_counts: dict[str, int] = {}
    self.fit_summary: dict[str, Any] = {}
    self._ids: dict[str, int] = {}
    self._plan_cache: dict[str, tuple[tuple[int, ...], bool, int]] = {}
    self._edge_slot: dict[str, int] = {}
    self._edge_table = np.zeros((0, self.config.num_value_bins - 1))

  def _finalize(self) -> None:
    """Rebuilds lookup tables after the vocabulary or value bins change (fit / load)."""
    self._ids = {tok: i for i, tok in enumerate(self.tokens)}
    self._edge_slot = {code: i for i, code in enumerate(self.value_edges)}
    width = self.config.num_value_bins - 1
    self._edge_table = np.array([self.value_edges[c] for c in self.value_edges], np.float64).reshape(-1, width)
    self._plan_cache = {}

  # ------------------------------------------------------------------------ structure

  @property
  def vocab_size(self) -> int:
    return len(self.tokens)

  @property
  def is_fitted(self) -> bool:
    return bool(self.tokens)

  def token_id(self, token: str) -> int:
    return self._ids[token]

  def _age_tokens(self) -> list[str]:
    step, top = self.config.age_bin_years, self.config.max_age_years
    return [f"[AGE {a}-{a + step}]" for a in range(0, top, step)] + [f"[AGE {top}+]"]

  def _gap_tokens(self) -> list[str]:
    return [f"[GAP {label}]" for label, _ in self.config.time_gap_bins]

  def _value_tokens(self) -> list[str]:
    return [f"[Q{i + 1}]" for i in range(self.config.num_value_bins)]

  def hierarchy_tokens(self, code: str) -> list[str]:
    """Hierarchy tokens emitted before `code` (before any min-count filtering)."""
    prefix, sep, body = code.partition("//")
    if not sep or prefix not in self._splitters or not body:
      return []
    kind, lengths = self._splitters[prefix]
    out = []
    if kind == "icd10cm":
      category = body.split(".")[0][:3]
      chapter = icd10cm_chapter(category) if len(category) == 3 else None
      if chapter is not None:
        out.append(f"[{prefix} chapter {chapter:02d}]")
      if category and category != body:
        out.append(f"[{prefix} category {category}]")
    else:
      compact = body.replace(".", "")
      out += [f"[{prefix} prefix {compact[:n]}]" for n in lengths if n < len(compact)]
    return out

  def _is_protected(self, code: str) -> bool:
    return code.partition("//")[0] in self.config.protected_prefixes

  # ------------------------------------------------------------------------------ fit

  def fit(self, reader: MEDSReader, split: str = TRAIN_SPLIT, progress: bool = False) -> TimelineTokenizer:
    """Builds the vocabulary and value bins from `split` (the train split unless testing)."""
    counts: collections.Counter[str] = collections.Counter()
    values: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    num_subjects = num_events = 0
    batches: Iterable[EventBatch] = reader.iter_batches(split)
    if progress:
      from tqdm.auto import tqdm

      batches = tqdm(batches, desc=f"fit vocab ({split})", unit="shard")
    for batch in batches:
      num_subjects += len(batch)
      num_events += batch.num_events
      per_code = np.bincount(batch.code_index, minlength=len(batch.code_table))
      for j in np.flatnonzero(per_code):
        counts[batch.code_table[j]] += int(per_code[j])
      has = ~np.isnan(batch.numeric_value)
      if has.any():
        ci, vals = batch.code_index[has], batch.numeric_value[has]
        order = np.argsort(ci, kind="stable")
        ci, vals = ci[order], vals[order]
        starts = np.flatnonzero(np.concatenate([[True], ci[1:] != ci[:-1]]))
        for lo, hi in zip(starts, np.append(starts[1:], len(ci))):
          values[batch.code_table[ci[lo]]].append(vals[lo:hi])
    self._build(counts, values, split, num_subjects, num_events)
    return self

  def _build(self, counts: collections.Counter[str], values: dict[str, list[np.ndarray]], split: str, num_subjects: int, num_events: int) -> None:
    cfg = self.config
    fixed = list(_FIXED_SPECIALS) + self._age_tokens() + self._gap_tokens() + self._value_tokens()
    kinds = ["special"] * 4 + ["code", "code", "age"] + ["age"] * len(self._age_tokens()) + ["gap"] * len(self._gap_tokens()) + ["value"] * cfg.num_value_bins
    protected = sorted(c for c in counts if self._is_protected(c) and c not in fixed)
    level_counts: collections.Counter[str] = collections.Counter()
    for code, n in counts.items():
      for level in self.hierarchy_tokens(code):
        level_counts[level] += n
    kept_codes = {c for c, n in counts.items() if n >= cfg.min_count and c not in fixed and c not in protected}
    kept_levels = {lv for lv, n in level_counts.items() if n >= cfg.min_count and lv not in kept_codes}
    ranked = sorted(kept_codes | kept_levels, key=lambda tok: (-(counts.get(tok, 0) + level_counts.get(tok, 0)), tok))
    self.tokens = fixed + protected + ranked
    self.kinds = kinds + ["code"] * len(protected) + ["level" if tok in kept_levels else "code" for tok in ranked]
    ids = {tok: i for i, tok in enumerate(self.tokens)}
    # Train counts of codes that passed min_count only: a vocabulary file travels with model
    # checkpoints, and counts of rare codes are small cells that should not leave the data.
    self.code_counts = {c: n for c, n in sorted(counts.items()) if n >= cfg.min_count}

    quantiles = np.arange(1, cfg.num_value_bins) / cfg.num_value_bins
    self.value_edges = {}
    values_without_bins = 0
    for code in sorted(values):
      vals = np.concatenate(values[code]).astype(np.float64)
      vals = vals[np.isfinite(vals)]
      if code in ids and len(vals) >= max(cfg.min_count, cfg.num_value_bins):
        self.value_edges[code] = np.quantile(vals, quantiles)
      else:
        values_without_bins += len(vals)
    self._finalize()
    rare = {c: n for c, n in counts.items() if c not in self._ids}
    self.fit_summary = {
      "split": split,
      "subjects": num_subjects,
      "events": num_events,
      "distinct_codes": len(counts),
      "codes_in_vocab": sum(1 for c in counts if c in self._ids),
      "rare_codes_to_unk": len(rare),
      "rare_code_events_to_unk": int(sum(rare.values())),
      "hierarchy_tokens": len(kept_levels),
      "codes_with_value_bins": len(self.value_edges),
      "values_without_bins": values_without_bins,
      "vocab_size": len(self.tokens),
    }

  # -------------------------------------------------------------------------- encoding

  def _code_plan(self, code: str) -> tuple[tuple[int, ...], bool, int]:
    hit = self._plan_cache.get(code)
    if hit is None:
      ids = [self._ids[lv] for lv in self.hierarchy_tokens(code) if lv in self._ids]
      full = self._ids.get(code)
      if full is not None and self.kinds[full] != "code":
        full = None  # a data code spelled like a structural token ("[PAD]") must not become one
      ids.append(self._ids[UNK] if full is None else full)
      slot = self._edge_slot.get(code, -1) if full is not None else -1
      hit = (tuple(ids), full is None, slot)
      self._plan_cache[code] = hit
    return hit

  def _plan(self, code_table: np.ndarray) -> _CodePlan:
    plans = [self._code_plan(str(c)) for c in code_table]
    width = max([len(p[0]) for p in plans], default=1)
    tok_mat = np.zeros((len(plans), width), np.int32)
    for i, (ids, _, _) in enumerate(plans):
      tok_mat[i, : len(ids)] = ids
    return _CodePlan(
      tok_mat=tok_mat,
      tok_len=np.array([len(p[0]) for p in plans], np.int64),
      value_slot=np.array([p[2] for p in plans], np.int64),
      unk=np.array([p[1] for p in plans], bool),
      birth=np.array([c == BIRTH_CODE for c in code_table], bool),
    )

  def _gap_token_counts(self, gap: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per event: number of repeated top-bin tokens, remainder bin (-1 none), capped flag."""
    edges = np.array([round(s * US_PER_SECOND) for _, s in self.config.time_gap_bins], np.int64)
    top = len(edges) - 1
    b = np.searchsorted(edges, gap, side="right") - 1
    b = np.where(gap < 0, -1, b)
    is_long = b == top
    whole = np.where(is_long, gap // edges[top], 0)
    capped = whole > self.config.max_gap_repeats
    repeats = np.minimum(whole, self.config.max_gap_repeats)
    remainder = np.where(is_long, gap - whole * edges[top], 0)
    rem_bin = np.searchsorted(edges, remainder, side="right") - 1
    single = np.where(is_long, np.where(capped, -1, rem_bin), b)
    return repeats.astype(np.int64), single.astype(np.int64), capped

  def _age_token_ids(self, age_years: np.ndarray) -> np.ndarray:
    """Age bin token per subject; ages below 0 (events before birth) use the first bin."""
    step, top = self.config.age_bin_years, self.config.max_age_years
    num_regular = len(self._age_tokens()) - 1
    safe = np.nan_to_num(age_years, nan=0.0)
    index = np.minimum(np.floor(np.maximum(safe, 0.0) / step), num_regular - 1).astype(np.int64)
    index = np.where(safe >= top, num_regular, index)
    ids = self._ids[self._age_tokens()[0]] + index
    return np.where(np.isnan(age_years), self._ids[AGE_UNKNOWN], ids)

  def encode_batch(self, batch: EventBatch) -> EncodedBatch:
    """Encodes every subject of a shard at once (vectorised; no per-event Python)."""
    if not self.is_fitted:
      raise RuntimeError("tokenizer is not fitted; call fit(reader) or TimelineTokenizer.load(path)")
    plan = self._plan(batch.code_table)
    num_subjects, n = len(batch), batch.num_events
    counts = np.diff(batch.offsets)
    subj = np.repeat(np.arange(num_subjects), counts)
    ci, t, v = batch.code_index, batch.time_us, batch.numeric_value
    static = t == TIME_NULL
    group = np.where(static, 0, np.where(plan.birth[ci], 1, 2))
    sort_key = subj * 3 + group
    if n > 1 and np.any(sort_key[1:] < sort_key[:-1]):
      order = np.argsort(sort_key, kind="stable")
      ci, t, v, group = ci[order], t[order], v[order], group[order]
    timed = group == 2

    # Gap tokens between consecutive timed events of a subject.
    gap = np.full(n, -1, np.int64)
    tidx = np.flatnonzero(timed)
    if len(tidx) > 1:
      same = subj[tidx[1:]] == subj[tidx[:-1]]
      gap[tidx[1:][same]] = t[tidx[1:][same]] - t[tidx[:-1][same]]
    repeats, single, capped = self._gap_token_counts(gap)
    n_gap = repeats + (single >= 0)
    n_code = plan.tok_len[ci]
    slot = plan.value_slot[ci]
    has_value = ~np.isnan(v)
    binned = has_value & (slot >= 0)
    n_tok = n_gap + n_code + binned

    # Positions: per subject [START] prefix-rows [AGE] timed-rows [END].
    total = np.bincount(subj, weights=n_tok, minlength=num_subjects).astype(np.int64)
    prefix_total = np.bincount(subj[~timed], weights=n_tok[~timed], minlength=num_subjects).astype(np.int64)
    block = total + 3
    block_start = np.cumsum(block) - block
    excl = np.cumsum(n_tok) - n_tok
    within = excl - excl[batch.offsets[:-1]][subj] if n else excl
    row_pos = block_start[subj] + 1 + within + timed
    size = int(block.sum())
    tokens = np.full(size, PAD_ID, np.int32)
    times = np.empty(size, np.int64)

    # Age at the first timed event, from the first birth event.
    birth_t = np.full(num_subjects, np.nan)
    first_t = np.full(num_subjects, np.nan)
    for mask, target in ((group == 1, birth_t), (timed, first_t)):
      rows = np.flatnonzero(mask)
      if len(rows):
        firsts = rows[np.concatenate([[True], subj[rows[1:]] != subj[rows[:-1]]])]
        target[subj[firsts]] = t[firsts]
    first_t = np.where(np.isnan(first_t), birth_t, first_t)
    age_years = (first_t - birth_t) / (365.25 * 86400 * US_PER_SECOND)
    tokens[block_start] = self._ids[TIMELINE_START]
    times[block_start] = TIME_NULL
    age_pos = block_start + 1 + prefix_total
    tokens[age_pos] = self._age_token_ids(age_years)
    times[age_pos] = TIME_NULL
    end_pos = block_start + block - 1
    tokens[end_pos] = self._ids[TIMELINE_END]
    times[end_pos] = TIME_END

    row_time = np.where(timed, t, TIME_NULL)
    times[np.repeat(row_pos, n_tok) + _ragged_arange(n_tok)] = np.repeat(row_time, n_tok)
    gap_first = self._ids[self._gap_tokens()[0]]
    rows = np.repeat(np.arange(n), repeats)
    tokens[row_pos[rows] + _ragged_arange(repeats)] = gap_first + len(self.config.time_gap_bins) - 1
    rows = np.flatnonzero(single >= 0)
    tokens[row_pos[rows] + repeats[rows]] = gap_first + single[rows]
    for j in range(plan.tok_mat.shape[1]):
      rows = np.flatnonzero(n_code > j)
      tokens[row_pos[rows] + n_gap[rows] + j] = plan.tok_mat[ci[rows], j]
    rows = np.flatnonzero(binned)
    if len(rows):
      edges = self._edge_table[slot[rows]]
      bins = (v[rows, None] >= edges).sum(axis=1)
      tokens[row_pos[rows] + n_gap[rows] + n_code[rows]] = self._ids["[Q1]"] + bins

    unk_rows = plan.unk[ci]
    stats = EncodeStats(
      subjects=num_subjects,
      events=n,
      tokens=size,
      static_events=int(static.sum()),
      unk_events=int(unk_rows.sum()),
      unk_codes={str(c) for c in batch.code_table[np.unique(ci[unk_rows])]},
      values_binned=int(binned.sum()),
      values_without_bins=int((has_value & ~binned).sum()),
      text_values_not_tokenized=batch.num_text_values,
      gaps_capped=int(capped.sum()),
    )
    return EncodedBatch(
      subject_ids=batch.subject_ids.copy(),
      offsets=np.append(block_start, size).astype(np.int64),
      tokens=tokens,
      times=times,
      stats=stats,
    )

  def encode(self, subject: SubjectEvents) -> tuple[np.ndarray, np.ndarray]:
    """Encodes one subject: (int32 tokens, int64 per-token times in microseconds)."""
    codes = np.asarray(subject.codes, dtype=object)
    table, index = np.unique(codes, return_inverse=True) if len(codes) else (np.zeros(0, object), np.zeros(0, np.int64))
    batch = EventBatch(
      source="<subject>",
      subject_ids=np.array([subject.subject_id], np.int64),
      offsets=np.array([0, len(codes)], np.int64),
      time_us=np.asarray(subject.times, np.int64),
      code_index=index.astype(np.int32),
      code_table=table.astype(object),
      numeric_value=np.asarray(subject.numeric_values, np.float32),
    )
    out = self.encode_batch(batch)
    return out.tokens, out.times

  # -------------------------------------------------------------------------- decoding

  def _gap_seconds(self) -> np.ndarray:
    return np.array([s for _, s in self.config.time_gap_bins], np.float64)

  def decode(self, tokens: Sequence[int] | np.ndarray) -> list[DecodedEvent]:
    """Turns tokens back into events; values come back as bin ranges, rare codes as [UNK]."""
    edges_s = self._gap_seconds()
    gap_first = self._ids[self._gap_tokens()[0]]
    q_first = self._ids["[Q1]"]
    events: list[DecodedEvent] = []
    levels: list[str] = []
    gap_ids: list[int] = []
    # A window may start mid-timeline, so assume timed events until [TIMELINE_START] says otherwise.
    in_timeline, prev_timed = True, False

    def gap_range() -> tuple[float, float]:
      if not gap_ids:
        return (0.0, float(edges_s[0]))
      top = len(edges_s) - 1
      idx = [i - gap_first for i in gap_ids]
      years = sum(1 for i in idx if i == top)
      rest = [i for i in idx if i != top]
      lo = years * edges_s[top]
      if rest:
        return (lo + edges_s[rest[0]], lo + edges_s[rest[0] + 1])
      if years >= self.config.max_gap_repeats:
        return (lo, float("inf"))
      return (lo, lo + edges_s[0])

    for tok in np.asarray(tokens).tolist():
      if tok == PAD_ID:
        continue
      name, kind = self.tokens[tok], self.kinds[tok]
      if kind == "gap":
        gap_ids.append(tok)
        continue
      if kind == "level":
        levels.append(name)
        continue
      if kind == "value":
        if events:
          last = events[-1]
          b = tok - q_first
          edges = self.value_edges.get(last.code)
          value_range = None
          if edges is not None:
            padded = np.concatenate([[-np.inf], edges, [np.inf]])
            value_range = (float(padded[b]), float(padded[b + 1]))
          events[-1] = dataclasses.replace(last, value_bin=b + 1, value_range=value_range)
        continue
      gap = None
      if name == TIMELINE_START:
        in_timeline, prev_timed = False, False
      elif kind == "age":
        in_timeline = True
      elif name != TIMELINE_END and in_timeline:
        gap = gap_range() if prev_timed else None
        prev_timed = True
      events.append(DecodedEvent(code=name, levels=tuple(levels), gap_seconds=gap))
      levels, gap_ids = [], []
    return events

  def decode_to_text(self, tokens: Sequence[int] | np.ndarray) -> str:
    """One line per event, for eyeballing a timeline (never log real patients' timelines)."""
    lines = []
    for e in self.decode(tokens):
      parts = []
      if e.gap_seconds is not None and e.gap_seconds[0] > 0:
        parts.append(f"+{_format_duration(e.gap_seconds[0])}")
      parts.append(e.code)
      if e.value_range is not None:
        parts.append(f"in [{e.value_range[0]:.4g}, {e.value_range[1]:.4g}) (Q{e.value_bin})")
      if e.levels:
        parts.append("{" + ", ".join(e.levels) + "}")
      lines.append(" ".join(parts))
    return "\n".join(lines)

  # ---------------------------------------------------------------------- persistence

  def to_json(self) -> dict[str, Any]:
    return {
      "format": VOCAB_FORMAT,
      "schema_version": VOCAB_SCHEMA_VERSION,
      "config": self.config.to_json(),
      "tokens": self.tokens,
      "kinds": self.kinds,
      "value_edges": {code: [float(x) for x in edges] for code, edges in self.value_edges.items()},
      "code_counts": self.code_counts,
      "fit_summary": self.fit_summary,
    }

  def fingerprint(self) -> str:
    """Hash of everything that changes encoding (config, tokens, bins): a cache key."""
    payload = {k: v for k, v in self.to_json().items() if k in ("schema_version", "config", "tokens", "kinds", "value_edges")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes the versioned JSON vocabulary (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(self.to_json(), indent=1))
    os.replace(tmp, path)

  @classmethod
  def from_json(cls, data: dict[str, Any], source: str = "<json>") -> TimelineTokenizer:
    if not isinstance(data, dict) or data.get("format") != VOCAB_FORMAT:
      raise VocabFormatError(f"{source}: not an mlx_med timeline vocabulary (format field is not '{VOCAB_FORMAT}'); fix: pass a file written by `mlx-med ehr tokenize`")
    version = data.get("schema_version")
    if version != VOCAB_SCHEMA_VERSION:
      raise VocabFormatError(f"{source}: vocabulary schema_version {version!r}, this mlx_med reads version {VOCAB_SCHEMA_VERSION}; fix: refit it with `mlx-med ehr tokenize --meds-root ... --out {source}`")
    tok = cls(TokenizerConfig.from_json(data["config"]))
    tok.tokens = list(data["tokens"])
    tok.kinds = list(data["kinds"])
    tok.value_edges = {code: np.asarray(e, np.float64) for code, e in data["value_edges"].items()}
    tok.code_counts = dict(data.get("code_counts", {}))
    tok.fit_summary = dict(data.get("fit_summary", {}))
    tok._finalize()
    return tok

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> TimelineTokenizer:
    path = Path(path)
    try:
      data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise VocabFormatError(f"{path}: invalid JSON at line {e.lineno}; fix: refit it with `mlx-med ehr tokenize`") from None
    return cls.from_json(data, source=str(path))


def _format_duration(seconds: float) -> str:
  for unit, size in (("y", 365.25 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
    if seconds >= size:
      return f"{seconds / size:.3g}{unit}"
  return f"{seconds:.0f}s"
