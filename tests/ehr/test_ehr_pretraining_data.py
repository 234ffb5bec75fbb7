"""Pretraining examples: no row ever mixes patients, loss_mask/positions/segment_ids agree,
every transition is trained exactly once, caching works, and task histories never leak."""

from __future__ import annotations

import chex
import numpy as np
import pytest

from mlx_med.ehr.dataset import (
  PretrainingSource,
  build_pretraining_data,
  build_task_examples,
  history_before,
  tokenize_split,
)
from mlx_med.ehr.labels import read_task_labels
from mlx_med.ehr.tokenizer import PAD_ID, TIME_END

SEQ_LEN = 128


@pytest.fixture(scope="module")
def train_stream(cohort_reader, cohort_tokenizer, tmp_path_factory):
  stream, _ = tokenize_split(cohort_reader, cohort_tokenizer, "train", tmp_path_factory.mktemp("cache"))
  return stream


def _check_rows(source: PretrainingSource) -> None:
  stream = source.stream
  L = source.seq_len
  for i in range(len(source)):
    ex = source[i]
    assert set(ex) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    chex.assert_type([ex["inputs"], ex["targets"], ex["segment_ids"], ex["positions"], ex["loss_mask"]],
                     [np.int32, np.int32, np.int32, np.int32, np.float32])
    chex.assert_shape(list(ex.values()), (L,))
    seg, pos, mask = ex["segment_ids"], ex["positions"], ex["loss_mask"]
    subjects = source.row_subjects(i)
    assert len(set(subjects.tolist())) == len(subjects)  # one piece per patient per row
    for s in range(1, seg.max() + 1):
      where = np.flatnonzero(seg == s)
      assert np.all(np.diff(where) == 1)  # contiguous segment
      np.testing.assert_array_equal(pos[where], np.arange(len(where)))  # positions restart
      # The segment's tokens are a contiguous slice of exactly one patient's timeline.
      tokens, _ = stream.subject(int(stream.index_of(subjects[s - 1 : s])[0]))
      seg_tokens = ex["inputs"][where]
      windows = np.lib.stride_tricks.sliding_window_view(tokens, len(seg_tokens))
      assert (windows == seg_tokens).all(axis=1).any(), "segment is not a slice of its patient's timeline"
    # loss_mask is 1 exactly where the next token is in the same segment. The last column's
    # next token lies beyond the row's L inputs, so only its padding case is checked here
    # (the transition count test covers it).
    same_next = (seg[:-1] > 0) & (seg[:-1] == seg[1:])
    np.testing.assert_array_equal(mask[:-1].astype(bool), same_next)
    assert mask[-1] in (0.0, 1.0) and (seg[-1] > 0 or mask[-1] == 0)
    assert np.all(ex["inputs"][seg == 0] == PAD_ID) and np.all(mask[seg == 0] == 0)
    np.testing.assert_array_equal(ex["targets"][:-1][mask[:-1] == 1], ex["inputs"][1:][mask[:-1] == 1])


@pytest.mark.parametrize("packing", ["window", "packed"])
def test_rows_never_span_patients(train_stream, packing):
  source = PretrainingSource(train_stream, SEQ_LEN, packing)
  _check_rows(source)
  # Every next-token transition of every timeline is a target exactly once.
  total_mask = sum(source[i]["loss_mask"].sum() for i in range(len(source)))
  assert total_mask == int((train_stream.lengths - 1).sum())


def test_window_mode_reconstructs_each_timeline(train_stream):
  source = PretrainingSource(train_stream, SEQ_LEN, "window")
  pieces: dict[int, list[np.ndarray]] = {}
  for i in range(len(source)):
    ex = source[i]
    (subject,) = source.row_subjects(i)
    n = int((ex["segment_ids"] > 0).sum())
    real = ex["inputs"][:n]
    if ex["loss_mask"][n - 1]:  # a full window: its last token is only visible as a target
      real = np.append(real, ex["targets"][n - 1])
    pieces.setdefault(int(subject), []).append(real)
  for row in range(0, len(train_stream), 25):
    tokens, _ = train_stream.subject(row)
    parts = pieces[int(train_stream.subject_ids[row])]
    rebuilt = np.concatenate([parts[0]] + [p[1:] for p in parts[1:]])  # pieces overlap by one token
    np.testing.assert_array_equal(rebuilt, tokens)


