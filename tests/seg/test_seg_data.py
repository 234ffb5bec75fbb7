"""Segmentation data: the synthetic generator, the png / msd / dicom readers, their bad-input errors,
the in-memory and ArrayRecord sources."""

import csv
import json
import logging

import nibabel as nib
import numpy as np
import pytest
from imaging_files import write_dicom, write_nifti
from PIL import Image
from scipy import ndimage

from mlx_med.seg import data, synth

BRIGHTER = {"lung nodule", "ground-glass opacity", "kidney stone"}
DARKER = {"liver lesion", "kidney cyst", "spleen lesion"}


def _rows(root):
  with open(root / "metadata.csv", newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  return synth.generate_synthetic(tmp_path_factory.mktemp("synth") / "set", n_train=60, n_test=12, seed=3)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, synthetic):
  prompts = [r["prompt"] for r in _rows(synthetic)] + ["liver in CT scan", "tumour in CT scan"]
  return data.make_tokenizer(prompts, tmp_path_factory.mktemp("tok") / "tokenizer.json", vocab_size=300,
                             context_length=12)


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_prefix_stable(tmp_path, synthetic):
  again = synth.generate_synthetic(tmp_path / "again", n_train=60, n_test=12, seed=3)
  assert _rows(again) == _rows(synthetic)
  for r in _rows(synthetic)[:20]:
    for key in ("image", "mask"):
      assert (again / r[key]).read_bytes() == (synthetic / r[key]).read_bytes()
  small = synth.generate_synthetic(tmp_path / "small", n_train=5, n_test=0, seed=3)  # image i from (seed, i)
  first = [r for r in _rows(synthetic) if int(r["image"][7:12]) < 5]
  assert [dict(r, split="train") for r in first] == _rows(small)
  other = synth.generate_synthetic(tmp_path / "other", n_train=5, n_test=0, seed=4)
  assert (other / "images/00000.png").read_bytes() != (small / "images/00000.png").read_bytes()
  with pytest.raises(FileExistsError, match="overwrite=True"):
    synth.generate_synthetic(tmp_path / "small", n_train=2, n_test=0)
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_synthetic_buckets_prompts_and_masks(synthetic):
  rows = _rows(synthetic)
  assert {r["split"] for r in rows} == {"train", "test"}
  counts = {name: sum(r["bucket"] == name for r in rows) for name, _, _ in data.SIZE_BUCKETS}
  assert min(counts.values()) >= 0.2 * len(rows), counts  # all three buckets well populated
  assert len({r["label"] for r in rows}) == len(synth.LESIONS)
  per_image = {}
  for r in rows:
    per_image.setdefault(r["image"], []).append(r)
  assert sum(len(v) > 1 for v in per_image.values()) >= 0.3 * len(per_image)  # several targets per image
  smallest = min(float(r["area_fraction"]) for r in rows) * 128 * 128
  assert 1 <= smallest <= 8  # the smallest lesions are a handful of pixels
  for image, targets in per_image.items():
    assert len({t["label"] for t in targets}) == len(targets)  # one target per type: the prompt picks one mask
    img = np.asarray(Image.open(synthetic / image)).astype(np.float64)
    assert img.shape == (128, 128)
    masks = [np.asarray(Image.open(synthetic / t["mask"])) > 0 for t in targets]
    assert sum(m.astype(int) for m in masks).max() == 1  # targets are disjoint
    for t, m in zip(targets, masks):
      assert t["prompt"] == f"{t['label']} in CT scan"
      assert float(t["area_fraction"]) == pytest.approx(m.mean(), rel=1e-4)
      assert t["bucket"] == synth.size_bucket(m.mean())
      assert t["organ"] == synth.LESIONS[t["label"]]["organ"]
      if m.sum() >= 12 and t["label"] != "ground-glass opacity":  # contrast of the type: inside vs a ring around
        ring = ndimage.binary_dilation(m, iterations=3) & ~ndimage.binary_dilation(m, iterations=1)
        inside = img[ndimage.binary_erosion(m)] if ndimage.binary_erosion(m).sum() >= 4 else img[m]
        delta = inside.mean() - np.median(img[ring])
        assert (delta > 8) if t["label"] in BRIGHTER else (delta < -8), (t, delta)


def test_size_bucket_edges():
  assert synth.size_bucket(0.0005) == "<0.1%"
  assert synth.size_bucket(0.001) == "0.1-1%"
  assert synth.size_bucket(0.0099) == "0.1-1%"
  assert synth.size_bucket(0.01) == ">1%"
  assert synth.size_bucket(1.0) == ">1%"


