"""Folder -> TFDS ArrayRecord -> grain: round trip, determinism, sharding, resumption, augmentation, errors."""

import csv
import shutil

import numpy as np
import pytest
from PIL import Image

from mlx_med.embed import data, synth
from mlx_med.vision.io import ImageProcessorConfig

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def toy_tokenizer(texts):
  """Deterministic stand-in for TextTokenizer.encode: word hashes, padded to 12 ids."""
  out = np.zeros((len(texts), 12), np.int32)
  for i, t in enumerate(texts):
    ids = [1 + (sum(map(ord, w)) % 997) for w in t.lower().split()][:12]
    out[i, :len(ids)] = ids
  return out


def _rows(folder):
  with open(folder / "metadata.csv", newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  folder = synth.generate_dataset(root / "synth", n_train=24, n_test=8, image_size=32, seed=3)
  builder = data.build_tfds(folder, root / "tfds")
  return folder, builder, root / "tfds"


def _loader(data_dir, **kw):
  args = {"batch_size": 4, "image_size": 32, "processor": (MEAN, STD), "tokenizer": toy_tokenizer, "seed": 0,
          "shard_index": 0, "shard_count": 1, "with_metadata": True}
  args.update(kw)
  return data.make_loader(data_dir, "train", **args)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_round_trip_synthetic(built):
  folder, builder, data_dir = built
  rows = _rows(folder)
  names = data.label_names(data_dir)
  assert names == sorted({x for r in rows for x in r["labels"].split(";") if x})
  assert data.label_names(builder) == names
  for split in ("train", "test"):
    source = builder.as_data_source(split)
    expected = {r["path"]: r for r in rows if r["split"] == split}
    assert len(source) == len(expected)
    seen = set()
    for i in range(len(source)):
      rec = source[i]
      path = rec["path"].decode()
      row = expected[path]
      seen.add(path)
      np.testing.assert_array_equal(rec["image"], np.asarray(Image.open(folder / path).convert("RGB")))
      assert rec["report"].decode() == row["report"]
      assert rec["domain"].decode() == row["domain"]
      assert rec["label_names"].decode() == row["labels"]
      hot = [names[j] for j in np.flatnonzero(rec["labels"])]
      assert rec["labels"].dtype == np.int32 and hot == sorted(filter(None, row["labels"].split(";")))
    assert seen == set(expected)
  # Opened again from the directory alone (a fresh process would do this).
  again = data.open_tfds(data_dir)
  assert len(again.as_data_source("test")) == 8


def test_round_trip_grayscale_nonsquare_and_resize(tmp_path):
  folder = tmp_path / "f"
  (folder / "img").mkdir(parents=True)
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
  rgb = rng.integers(0, 256, (18, 12, 3), dtype=np.uint8)
  Image.fromarray(gray, "L").save(folder / "img/a.png")
  Image.fromarray(rgb, "RGB").save(folder / "img/b.png")
  with open(folder / "metadata.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["path", "split", "labels", "report"])  # no domain column: optional
    w.writerow(["img/a.png", "train", "x;y", "gray one"])
    w.writerow(["img/b.png", "train", "", "colour one"])
  b = data.build_tfds(folder, tmp_path / "raw", label_names=["y", "x", "z"])
  recs = {r["path"].decode(): r for r in (b.as_data_source("train")[i] for i in range(2))}
  np.testing.assert_array_equal(recs["img/a.png"]["image"], np.repeat(gray[..., None], 3, -1))
  np.testing.assert_array_equal(recs["img/b.png"]["image"], rgb)
  np.testing.assert_array_equal(recs["img/a.png"]["labels"], [1, 1, 0])  # the given vocabulary's order
  assert recs["img/b.png"]["domain"].decode() == "" and data.label_names(b) == ["y", "x", "z"]
  small = data.build_tfds(folder, tmp_path / "small", image_size=16)
  for i in range(2):
    rec = small.as_data_source("train")[i]
    assert rec["image"].shape == (16, 16, 3) and rec["image"].dtype == np.uint8
  # Resized on write = the loader's resize of the raw record (short side to 16, centre crop).
  raw = data.load_rgb_uint8(folder / "img/a.png", 16)
  ref = np.asarray(Image.fromarray(np.repeat(gray[..., None], 3, -1)).resize((24, 16), Image.Resampling.BICUBIC))
  np.testing.assert_allclose(raw[:, 4:12].astype(int), ref[:, 8:16].astype(int), atol=2)  # same content, crop centred


def test_batches_without_augmentation_are_the_normalised_pixels(built):
  folder, _, data_dir = built
  batch = next(iter(_loader(data_dir, shuffle=False, augment=False, num_epochs=1)))
  assert batch["images"].shape == (4, 32, 32, 3) and batch["images"].dtype == np.float32
  assert batch["text_ids"].dtype == np.int32 and batch["labels"].dtype == np.int32
  rows = {r["path"]: r for r in _rows(folder)}
  for i, path in enumerate(batch["path"]):
    pixels = np.asarray(Image.open(folder / path).convert("RGB")).astype(np.float32) / 255.0
    np.testing.assert_allclose(batch["images"][i], (pixels - np.float32(MEAN)) / np.float32(STD), atol=1e-6)
    np.testing.assert_array_equal(batch["text_ids"][i], toy_tokenizer([rows[path]["report"]])[0])
  # Default keys are exactly the embedding task's batch keys.
  plain = next(iter(_loader(data_dir, with_metadata=False)))
  assert set(plain) == {"images", "text_ids", "labels"}


def test_processor_forms_agree(built):
  _, _, data_dir = built

  class MeanStd:
    mean, std = MEAN, STD

  proc = ImageProcessorConfig(size=32, resize="exact", crop_size=None, image_mean=MEAN, image_std=STD)

  class WithEncode:
    encode = staticmethod(toy_tokenizer)

  first = [next(iter(_loader(data_dir, processor=p, shuffle=False))) for p in ((MEAN, STD), MeanStd(), proc)]
  first.append(next(iter(_loader(data_dir, shuffle=False, tokenizer=WithEncode()))))
  for other in first[1:]:
    _assert_batches_equal([first[0]], [other])
  with pytest.raises(ValueError, match="processor"):
    _loader(data_dir, processor="clip")


def test_deterministic_for_a_seed(built):
  _, _, data_dir = built
  a = _take(iter(_loader(data_dir, augment=True, seed=5)), 8)
  b = _take(iter(_loader(data_dir, augment=True, seed=5)), 8)
  c = _take(iter(_loader(data_dir, augment=True, seed=6)), 8)
  _assert_batches_equal(a, b)
  assert any(not np.array_equal(x["path"], y["path"]) for x, y in zip(a, c))
  # Epochs are reshuffled: the order of epoch 2 differs from epoch 1 (6 batches of 4 = one epoch).
  order = np.concatenate([x["path"] for x in _take(iter(_loader(data_dir, seed=5)), 12)])
  assert sorted(order[:24]) == sorted(order[24:]) and list(order[:24]) != list(order[24:])


def test_augmentation(built):
  _, _, data_dir = built
  plain = next(iter(_loader(data_dir, shuffle=False)))
  aug = next(iter(_loader(data_dir, shuffle=False, augment=True)))
  np.testing.assert_array_equal(plain["path"], aug["path"])
  np.testing.assert_array_equal(plain["labels"], aug["labels"])
  assert aug["images"].shape == plain["images"].shape
  assert not np.allclose(aug["images"], plain["images"])
  identity = data.Augment(scale=(1.0, 1.0), ratio=(1.0, 1.0), brightness=0.0, contrast=0.0)
  same = next(iter(_loader(data_dir, shuffle=False, augment=identity)))
  np.testing.assert_allclose(same["images"], plain["images"], atol=1e-6)
  flipped = next(iter(_loader(data_dir, shuffle=False, augment=data.Augment(
      scale=(1.0, 1.0), ratio=(1.0, 1.0), brightness=0.0, contrast=0.0, flip=True), seed=1)))
  for x, y in zip(flipped["images"], plain["images"]):  # each image either untouched or mirrored
    assert np.allclose(x, y, atol=1e-6) or np.allclose(x, y[:, ::-1], atol=1e-6)
  # Different epochs draw different crops of the same image.
  it = iter(_loader(data_dir, shuffle=False, augment=True))
  epoch = _take(it, 12)
  assert not np.allclose(epoch[0]["images"], epoch[6]["images"])


def test_two_way_sharding_is_disjoint_and_covering(built):
  folder, _, data_dir = built
  shards = []
  for index in range(2):
    batches = list(_loader(data_dir, shard_index=index, shard_count=2, num_epochs=1, batch_size=3))
    shards.append([p for b in batches for p in b["path"]])
  assert len(shards[0]) == len(shards[1]) == 12
  assert not set(shards[0]) & set(shards[1])
  assert set(shards[0]) | set(shards[1]) == {r["path"] for r in _rows(folder) if r["split"] == "train"}
  with pytest.raises(ValueError, match="shard_index"):
    _loader(data_dir, shard_index=2, shard_count=2)


def test_checkpoint_resume_mid_epoch(built):
  _, _, data_dir = built
  it = iter(_loader(data_dir, augment=True, seed=9, batch_size=5))
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 4)  # crosses into the second epoch (24 records, 4 batches of 5 a pass)
  fresh = iter(_loader(data_dir, augment=True, seed=9, batch_size=5))
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 4), expected)