def test_packing_is_denser_and_deterministic(train_stream):
  window = PretrainingSource(train_stream, SEQ_LEN, "window")
  packed = PretrainingSource(train_stream, SEQ_LEN, "packed")
  assert packed.stats["fill_fraction"] > window.stats["fill_fraction"]
  assert len(packed) < len(window)
  again = PretrainingSource(train_stream, SEQ_LEN, "packed")
  for i in (0, len(packed) // 2, len(packed) - 1):
    for key, value in packed[i].items():
      np.testing.assert_array_equal(value, again[i][key])
  with pytest.raises(IndexError):
    packed[len(packed)]


def test_grain_can_batch_the_source(train_stream):
  import grain

  source = PretrainingSource(train_stream, SEQ_LEN, "packed")
  dataset = grain.MapDataset.source(source).shuffle(seed=0).batch(4)
  batch = dataset[0]
  chex.assert_shape(list(batch.values()), (4, SEQ_LEN))
  chex.assert_type(batch["loss_mask"], np.float32)


def test_source_pickles_by_cache_path(train_stream):
  import pickle

  source = PretrainingSource(train_stream, SEQ_LEN, "packed")
  blob = pickle.dumps(source)
  assert len(blob) < train_stream.tokens.nbytes / 4  # the token stream is not copied
  clone = pickle.loads(blob)
  for key, value in source[5].items():
    np.testing.assert_array_equal(value, clone[5][key])


def test_build_pretraining_data_caches_and_fits_on_train(cohort_root, tmp_path):
  vocab = tmp_path / "vocab.json"
  cache = tmp_path / "cache"
  source, tok, summary = build_pretraining_data(cohort_root, vocab, seq_len=64, packing="packed", split="held_out", cache_dir=cache, min_count=3, progress=False)
  assert vocab.is_file() and summary.vocab["split"] == "train"
  assert summary.encoding["cache_hit"] is False and summary.examples["rows"] == len(source) > 0
  text = summary.format()
  assert "rare_codes_to_unk" in text and "fill=" in text
  source2, tok2, summary2 = build_pretraining_data(cohort_root, vocab, seq_len=64, packing="packed", split="held_out", cache_dir=cache, progress=False)
  assert summary2.encoding["cache_hit"] is True and tok2.fingerprint() == tok.fingerprint()
  np.testing.assert_array_equal(source2[3]["inputs"], source[3]["inputs"])
  with pytest.raises(ValueError, match=r"min_count=3 \(asked 7\)"):
    build_pretraining_data(cohort_root, vocab, seq_len=64, split="held_out", cache_dir=cache, min_count=7, progress=False)
  with pytest.raises(ValueError, match="code_hierarchy"):
    build_pretraining_data(cohort_root, vocab, seq_len=64, split="held_out", cache_dir=cache, hierarchical_codes=False, progress=False)
  # The keyword set the trainer passes (mlx_med/ehr/pretrain.py) refits a new vocabulary.
  flat_vocab = tmp_path / "flat.json"
  _, flat, _ = build_pretraining_data(
    cohort_root, flat_vocab, seq_len=64, packing="window", split="train", cache_dir=cache, min_count=3, num_value_bins=5, hierarchical_codes=False, progress=False
  )
  assert flat.config.num_value_bins == 5 and flat.config.code_hierarchy == () and flat.vocab_size < tok.vocab_size


def test_history_before_excludes_the_future(train_stream, cohort_root):
  labels = read_task_labels(cohort_root, "readmission_30d", with_true_probability=True)
  examples = build_task_examples(train_stream, labels, seq_len=256)
  assert examples.skipped_rows == int((np.asarray(labels.column("split").to_pylist()) != "train").sum())
  assert len(examples.labels) > 0 and examples.true_probability is not None
  for i in range(0, len(examples.labels), 7):
    row = int(train_stream.index_of(examples.subject_ids[i : i + 1])[0])
    tokens, times = train_stream.subject(row)
    hist = history_before(tokens, times, examples.prediction_times[i])
    cut = len(hist)
    assert np.all(times[:cut] <= examples.prediction_times[i]) and np.all(times[cut:] > examples.prediction_times[i])
    assert TIME_END not in times[:cut]
    # Events at exactly the prediction time (the discharge itself) are part of the history.
    assert times[cut - 1] == examples.prediction_times[i]
    n = examples.lengths[i]
    if examples.truncated[i]:
      assert n == 256 and np.array_equal(examples.inputs[i, :4], tokens[:4])
    else:
      np.testing.assert_array_equal(examples.inputs[i, :n], hist)
    assert np.all(examples.inputs[i, n:] == PAD_ID)
  tokens, times = train_stream.subject(0)
  with pytest.raises(ValueError, match="tokens but .* times"):
    history_before(tokens, times[1:], int(times[-2]))
