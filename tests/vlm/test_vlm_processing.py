"""Image processors against transformers: CLIP (LLaVA) and Qwen2-VL, configs in and out.

Reference: transformers' PIL-backed processors (CLIPImageProcessorPil, Qwen2VLImageProcessorPil; the
"slow" processors of transformers 4), which ours must equal exactly on uint8 input. transformers 5's
default classes resize with torchvision; against those the gap is measured: one 8-bit level
(1 / (255 * std) after normalisation) on the CLIP cases here, more for some Qwen size pairs (see
test_qwen_vs_hf_torchvision_default), and none once no resampling is left to do.
"""

import json

import numpy as np
import pytest
from PIL import Image
from torch_peers import import_torchvision

from mlx_med.vlm import processing as P

import_torchvision()
import transformers as T
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
  smart_resize as hf_smart_resize,
)

RNG_SEED = 0


def _images():
  """Random test images: sizes, aspect ratios, grey / RGB / RGBA, as PIL and as arrays."""
  rng = np.random.default_rng(RNG_SEED)
  out = []
  for shape in [(40, 57, 3), (57, 40, 3), (31, 31, 3), (20, 90, 3), (123, 17, 3), (64, 48), (33, 45, 4), (7, 9, 3)]:
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    if len(shape) == 3 and shape[-1] == 4:
      a[..., 3] = rng.choice([0, 128, 255], shape[:2])  # transparent, half, opaque
    out.append(a)
  return out


IMAGES = _images()


def _pil(a):
  return Image.fromarray(a)