# ---------------------------------------------------------------------------------------------- png


def test_png_metadata_layout_and_source(synthetic, tokenizer):
  train = data.scan(synthetic, format="png", split="train")
  rows = [r for r in _rows(synthetic) if r["split"] == "train"]
  assert len(train) == len(rows)
  for ex, r in zip(train, rows):
    assert ex.prompt == r["prompt"] and ex.label == r["label"] and ex.bucket == r["bucket"]
    assert ex.area_fraction == pytest.approx(float(r["area_fraction"]), rel=1e-4)
    assert ex.source_shape == (128, 128) and ex.slice_index is None and ex.affine is None
  src = data.SegSource(train[:10], image_size=64, tokenizer=tokenizer)
  rec = src[3]
  assert set(rec) == {"images", "masks", "text_ids"}
  assert rec["images"].dtype == np.uint8 and rec["images"].shape == (64, 64, 3)
  assert rec["masks"].dtype == np.uint8 and rec["masks"].shape == (64, 64) and set(np.unique(rec["masks"])) <= {0, 1}
  assert rec["masks"].sum() >= 1  # every lesion survives the downsampling, the tiny ones too
  assert rec["text_ids"].dtype == np.int32 and rec["text_ids"].shape == (12,)
  image, mask = data.load_example(train[3], image_size=64)
  np.testing.assert_array_equal(rec["images"], image)
  np.testing.assert_array_equal(rec["masks"], mask)
  # two targets of one image: the image is stored once, the prompts and masks differ
  first = next(i for i in range(1, 10) if train[i].image_path == train[i - 1].image_path)
  a, b = src[first - 1], src[first]
  assert src.image_index[first] == src.image_index[first - 1]
  np.testing.assert_array_equal(a["images"], b["images"])
  assert not np.array_equal(a["text_ids"], b["text_ids"]) and not np.array_equal(a["masks"], b["masks"])
  x = data.normalize(rec["images"][None])
  assert x.dtype == np.float32
  np.testing.assert_allclose(x[0, 0, 0], (rec["images"][0, 0] / 255.0 - np.array(data.CLIP_MEAN)) / np.array(data.CLIP_STD),
                             rtol=1e-5)


def _pair_folder(root, n=3, size=32):
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  rng = np.random.default_rng(0)
  for i in range(n):
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8), "L").save(root / f"images/c{i}.png")
    m = np.zeros((size, size), np.uint8)
    m[4 + i:10 + i, 5:9] = 255
    Image.fromarray(m, "L").save(root / f"masks/c{i}.png")
  return root


def test_png_pair_folder_and_its_errors(tmp_path, caplog):
  root = _pair_folder(tmp_path / "pairs")
  with pytest.raises(data.SegDataError, match="carry no prompt.*pass prompt="):
    data.scan(root, format="png")
  exs = data.scan(root, format="png", prompt="polyp in endoscopy")
  assert [e.case_id for e in exs] == ["c0", "c1", "c2"] and all(e.prompt == "polyp in endoscopy" for e in exs)
  assert exs[0].area_fraction == pytest.approx(24 / 1024)
  _, mask = data.load_example(exs[1], image_size=32)
  assert mask.sum() == 24 and mask[5:11, 5:9].all()

  Image.fromarray(np.zeros((32, 32), np.uint8), "L").save(root / "masks/c1.png")  # empty mask
  with pytest.raises(data.SegDataError, match=r"c1\.png: empty mask.*empty='skip'") as e:
    data.scan(root, format="png", prompt="polyp")
  assert "\n" not in str(e.value)
  with caplog.at_level(logging.WARNING, logger="mlx_med.seg.data"):
    assert len(data.scan(root, format="png", prompt="polyp", empty="skip")) == 2
  assert "skipped 1 empty mask" in caplog.text

  Image.fromarray(np.ones((30, 32), np.uint8), "L").save(root / "masks/c1.png")  # wrong shape
  with pytest.raises(data.SegDataError, match=r"c1\.png: mask shape 30x32 differs from the image's 32x32"):
    data.scan(root, format="png", prompt="polyp")
  (root / "masks/c1.png").unlink()
  with pytest.raises(data.SegDataError, match=r"c1\.png: no mask named c1"):
    data.scan(root, format="png", prompt="polyp")
  with pytest.raises(data.SegDataError, match="unknown data format 'nrrd'.*png, msd, dicom"):
    data.scan(root, format="nrrd")


