"""Timeline tokenizer: round trip, train-only value bins, gap bins, hierarchy, specials, the
versioned vocabulary file, and agreement between batch and per-subject encoding."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from mlx_med.ehr.meds import TIME_NULL, MEDSReader, SubjectEvents
from mlx_med.ehr.tokenizer import (
  PAD_ID,
  TIME_END,
  TimelineTokenizer,
  TokenizerConfig,
  VocabFormatError,
  icd10cm_chapter,
)

MINUTE = 60 * 1_000_000
DAY = 24 * 60 * MINUTE


def _expected_code(tok: TimelineTokenizer, code: str) -> str:
  return code if code in tok._ids else "[UNK]"


def test_round_trip_recovers_codes_values_and_gaps(cohort_reader, cohort_tokenizer):
  tok = cohort_tokenizer
  saw_unk = saw_value = False
  for batch in cohort_reader.iter_batches("tuning"):  # unseen split: exercises [UNK]
    encoded = tok.encode_batch(batch)
    for i in range(len(batch)):
      subject = batch.subject(i)
      tokens = encoded.tokens[encoded.offsets[i] : encoded.offsets[i + 1]]
      events = tok.decode(tokens)
      assert events[0].code == "[TIMELINE_START]" and events[-1].code == "[TIMELINE_END]"
      static = subject.times == TIME_NULL
      birth = (subject.codes == "MEDS_BIRTH") & ~static
      order = np.concatenate([np.flatnonzero(static), np.flatnonzero(birth), np.flatnonzero(~static & ~birth)])
      body = [e for e in events[1:-1] if not e.code.startswith("[AGE")]
      assert [e.code for e in body] == [_expected_code(tok, subject.codes[j]) for j in order]
      timed = order[static.sum() + birth.sum() :]
      for k, j in enumerate(order):
        e, v = body[k], subject.numeric_values[j]
        if e.value_range is not None:
          saw_value = True
          assert e.value_range[0] <= v < e.value_range[1] or (v == e.value_range[1] == np.inf)
        saw_unk |= e.code == "[UNK]"
      offset = static.sum() + birth.sum()
      for k in range(1, len(timed)):
        gap_s = (subject.times[timed[k]] - subject.times[timed[k - 1]]) / 1e6
        lo, hi = body[offset + k].gap_seconds
        assert lo <= gap_s < hi, (gap_s, lo, hi)
  assert saw_unk and saw_value


def test_value_bins_fit_on_train_only(make_meds_root, h):
  rows, splits = [], {}
  for sid in range(1, 41):
    held = sid > 30
    splits[sid] = "held_out" if held else "train"
    base = 1000.0 if held else 0.0
    for k in range(5):
      rows.append((sid, h.us(2020, 1, 1 + k), "LAB//X", base + (sid * 5 + k) % 100))
    if held:
      rows.append((sid, h.us(2020, 2, 1), "ONLY_IN_HELD_OUT", None))
  root = make_meds_root({"0": h.events_table(rows)}, splits)
  reader = MEDSReader(root)
  tok = TimelineTokenizer(TokenizerConfig(min_count=1)).fit(reader, split="train")
  edges = tok.value_edges["LAB//X"]
  assert len(edges) == 9 and edges.max() < 100  # the held-out values (>= 1000) did not move them
  assert "ONLY_IN_HELD_OUT" not in tok._ids
  held = next(reader.iter_batches("held_out"))
  enc = tok.encode_batch(held)
  assert np.all(enc.tokens[np.isin(enc.tokens, [tok.token_id(f"[Q{i}]") for i in range(1, 11)])] == tok.token_id("[Q10]"))
  assert enc.stats.unk_events == 10 and enc.stats.unk_codes == {"ONLY_IN_HELD_OUT"}


def _subject(times, codes, values=None):
  values = [np.nan] * len(codes) if values is None else values
  return SubjectEvents(
    subject_id=1,
    times=np.array([TIME_NULL if t is None else t for t in times], np.int64),
    codes=np.array(codes, dtype=object),
    numeric_values=np.array(values, np.float32),
  )


@pytest.fixture
def tiny_tokenizer(make_meds_root, h):
  rows = [(1, None, "GENDER//F", None), (1, h.us(1950, 6, 1), "MEDS_BIRTH", None)]
  rows += [(1, h.us(2000, 1, 1) + k * MINUTE, c, None) for k, c in enumerate(["A", "B", "ICD10CM//E11.9", "ICD10PCS//0SRD0J9"])]
  rows += [(1, h.us(2001, 1, 1), "HOSPITAL_ADMISSION//EMERGENCY", None), (1, h.us(2001, 1, 5), "MEDS_DEATH", None)]
  root = make_meds_root({"0": h.events_table(rows)}, {1: "train"})
  config = TokenizerConfig(min_count=1, code_hierarchy=(("ICD10CM", "icd10cm"), ("ICD10PCS", "prefix:1,3")))
  return TimelineTokenizer(config).fit(MEDSReader(root))


def test_time_gap_tokens(tiny_tokenizer, h):
  tok = tiny_tokenizer
  t0 = h.us(2000, 1, 1)
  gaps = [1 * MINUTE, 5 * MINUTE, 20 * MINUTE, 90 * MINUTE, DAY + 60 * MINUTE, 400 * DAY, 20 * 365 * DAY]
  times = [None, h.us(1950, 6, 1), t0] + list(t0 + np.cumsum(gaps))
  codes = ["GENDER//F", "MEDS_BIRTH"] + ["A"] * (len(gaps) + 1)
  tokens, tok_times = tok.encode(_subject(times, codes))
  names = [tok.tokens[t] for t in tokens]
  a = names.index("[AGE 45-50]")
  assert names[: a + 1] == ["[TIMELINE_START]", "GENDER//F", "MEDS_BIRTH", "[AGE 45-50]"]
  expected = ["A", "A", "[GAP 5m]", "A", "[GAP 15m]", "A", "[GAP 1h]", "A", "[GAP 1d]", "A", "[GAP 1y]", "[GAP 1mo]", "A"]
  expected += ["[GAP 1y]"] * 5 + ["A", "[TIMELINE_END]"]
  assert names[a + 1 :] == expected
  assert tok_times[-1] == TIME_END and np.all(tok_times[1:] >= tok_times[:-1])  # (diff would overflow)
  assert np.all(tok_times[: a + 1] == TIME_NULL)
  # A 20-year gap exceeds max_gap_repeats (5) years: encoded as capped and counted.
  batch_stats = tok.encode_batch(_as_batch(_subject(times, codes))).stats
  assert batch_stats.gaps_capped == 1


def _as_batch(subject):
  from mlx_med.ehr.meds import EventBatch

  table, index = np.unique(subject.codes, return_inverse=True)
  return EventBatch("<t>", np.array([1]), np.array([0, len(subject.codes)]), subject.times, index.astype(np.int32), table, subject.numeric_values)


def test_gap_bins_are_configurable(tiny_tokenizer, h, make_meds_root):
  config = dataclasses.replace(tiny_tokenizer.config, time_gap_bins=(("1h", 3600.0), ("1d", 86400.0)), max_gap_repeats=2)
  rows = [(1, h.us(2000, 1, 1), "A", None), (1, h.us(2000, 1, 1, 2), "A", None), (1, h.us(2000, 1, 4), "A", None)]
  tok = TimelineTokenizer(config).fit(MEDSReader(make_meds_root({"0": h.events_table(rows)}, {1: "train"}, name="gaps")))
  names = [tok.tokens[t] for t in tok.encode(_subject([r[1] for r in rows], ["A"] * 3))[0]]
  assert names == ["[TIMELINE_START]", "[AGE unknown]", "A", "[GAP 1h]", "A", "[GAP 1d]", "[GAP 1d]", "[GAP 1h]", "A", "[TIMELINE_END]"]


def test_hierarchical_codes_and_specials(tiny_tokenizer, h):
  tok = tiny_tokenizer
  assert tok.tokens[PAD_ID] == "[PAD]"
  assert tok.hierarchy_tokens("ICD10CM//E11.9") == ["[ICD10CM chapter 04]", "[ICD10CM category E11]"]
  assert tok.hierarchy_tokens("ICD10CM//I10") == ["[ICD10CM chapter 09]"]
  assert tok.hierarchy_tokens("ICD10PCS//0SRD0J9") == ["[ICD10PCS prefix 0]", "[ICD10PCS prefix 0SR]"]
  assert icd10cm_chapter("D50") == 3 and icd10cm_chapter("D49") == 2 and icd10cm_chapter("O9A") == 15 and icd10cm_chapter("T50") == 19
  tokens, _ = tok.encode(_subject([h.us(2000)], ["ICD10CM//E11.9"]))
  assert [tok.tokens[t] for t in tokens[2:5]] == ["[ICD10CM chapter 04]", "[ICD10CM category E11]", "ICD10CM//E11.9"]
  # An unseen code of a known category keeps its hierarchy tokens in front of [UNK].
  tokens, _ = tok.encode(_subject([h.us(2000)], ["ICD10CM//E11.65"]))
  decoded = tok.decode(tokens)
  assert decoded[2].code == "[UNK]" and decoded[2].levels == ("[ICD10CM chapter 04]", "[ICD10CM category E11]")
  flat = TimelineTokenizer(dataclasses.replace(tok.config, code_hierarchy=()))
  assert flat.hierarchy_tokens("ICD10CM//E11.9") == []


def test_protected_codes_survive_min_count(make_meds_root, h):
  rows = [(1, h.us(2000), "HOSPITAL_ADMISSION//RARE", None), (1, h.us(2001), "RARE_CODE", None), (1, h.us(2002), "MEDS_DEATH", None)]
  tok = TimelineTokenizer(TokenizerConfig(min_count=100)).fit(MEDSReader(make_meds_root({"0": h.events_table(rows)}, {1: "train"})))
  assert "HOSPITAL_ADMISSION//RARE" in tok._ids and "MEDS_DEATH" in tok._ids and "RARE_CODE" not in tok._ids
  assert tok.fit_summary["rare_codes_to_unk"] == 1 and tok.fit_summary["rare_code_events_to_unk"] == 1


def test_age_token(tiny_tokenizer, h):
  tok = tiny_tokenizer
  tokens, _ = tok.encode(_subject([h.us(1950, 6, 1), h.us(2010, 7, 1)], ["MEDS_BIRTH", "A"]))
  assert [tok.tokens[t] for t in tokens] == ["[TIMELINE_START]", "MEDS_BIRTH", "[AGE 60-65]", "A", "[TIMELINE_END]"]
  tokens, _ = tok.encode(_subject([h.us(1900, 1, 1), h.us(2010, 7, 1)], ["MEDS_BIRTH", "A"]))
  assert tok.tokens[tokens[2]] == "[AGE 100+]"


def test_vocab_save_load_and_versioning(cohort_tokenizer, cohort_reader, tmp_path):
  path = tmp_path / "vocab" / "v.json"
  cohort_tokenizer.save(path)
  assert [p.name for p in path.parent.iterdir()] == ["v.json"]  # no temporary left behind
  loaded = TimelineTokenizer.load(path)
  assert loaded.fingerprint() == cohort_tokenizer.fingerprint() and loaded.vocab_size == cohort_tokenizer.vocab_size
  batch = next(cohort_reader.iter_batches("held_out"))
  np.testing.assert_array_equal(loaded.encode_batch(batch).tokens, cohort_tokenizer.encode_batch(batch).tokens)
  data = json.loads(path.read_text())
  data["schema_version"] = 999
  path.write_text(json.dumps(data))
  with pytest.raises(VocabFormatError, match=r"v\.json: vocabulary schema_version 999, this mlx_med reads version 1; fix"):
    TimelineTokenizer.load(path)
  path.write_text(json.dumps({"hello": 1}))
  with pytest.raises(VocabFormatError, match="not an mlx_med timeline vocabulary"):
    TimelineTokenizer.load(path)


def test_batch_encoding_matches_per_subject_encoding(cohort_reader, cohort_tokenizer):
  batch = next(cohort_reader.iter_batches("train"))
  enc = cohort_tokenizer.encode_batch(batch)
  for i in range(0, len(batch), 37):
    tokens, times = cohort_tokenizer.encode(batch.subject(i))
    np.testing.assert_array_equal(tokens, enc.tokens[enc.offsets[i] : enc.offsets[i + 1]])
    np.testing.assert_array_equal(times, enc.times[enc.offsets[i] : enc.offsets[i + 1]])
  assert np.all(enc.tokens != PAD_ID)
  per_subject = np.split(enc.times, enc.offsets[1:-1])
  assert all(np.all(t[1:] >= t[:-1]) for t in per_subject)