def _write_csv(folder, header, rows):
  with open(folder / "metadata.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


def test_bad_metadata_errors(built, tmp_path):
  folder, _, data_dir = built
  bad = tmp_path / "bad"
  shutil.copytree(folder / "images", bad / "images")
  header = ["path", "split", "domain", "labels", "report"]

  _write_csv(bad, ["path", "split", "labels"], [["images/00000.png", "train", ""]])
  with pytest.raises(data.MetadataError, match=r"metadata.csv: missing column\(s\) \['report'\]"):
    data.build_tfds(bad, tmp_path / "t1")

  _write_csv(bad, header, [["images/00000.png", "train", "ct", "", "ok"], ["images/00001.png", "val", "ct", "", "x"]])
  with pytest.raises(data.MetadataError, match=r"metadata.csv, line 3: split 'val' is not one of"):
    data.build_tfds(bad, tmp_path / "t2")

  _write_csv(bad, header, [["images/00000.png", "train", "ct", "", "ok"], ["images/nope.png", "test", "ct", "a", "x"]])
  with pytest.raises(data.MetadataError, match=r"line 3: image file 'images/nope.png' not found"):
    data.build_tfds(bad, tmp_path / "t3")

  _write_csv(bad, header, [["images/00000.png", "train", "ct", "", "ok"], ["images/00000.png", "test", "ct", "", "x"]])
  with pytest.raises(data.MetadataError, match=r"line 3: image 'images/00000.png' is listed again \(first on line 2\)"):
    data.build_tfds(bad, tmp_path / "t3b")

  (bad / "images/broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  _write_csv(bad, header, [["images/broken.png", "train", "ct", "a", "x"]])
  with pytest.raises(data.MetadataError, match=r"line 2: .*broken.png"):
    data.build_tfds(bad, tmp_path / "t4")

  _write_csv(bad, header, [["images/00000.png", "train", "ct", "a;b", "x"]])
  with pytest.raises(data.MetadataError, match=r"line 2: labels \['b'\] are not in the given label_names"):
    data.build_tfds(bad, tmp_path / "t5", label_names=["a"])

  for err in (data.MetadataError, ValueError):  # one line each, and a ValueError for callers
    with pytest.raises(err) as info:
      data.build_tfds(tmp_path / "nowhere", tmp_path / "t6")
    assert "\n" not in str(info.value) and "metadata.csv: not found" in str(info.value)

  with pytest.raises(ValueError, match=r"split 'validation' is not in"):
    data.make_loader(data_dir, "validation", batch_size=2, image_size=32, tokenizer=toy_tokenizer)
  with pytest.raises(FileNotFoundError, match="no built dataset"):
    data.make_loader(tmp_path / "empty", "train", batch_size=2, image_size=32, tokenizer=toy_tokenizer)