def test_png_metadata_errors(tmp_path):
  root = _pair_folder(tmp_path / "meta")
  (root / "metadata.csv").write_text("image,mask\nimages/c0.png,masks/c0.png\n")
  with pytest.raises(data.SegDataError, match=r"metadata\.csv: missing column\(s\) prompt"):
    data.scan(root, format="png")
  (root / "metadata.csv").write_text("image,mask,prompt\nimages/c0.png,masks/gone.png,polyp\n")
  with pytest.raises(data.SegDataError, match=r"gone\.png: mask file not found \(.*line 2\)"):
    data.scan(root, format="png")


# ---------------------------------------------------------------------------------------------- msd


def _msd(root, *, flip=False, four_d=False):
  """A two-case CT task: label 1 (liver) on slices 2-4, label 2 (tumour) on slice 3; the image is bright
  exactly where the label is, so orientation mistakes show."""
  (root / "imagesTr").mkdir(parents=True)
  (root / "labelsTr").mkdir()
  affine = np.diag([0.8, 0.7, 2.5, 1.0])
  if flip:
    affine = np.diag([-0.8, 0.7, 2.5, 1.0])  # stored left-right mirrored: canonical reorients it
  training = []
  for c in range(2):
    lab = np.zeros((20, 16, 6), np.int16)
    lab[3 + c:9 + c, 4:8, 2:5] = 1
    lab[12:14, 10:13, 3] = 2
    img = np.where(lab > 0, 200, -300).astype(np.int16) + np.arange(20)[:, None, None].astype(np.int16)
    name = f"case_{c:03d}.nii.gz"
    if four_d:
      nib.save(nib.Nifti1Image(np.stack([img, -img], -1).astype(np.int16), affine), root / "imagesTr" / name)
    else:
      write_nifti(root / "imagesTr" / name, img, affine)
    write_nifti(root / "labelsTr" / name, lab, affine)
    training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
  meta = {"name": "Tiny", "modality": {"0": "CT", "1": "fake"}, "labels": {"0": "background", "1": "liver", "2": "tumour"},
          "training": training, "test": []}
  (root / "dataset.json").write_text(json.dumps(meta))
  return root, affine


@pytest.mark.parametrize("flip,four_d", [(False, False), (True, False), (False, True)])
def test_msd_slices_prompts_affine(tmp_path, tokenizer, flip, four_d):
  root, affine = _msd(tmp_path / "Task", flip=flip, four_d=four_d)
  exs = data.scan(root, format="msd", split=None)
  # per case: liver on 3 slices, tumour on 1
  assert len(exs) == 8
  assert sorted({(e.label, e.prompt) for e in exs}) == [("liver", "liver in CT scan"), ("tumour", "tumour in CT scan")]
  assert sorted(e.slice_index for e in exs if e.case_id == "case_000") == [2, 3, 3, 4]
  for e in exs:
    assert e.source_shape == (20, 16, 6) and e.format == "msd"
    np.testing.assert_allclose(np.asarray(e.affine), affine)
    assert e.channel == (0 if four_d else None)
  tumour = next(e for e in exs if e.label == "tumour")
  assert tumour.area_fraction == pytest.approx(6 / 320) and tumour.bucket == ">1%"
  for e in exs:
    image, mask = data.read_example(e)
    assert image.shape == mask.shape == (16, 20)  # vision.io's display: rows anterior first
    assert mask.sum() == round(e.area_fraction * 320)
    bright = image > 0.8  # the image is bright exactly where some label is
    assert bright[mask].all()
    if e.slice_index != 3:  # only the liver there
      np.testing.assert_array_equal(bright, mask)
  # the source reads each volume once; its records equal load_example's (vision.io.load_image) bitwise
  src = data.SegSource(exs, image_size=32, tokenizer=tokenizer)
  for i, e in enumerate(exs):
    image, mask = data.load_example(e, image_size=32)
    np.testing.assert_array_equal(src[i]["images"], image)
    np.testing.assert_array_equal(src[i]["masks"], mask)
  test = data.scan(root, format="msd", split=None, test_fraction=0.5, seed=1)
  assert {e.split for e in test} <= {"train", "test"}
  assert all(len({e.split for e in test if e.case_id == c}) == 1 for c in ("case_000", "case_001"))


