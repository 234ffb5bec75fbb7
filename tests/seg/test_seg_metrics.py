"""Segmentation metrics against a brute-force reference and hand-computed cases; aggregation and the report.

The reference HD95 is written here without scipy: a surface voxel is a mask voxel with a face neighbour
outside the mask (or outside the array), and every surface-to-surface distance is computed pairwise in
numpy with the spacing. Tolerances are float64 rounding only (the two routes take the square root of the
same sums of squares).
"""

import csv
import json
import math

import numpy as np
import pytest

from mlx_med.seg import metrics as M

# --------------------------------------------------------------------------- reference (numpy only)


def _surface_reference(mask: np.ndarray) -> np.ndarray:
  padded = np.pad(mask, 1, constant_values=False)
  inner = tuple(slice(1, -1) for _ in range(mask.ndim))
  all_neighbours_in = np.ones_like(mask)
  for axis in range(mask.ndim):
    for shift in (-1, 1):
      all_neighbours_in &= np.roll(padded, shift, axis=axis)[inner]
  return mask & ~all_neighbours_in


def _directed_reference(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
  pa = np.argwhere(_surface_reference(a)) * np.asarray(spacing, float)
  pb = np.argwhere(_surface_reference(b)) * np.asarray(spacing, float)
  d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
  return d.min(axis=1)


def _hd95_reference(a: np.ndarray, b: np.ndarray, spacing) -> float:
  d = np.concatenate([_directed_reference(a, b, spacing), _directed_reference(b, a, spacing)])
  return float(np.percentile(d, 95))


def _blobs(rng: np.random.Generator, shape: tuple[int, ...], k: int) -> np.ndarray:
  """Union of k random axis-aligned ellipsoids (may touch or cross the array border)."""
  grid = np.indices(shape).astype(float)
  mask = np.zeros(shape, bool)
  expand = (-1,) + (1,) * len(shape)
  for _ in range(k):
    centre = rng.uniform(0, np.array(shape)).reshape(expand)
    radii = rng.uniform(1.0, max(shape) / 4, len(shape)).reshape(expand)
    mask |= (((grid - centre) / radii) ** 2).sum(0) <= 1.0
  return mask


def _random_pairs(ndim: int, count: int, seed: int):
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < count:
    shape = tuple(int(x) for x in rng.integers(10, 48 if ndim == 2 else 18, ndim))
    a, b = _blobs(rng, shape, int(rng.integers(1, 4))), _blobs(rng, shape, int(rng.integers(1, 4)))
    if a.any() and b.any():
      out.append((a, b, tuple(float(s) for s in rng.uniform(0.4, 2.5, ndim))))
  return out


# --------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("ndim", [2, 3])
def test_hd95_equals_brute_force_on_random_blobs_with_anisotropic_spacing(ndim):
  for a, b, spacing in _random_pairs(ndim, 25, seed=ndim):
    np.testing.assert_array_equal(M.surface(a), _surface_reference(a))
    d_ab, d_ba = M.surface_distances(a, b, spacing)
    np.testing.assert_allclose(d_ab, _directed_reference(a, b, spacing), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d_ba, _directed_reference(b, a, spacing), rtol=1e-12, atol=1e-12)
    assert M.hd95(a, b, spacing) == pytest.approx(_hd95_reference(a, b, spacing), rel=1e-12, abs=1e-12)
    assert M.hd95(a, b, spacing) == pytest.approx(M.hd95(b, a, spacing), rel=1e-12, abs=1e-12)  # symmetric
    tp, na, nb = int((a & b).sum()), int(a.sum()), int(b.sum())
    assert M.dice(a, b) == pytest.approx(2 * tp / (na + nb), abs=1e-15)
    assert M.iou(a, b) == pytest.approx(tp / (na + nb - tp), abs=1e-15)


def test_surface_is_connectivity_one_and_the_array_edge_is_background():
  m = np.zeros((5, 5), bool)
  m[1:4, 1:4] = True
  expected = m.copy()
  expected[2, 2] = False  # with 4-neighbours only the centre of a 3x3 square is interior
  np.testing.assert_array_equal(M.surface(m), expected)
  full = np.ones((4, 4), bool)
  ring = full.copy()
  ring[1:3, 1:3] = False  # a mask filling the array: its edge voxels are surface (outside = background)
  np.testing.assert_array_equal(M.surface(full), ring)


# --------------------------------------------------------------------------- hand-computed


def _square(shape, rows, cols):
  m = np.zeros(shape, bool)
  m[rows[0]:rows[1], cols[0]:cols[1]] = True
  return m


def test_two_shifted_squares_by_hand():
  a = _square((10, 10), (2, 6), (2, 6))  # 4x4
  b = _square((10, 10), (2, 6), (4, 8))  # the same, two columns to the right
  # overlap 4x2 = 8: Dice 2*8/(16+16), IoU 8/24
  assert M.dice(a, b) == pytest.approx(0.5, abs=1e-15)
  assert M.iou(a, b) == pytest.approx(1 / 3, abs=1e-15)
  # each 12-voxel ring sees the other at distances 0 (x4), 1 (x4), 2 (x4): the 95th percentile of the 24 is 2
  assert M.hd95(a, b) == 2.0
  assert M.hd95(a, b, spacing=(1.0, 0.5)) == 1.0  # only column distances count: halved
  assert M.hd95(a, b, spacing=(7.0, 0.5)) == 1.0  # row spacing never enters
  assert M.hausdorff(a, b, percentile=100) == 2.0


def test_percentile_interpolates_over_both_directed_sets_by_hand():
  a = np.zeros((6, 12), bool)
  a[0, 0:10] = True
  b = np.zeros((6, 12), bool)
  b[0, 0:9] = True
  b[4, 9] = True
  # a->b: nine 0s and 1 (for (0,9)); b->a: nine 0s and 4 (for (4,9)). Sorted 20 values: 18 zeros, 1, 4;
  # the 95th percentile sits at rank 0.95*19 = 18.05: 1 + 0.05*(4-1)
  assert M.hd95(a, b) == pytest.approx(1.15, abs=1e-12)
  assert M.hausdorff(a, b, percentile=100) == 4.0
  assert M.hd95(a, b, spacing=(2.0, 1.0)) == pytest.approx(1 + 0.05 * (8 - 1), abs=1e-12)


def test_single_voxels_3d_with_spacing():
  a = np.zeros((4, 6, 8), bool)
  b = np.zeros((4, 6, 8), bool)
  a[0, 0, 0] = True
  b[1, 2, 4] = True
  assert M.hd95(a, b) == pytest.approx(math.sqrt(1 + 4 + 16), abs=1e-12)
  assert M.hd95(a, b, spacing=(3.0, 0.5, 0.25)) == pytest.approx(math.sqrt(9 + 1 + 1), abs=1e-12)
  assert M.dice(a, b) == 0.0 and M.iou(a, b) == 0.0


# --------------------------------------------------------------------------- empty masks


def test_empty_mask_conventions():
  empty = np.zeros((8, 8), bool)
  some = _square((8, 8), (2, 4), (2, 4))
  assert (M.dice(empty, empty), M.iou(empty, empty), M.hd95(empty, empty)) == (1.0, 1.0, 0.0)
  for p, g in ((empty, some), (some, empty)):
    assert M.dice(p, g) == 0.0 and M.iou(p, g) == 0.0
    assert math.isnan(M.hd95(p, g))
  with pytest.raises(M.SegMetricsError, match="non-empty"):
    M.surface_distances(empty, some)


def test_undefined_hd95_is_counted_and_left_out_of_the_mean():
  empty = np.zeros((16, 16), bool)
  a = _square((16, 16), (2, 6), (2, 6))
  b = _square((16, 16), (2, 6), (4, 8))
  preds = [a, empty, a, empty]
  gts = [b, a, empty, empty]
  res = M.evaluate_masks(preds, gts, n_boot=50, seed=0)
  rows = res["per_image"]
  assert [r["empty"] for r in rows] == ["", "pred", "gt", "both"]
  assert [r["dice"] for r in rows] == [0.5, 0.0, 0.0, 1.0]
  assert [(r["tp"], r["fp"], r["fn"]) for r in rows] == [(8, 8, 8), (0, 0, 16), (0, 16, 0), (0, 0, 0)]
  hd = res["overall"]["hd95"]
  assert hd["n"] == 2 and hd["n_undefined"] == 2
  assert hd["mean"] == pytest.approx((2.0 + 0.0) / 2)  # the shifted squares and the both-empty image
  assert res["overall"]["dice"]["mean"] == pytest.approx(1.5 / 4) and res["overall"]["dice"]["n_undefined"] == 0
  assert (res["overall"]["n_pred_empty"], res["overall"]["n_gt_empty"], res["overall"]["n_both_empty"]) == (1, 1, 1)
  assert set(res["buckets"]) == {">1%", "empty"}  # a 16-voxel target in 256 voxels; empty targets apart
  assert res["buckets"]["empty"]["n"] == 2


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_interval_contains_the_mean_is_seeded_and_has_the_normal_width():
  rng = np.random.default_rng(1)
  values = rng.normal(0.7, 0.2, 400)
  a = M.bootstrap_mean_ci(values, n_boot=2000, seed=3)
  assert a == M.bootstrap_mean_ci(values, n_boot=2000, seed=3)  # deterministic given the seed
  assert a != M.bootstrap_mean_ci(values, n_boot=2000, seed=4)
  assert a["lo"] < a["mean"] < a["hi"]
  assert a["mean"] == pytest.approx(values.mean(), abs=1e-15)
  # percentile interval of a mean of 400 draws ~ mean +- 1.96 * sd / sqrt(n): width within 10% of that
  normal_width = 2 * 1.96 * values.std(ddof=1) / math.sqrt(values.size)
  assert (a["hi"] - a["lo"]) == pytest.approx(normal_width, rel=0.1)
  one = M.bootstrap_mean_ci([0.3], n_boot=10, seed=0)
  assert (one["mean"], one["lo"], one["hi"]) == (0.3, 0.3, 0.3)
  none = M.bootstrap_mean_ci([math.nan], n_boot=10, seed=0)
  assert math.isnan(none["mean"]) and none["n"] == 0 and none["n_undefined"] == 1


def test_bootstrap_chunks_large_inputs_deterministically():
  values = np.random.default_rng(0).random(300_000)  # forces several resample chunks
  a = M.bootstrap_mean_ci(values, n_boot=40, seed=0)
  assert a == M.bootstrap_mean_ci(values, n_boot=40, seed=0)
  assert a["lo"] <= a["mean"] <= a["hi"] and a["hi"] - a["lo"] < 0.01


def test_paired_difference():
  rng = np.random.default_rng(2)
  b = rng.random(200)
  shifted = M.paired_difference(b + 0.1, b, n_boot=200, seed=0)
  # a constant shift: every paired resample has the same mean difference
  assert shifted["mean"] == pytest.approx(0.1) and shifted["lo"] == pytest.approx(0.1)
  assert shifted["hi"] == pytest.approx(0.1)
  a = b + rng.normal(0.05, 0.1, 200)
  a[:3] = math.nan
  d = M.paired_difference(a, b, n_boot=500, seed=0)
  assert d["n"] == 197 and d["n_excluded"] == 3
  assert d["mean"] == pytest.approx(np.mean(a[3:] - b[3:]), abs=1e-12)
  assert d["lo"] < d["mean"] < d["hi"] and d["lo"] > 0  # the 0.05 gain is resolved
  assert d == M.paired_difference(a, b, n_boot=500, seed=0)
  # pairing removes the between-image spread: the interval of the difference is narrower than that of a's mean
  ua = M.bootstrap_mean_ci(a, n_boot=500, seed=0)
  assert d["hi"] - d["lo"] < (ua["hi"] - ua["lo"])
  with pytest.raises(M.SegMetricsError, match="same images"):
    M.paired_difference(a, b[:10])


# --------------------------------------------------------------------------- grouping


def test_size_bucket_edges():
  assert [b[0] for b in M.SIZE_BUCKETS] == ["<0.1%", "0.1-1%", ">1%"]
  cases = {0.0: "<0.1%", 0.00099: "<0.1%", 0.001: "0.1-1%", 0.0099: "0.1-1%", 0.01: ">1%", 1.0: ">1%"}
  for area, name in cases.items():
    assert M.size_bucket(area) == name
  with pytest.raises(M.SegMetricsError, match="outside"):
    M.size_bucket(1.5)


def _disc(size: int, area_px: int, centre=(50, 50)) -> np.ndarray:
  """A mask of exactly area_px voxels: the area_px voxels nearest to the centre."""
  yy, xx = np.mgrid[:size, :size]
  d = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 + 1e-6 * (yy * size + xx)  # unique order
  m = np.zeros(size * size, bool)
  m[np.argsort(d, axis=None)[:area_px]] = True
  return m.reshape(size, size)


def test_per_bucket_and_per_prompt_grouping():
  rng = np.random.default_rng(5)
  size = 100  # 10000 voxels: 5 px = 0.05%, 50 px = 0.5%, 400 px = 4%
  preds, gts, examples = [], [], []
  for i in range(30):
    area = (5, 50, 400)[i % 3]
    gt = _disc(size, area)
    pred = _disc(size, int(area * rng.uniform(0.5, 1.5)), centre=(50 + int(rng.integers(-2, 3)), 50))
    preds.append(pred.astype(np.uint8))
    gts.append(gt.astype(np.uint8))
    examples.append({"prompt": ("lung nodule in CT scan", "kidney stone in CT scan")[i % 2], "case_id": f"c{i}",
                     "image_path": f"/data/img{i}.png", "label": "lesion"})
  res = M.evaluate_masks(preds, gts, examples, n_boot=300, seed=0)
  rows = res["per_image"]
  assert list(res["buckets"]) == ["<0.1%", "0.1-1%", ">1%"]
  for bucket, area in zip(["<0.1%", "0.1-1%", ">1%"], (5, 50, 400)):
    group = [r for r in rows if r["bucket"] == bucket]
    assert len(group) == 10 and all(r["gt_area_fraction"] == area / 1e4 for r in group)
    for m in ("dice", "iou", "hd95"):
      assert res["buckets"][bucket][m]["mean"] == pytest.approx(np.mean([r[m] for r in group]), abs=1e-12)
  assert sorted(res["prompts"]) == ["kidney stone in CT scan", "lung nodule in CT scan"]
  lung = [r for r in rows if r["prompt"] == "lung nodule in CT scan"]
  assert res["prompts"]["lung nodule in CT scan"]["n"] == 15
  assert res["prompts"]["lung nodule in CT scan"]["dice"]["mean"] == pytest.approx(np.mean([r["dice"] for r in lung]))
  assert res["overall"]["n"] == 30 and rows[7]["case_id"] == "c7" and rows[7]["image"] == "/data/img7.png"
  for i, r in enumerate(rows):  # the rows agree with the one-image functions
    assert (r["dice"], r["iou"], r["hd95"]) == (M.dice(preds[i], gts[i]), M.iou(preds[i], gts[i]),
                                                M.hd95(preds[i], gts[i]))
  for group in [res["overall"], *res["buckets"].values(), *res["prompts"].values()]:
    for m in ("dice", "iou", "hd95"):
      assert group[m]["lo"] <= group[m]["mean"] <= group[m]["hi"]
  assert M.evaluate_masks(preds, gts, examples, n_boot=300, seed=0) == res
  # a stacked array (first axis = images) scores the same as the list
  assert M.evaluate_masks(np.stack(preds), np.stack(gts), examples, n_boot=300, seed=0) == res

  # comparing two results on the same images: a better prediction set gains Dice in every bucket
  res_gt = M.evaluate_masks(gts, gts, examples, n_boot=300, seed=0)
  cmp = M.compare_results(res_gt, res, metric="dice", n_boot=300, seed=0)
  assert cmp["overall"]["mean"] == pytest.approx(1.0 - res["overall"]["dice"]["mean"])
  assert set(cmp["buckets"]) == {"<0.1%", "0.1-1%", ">1%"} and all(v["mean"] > 0 for v in cmp["buckets"].values())


def test_volumes_with_per_image_spacing_and_threshold():
  rng = np.random.default_rng(7)
  pairs = _random_pairs(3, 3, seed=11)
  probs = [np.where(a, rng.uniform(0.5, 1.0, a.shape), rng.uniform(0.0, 0.49, a.shape)) for a, _, _ in pairs]
  res = M.evaluate_masks(probs, [b for _, b, _ in pairs], spacing=[s for _, _, s in pairs], threshold=0.5, n_boot=20)
  for row, (a, b, s) in zip(res["per_image"], pairs):
    assert row["hd95"] == pytest.approx(_hd95_reference(a, b, s), rel=1e-12)
  assert res["hd95_unit"].startswith("spacing")
  one = M.evaluate_masks([a for a, _, _ in pairs], [b for _, b, _ in pairs], spacing=(2.0, 1.0, 1.0), n_boot=20)
  assert one["per_image"][0]["hd95"] == pytest.approx(_hd95_reference(pairs[0][0], pairs[0][1], (2.0, 1.0, 1.0)))
  assert M.spacing_from_affine(np.diag([0.7, 0.8, 2.5, 1.0]), axes=(0, 1, 2)) == pytest.approx((0.7, 0.8, 2.5))


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_are_one_line_errors():
  a = np.zeros((8, 8), bool)
  with pytest.raises(M.SegMetricsError, match=r"prediction 0 \(/x/img\.png\) has shape \(8, 8\) but its ground truth \(8, 9\)"):
    M.evaluate_masks([a], [np.zeros((8, 9))], [{"image_path": "/x/img.png"}], n_boot=10)
  with pytest.raises(M.SegMetricsError, match="values other than 0/1"):
    M.dice(np.full((4, 4), 0.7), a[:4, :4])
  with pytest.raises(M.SegMetricsError, match="3 entries for a 2D mask"):
    M.hd95(a, a, spacing=(1, 1, 1))
  with pytest.raises(M.SegMetricsError, match="positive"):
    M.hd95(a, a, spacing=(1, 0))
  with pytest.raises(M.SegMetricsError, match="2 predictions but 1 ground-truth"):
    M.evaluate_masks([a, a], [a])
  with pytest.raises(M.SegMetricsError, match="one spacing tuple per image"):
    M.evaluate_masks([a, a], [a, a], spacing=[(1, 1), (1, 1), (1, 1)])
  for err in (M.SegMetricsError("x"),):
    assert isinstance(err, ValueError)


# --------------------------------------------------------------------------- report and speed


def test_write_report_files(tmp_path):
  empty = np.zeros((16, 16), bool)
  a = _square((16, 16), (2, 6), (2, 6))
  res = M.evaluate_masks([a, empty, a], [a, a, empty],
                         [{"prompt": "liver lesion | CT", "image_path": "i0.png"}, {"prompt": "p"}, {"prompt": "p"}],
                         n_boot=30)
  paths = M.write_report(res, tmp_path / "eval")
  assert [p.name for p in paths] == ["report.json", "per_image.csv", "summary.md"]
  assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["per_image.csv", "report.json", "summary.md"]
  report = json.loads(paths.report.read_text())  # strict JSON: NaN became null
  assert report["per_image"][1]["hd95"] is None and report["overall"]["hd95"]["n_undefined"] == 2
  with open(paths.per_image, newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 3 and tuple(rows[0]) == M.PER_IMAGE_COLUMNS
  assert rows[0]["image"] == "i0.png" and float(rows[0]["dice"]) == 1.0 and rows[1]["hd95"] == ""
  text = paths.summary.read_text()
  assert "| Dice [95% CI]" in text and "liver lesion \\| CT" in text and "Conventions:" in text
  M.write_report(res, tmp_path / "eval")  # overwriting leaves no temporary files behind
  assert len(list((tmp_path / "eval").iterdir())) == 3


def test_thousand_images_aggregate_by_bucket():
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:128, :128]
  preds, gts = [], []
  for _ in range(1000):
    r = rng.choice([1.5, 5.0, 20.0])
    cy, cx = rng.uniform(r, 128 - r, 2)
    gts.append((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)
    preds.append((yy - cy - rng.normal()) ** 2 + (xx - cx - rng.normal()) ** 2 <= (r * rng.uniform(0.7, 1.3)) ** 2)
  res = M.evaluate_masks(preds, gts, n_boot=1000, seed=0)
  assert res["overall"]["n"] == 1000
  assert sum(group["n"] for group in res["buckets"].values()) == 1000
  assert set(res["buckets"]) == {"<0.1%", "0.1-1%", ">1%"}


def test_size_buckets_have_one_definition():
  from mlx_med.seg import data, synth

  assert data.SIZE_BUCKETS is M.SIZE_BUCKETS
  assert data.size_bucket is synth.size_bucket is M.size_bucket
