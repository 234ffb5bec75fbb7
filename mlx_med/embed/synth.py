"""Synthetic multi-domain medical images with reports and labels: the embedding demo's data.

Five "modalities" with distinct appearance, each with findings that are VISIBLE structures
whose presence alone defines the labels:

  xray         grayscale thorax: body, two dark lung fields, ribs, spine, heart shadow
               nodule (small bright blob inside a lung), effusion (bright fluid level with a
               meniscus at a lung base), cardiomegaly (a heart shadow much wider than normal)
  ct           grayscale axial abdomen: body, liver, kidneys, spine
               mass (round dark patch in the liver), calcification (tiny very bright spot)
  dermatology  skin-tone colour with texture and benign moles as distractors
               melanoma (dark, irregular, variegated patch), erythema (diffuse red patch)
  pathology    pink eosin background with scattered purple nuclei
               carcinoma (a region of crowded, large, dark nuclei), necrosis (a pale patch
               without nuclei)
  oct          grayscale retina: curved layered horizontal bands over a bright RPE line
               fluid (dark cyst inside the layers), drusen (bumps lifting the RPE line)

Each finding appears independently (probability `prevalence`), so an image has 0..n findings
and about a quarter to a third of the images are normal. Position, size, contrast, anatomy,
brightness and noise vary per image. `finding_scale`, `contrast` and `noise` are the
difficulty knobs (1, 1, 0.04 is the demo default: learnable by a tiny ViT in minutes, not
separable by one pixel).

Each image gets a templated report in one of several phrasings: it names every present
finding (with its literal finding name, e.g. "nodule"), usually the modality, and sometimes
a negated absent finding ("No effusion."); normal images say so ("no acute findings").

Labels are "domain/finding" strings (`ALL_LABELS`, in `DOMAINS` order) because a finding name
alone is ambiguous across modalities only in principle but the per-domain evaluation needs
the domain anyway. `generate_dataset` writes

  out_dir/images/NNNNN.png   uint8 RGB (grayscale modalities repeated over 3 channels)
  out_dir/metadata.csv       path (relative), split (train|test), domain, labels
                             (";"-joined "domain/finding", empty for normal), report

All arrays are made with numpy over whole batches of images, so 5000 images of 64 px take
a few seconds; the output is a pure function of the arguments (seed included).

Command: python -m mlx_med.embed.synth OUT_DIR --n-train 4000 --n-test 1000
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

#: modality -> its findings (label order within the modality)
DOMAINS: dict[str, list[str]] = {
    "xray": ["nodule", "effusion", "cardiomegaly"],
    "ct": ["mass", "calcification"],
    "dermatology": ["melanoma", "erythema"],
    "pathology": ["carcinoma", "necrosis"],
    "oct": ["fluid", "drusen"],
}

#: every label as "domain/finding", modality by modality in DOMAINS order
ALL_LABELS: list[str] = [f"{d}/{f}" for d, fs in DOMAINS.items() for f in fs]

#: how reports name each modality (the first phrase is the canonical one)
DOMAIN_PHRASES: dict[str, list[str]] = {
    "xray": ["chest x-ray", "chest radiograph", "frontal chest x-ray"],
    "ct": ["abdominal ct", "ct of the abdomen", "axial ct image"],
    "dermatology": ["skin photograph", "dermatology image", "clinical photo of the skin"],
    "pathology": ["histopathology slide", "h&e stained section", "pathology image"],
    "oct": ["retinal oct", "oct of the macula", "optical coherence tomography"],
}

# How reports mention a present finding: every phrase contains the finding's name verbatim.
_FINDING_PHRASES: dict[str, list[str]] = {
    "xray/nodule": ["a pulmonary nodule", "a small lung nodule", "a nodule in the {side} lung"],
    "xray/effusion": ["pleural effusion", "a {side} pleural effusion", "an effusion at the {side} base"],
    "xray/cardiomegaly": ["cardiomegaly", "cardiomegaly with an enlarged cardiac silhouette"],
    "ct/mass": ["a hypodense liver mass", "a liver mass", "a low attenuation mass"],
    "ct/calcification": ["a calcification", "a dense calcification", "a punctate calcification"],
    "dermatology/melanoma": ["melanoma", "an irregular pigmented lesion consistent with melanoma",
                             "melanoma with irregular borders"],
    "dermatology/erythema": ["erythema", "a patch of erythema", "diffuse erythema"],
    "pathology/carcinoma": ["carcinoma", "invasive carcinoma", "a focus of carcinoma with crowded atypical nuclei"],
    "pathology/necrosis": ["necrosis", "an area of necrosis", "focal necrosis"],
    "oct/fluid": ["intraretinal fluid", "cystoid fluid", "fluid within the retina"],
    "oct/drusen": ["drusen", "drusen under the pigment epithelium", "several drusen"],
}

_NORMAL_SENTENCES = ["normal study.", "no acute findings.", "no abnormality seen.", "unremarkable, no acute findings."]


def finding_name(label: str) -> str:
  """'xray/nodule' -> 'nodule' (the words a report uses for the label)."""
  return label.split("/", 1)[1].replace("_", " ")


# ---------------------------------------------------------------------------------------------
# Array helpers: every image parameter has shape [n, 1, 1] and broadcasts against the [1, S, S]
# coordinate grids, so one expression draws a structure into the whole batch.


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  c = (np.arange(size, dtype=np.float32) + 0.5) / size
  return c[None, :, None], c[None, None, :]  # yy [1,S,1], xx [1,1,S]


def _u(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
  return rng.uniform(lo, hi, size=(n, 1, 1)).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


def _ellipse(yy, xx, cy, cx, ry, rx, soft: float = 0.08) -> np.ndarray:
  """Soft mask ~1 inside the ellipse, ~0 outside (edge width `soft` in normalised radius)."""
  d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
  return _sigmoid((1.0 - d) / soft)


def _blob(yy, xx, cy, cx, r) -> np.ndarray:
  return np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * r ** 2)))


def _irregular(rng, n, yy, xx, cy, cx, r, roughness: float = 0.25, soft: float = 0.012) -> np.ndarray:
  """Soft mask of a blob whose radius wobbles with the angle (three random harmonics)."""
  theta = np.arctan2(yy - cy, xx - cx)
  radius = np.ones_like(theta) * r
  for k in (2, 3, 5):
    radius = radius * (1.0 + _u(rng, n, 0, roughness) * np.cos(k * theta + _u(rng, n, 0, 2 * np.pi)))
  dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
  return _sigmoid((radius - dist) / soft)


def _smooth_noise(rng, n: int, size: int, cells: int) -> np.ndarray:
  """Low-frequency noise in about [-1, 1]: a random cells x cells lattice, bilinearly upsampled."""
  lattice = rng.standard_normal((n, cells + 1, cells + 1)).astype(np.float32)
  t = np.linspace(0, cells, size, endpoint=False, dtype=np.float32) + cells / (2 * size)
  i0 = np.minimum(np.floor(t).astype(np.int64), cells - 1)
  w = (t - i0)
  rows = lattice[:, i0, :] * (1 - w)[None, :, None] + lattice[:, i0 + 1, :] * w[None, :, None]
  return rows[:, :, i0] * (1 - w)[None, None, :] + rows[:, :, i0 + 1] * w[None, None, :]


def _blur(x: np.ndarray, radius: int) -> np.ndarray:
  """Separable box blur of [n, S, S] (edge-replicated), `radius` pixels each side."""
  if radius <= 0:
    return x
  k = 2 * radius + 1
  p = np.pad(x, ((0, 0), (radius, radius), (0, 0)), mode="edge")
  c = np.cumsum(p, axis=1, dtype=np.float32)
  c = np.concatenate([np.zeros_like(c[:, :1]), c], axis=1)
  x = (c[:, k:] - c[:, :-k]) / k
  p = np.pad(x, ((0, 0), (0, 0), (radius, radius)), mode="edge")
  c = np.cumsum(p, axis=2, dtype=np.float32)
  c = np.concatenate([np.zeros_like(c[:, :, :1]), c], axis=2)
  return (c[:, :, k:] - c[:, :, :-k]) / k


def _mix(img: np.ndarray, mask: np.ndarray, color) -> np.ndarray:
  """Paint `color` (RGB triple or [n,1,1,3]) over an [n,S,S,3] image with an [n,S,S] alpha."""
  color = np.asarray(color, np.float32)
  return img * (1 - mask[..., None]) + mask[..., None] * color


def _point_in_ellipse(rng, n, cy, cx, ry, rx, max_frac: float = 0.65):
  ang = _u(rng, n, 0, 2 * np.pi)
  rad = np.sqrt(_u(rng, n, 0, 1)) * max_frac
  return cy + ry * rad * np.sin(ang), cx + rx * rad * np.cos(ang)


# ---------------------------------------------------------------------------------------------
# One function per modality: (rng, present [n, F] bool, size, knobs) -> float images in [0, 1],
# [n, S, S] (grayscale) or [n, S, S, 3].


def _xray(rng, present, size, scale, contrast):
  n = present.shape[0]
  yy, xx = _grid(size)
  oy, ox = _u(rng, n, -0.04, 0.04), _u(rng, n, -0.04, 0.04)  # patient position
  img = np.full((n, size, size), 0.06, np.float32)
  body = _ellipse(yy, xx, 0.58 + oy, 0.5 + ox, 0.55, _u(rng, n, 0.40, 0.46), 0.05)
  img += body * _u(rng, n, 0.38, 0.48)
  lung_cy, lung_ry, lung_rx = 0.47 + oy, _u(rng, n, 0.25, 0.30), _u(rng, n, 0.12, 0.15)
  lung_cx = [0.5 + ox - _u(rng, n, 0.16, 0.19), 0.5 + ox + _u(rng, n, 0.16, 0.19)]
  lungs = [_ellipse(yy, xx, lung_cy, cx, lung_ry, lung_rx, 0.1) for cx in lung_cx]
  lung_mask = np.maximum(lungs[0], lungs[1])
  img -= lung_mask * _u(rng, n, 0.22, 0.28)
  ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (yy * _u(rng, n, 6.0, 8.0) + _u(rng, n, 0, 1)) + 3.0 * (xx - 0.5 - ox) ** 2 * 6)
  img += lung_mask * ribs * _u(rng, n, 0.03, 0.07)
  img += np.exp(-((xx - 0.5 - ox) / 0.035) ** 2) * body * _u(rng, n, 0.12, 0.2)  # spine / mediastinum
  # Heart shadow: normal width 0.09-0.12 of the image (radius), cardiomegaly 0.16-0.2.
  big = present[:, 2][:, None, None]
  heart_rx = np.where(big, _u(rng, n, 0.17, 0.21) * scale ** 0.3, _u(rng, n, 0.08, 0.11))
  heart = _ellipse(yy, xx, 0.66 + oy, 0.47 + ox, _u(rng, n, 0.10, 0.13), heart_rx, 0.12)
  img += heart * _u(rng, n, 0.2, 0.28)
  # Nodule: a small bright blob well inside one lung.
  side = rng.integers(0, 2, size=(n, 1, 1))
  cx = np.where(side == 0, lung_cx[0], lung_cx[1])
  ny, nx = _point_in_ellipse(rng, n, lung_cy, cx, lung_ry, lung_rx, 0.6)
  nod = _blob(yy, xx, ny, nx, _u(rng, n, 0.035, 0.05) * scale)
  img += present[:, 0][:, None, None] * nod * _u(rng, n, 0.35, 0.5) * contrast
  # Effusion: the base of one (sometimes both) lung turns bright below a meniscus.
  level = lung_cy + lung_ry * (1.0 - 2 * _u(rng, n, 0.28, 0.45) * np.sqrt(scale))
  fluid_side = rng.integers(0, 3, size=(n, 1, 1))  # 0 left, 1 right, 2 both
  fluid = np.zeros_like(img)
  for i, lung in enumerate(lungs):
    meniscus = level - 4.0 * (xx - lung_cx[i]) ** 2  # the fluid climbs the chest wall
    below = _sigmoid((yy - meniscus) / 0.015)
    on = (fluid_side == i) | (fluid_side == 2)
    fluid = np.maximum(fluid, below * lung * on)
  img += present[:, 1][:, None, None] * fluid * _u(rng, n, 0.26, 0.36) * contrast
  return img


def _ct(rng, present, size, scale, contrast):
  n = present.shape[0]
  yy, xx = _grid(size)
  oy, ox = _u(rng, n, -0.03, 0.03), _u(rng, n, -0.03, 0.03)
  img = np.full((n, size, size), 0.02, np.float32)
  body = _ellipse(yy, xx, 0.5 + oy, 0.5 + ox, _u(rng, n, 0.34, 0.4), _u(rng, n, 0.42, 0.47), 0.03)
  fat = _ellipse(yy, xx, 0.5 + oy, 0.5 + ox, 0.3, 0.39, 0.05)
  img += body * 0.32 + fat * _u(rng, n, 0.08, 0.14)
  liver_cy, liver_cx, liver_ry, liver_rx = 0.45 + oy, 0.35 + ox, _u(rng, n, 0.15, 0.19), _u(rng, n, 0.13, 0.17)
  liver = _ellipse(yy, xx, liver_cy, liver_cx, liver_ry, liver_rx, 0.1)
  img += liver * _u(rng, n, 0.1, 0.16)
  for kx in (0.36, 0.64):
    img += _ellipse(yy, xx, 0.66 + oy, kx + ox, 0.06, 0.045, 0.15) * 0.18
  img += _ellipse(yy, xx, 0.72 + oy, 0.5 + ox, 0.05, 0.05, 0.1) * 0.45  # vertebra
  img += _ellipse(yy, xx, 0.42 + oy, 0.66 + ox, 0.1, 0.08, 0.2) * _u(rng, n, -0.1, 0.05)  # bowel gas / stomach
  my, mx = _point_in_ellipse(rng, n, liver_cy, liver_cx, liver_ry, liver_rx, 0.55)
  mass = _ellipse(yy, xx, my, mx, _u(rng, n, 0.055, 0.085) * scale, _u(rng, n, 0.055, 0.085) * scale, 0.15)
  img -= present[:, 0][:, None, None] * mass * _u(rng, n, 0.18, 0.26) * contrast
  # Calcification anywhere in the soft tissue (liver, kidneys, aorta region).
  cy, cx = _point_in_ellipse(rng, n, 0.52 + oy, 0.5 + ox, 0.28, 0.36, 0.85)
  calc = _blob(yy, xx, cy, cx, _u(rng, n, 0.025, 0.035) * scale)
  img += present[:, 1][:, None, None] * calc * _u(rng, n, 0.55, 0.7) * contrast
  return img


def _dermatology(rng, present, size, scale, contrast):
  n = present.shape[0]
  yy, xx = _grid(size)
  light, dark = np.array([0.94, 0.80, 0.70], np.float32), np.array([0.50, 0.34, 0.24], np.float32)
  tone = _u(rng, n, 0, 1)[..., None]
  base = light * (1 - tone) + dark * tone  # [n,1,1,3]
  texture = 1.0 + 0.05 * _smooth_noise(rng, n, size, 6)[..., None] + 0.025 * _smooth_noise(rng, n, size, 16)[..., None]
  img = np.broadcast_to(base, (n, size, size, 3)) * texture
  # Distractors: up to two small, round, uniformly light-brown benign moles.
  for _ in range(2):
    on = _u(rng, n, 0, 1) < 0.35
    mole = _ellipse(yy, xx, _u(rng, n, 0.15, 0.85), _u(rng, n, 0.15, 0.85), _u(rng, n, 0.025, 0.04),
                    _u(rng, n, 0.025, 0.04), 0.15) * on
    img = _mix(img, mole * 0.6, base[..., :] * 0.7)
  cy, cx = _u(rng, n, 0.3, 0.7), _u(rng, n, 0.3, 0.7)
  r = _u(rng, n, 0.11, 0.17) * scale
  lesion = _irregular(rng, n, yy, xx, cy, cx, r, roughness=0.22, soft=0.015)
  variegation = 0.5 + 0.5 * _smooth_noise(rng, n, size, 10)
  color = (np.array([0.30, 0.17, 0.12], np.float32) * (1 - variegation[..., None])
           + np.array([0.12, 0.07, 0.08], np.float32) * variegation[..., None])
  alpha = present[:, 0][:, None, None] * lesion * np.clip(_u(rng, n, 0.7, 0.95) * contrast, 0, 1)
  img = img * (1 - alpha[..., None]) + alpha[..., None] * color
  ey, ex = _u(rng, n, 0.25, 0.75), _u(rng, n, 0.25, 0.75)
  red = _blob(yy, xx, ey, ex, _u(rng, n, 0.12, 0.18) * scale) * (1 + 0.3 * _smooth_noise(rng, n, size, 8))
  red = present[:, 1][:, None, None] * np.clip(red, 0, 1) * _u(rng, n, 0.16, 0.24) * contrast
  img = img + red[..., None] * np.array([0.35, -0.45, -0.35], np.float32)
  return img


def _pathology(rng, present, size, scale, contrast):
  n = present.shape[0]
  yy, xx = _grid(size)
  pink = np.array([0.93, 0.72, 0.84], np.float32) + np.array([0.0, 0.06, 0.03], np.float32) * _u(rng, n, -1, 1)[..., None]
  stroma = 0.5 + 0.5 * _smooth_noise(rng, n, size, 8)
  img = np.broadcast_to(pink, (n, size, size, 3)) * (1 - 0.12 * stroma[..., None])
  nuc_color = np.array([0.38, 0.2, 0.55], np.float32)
  # Ordinary nuclei: sparse dots, blurred one pixel.
  dots = (rng.random((n, size, size)) < _u(rng, n, 0.025, 0.045)).astype(np.float32)
  nuclei = np.clip(_blur(dots, 1) * 4.0, 0, 1)
  # Carcinoma: a region with crowded, larger, darker nuclei.
  cy, cx = _u(rng, n, 0.3, 0.7), _u(rng, n, 0.3, 0.7)
  region = _irregular(rng, n, yy, xx, cy, cx, _u(rng, n, 0.16, 0.24) * scale, roughness=0.2, soft=0.03)
  crowd = (rng.random((n, size, size)) < 0.11 * contrast).astype(np.float32)
  big = np.clip(_blur(crowd, 1) * 3.0 + _blur(crowd, 2) * 2.0, 0, 1)
  tumor = present[:, 0][:, None, None] * region
  nuclei = np.maximum(nuclei * (1 - tumor), big * tumor)
  # Necrosis: a pale patch with nuclei gone (a few fragments remain).
  py, px = _u(rng, n, 0.25, 0.75), _u(rng, n, 0.25, 0.75)
  pale = _irregular(rng, n, yy, xx, py, px, _u(rng, n, 0.14, 0.2) * scale, roughness=0.3, soft=0.02)
  pale = present[:, 1][:, None, None] * pale * np.clip(_u(rng, n, 0.75, 0.95) * contrast, 0, 1)
  nuclei = nuclei * (1 - pale * 0.85)
  img = _mix(img, pale, np.array([0.97, 0.93, 0.95], np.float32))
  darkness = np.where(tumor > 0.5, 1.0, _u(rng, n, 0.7, 0.9))
  img = _mix(img, nuclei * darkness, nuc_color * np.where(tumor[..., None] > 0.5, 0.75, 1.0))
  return img


def _oct(rng, present, size, scale, contrast):
  n = present.shape[0]
  yy, xx = _grid(size)
  curve = _u(rng, n, -0.15, 0.15) * (xx - 0.5) ** 2 + _u(rng, n, -0.05, 0.05) * (xx - 0.5)
  top = _u(rng, n, 0.3, 0.4) + curve + _u(rng, n, 0.04, 0.07) * np.exp(-((xx - 0.5 - _u(rng, n, -0.08, 0.08)) / 0.08) ** 2)
  rpe = _u(rng, n, 0.62, 0.7) + curve  # the bright pigment-epithelium line
  thick = rpe - top
  depth = (yy - top) / thick  # 0 at the surface, 1 at the RPE
  inside = _sigmoid(depth / 0.03) * _sigmoid((1 - depth) / 0.03)
  layers = 0.35 + 0.15 * np.cos(2 * np.pi * depth * 3.5) + 0.1 * np.exp(-(depth / 0.06) ** 2)
  img = 0.05 + inside * layers
  # Drusen: 1-3 bumps that lift the RPE line, filled with medium-bright material.
  lift = np.zeros((n, 1, size), np.float32)
  for k in range(3):
    on = (_u(rng, n, 0, 1) < [1.0, 0.6, 0.3][k]) * present[:, 1][:, None, None]
    lift = lift + on * _u(rng, n, 0.035, 0.06) * scale * _blob(0.0, xx, 0.0, _u(rng, n, 0.2, 0.8), _u(rng, n, 0.035, 0.05) * scale)
  line = rpe - lift
  img += np.exp(-((yy - line) / 0.018) ** 2) * _u(rng, n, 0.45, 0.6)
  img += (yy > line) * (yy < rpe) * 0.3 * contrast
  img += _sigmoid((yy - rpe - 0.03) / 0.02) * np.exp(-np.maximum(yy - rpe, 0) / 0.1) * 0.25  # choroid
  # Fluid: a dark cyst inside the layers.
  fy = top + thick * _u(rng, n, 0.35, 0.65)
  fx = _u(rng, n, 0.3, 0.7)
  cyst = _ellipse(yy, xx, fy, fx, _u(rng, n, 0.045, 0.07) * scale, _u(rng, n, 0.08, 0.13) * scale, 0.15)
  img = img * (1 - present[:, 0][:, None, None] * cyst * np.clip(0.85 * contrast, 0, 1))
  img *= 1 + 0.25 * _smooth_noise(rng, n, size, 24)  # speckle
  return img


_DRAW: dict[str, Callable] = {"xray": _xray, "ct": _ct, "dermatology": _dermatology, "pathology": _pathology,
                              "oct": _oct}


def draw_images(domain: str, present: np.ndarray, *, image_size: int = 64, seed: int | np.random.Generator = 0,
                finding_scale: float = 1.0, contrast: float = 1.0, noise: float = 0.04) -> np.ndarray:
  """uint8 [n, S, S, 3] images of `domain` with the findings marked in `present` [n, F] (bool).

  Adds a per-image brightness / contrast change and Gaussian pixel noise (std `noise`)."""
  if domain not in _DRAW:
    raise ValueError(f"unknown domain {domain!r}; choose from {sorted(_DRAW)}")
  present = np.asarray(present, bool)
  if present.ndim != 2 or present.shape[1] != len(DOMAINS[domain]):
    raise ValueError(f"present must be [n, {len(DOMAINS[domain])}] for {domain} ({DOMAINS[domain]}), "
                     f"got shape {present.shape}")
  rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
  n = present.shape[0]
  img = _DRAW[domain](rng, present, image_size, float(finding_scale), float(contrast)).astype(np.float32)
  if img.ndim == 3:
    img = np.repeat(img[..., None], 3, axis=-1)
  gain, bias = _u(rng, n, 0.85, 1.15)[..., None], _u(rng, n, -0.05, 0.05)[..., None]
  img = img * gain + bias + rng.standard_normal(img.shape, dtype=np.float32) * noise
  return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Reports.


def make_report(domain: str, labels: Sequence[str], rng: np.random.Generator, *, negation_rate: float = 0.15) -> str:
  """A templated report naming exactly the present `labels` ("domain/finding") of `domain`.

  Phrasing, modality mention and an occasional negated absent finding vary with `rng`."""
  modality = DOMAIN_PHRASES[domain][rng.integers(len(DOMAIN_PHRASES[domain]))]
  side = ("left", "right")[rng.integers(2)]
  mentions = []
  for label in labels:
    options = _FINDING_PHRASES[label]
    mentions.append(options[rng.integers(len(options))].format(side=side))
  absent = [f for f in DOMAINS[domain] if f"{domain}/{f}" not in labels]
  negated = absent[rng.integers(len(absent))] if absent and rng.random() < negation_rate else None
  if not mentions:
    body = _NORMAL_SENTENCES[rng.integers(len(_NORMAL_SENTENCES))]
    style = rng.integers(4)
    text = [f"{modality}: {body}", f"{modality} with {body}", f"normal {modality}. {body}",
            f"{body}"][style]
  else:
    listed = mentions[0] if len(mentions) == 1 else ", ".join(mentions[:-1]) + " and " + mentions[-1]
    style = rng.integers(5)
    text = [f"{modality} shows {listed}.", f"{modality}: {listed}.", f"findings: {listed}. modality: {modality}.",
            f"there is {listed}.", f"{modality} demonstrating {listed}."][style]
  if negated is not None:
    text += f" no {negated.replace('_', ' ')}."
  return text[0].upper() + text[1:]


# ---------------------------------------------------------------------------------------------
# The dataset on disk.


def generate_dataset(out_dir: str | os.PathLike, *, n_train: int, n_test: int, image_size: int = 64, seed: int = 0,
                     domains: Sequence[str] | None = None, prevalence: float = 0.35, finding_scale: float = 1.0,
                     contrast: float = 1.0, noise: float = 0.04, overwrite: bool = False) -> Path:
  """Writes images/NNNNN.png and metadata.csv under `out_dir` (see the module docstring); returns it.

  Modalities are assigned in equal shares, in a seeded random order; the first `n_train` rows
  are the train split, the rest the test split. Everything is written under a temporary name
  and renamed into place; an existing dataset is replaced only with `overwrite=True`."""
  domains = list(DOMAINS) if domains is None else list(domains)
  unknown = [d for d in domains if d not in DOMAINS]
  if unknown or not domains:
    raise ValueError(f"unknown domains {unknown}; choose from {list(DOMAINS)}")
  if n_train < 0 or n_test < 0 or n_train + n_test == 0:
    raise ValueError(f"n_train={n_train}, n_test={n_test}: need non-negative counts with at least one image")
  if image_size < 16:
    raise ValueError(f"image_size={image_size} is too small to draw the findings; use at least 16")
  if not 0.0 <= prevalence <= 1.0:
    raise ValueError(f"prevalence={prevalence} must be in [0, 1]")
  out = Path(out_dir)
  if (out / "metadata.csv").exists() and not overwrite:
    raise FileExistsError(f"{out / 'metadata.csv'} exists; pass overwrite=True (--overwrite) or choose another folder")
  out.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  total = n_train + n_test
  domain_of = np.array(domains, dtype=object)[rng.permutation(np.arange(total) % len(domains))]
  tmp = out / f".synth-tmp-{uuid.uuid4().hex[:8]}"
  (tmp / "images").mkdir(parents=True)
  rows: list[dict[str, str]] = [{} for _ in range(total)]
  try:
    for d in domains:
      idx = np.flatnonzero(domain_of == d)
      present = rng.random((len(idx), len(DOMAINS[d]))) < prevalence
      for start in range(0, len(idx), 512):  # bounded memory for large sets
        chunk = slice(start, start + 512)
        images = draw_images(d, present[chunk], image_size=image_size, seed=rng, finding_scale=finding_scale,
                             contrast=contrast, noise=noise)
        for i, image, marks in zip(idx[chunk], images, present[chunk]):
          labels = [f"{d}/{f}" for f, on in zip(DOMAINS[d], marks) if on]
          name = f"images/{i:05d}.png"
          Image.fromarray(image, "RGB").save(tmp / name, compress_level=1)
          rows[i] = {"path": name, "split": "train" if i < n_train else "test", "domain": d,
                     "labels": ";".join(labels), "report": make_report(d, labels, rng)}
    with open(tmp / "metadata.csv", "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=["path", "split", "domain", "labels", "report"])
      writer.writeheader()
      writer.writerows(rows)
    if (out / "images").exists():
      shutil.rmtree(out / "images")
    os.replace(tmp / "images", out / "images")
    os.replace(tmp / "metadata.csv", out / "metadata.csv")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description="Write the synthetic multi-domain image-report-label dataset.")
  p.add_argument("out_dir")
  p.add_argument("--n-train", type=int, default=4000)
  p.add_argument("--n-test", type=int, default=1000)
  p.add_argument("--image-size", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--domains", default=None, help="comma-separated subset of " + ",".join(DOMAINS))
  p.add_argument("--prevalence", type=float, default=0.35)
  p.add_argument("--finding-scale", type=float, default=1.0)
  p.add_argument("--contrast", type=float, default=1.0)
  p.add_argument("--noise", type=float, default=0.04)
  p.add_argument("--overwrite", action="store_true")
  a = p.parse_args(argv)
  out = generate_dataset(a.out_dir, n_train=a.n_train, n_test=a.n_test, image_size=a.image_size, seed=a.seed,
                         domains=a.domains.split(",") if a.domains else None, prevalence=a.prevalence,
                         finding_scale=a.finding_scale, contrast=a.contrast, noise=a.noise, overwrite=a.overwrite)
  print(f"wrote {a.n_train + a.n_test} images and {out / 'metadata.csv'}")


if __name__ == "__main__":
  main()
