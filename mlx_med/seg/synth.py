"""Synthetic CT-like axial slices with small lesions and a text prompt per lesion: the default seg data.

Why synthetic: the capability must train, be measured and be demonstrated offline on a CPU, and its
claim is about *small* objects, so the generator controls exactly what matters: lesion size in three
buckets of the image area (`SIZE_BUCKETS`: < 0.1 %, 0.1-1 %, > 1 %), several lesion types with
different contrast, each inside its organ, and images holding several lesion types at once so that
only the text prompt says which one to segment.

An image is one of two slice levels, drawn in Hounsfield-like units and then windowed to 8 bits
the way a radiologist would look at it:
  * chest (lung window, centre -600 / width 1500): body wall (fat, muscle, ribs), both lungs with
    vessel-like bright dots and streaks (the natural distractors of a small nodule), mediastinum,
    descending aorta, spine; lesions: "lung nodule" (solid, -50..60 HU) and "ground-glass opacity"
    (-700..-450 HU, fuzzy edge).
  * upper abdomen (soft-tissue window, 50 / 400): liver, spleen, both kidneys (enhanced cortex,
    sinus fat), stomach with an air pocket, aorta, IVC, spine, paraspinal muscles, bowel loops;
    lesions: "liver lesion" (hypodense, irregular edge), "kidney stone" (400..1200 HU), "kidney
    cyst" (water) and "spleen lesion" (hypodense).
Organs carry a smooth low-frequency texture; the whole slice gets spatially correlated noise
(CT noise is not white). Lesion edges have a one-pixel partial-volume ramp in the image while the
mask is hard (the pixel centre inside the lesion outline), so a lesion of a handful of pixels at
128 px is visible but low in contrast: hard, as in real scans.

Sizes: for each target a bucket is drawn uniformly, then a lesion type of the slice that can hold
a lesion of that size in its organ (at most 35 % of the organ's area), then the area log-uniformly
inside the bucket (kept away from the bucket borders so the measured area lands in it). The
recorded `area_fraction` and `bucket` are measured on the written mask. One image holds one to
three lesions of *different* types (never two of one type, so a prompt names exactly one mask).

On disk (the `png` layout that `mlx_med.seg.data.scan(root, format="png")` reads):
  root/images/NNNNN.png          8-bit grayscale slice
  root/masks/NNNNN_K.png         8-bit mask of target K of that image (0 background, 255 lesion)
  root/metadata.csv              image, mask, prompt, split, label, organ, bucket, area_fraction
  root/synthetic.json            the generator's arguments (what made this folder)
Rows of the first `n_train` images have split "train", the rest "test". Image i is drawn from its own
generator seeded by (seed, i), so a larger set begins with the same images. The folder is written
under a temporary name and swapped in whole (`core.fileio.replace_dir`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from mlx_med.seg.metrics import size_bucket  # the one definition of the size buckets

METADATA = "metadata.csv"
COLUMNS = ("image", "mask", "prompt", "split", "label", "organ", "bucket", "area_fraction")
PROMPT_TEMPLATE = "{label} in CT scan"

# Display windows (centre, width) in HU, the usual presets (as mlx_med.vision.io.WINDOW_PRESETS).
WINDOWS = {"chest": (-600.0, 1500.0), "abdomen": (50.0, 400.0)}

# Lesion types: slice level, organ, HU range, shape, the buckets it may take.
LESIONS: dict[str, dict[str, Any]] = {
  "lung nodule": {"region": "chest", "organ": "lung", "hu": (-50.0, 60.0), "shape": "round", "buckets": (0, 1, 2)},
  "ground-glass opacity": {"region": "chest", "organ": "lung", "hu": (-700.0, -450.0), "shape": "fuzzy",
                           "buckets": (1, 2)},
  "liver lesion": {"region": "abdomen", "organ": "liver", "hu": (30.0, 65.0), "shape": "irregular",
                   "buckets": (0, 1, 2)},
  "kidney stone": {"region": "abdomen", "organ": "kidney", "hu": (400.0, 1200.0), "shape": "round",
                   "buckets": (0, 1)},
  "kidney cyst": {"region": "abdomen", "organ": "kidney", "hu": (-5.0, 15.0), "shape": "round", "buckets": (0, 1)},
  "spleen lesion": {"region": "abdomen", "organ": "spleen", "hu": (35.0, 70.0), "shape": "irregular",
                    "buckets": (0, 1, 2)},
}
# Area ranges drawn inside each bucket (fractions of the image): away from the borders.
_DRAW_RANGES = ((0.0002, 0.0008), (0.0013, 0.008), (0.013, 0.045))
_MAX_ORGAN_SHARE = 0.35
_MIN_PIXELS = 2.5


def prompt_for(label: str) -> str:
  return PROMPT_TEMPLATE.format(label=label)


# ---------------------------------------------------------------------------------------------
# Drawing


def _ellipse_rho(yy, xx, cy, cx, ry, rx, angle=0.0):
  """Normalised elliptical radius (1 on the outline) of every pixel centre."""
  c, s = math.cos(angle), math.sin(angle)
  dy, dx = yy - cy, xx - cx
  u, v = c * dy + s * dx, -s * dy + c * dx
  return np.sqrt((u / ry) ** 2 + (v / rx) ** 2)


class _Slice:
  """One slice under construction: HU values and an organ label map."""

  def __init__(self, size: int, rng: np.random.Generator):
    self.size, self.rng = size, rng
    self.yy, self.xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    self.hu = np.full((size, size), -1000.0, np.float32)
    self.organ = np.zeros((size, size), np.int16)
    self.names: list[str] = [""]

  def jitter(self, v: float, rel: float = 0.06) -> float:
    return v * (1.0 + self.rng.uniform(-rel, rel))

  def paint(self, name: str | None, hu: float, cy, cx, ry, rx, angle=0.0, texture: float = 0.0) -> None:
    """Fill an ellipse (fractions of the size) with `hu` (+ smooth texture); label it `name`."""
    s = self.size
    box = _box(cy * s, cx * s, max(ry, rx) * s, s)
    inside = _ellipse_rho(self.yy[box], self.xx[box], cy * s, cx * s, ry * s, rx * s, angle) <= 1.0
    if texture:
      self.hu[box][inside] = hu + texture * _smooth_field(self.rng, s, 6)[box][inside]
    else:
      self.hu[box][inside] = hu
    if name is not None and name not in self.names:
      self.names.append(name)
    self.organ[box][inside] = self.names.index(name) if name is not None else 0

  def mask(self, name: str) -> np.ndarray:
    return self.organ == self.names.index(name) if name in self.names else np.zeros_like(self.organ, bool)


def _box(cy: float, cx: float, r: float, size: int) -> tuple[slice, slice]:
  """The pixel window holding a disc of radius r (pixels) around (cy, cx)."""
  return (slice(max(int(cy - r) - 1, 0), min(int(cy + r) + 2, size)),
          slice(max(int(cx - r) - 1, 0), min(int(cx + r) + 2, size)))


_INTERP: dict[tuple[int, int], np.ndarray] = {}


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
  """Unit-scale smooth random field: a (cells + 1)^2 Gaussian grid interpolated linearly to size^2."""
  a = _INTERP.get((size, cells))
  if a is None:  # [size, cells + 1] linear interpolation weights (cached: one matrix per size)
    pos = (np.arange(size) + 0.5) / size * cells
    lo = np.minimum(pos.astype(int), cells - 1)
    frac = (pos - lo).astype(np.float32)
    a = np.zeros((size, cells + 1), np.float32)
    a[np.arange(size), lo] = 1 - frac
    a[np.arange(size), lo + 1] = frac
    _INTERP[(size, cells)] = a
  coarse = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
  return a @ coarse @ a.T


def _body(sl: _Slice, ry: float, rx: float, cy: float = 0.5) -> tuple[float, float, float]:
  """Skin/fat, a muscle ring and the visceral cavity; returns the cavity ellipse (cy, ry, rx)."""
  cx = 0.5
  sl.paint(None, -100.0, cy, cx, ry, rx, texture=8.0)
  wall = sl.rng.uniform(0.03, 0.045)
  sl.paint(None, 50.0, cy, cx, ry - wall, rx - wall, texture=6.0)
  sl.paint(None, -90.0, cy, cx, ry - wall - 0.02, rx - wall - 0.02, texture=10.0)
  return cy, ry - wall - 0.02, rx - wall - 0.02


def _spine(sl: _Slice, cy: float) -> None:
  r = sl.jitter(0.05)
  sl.paint(None, 700.0, cy, 0.5, r, r)
  sl.paint(None, 300.0, cy, 0.5, r * 0.78, r * 0.78, texture=30.0)
  sl.paint(None, 650.0, cy + r * 1.6, 0.5, r * 0.55, r * 0.35)  # spinous process
  for side in (-1, 1):
    sl.paint(None, 50.0, cy + r * 1.5, 0.5 + side * 0.085, 0.05, 0.045, texture=6.0)  # paraspinal muscles


def _draw_chest(sl: _Slice) -> None:
  rng = sl.rng
  cy, ry, rx = _body(sl, sl.jitter(0.33), sl.jitter(0.46, 0.04))
  for k in range(10):  # ribs along the inner wall
    t = math.pi * (0.15 + 0.7 * k / 9) if k < 5 else math.pi * (1.15 + 0.7 * (k - 5) / 4)
    y, x = cy + (ry + 0.012) * math.cos(t), 0.5 + (rx + 0.012) * math.sin(t)
    sl.paint(None, 600.0, y, x, 0.014, 0.02, angle=t)
  for name, x in (("lung", 0.5 - sl.jitter(0.2)), ("lung", 0.5 + sl.jitter(0.2))):
    sl.paint(name, -850.0, cy + 0.01, x, sl.jitter(0.25), sl.jitter(0.15), angle=rng.uniform(-0.15, 0.15),
             texture=25.0)
  sl.paint("mediastinum", 40.0, cy - 0.04, 0.52, sl.jitter(0.17), sl.jitter(0.11), angle=0.4, texture=8.0)
  sl.paint("aorta", 40.0, cy + 0.16, 0.56, 0.03, 0.03)
  _spine(sl, cy + 0.24)
  _vessels(sl, sl.mask("lung"))


def _vessels(sl: _Slice, lung: np.ndarray) -> None:
  """Bright dots and short streaks inside the lungs: vessels seen in cross-section and in plane."""
  rng, s = sl.rng, sl.size
  ys, xs = np.nonzero(lung)
  if not len(ys):
    return
  weight = np.zeros((s, s), np.float32)
  for _ in range(rng.integers(20, 40)):
    i = rng.integers(len(ys))
    y0, x0 = ys[i] + rng.uniform(), xs[i] + rng.uniform()
    length = rng.uniform(0, 0.06 * s) if rng.random() < 0.6 else 0.0
    angle = rng.uniform(0, math.pi)
    width = rng.uniform(0.35, 0.8) * s / 128
    for t in np.linspace(0, 1, 1 + int(length)):
      y, x = y0 + t * length * math.sin(angle), x0 + t * length * math.cos(angle)
      lo_y, hi_y = max(int(y) - 3, 0), min(int(y) + 4, s)
      lo_x, hi_x = max(int(x) - 3, 0), min(int(x) + 4, s)
      d2 = (sl.yy[lo_y:hi_y, lo_x:hi_x] - y) ** 2 + (sl.xx[lo_y:hi_y, lo_x:hi_x] - x) ** 2
      np.maximum(weight[lo_y:hi_y, lo_x:hi_x], np.exp(-d2 / (2 * width ** 2)),
                 out=weight[lo_y:hi_y, lo_x:hi_x])
  weight *= lung
  sl.hu += weight * (rng.uniform(-60, 40) - sl.hu) * 0.9


def _draw_abdomen(sl: _Slice) -> None:
  rng = sl.rng
  cy, _, _ = _body(sl, sl.jitter(0.35), sl.jitter(0.45, 0.04))
  for _ in range(rng.integers(4, 8)):  # bowel loops (soft tissue with gas)
    y, x = cy + rng.uniform(-0.2, 0.05), 0.5 + rng.uniform(-0.2, 0.25)
    r = rng.uniform(0.025, 0.045)
    sl.paint(None, rng.uniform(10, 45), y, x, r, r * rng.uniform(0.7, 1.3), texture=8.0)
    if rng.random() < 0.4:
      sl.paint(None, -1000.0, y - r * 0.3, x, r * 0.4, r * 0.5)
  sl.paint("stomach", 25.0, cy - 0.1, 0.62, sl.jitter(0.09), sl.jitter(0.1), angle=0.5, texture=6.0)
  sl.paint(None, -1000.0, cy - 0.16, 0.62, 0.03, 0.06, angle=0.2)
  sl.paint("liver", 100.0, cy - 0.05, 0.32, sl.jitter(0.2), sl.jitter(0.16), angle=rng.uniform(-0.3, 0.1),
           texture=7.0)
  sl.paint("spleen", 110.0, cy + 0.1, 0.76, sl.jitter(0.11), sl.jitter(0.065), angle=rng.uniform(0.3, 0.7),
           texture=6.0)
  sl.paint("aorta", 170.0, cy + 0.12, 0.53, 0.022, 0.022)
  sl.paint("ivc", 130.0, cy + 0.1, 0.45, 0.02, 0.028)
  for side in (-1, 1):
    y, x = cy + sl.jitter(0.2, 0.05), 0.5 + side * sl.jitter(0.16, 0.05)
    angle = side * rng.uniform(0.3, 0.6)
    sl.paint("kidney", 160.0, y, x, sl.jitter(0.078), sl.jitter(0.052), angle=angle, texture=8.0)
    sl.paint(None, -50.0, y, x - side * 0.03, 0.025, 0.015, angle=angle)  # renal sinus fat (medial)
  _spine(sl, cy + 0.25)


def _noise(rng: np.random.Generator, size: int, sigma_hu: float) -> np.ndarray:
  white = rng.standard_normal((size, size)).astype(np.float32)
  corr = ndimage.gaussian_filter(white, 0.7 * size / 128, mode="reflect")
  return corr * np.float32(sigma_hu / max(float(corr.std()), 1e-6))


def _place_lesion(sl: _Slice, label: str, bucket: int, occupied: np.ndarray) -> tuple[np.ndarray, float] | None:
  """Draw one lesion of `label` in its organ with an area in `bucket`; returns (mask, area) or None."""
  spec, rng, s = LESIONS[label], sl.rng, sl.size
  organ = sl.mask(spec["organ"]) & ~occupied
  organ_px = float(organ.sum())
  lo, hi = (f * s * s for f in _DRAW_RANGES[bucket])
  lo = max(lo, _MIN_PIXELS)
  hi = min(hi, _MAX_ORGAN_SHARE * organ_px)
  if hi <= lo:
    return None
  area = math.exp(rng.uniform(math.log(lo), math.log(hi)))
  ratio = rng.uniform(0.65, 1.0)
  r_eq = math.sqrt(area / math.pi)
  ry, rx = r_eq / math.sqrt(ratio), r_eq * math.sqrt(ratio)
  rows, cols = np.nonzero(organ.any(axis=1))[0], np.nonzero(organ.any(axis=0))[0]
  y0, x0 = max(int(rows[0]) - 1, 0), max(int(cols[0]) - 1, 0)
  crop = organ[y0:int(rows[-1]) + 2, x0:int(cols[-1]) + 2]
  dist = ndimage.distance_transform_edt(np.pad(crop, 1))[1:-1, 1:-1]  # zero border: the crop's edge is outside
  need = max(ry, rx) * (1.25 if spec["shape"] == "irregular" else 1.0) + 0.5
  ys, xs = np.nonzero(dist >= need)
  ys, xs = ys + y0, xs + x0
  if not len(ys):
    return None
  k = rng.integers(len(ys))
  cy, cx = ys[k] + rng.uniform(0.2, 0.8), xs[k] + rng.uniform(0.2, 0.8)
  angle = rng.uniform(0, math.pi)
  box = _box(cy, cx, max(ry, rx) * 1.3 + 7.0, s)  # the lesion and its (fuzzy) edge
  yy, xx = sl.yy[box], sl.xx[box]
  rho = _ellipse_rho(yy, xx, cy, cx, ry, rx, angle)
  if spec["shape"] == "irregular":
    theta = np.arctan2(yy - cy, xx - cx)
    wobble = sum(rng.uniform(0.04, 0.09) * np.cos(m * theta + rng.uniform(0, 2 * math.pi)) for m in (2, 3, 5))
    rho = rho / (1.0 + wobble)
  inside = (rho <= 1.0) & organ[box]
  if not inside.any():  # a lesion smaller than the spacing of pixel centres: its centre pixel
    inside[min(int(cy), s - 1) - box[0].start, min(int(cx), s - 1) - box[1].start] = True
  r_min = min(ry, rx)
  if spec["shape"] == "fuzzy":
    weight = 1.0 / (1.0 + np.exp((rho - 1.0) * r_min / 1.2))
  else:
    weight = np.clip(0.5 - (rho - 1.0) * r_min, 0.0, 1.0)
  weight = np.maximum(weight, np.where(inside, 0.6, 0.0)).astype(np.float32) * sl.mask(spec["organ"])[box]
  hu = rng.uniform(*spec["hu"])
  if spec["shape"] != "round":
    hu = hu + 10.0 * _smooth_field(rng, s, 12)[box]
  sl.hu[box] += weight * (hu - sl.hu[box])
  mask = np.zeros((s, s), bool)
  mask[box] = inside
  return mask, float(mask.sum())


def draw_slice(rng: np.random.Generator, image_size: int = 128, *, max_targets: int = 3
               ) -> tuple[np.ndarray, list[dict[str, Any]]]:
  """One synthetic slice: (uint8 [S, S] windowed image, targets), each target
  {"label", "organ", "mask": bool [S, S], "area_fraction", "bucket"} with distinct labels."""
  s = int(image_size)
  sl = _Slice(s, rng)
  region = "chest" if rng.random() < 0.5 else "abdomen"
  (_draw_chest if region == "chest" else _draw_abdomen)(sl)
  types = [t for t, spec in LESIONS.items() if spec["region"] == region]
  n = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
  n = min(n, max_targets, len(types))
  occupied = np.zeros((s, s), bool)
  targets: list[dict[str, Any]] = []
  attempts = 0
  while len(targets) < n and attempts < 4 * n + 4:
    attempts += 1
    bucket = int(rng.integers(3))
    used = {t["label"] for t in targets}
    options = [t for t in types if t not in used and bucket in LESIONS[t]["buckets"]]
    if not options:
      continue
    label = options[int(rng.integers(len(options)))]
    placed = _place_lesion(sl, label, bucket, occupied)
    if placed is None:
      continue
    mask, area = placed
    occupied |= ndimage.binary_dilation(mask, iterations=2)
    fraction = area / (s * s)
    targets.append({"label": label, "organ": LESIONS[label]["organ"], "mask": mask, "area_fraction": fraction,
                    "bucket": size_bucket(fraction)})
  sl.hu += _noise(rng, s, rng.uniform(8.0, 16.0) if region == "abdomen" else rng.uniform(15.0, 30.0))
  center, width = WINDOWS[region]
  low = center - width / 2
  image = np.clip((sl.hu - low) / width, 0.0, 1.0)
  return np.round(image * 255.0).astype(np.uint8), targets


# ---------------------------------------------------------------------------------------------
# The dataset on disk


def _image_rng(seed: int, index: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x5E6, int(index)]))


def generate_synthetic(root: str | os.PathLike, *, n_train: int, n_test: int, image_size: int = 128, seed: int = 0,
                       overwrite: bool = False, progress: bool = False) -> Path:
  """Writes the synthetic set under `root` (see the module docstring) and returns `root`.

  An existing dataset (root/metadata.csv) is replaced only with `overwrite=True`."""
  if n_train < 0 or n_test < 0 or n_train + n_test == 0:
    raise ValueError(f"n_train={n_train}, n_test={n_test}: need non-negative counts with at least one image")
  if image_size < 48:
    raise ValueError(f"image_size={image_size} is too small for lesions under 0.1% of the image; use at least 48")
  out = Path(root)
  if (out / METADATA).exists() and not overwrite:
    raise FileExistsError(f"{out / METADATA} exists; pass overwrite=True or choose another folder")
  from mlx_med.core.fileio import replace_dir

  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
  (tmp / "images").mkdir(parents=True)
  (tmp / "masks").mkdir()
  rows: list[dict[str, str]] = []
  total = n_train + n_test
  indices: Sequence[int] = range(total)
  if progress:
    from tqdm.auto import tqdm
    indices = tqdm(indices, desc="synthetic slices", unit="img", leave=False)
  try:
    for i in indices:
      image, targets = draw_slice(_image_rng(seed, i), image_size)
      name = f"images/{i:05d}.png"
      Image.fromarray(image, "L").save(tmp / name, compress_level=1)
      for k, t in enumerate(targets):
        mask_name = f"masks/{i:05d}_{k}.png"
        Image.fromarray(t["mask"].astype(np.uint8) * 255, "L").save(tmp / mask_name, compress_level=1)
        rows.append({"image": name, "mask": mask_name, "prompt": prompt_for(t["label"]),
                     "split": "train" if i < n_train else "test", "label": t["label"], "organ": t["organ"],
                     "bucket": t["bucket"], "area_fraction": f"{t['area_fraction']:.6g}"})
    with open(tmp / METADATA, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
      writer.writeheader()
      writer.writerows(rows)
    (tmp / "synthetic.json").write_text(json.dumps(
        {"n_train": n_train, "n_test": n_test, "image_size": image_size, "seed": seed}, indent=1) + "\n")
    replace_dir(tmp, out)
  finally:
    if tmp.exists():
      import shutil
      shutil.rmtree(tmp, ignore_errors=True)
  return out


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description="Write the synthetic CT-like lesion segmentation set (PNG + metadata.csv).")
  p.add_argument("root")
  p.add_argument("--n-train", type=int, default=2000)
  p.add_argument("--n-test", type=int, default=500)
  p.add_argument("--image-size", type=int, default=128)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--overwrite", action="store_true")
  a = p.parse_args(argv)
  out = generate_synthetic(a.root, n_train=a.n_train, n_test=a.n_test, image_size=a.image_size, seed=a.seed,
                           overwrite=a.overwrite, progress=True)
  print(f"wrote {a.n_train + a.n_test} slices and {out / METADATA}")


if __name__ == "__main__":
  main()
