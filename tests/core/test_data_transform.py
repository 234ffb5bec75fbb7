"""`core.data.make_loader`'s per-example random transform: applied after shuffle and repeat,
deterministic for a seed, new draws every epoch, per host, resumed bit-identically from an
iterator's state; and the trainer applies a train source's `train_transform` (train loader only)."""

from __future__ import annotations

import grain.python as grain
import numpy as np
import pytest
from conv_task import ConvClassifierTask, ImageSource, image_config

from mlx_med.core import data, trainer


class Records:
  """Eight records: an id and a constant vector."""

  def __init__(self, n: int = 8):
    self.n = n

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i):
    return {"id": np.int32(i), "x": np.full(3, float(i), np.float32)}


def jitter(record, rng: np.random.Generator):
  """A callable transform: adds a random draw to x (ids stay, to follow records)."""
  return {"id": record["id"], "x": record["x"] + rng.uniform(-1, 1, 3).astype(np.float32)}


class Jitter(grain.RandomMapTransform):
  def random_map(self, record, rng):
    return jitter(record, rng)


def _loader(seed=0, transform=jitter, **kw):
  args = {"shuffle": True, "process_index": 0, "process_count": 1, "transform": transform}
  args.update(kw)
  return data.make_loader(Records(), 4, seed, **args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _noise(batches):
  """Per record id, the list of its draws in stream order."""
  out: dict[int, list] = {}
  for b in batches:
    for i, x in zip(b["id"], b["x"]):
      out.setdefault(int(i), []).append(x - float(i))
  return out


def _equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_transform_is_deterministic_for_a_seed_and_both_forms_agree():
  a = _take(iter(_loader(seed=3)), 6)
  _equal(a, _take(iter(_loader(seed=3)), 6))
  _equal(a, _take(iter(_loader(seed=3, transform=Jitter())), 6))  # RandomMapTransform == callable
  other = _take(iter(_loader(seed=4)), 6)
  assert not all(np.array_equal(x["x"], y["x"]) for x, y in zip(a, other))
  # The transform leaves the shuffled order alone: the same ids as the loader without it.
  plain = _take(iter(_loader(seed=3, transform=None)), 6)
  for x, y in zip(a, plain):
    np.testing.assert_array_equal(x["id"], y["id"])
    assert np.all(np.abs(x["x"] - y["x"]) <= 1.0) and not np.array_equal(x["x"], y["x"])


def test_each_epoch_draws_anew():
  # Three epochs of 8 records (2 batches each), unshuffled and shuffled: every record three times,
  # with three different draws.
  for shuffle in (False, True):
    noise = _noise(_take(iter(_loader(seed=0, shuffle=shuffle)), 6))
    assert sorted(noise) == list(range(8))
    for draws in noise.values():
      assert len(draws) == 3
      assert all(np.all(np.abs(d) <= 1.0) for d in draws)
      assert not np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[1], draws[2])


def test_hosts_draw_different_augmentations():
  assert data.transform_seed(0, 0) != data.transform_seed(0, 1) != data.transform_seed(1, 0)
  assert data.transform_seed(7, 1) == data.transform_seed(7, 1) and 0 <= data.transform_seed(7, 1) < 2**32
  b0 = next(iter(_loader(seed=0, shuffle=False, process_index=0, process_count=2)))
  b1 = next(iter(_loader(seed=0, shuffle=False, process_index=1, process_count=2)))
  # Disjoint records (every second one); the draws are not the same numbers shifted.
  assert set(b0["id"].tolist()).isdisjoint(b1["id"].tolist())
  assert not np.allclose(b0["x"] - b0["id"][:, None], b1["x"] - b1["id"][:, None])


@pytest.mark.parametrize("taken", [1, 3])
def test_resume_mid_epoch_is_bit_identical(taken):
  it = iter(_loader(seed=5))
  _take(it, taken)
  state = it.get_state()
  expected = _take(it, 5)  # crosses epoch boundaries
  fresh = iter(_loader(seed=5))
  fresh.set_state(state)
  _equal(_take(fresh, 5), expected)


class _TransformedImages(ImageSource):
  """The conv task's images, with a train transform that adds 10 plus a uniform draw."""

  def __init__(self, n, seed, calls):
    super().__init__(n, seed)
    self.calls = calls

    def shift(record, rng):
      calls.append(1)
      return {"image": record["image"] + np.float32(10.0) + rng.uniform(0, 1, (1,)).astype(np.float32),
              "label": record["label"]}

    self.train_transform = shift


def test_trainer_applies_a_train_sources_transform_and_never_to_eval(tmp_path):
  train_calls: list = []
  eval_calls: list = []
  source = _TransformedImages(32, 0, train_calls)
  t = trainer.Trainer(image_config(steps=1), str(tmp_path / "run"), ConvClassifierTask("xent"), source,
                      _TransformedImages(16, 1, eval_calls), progress=False).setup()
  batch = next(t.iterator)
  assert batch["image"].shape == (16, 12, 12, 1) and train_calls
  raw = source.images
  # Each image is one record's image shifted by 10 + u, u in [0, 1) (a constant per image).
  for image in batch["image"]:
    shift = image[None] - raw
    hits = [j for j in range(32) if np.ptp(shift[j]) < 1e-5 and 10.0 <= shift[j].flat[0] < 11.0]
    assert len(hits) == 1
  assert t.evaluate() is not None and not eval_calls  # evaluation reads the eval source as it is