def _hf_clip(hf, image):
  return hf(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def _level(std):
  """One 8-bit level after normalisation (the torchvision-vs-PIL bound)."""
  return 1.0 / 255.0 / min(std) + 1e-5


CLIP_CONFIGS = [
  {"size": {"shortest_edge": 33}, "crop_size": {"height": 31, "width": 27}},  # odd crop
  {"size": {"shortest_edge": 24}, "crop_size": {"height": 24, "width": 24}},
  {"size": {"height": 29, "width": 35}, "crop_size": {"height": 40, "width": 20}},  # exact resize, crop pads height
  {"size": {"shortest_edge": 30}, "do_center_crop": False},
  {"do_resize": False, "crop_size": {"height": 16, "width": 16}},
  {"size": {"shortest_edge": 26}, "crop_size": {"height": 26, "width": 26}, "resample": 2, "do_normalize": False},
]


@pytest.mark.parametrize("kwargs", CLIP_CONFIGS)
def test_clip_equals_hf_pil_processor(kwargs):
  hf = T.CLIPImageProcessorPil(**kwargs)
  ours = P.ClipImageProcessor.from_dict(hf.to_dict())
  for a in IMAGES:
    want = _hf_clip(hf, _pil(a))
    got = ours(_pil(a))
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    if ours.output_size is not None:
      assert got.shape[:2] == ours.output_size
  # numpy inputs (HWC uint8; grey as [H, W, 1]; RGBA blended in float as HF's numpy path)
  for a in IMAGES:
    arr = a[..., None] if a.ndim == 2 else a
    np.testing.assert_array_equal(ours(arr), _hf_clip(hf, arr))


def test_clip_float_input_and_llava_config():
  # a llava-1.5 preprocessor_config.json as shipped (336 px, CLIPImageProcessor)
  cfg = {"crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
         "do_normalize": True, "do_rescale": True, "do_resize": True,
         "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
         "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "LlavaProcessor", "resample": 3,
         "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336}}
  ours = P.image_processor_from_dict(cfg)
  assert isinstance(ours, P.ClipImageProcessor) and ours.output_size == (336, 336)
  hf = T.CLIPImageProcessorPil(**{k: v for k, v in cfg.items() if k not in ("image_processor_type", "processor_class")})
  a = IMAGES[0]
  np.testing.assert_array_equal(ours(a), _hf_clip(hf, _pil(a)))
  np.testing.assert_array_equal(ours(a / 255.0), ours(a))  # floats in [0, 1] round to the same 8 bits
  # legacy int sizes (CLIPFeatureExtractor files): size is the shortest edge, crop square
  old = P.image_processor_from_dict({"feature_extractor_type": "CLIPFeatureExtractor", "size": 40, "crop_size": 32})
  assert dict(old.size) == {"shortest_edge": 40} and old.crop_size == (32, 32)


def test_llava_pad_to_square_equals_hf_pil_processor(tmp_path):
  hf = T.LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
  d = hf.to_dict()
  d["image_processor_type"] = "LlavaImageProcessor"
  ours = P.image_processor_from_dict(d)
  assert isinstance(ours, P.ClipImageProcessor) and ours.do_pad
  for a in IMAGES:
    np.testing.assert_array_equal(ours(_pil(a)), _hf_clip(hf, _pil(a)))
  ours.save(tmp_path)
  assert json.loads((tmp_path / "preprocessor_config.json").read_text())["image_processor_type"] == "LlavaImageProcessor"
  assert P.load_image_processor(tmp_path) == ours
  # do_pad belongs to LlavaImageProcessor only: transformers' CLIPImageProcessor ignores it, so do we
  assert not P.image_processor_from_dict({**d, "image_processor_type": "CLIPImageProcessor"}).do_pad


@pytest.mark.parametrize("kwargs", [CLIP_CONFIGS[0], CLIP_CONFIGS[1], CLIP_CONFIGS[3]])
def test_clip_within_one_level_of_hf_torchvision_default(kwargs):
  """Crops that fit the image only: when the crop is larger, transformers' torchvision backend pads
  floor((crop - h) / 2) rows on top, its PIL backend (and ours) ceil(...), a one-pixel shift."""
  hf = T.CLIPImageProcessor(**kwargs)  # transformers 5's default class: torchvision resize
  ours = P.ClipImageProcessor.from_dict(hf.to_dict())
  n_diff = n_all = 0
  for a in IMAGES:
    want = _hf_clip(hf, _pil(a))
    got = ours(_pil(a))
    assert np.abs(got - want).max() <= _level(ours.image_std)
    n_diff += int((np.abs(got - want) > 1e-5).sum())
    n_all += got.size
  assert n_diff / n_all < 0.2  # most values agree exactly


QWEN_CONFIGS = [
  {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 30},  # downscales big inputs, upscales small ones
  {"size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 12}},  # newer configs' spelling
  {"min_pixels": 32 * 32, "max_pixels": 32 * 32 * 20, "patch_size": 16, "merge_size": 2, "temporal_patch_size": 2},
  {"min_pixels": 16, "max_pixels": 8 * 8 * 40, "patch_size": 8, "merge_size": 1, "temporal_patch_size": 1},
  {"min_pixels": 12 * 12 * 9, "max_pixels": 12 * 12 * 9 * 8, "patch_size": 4, "merge_size": 3, "temporal_patch_size": 3,
       "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
]


@pytest.mark.parametrize("kwargs", QWEN_CONFIGS)
def test_qwen_equals_hf_pil_processor(kwargs):
  hf = T.Qwen2VLImageProcessorPil(**kwargs)
  ours = P.Qwen2VLImageProcessor.from_dict(hf.to_dict())
  for a in IMAGES + [np.random.default_rng(1).integers(0, 256, (300, 211, 3), dtype=np.uint8)]:
    out = hf(images=_pil(a), return_tensors="np")
    patches, thw = ours(_pil(a))
    assert thw == tuple(int(v) for v in out["image_grid_thw"][0])
    assert patches.dtype == np.float32 and patches.shape == out["pixel_values"].shape
    np.testing.assert_array_equal(patches, out["pixel_values"])
    assert ours.grid_thw(*a.shape[:2]) == thw
    assert ours.num_image_tokens(*a.shape[:2]) == thw[0] * thw[1] * thw[2] // ours.merge_size ** 2


def test_qwen_vs_hf_torchvision_default():
  """transformers 5's default Qwen2VLImageProcessor resizes with torchvision, whose bicubic departs from
  PIL's for some size pairs (measured on these images: up to ~21 8-bit levels, e.g. 33x45 -> 32x48 or
  123x17 -> 112x28; others within 2 levels). Grids always agree, and with no resampling to do (an
  image already at its target size) every value agrees to float rounding: the gap is the resize alone."""
  hf = T.Qwen2VLImageProcessor(**QWEN_CONFIGS[0])
  ours = P.Qwen2VLImageProcessor.from_dict(hf.to_dict())
  for a in IMAGES:
    out = hf(images=_pil(a), return_tensors="np")
    patches, thw = ours(_pil(a))
    assert thw == tuple(int(v) for v in out["image_grid_thw"][0]) and patches.shape == out["pixel_values"].shape
  for a in IMAGES:
    h, w = ours.resized_size(*a.shape[:2])
    b = np.asarray(_pil(a).convert("RGB").resize((w, h)))  # already at the target size: no resampling left
    assert ours.resized_size(h, w) == (h, w)
    np.testing.assert_allclose(ours(b)[0], hf(images=_pil(b), return_tensors="np")["pixel_values"], atol=1e-6, rtol=0)


def test_smart_resize_matches_hf():
  rng = np.random.default_rng(2)
  for _ in range(400):
    h, w = (int(v) for v in rng.integers(1, 3000, 2))
    if max(h, w) / min(h, w) > 200:
      continue
    factor = int(rng.choice([28, 32, 8]))
    lo = int(rng.integers(1, 100)) * factor * factor
    hi = lo * int(rng.integers(1, 400))
    assert P.smart_resize(h, w, factor, lo, hi) == tuple(hf_smart_resize(h, w, factor, lo, hi)), (h, w, factor, lo, hi)
  with pytest.raises(ValueError, match="aspect ratios up to 200") as e:
    P.smart_resize(10, 2500)
  assert "\n" not in str(e.value)


def test_patchify_order_by_hand():
  """Each pixel lands where Qwen2-VL's merge-window-major layout puts it (independent index arithmetic)."""
  p, m, t, c = 3, 2, 2, 3
  h, w = 2 * p * m, 3 * p * m
  x = np.arange(h * w * c, dtype=np.float32).reshape(h, w, c)
  out = P.patchify(x, p, m, t)
  gh, gw = h // p, w // p
  assert out.shape == (gh * gw, c * t * p * p)
  for y in range(h):
    for xx in range(w):
      wr, wc, ir, ic = y // (p * m), xx // (p * m), (y // p) % m, (xx // p) % m
      row = ((wr * (gw // m) + wc) * m + ir) * m + ic
      for ch in range(c):
        for tt in range(t):
          col = ((ch * t + tt) * p + y % p) * p + xx % p
          assert out[row, col] == x[y, xx, ch]


def test_configs_round_trip_and_hf_loads_ours(tmp_path):
  clip = P.ClipImageProcessor.from_dict(T.CLIPImageProcessorPil(size={"shortest_edge": 33},
                                                                 crop_size={"height": 31, "width": 27}).to_dict())
  qwen = P.Qwen2VLImageProcessor.from_dict(T.Qwen2VLImageProcessorPil(**QWEN_CONFIGS[0]).to_dict())
  for ours, hf_cls in ((clip, T.CLIPImageProcessorPil), (qwen, T.Qwen2VLImageProcessorPil)):
    d = tmp_path / type(ours).__name__
    path = ours.save(d)
    assert path.name == "preprocessor_config.json" and not list(d.glob(".*tmp*"))
    back = P.load_image_processor(d)
    assert back == ours and type(back).from_dir(d) == ours
    hf = hf_cls.from_pretrained(str(d))
    a = IMAGES[1]
    if isinstance(ours, P.ClipImageProcessor):
      np.testing.assert_array_equal(ours(a), _hf_clip(hf, _pil(a)))
    else:
      np.testing.assert_array_equal(ours(a)[0], hf(images=_pil(a), return_tensors="np")["pixel_values"])
    # and ours reads what transformers writes
    hf_dir = tmp_path / f"hf_{type(ours).__name__}"
    hf.save_pretrained(str(hf_dir))
    assert P.load_image_processor(hf_dir) == ours.__class__.from_dict({**hf.to_dict()})


def test_qwen25_vl_config_and_size_precedence():
  # a Qwen2.5-VL preprocessor_config.json as shipped: min/max_pixels beside an optional size
  cfg = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
         "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
         "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}
  q = P.image_processor_from_dict(cfg)
  assert isinstance(q, P.Qwen2VLImageProcessor) and (q.min_pixels, q.max_pixels) == (3136, 12845056)
  assert q.to_dict()["processor_class"] == "Qwen2_5_VLProcessor"  # other keys are written back
  q2 = P.image_processor_from_dict({"image_processor_type": "Qwen2VLImageProcessorFast",
                                    "size": {"shortest_edge": 100, "longest_edge": 5000}})
  assert (q2.min_pixels, q2.max_pixels) == (100, 5000)
  q3 = P.image_processor_from_dict({"image_processor_type": "Qwen2VLImageProcessor", "max_pixels": 7000,
                                    "size": {"shortest_edge": 100, "longest_edge": 5000}})
  assert (q3.min_pixels, q3.max_pixels) == (100, 7000)  # max_pixels wins over size, as in transformers


def test_processor_config_json_nested(tmp_path):
  d = {"image_processor": {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 20},
                           "crop_size": {"height": 20, "width": 20}},
       "processor_class": "LlavaProcessor", "patch_size": 14}
  (tmp_path / "processor_config.json").write_text(json.dumps(d))
  p = P.load_image_processor(tmp_path)
  assert isinstance(p, P.ClipImageProcessor) and p.output_size == (20, 20)


def test_config_errors_one_line(tmp_path):
  def check(fn, what, name):
    with pytest.raises(ValueError, match=what) as e:
      fn()
    text = str(e.value)
    assert "\n" not in text and name in text
    return text

  check(lambda: P.load_image_processor(tmp_path), "no preprocessor_config.json", str(tmp_path))
  f = tmp_path / "preprocessor_config.json"
  f.write_text(json.dumps({"image_processor_type": "SiglipImageProcessor"}))
  text = check(lambda: P.load_image_processor(tmp_path), "'SiglipImageProcessor' is not supported", str(f))
  assert "CLIPImageProcessor" in text
  f.write_text(json.dumps({"size": 3}))
  check(lambda: P.load_image_processor(tmp_path), "image_processor_type missing", str(f))
  f.write_text("{not json")
  check(lambda: P.load_image_processor(tmp_path), "not valid JSON", str(f))
  f.write_text(json.dumps({"image_processor_type": "CLIPImageProcessor", "size": {"longest_edge": 5}}))
  check(lambda: P.load_image_processor(tmp_path), "size .* is not supported", str(f))
  f.write_text(json.dumps({"image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 10, "max_pixels": 5}))
  check(lambda: P.load_image_processor(tmp_path), "min_pixels <= max_pixels", str(f))
  f.write_text(json.dumps({"image_processor_type": "CLIPImageProcessor", "image_mean": [0.5, 0.5]}))
  check(lambda: P.load_image_processor(tmp_path), "image_mean needs 3 values", str(f))


def test_bad_images_one_line():
  clip, qwen = P.ClipImageProcessor(), P.Qwen2VLImageProcessor()
  for image, what in ((np.zeros((4, 4, 2), np.uint8), "got shape"), (np.full((4, 4, 3), 2.0), "values in"),
                      (np.zeros((4, 4, 3), np.int64), "dtype int64"), (np.zeros((0, 4, 3), np.uint8), "no pixels")):
    for proc in (clip, qwen):
      with pytest.raises(ValueError, match=what) as e:
        proc(image)
      assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="not a multiple of patch_size"):
    P.Qwen2VLImageProcessor(do_resize=False)(np.zeros((30, 28, 3), np.uint8))