def test_msd_errors(tmp_path, caplog):
  root, affine = _msd(tmp_path / "Task")
  meta = json.loads((root / "dataset.json").read_text())
  (root / "labelsTr/case_001.nii.gz").rename(root / "spare.nii.gz")
  with pytest.raises(data.SegDataError, match=r"labelsTr/case_001\.nii\.gz: label file not found.*training\[1\]"):
    data.scan(root, format="msd")
  write_nifti(root / "labelsTr/case_001.nii.gz", np.zeros((20, 15, 6), np.int16), affine)
  with pytest.raises(data.SegDataError, match=r"case_001\.nii\.gz: label shape \(20, 15, 6\) differs from the image's "
                     r"\(20, 16, 6\)"):
    data.scan(root, format="msd")
  write_nifti(root / "labelsTr/case_001.nii.gz", np.zeros((20, 16, 6), np.int16), affine)
  with pytest.raises(data.SegDataError, match=r"case_001\.nii\.gz: empty label volume.*empty='skip'"):
    data.scan(root, format="msd")
  with caplog.at_level(logging.WARNING, logger="mlx_med.seg.data"):
    assert {e.case_id for e in data.scan(root, format="msd", empty="skip")} == {"case_000"}
  assert "skipped 1 empty mask" in caplog.text
  del meta["labels"]
  (root / "dataset.json").write_text(json.dumps(meta))
  with pytest.raises(data.SegDataError, match=r"dataset\.json: missing key 'labels'"):
    data.scan(root, format="msd")
  (root / "dataset.json").unlink()
  with pytest.raises(data.SegDataError, match=r"dataset\.json: not found"):
    data.scan(root, format="msd")


# ---------------------------------------------------------------------------------------------- dicom


def _dicom_case(root, name="case1", rows=12, cols=10, n=4):
  case = root / name
  case.mkdir(parents=True)
  mask = np.zeros((cols, rows, n), np.uint8)  # [column, row, slice]
  mask[2:5, 3:7, 1] = 1
  mask[6:8, 1:3, 2] = 2
  order = [2, 0, 3, 1]  # file names not in slice order: positions decide
  for file_k, k in enumerate(order):
    hu = np.full((rows, cols), -500, np.int16)
    hu[mask[:, :, k].T > 0] = 100 + 50 * k
    write_dicom(case / f"im{file_k}.dcm", hu, slope=1.0, intercept=0.0, center=0, width=1000,
                extra={"ImagePositionPatient": [0.0, 0.0, 5.0 * k], "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
                       "PixelSpacing": [0.7, 0.6], "InstanceNumber": 10 - k})
  write_nifti(case / "mask.nii.gz", mask, np.eye(4))
  return case


def test_dicom_series_with_mask(tmp_path):
  case = _dicom_case(tmp_path / "dcm")
  exs = data.scan(tmp_path / "dcm", format="dicom", labels={1: "liver", 2: "lesion"})
  assert [(e.slice_index, e.label, e.prompt) for e in exs] == [(1, "liver", "liver in CT scan"),
                                                              (2, "lesion", "lesion in CT scan")]
  assert exs[0].source_shape == (12, 10) and exs[0].area_fraction == pytest.approx(12 / 120)
  assert np.asarray(exs[1].affine)[2, 3] == 10.0 and np.asarray(exs[1].affine)[0, 0] == pytest.approx(0.6)
  for e in exs:
    image, mask = data.read_example(e)
    assert mask.shape == image.shape == (12, 10)
    assert mask.sum() == round(e.area_fraction * 120)
    assert image[mask].min() > image[~mask].max()  # the slice order found the right file
  binary = data.scan(tmp_path / "dcm", format="dicom", prompt="abnormality in CT scan")
  assert [e.slice_index for e in binary] == [1, 2] and binary[0].label_value is None
  with pytest.raises(data.SegDataError, match="pass prompt="):
    data.scan(tmp_path / "dcm", format="dicom")
  write_nifti(case / "mask.nii.gz", np.ones((12, 10, 4), np.int16), np.eye(4))
  with pytest.raises(data.SegDataError, match=r"mask\.nii\.gz: mask shape \(12, 10, 4\) differs from the series' "
                     r"\(columns, rows, slices\) \(10, 12, 4\)"):
    data.scan(tmp_path / "dcm", format="dicom", prompt="x")
  write_nifti(case / "mask.nii.gz", np.zeros((10, 12, 4), np.int16), np.eye(4))
  with pytest.raises(data.SegDataError, match=r"mask\.nii\.gz: empty mask"):
    data.scan(tmp_path / "dcm", format="dicom", prompt="x")
  (case / "mask.nii.gz").unlink()
  with pytest.raises(data.SegDataError, match=r"case1/mask\.nii\.gz: mask file not found"):
    data.scan(tmp_path / "dcm", format="dicom", prompt="x")


# ---------------------------------------------------------------------------------------------- resizing


def test_resize_mask_keeps_tiny_lesions():
  m = np.zeros((256, 256), bool)
  m[100:140, 30:90] = True  # large: plain nearest neighbour
  m[201, 202] = True  # one pixel, between the sampled centres of a 4x downsampling
  m[10:12, 10:12] = True
  small = data.resize_mask(m, 64)
  nearest = m[2::4, 2::4]
  assert not nearest[50, 50] and small[50, 50] == 1  # the lone pixel kept where it lies
  assert small[2, 2] == 1 and nearest[2, 2]  # sampled anyway
  np.testing.assert_array_equal(np.delete(np.delete(small, 50, 0), 50, 1),
                                np.delete(np.delete(nearest, 50, 0), 50, 1).astype(np.uint8))
  assert ndimage.label(small)[1] == 3
  np.testing.assert_array_equal(data.resize_mask(small, 128)[::2, ::2], small)  # upsampling: nearest


# ---------------------------------------------------------------------------------------------- tfds


def test_tfds_round_trip(tmp_path, synthetic, tokenizer):
  builder = data.build_tfds(synthetic, tmp_path / "tfds", format="png", image_size=48)
  assert set(builder.info.splits) == {"train", "test"}
  records = data.RecordSegSource.from_builder(builder, "test", tokenizer)
  memory = data.SegSource(data.scan(synthetic, format="png", split="test"), image_size=48, tokenizer=tokenizer)
  assert len(records) == len(memory)
  for i in range(len(memory)):
    a, b = records[i], memory[i]
    for key in ("images", "masks", "text_ids"):
      assert a[key].dtype == b[key].dtype
      np.testing.assert_array_equal(a[key], b[key])
  assert records.examples == memory.examples
  with pytest.raises(data.SegDataError, match="split 'validation' not built"):
    data.RecordSegSource.from_builder(builder, "validation", tokenizer)
  import grain.python as grain
  batch = next(iter(grain.MapDataset.source(records).batch(4)))
  assert batch["images"].shape == (4, 48, 48, 3) and batch["masks"].shape == (4, 48, 48)


def test_make_source_settings_and_spacing(tmp_path, synthetic, tokenizer):
  import ml_collections

  exs = data.scan(synthetic, format="png", split="test")[:6]
  config = ml_collections.ConfigDict({"data": {"source": "tfds", "tfds_dir": str(tmp_path / "tfds"), "root": "",
                                               "format": "png", "window": "auto", "channel": 0}})
  records = data.make_source(config, tmp_path, exs, tokenizer, image_size=32, split="test")
  config.data.source = "memory"
  memory = data.make_source(config, tmp_path, exs, tokenizer, image_size=32, split="test")
  assert isinstance(records, data.RecordSegSource) and isinstance(memory, data.SegSource)
  assert records.examples == exs and len(records) == len(memory) == 6
  for i in range(6):
    for key in ("images", "masks", "text_ids"):
      np.testing.assert_array_equal(records[i][key], memory[i][key])
  np.testing.assert_allclose(np.asarray(data.normalize_device(memory[0]["images"])),
                             data.normalize(memory[0]["images"]), rtol=1e-6, atol=1e-6)
  settings = data.data_settings(config, 32)
  assert settings["window"] == "header" and settings["image_size"] == 32
  assert settings["normalisation"]["mean"] == list(data.CLIP_MEAN)
  assert data.model_spacing(exs[0], 32) == (4.0, 4.0)  # png: source pixels per model pixel

  root, _ = _msd(tmp_path / "Task", flip=True)
  config.data.update({"root": str(root), "format": "msd"})
  assert data.data_settings(config, 32)["window"] == "soft_tissue"  # a CT task: no header window in NIfTI
  ex = data.scan(root, format="msd")[0]
  assert data.resolve_window(ex) == "soft_tissue"
  # display rows follow canonical y (0.7 mm, 16 voxels), columns canonical x (0.8 mm, 20 voxels)
  assert data.model_spacing(ex, 32) == pytest.approx((0.7 * 16 / 32, 0.8 * 20 / 32))
  windowed = data.scan(root, format="msd", window=(40, 400))[0]
  assert windowed.window == (40.0, 400.0) and data.resolve_window(windowed) == (40.0, 400.0)
  assert data.SegExample.from_dict(json.loads(json.dumps(windowed.to_dict()))) == windowed
