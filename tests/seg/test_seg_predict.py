"""`mlx_med.seg.predict`: a tiny run directory built here (random parameters saved in the trainer's
checkpoint layout) is loaded and used on PNG, DICOM and NIfTI inputs.

Checked: probability maps at the source size equal the model's logits resized by torch's
F.interpolate(bilinear, align_corners=False) then the sigmoid; an image's Boltzmann map does not depend
on the batch size; a PNG gives a 0/255 PNG of its size; a DICOM gives a PNG; a NIfTI volume with a
non-canonical affine gives a label volume with the same shape, affine, header transforms and codes,
whose every slice, read back through the image reader, is the mask predicted for that slice; one
checkpoint evaluated under another attention mode keeps its parameters and changes the map; bad inputs
give one-line errors naming the path.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import struct
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest
from imaging_files import write_dicom
from PIL import Image

from mlx_med.seg import predict as predict_lib
from mlx_med.seg.predict import Segmenter, SegmenterError, predict_files

PROMPTS = ["lung nodule in CT scan", "liver lesion in CT scan", "kidney cyst in CT scan"]
SIZE = 64


def _tiny_model_dict(tokenizer) -> dict:
  from mlx_med.seg.model import BoltzFormerConfig

  encoder = {"kind": "davit", "dims": (8, 8, 16, 16), "depths": (1, 1, 1, 1), "heads": (1, 1, 2, 2),
             "window_size": 2, "patch_sizes": (7, 3, 3, 3), "strides": (4, 2, 2, 2), "image_size": SIZE,
             "channel_attention": "v2", "drop_path_rate": 0.0, "dtype": "float32", "param_dtype": "float32",
             "remat": False}
  text = {"vocab_size": int(tokenizer.vocab_size), "context_length": 16, "width": 16, "depth": 1, "num_heads": 2,
          "mlp_dim": 32, "style": "clip", "act": "quick_gelu", "layer_norm_eps": 1e-5,
          "eos_token_id": int(tokenizer.eos_token_id), "pad_token_id": int(tokenizer.pad_token_id),
          "dtype": "float32", "remat": False}
  cfg = BoltzFormerConfig(image_size=SIZE, encoder=encoder, text=text, hidden_dim=16, num_queries=4, num_heads=2,
                          dec_layers=3, dim_feedforward=32, mask_dim=16, pixel_decoder_layers=1, pixel_decoder_dim=16,
                          pixel_decoder_heads=2, pixel_decoder_ffn=32, attention="boltzmann",
                          kernel_backend="xla")
  return cfg.to_dict()


def _save_state(ckpt_dir: Path, params, step: int, *, ema=None) -> None:
  import optax

  from mlx_med.core.checkpoint import Checkpointer
  from mlx_med.core.train_step import init_train_state

  state = init_train_state(params, optax.adamw(1e-3), seed=0, ema=ema is not None)
  if ema is not None:
    state["ema_params"] = ema
  ckpt = Checkpointer(str(ckpt_dir), keep=2, save_every=1, async_save=False)
  ckpt.save(step, state, force=True)
  ckpt.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
  """model.json, tokenizer.json, data.json and checkpoints/ in the layout `mlx-med seg train` writes."""
  import flax.linen as nn

  from mlx_med.seg.model import BoltzFormerConfig, init_params
  from mlx_med.vision.text import train_text_tokenizer

  work = tmp_path_factory.mktemp("seg_run")
  tok = train_text_tokenizer(PROMPTS * 4, 300, work / "tokenizer.json", context_length=16)
  model_dict = _tiny_model_dict(tok)
  (work / "model.json").write_text(json.dumps(model_dict))
  (work / "data.json").write_text(json.dumps({"image_size": SIZE, "window": "header", "normalisation": "clip"}))
  cfg = BoltzFormerConfig.from_dict(model_dict)
  params = jax.jit(lambda key: nn.unbox(init_params(cfg, key)))(jax.random.key(0))
  if isinstance(params, dict) and set(params) == {"params"}:
    params = params["params"]
  # EMA parameters differ from the raw ones: the Segmenter must take the EMA (use_ema=True).
  ema = jax.tree.map(lambda x: x * 1.5, params)
  _save_state(work / "checkpoints", params, 3, ema=ema)
  return work


@pytest.fixture(scope="module")
def seg_threshold(run_dir) -> Segmenter:
  return Segmenter.load(run_dir, attention="threshold", batch_size=4)


@pytest.fixture(scope="module")
def seg_boltzmann(run_dir) -> Segmenter:
  return Segmenter.load(run_dir, batch_size=4)


def _ct_like(h: int, w: int, seed: int) -> np.ndarray:
  """A body-like disc with a bright blob and noise, uint8 [h, w]."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  body = ((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2 < 1
  blob = (yy - h / 3) ** 2 + (xx - w / 3) ** 2 < (min(h, w) / 8) ** 2
  img = 20 + 100 * body + 120 * blob + rng.normal(0, 8, (h, w))
  return np.clip(img, 0, 255).astype(np.uint8)


_DIRECT = {}


def _direct_logits(model):
  """The model's own apply on a batch of one, jitted once per attention mode."""
  if model.cfg.attention not in _DIRECT:
    _DIRECT[model.cfg.attention] = jax.jit(
        lambda p, x, ids, key: model.apply({"params": p}, x, ids, sample_rng=key).logits)
  return _DIRECT[model.cfg.attention]


def _reference_probs(seg: Segmenter, image: np.ndarray, prompt: str, key) -> np.ndarray:
  """The model applied directly, its logits resized by torch (bilinear, align_corners=False), sigmoid."""
  import torch

  from mlx_med.seg import data as seg_data

  x = np.asarray(seg_data.normalize(seg.prepare(image)[None]), np.float32)
  ids = np.asarray(seg.tokenizer.encode([prompt]), np.int32)
  logits = _direct_logits(seg.model)(seg.params, x, ids, key)
  logits = torch.from_numpy(np.array(logits, np.float32))[:, None]
  resized = torch.nn.functional.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
  return torch.sigmoid(resized)[0, 0].numpy()


def test_load_reads_the_run_and_takes_the_ema(run_dir, seg_threshold):
  from mlx_med.core.checkpoint import Checkpointer

  assert seg_threshold.step == 3 and seg_threshold.image_size == SIZE
  assert seg_threshold.cfg.attention == "threshold"
  ckpt = Checkpointer(str(run_dir / "checkpoints"), async_save=False)
  import orbax.checkpoint as ocp
  state = ckpt.manager.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  ckpt.close()
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert same(seg_threshold.params, state["ema_params"]) and not same(seg_threshold.params, state["params"])
  raw = Segmenter.load(run_dir, attention="threshold", use_ema=False)
  assert same(raw.params, state["params"])


def test_probabilities_match_resized_logits_at_the_source_size(seg_threshold):
  image = _ct_like(50, 77, 0)  # non-square, smaller and larger than the model's 64 on either side
  probs = seg_threshold.predict(image, PROMPTS[0])
  assert len(probs) == 1 and probs[0].shape == (50, 77) and probs[0].dtype == np.float32
  ref = _reference_probs(seg_threshold, image, PROMPTS[0], None)
  np.testing.assert_allclose(probs[0], ref, atol=2e-5, rtol=0)
  assert 0.0 <= probs[0].min() and probs[0].max() <= 1.0


def test_boltzmann_maps_do_not_depend_on_the_batch(seg_boltzmann):
  images = [_ct_like(40 + 4 * i, 64, i) for i in range(5)]
  prompts = [PROMPTS[i % 3] for i in range(5)]
  batched = seg_boltzmann.predict(images, prompts, sample_seed=7)  # batch 4: one full, one padded
  # Image 2 alone (padded with copies of itself) at its position 2: the same samples, the same map.
  ids = np.asarray(seg_boltzmann.tokenizer.encode([prompts[2]]), np.int32)
  alone = seg_boltzmann.logits([seg_boltzmann.prepare(images[2])], ids, sample_seed=7, offset=2)
  np.testing.assert_allclose(batched[2], predict_lib._sigmoid(predict_lib._bilinear(alone, *images[2].shape))[0],
                             atol=1e-6, rtol=0)
  # The samples are those of fold_in(key(seed), position): image 2's map is the direct model call's.
  # (The direct call is another program, batch 1 instead of 4: float32 sums in another order move a
  # probability by up to ~1e-5; a different sample moves it by orders of magnitude more, see below.)
  ref = _reference_probs(seg_boltzmann, images[2], prompts[2], jax.random.fold_in(jax.random.key(7), 2))
  np.testing.assert_allclose(batched[2], ref, atol=5e-5, rtol=0)
  other = _reference_probs(seg_boltzmann, images[2], prompts[2], jax.random.fold_in(jax.random.key(8), 2))
  assert np.max(np.abs(batched[2] - other)) > 1e-3


def test_png_in_png_mask_out_of_the_same_size(tmp_path, seg_threshold):
  src = tmp_path / "in"
  src.mkdir()
  Image.fromarray(_ct_like(45, 70, 1)).save(src / "slice_a.png")
  Image.fromarray(np.stack([_ct_like(64, 48, 2)] * 3, -1)).save(src / "slice_b.png")  # RGB
  probs = seg_threshold.predict([src / "slice_a.png", src / "slice_b.png"], PROMPTS[1])
  thr = float(np.median(np.concatenate([p.ravel() for p in probs])))  # a mixed mask from random weights
  result = predict_files(seg_threshold, [src / "slice_a.png", src / "slice_b.png"], PROMPTS[1], tmp_path / "out",
                         threshold=thr)
  assert [p.name for p in result.masks] == ["slice_a.png", "slice_b.png"]
  for path, prob, shape in zip(result.masks, probs, [(45, 70), (64, 48)]):
    mask = np.asarray(Image.open(path))
    assert mask.shape == shape and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask == 255, prob >= thr)
  manifest = json.loads(result.manifest.read_text())
  assert manifest["attention"] == "threshold" and manifest["step"] == 3
  assert [it["input"] for it in manifest["items"]] == [str(src / "slice_a.png"), str(src / "slice_b.png")]
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "slice_a.png", "slice_b.png"]
  plain = tmp_path / "plain"
  plain.write_text("x")  # outputs get the permissions any new file gets here (no private temp-file mode)
  assert result.masks[0].stat().st_mode == plain.stat().st_mode == result.manifest.stat().st_mode


def test_dicom_in_png_out(tmp_path, seg_threshold):
  hu = _ct_like(40, 52, 3).astype(np.int16) * 4 - 500
  path = write_dicom(tmp_path / "IM0001.dcm", hu, slope=1, intercept=0, center=40, width=400)
  result = predict_files(seg_threshold, [path], PROMPTS[0], tmp_path / "out")
  assert result.masks == [tmp_path / "out" / "IM0001.png"]
  mask = np.asarray(Image.open(result.masks[0]))
  assert mask.shape == (40, 52) and set(np.unique(mask)) <= {0, 255}
  prob = seg_threshold.predict(path, PROMPTS[0])[0]
  np.testing.assert_array_equal(mask == 255, prob >= 0.5)


def _oblique_volume(path: Path, shape=(20, 24, 5), *, slope=0.5, inter=-100.0) -> Path:
  """A .nii.gz whose voxel axes are not RAS (x flipped, y and z swapped), both transforms coded (qform 1,
  sform 2), stored int16 with scl_slope/scl_inter and a cal_min/cal_max window (patched into the header
  bytes, so the stored integers stay as written)."""
  rng = np.random.default_rng(0)
  raw = rng.integers(-200, 300, size=shape).astype(np.int16)
  raw[5:12, 6:14, ...] += 400
  affine = np.array([[-0.8, 0, 0, 30.0], [0, 0, 2.5, -10.0], [0, 0.9, 0, 5.0], [0, 0, 0, 1]])
  img = nib.Nifti1Image(raw, affine)
  img.header.set_data_dtype(np.int16)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=2)
  plain = path.with_name(path.name[:-3])
  nib.save(img, plain)
  blob = bytearray(plain.read_bytes())
  blob[112:120] = struct.pack("<ff", slope, inter)  # scl_slope, scl_inter
  blob[124:132] = struct.pack("<ff", 200.0, -150.0)  # cal_max, cal_min
  plain.unlink()
  path.write_bytes(gzip.compress(bytes(blob)))
  return path


def test_the_canonical_copy_reads_like_the_original(tmp_path):
  """Slices of the one-read canonical copy equal the reader's slices of the original, to the bit."""
  from mlx_med.vision.io import load_image

  src = _oblique_volume(tmp_path / "scaled.nii.gz")
  copy = predict_lib._canonical_copy(nib.load(src), str(tmp_path))
  assert np.allclose(nib.load(copy).affine, nib.as_closest_canonical(nib.load(src)).affine)
  for window in ("header", "soft_tissue", "none"):
    for k in range(nib.as_closest_canonical(nib.load(src)).shape[2]):
      np.testing.assert_array_equal(load_image(copy, window=window, slice_index=k),
                                    load_image(src, window=window, slice_index=k))


def test_nifti_volume_in_nifti_labels_out_with_the_same_grid(tmp_path, seg_threshold):
  from mlx_med.vision.io import load_image

  src = _oblique_volume(tmp_path / "case_001.nii.gz")
  inp = nib.load(src)
  canon_depth = nib.as_closest_canonical(inp).shape[2]
  views = [seg_threshold.load_image(src, slice_index=k) for k in range(canon_depth)]
  probs = seg_threshold.predict(views, PROMPTS[0])
  thr = float(np.median(np.concatenate([p.ravel() for p in probs])))
  result = predict_files(seg_threshold, [src], PROMPTS[0], tmp_path / "out", threshold=thr)
  assert result.masks == [tmp_path / "out" / "case_001.nii.gz"]
  out = nib.load(result.masks[0])
  assert out.shape == inp.shape
  np.testing.assert_array_equal(out.affine, inp.affine)
  np.testing.assert_allclose(out.header.get_qform(), inp.header.get_qform(), atol=1e-5)
  np.testing.assert_array_equal(out.header.get_sform(), inp.header.get_sform())
  assert int(out.header["qform_code"]) == 1 and int(out.header["sform_code"]) == 2
  assert out.get_data_dtype() == np.uint8 and out.dataobj.slope == 1 and out.dataobj.inter == 0
  labels = np.asarray(out.dataobj)
  assert set(np.unique(labels)) == {0, 1}
  # Every slice read back through the same reader is the mask predicted from that slice's view.
  for k, prob in enumerate(probs):
    back = load_image(result.masks[0], window="none", slice_index=k)
    np.testing.assert_array_equal(back > 0.5, prob >= thr, err_msg=f"slice {k}")
  # Only the slices asked for: the others stay 0.
  part = predict_files(seg_threshold, [src], PROMPTS[0], tmp_path / "part", threshold=thr, slices=[1, 3])
  for k, prob in enumerate(probs):
    back = load_image(part.masks[0], window="none", slice_index=k)
    np.testing.assert_array_equal(back > 0.5, (prob >= thr) if k in (1, 3) else np.zeros_like(prob, bool))
  item = json.loads(part.manifest.read_text())["items"][0]
  assert item["kind"] == "nifti" and item["slices"] == [1, 3] and item["shape"] == list(inp.shape)


def test_a_multichannel_volume_uses_the_runs_channel(tmp_path, seg_threshold):
  """A 4-D (multi-modality) NIfTI: the run's data.channel is read, one 3-D label volume comes out."""
  import copy

  from mlx_med.vision.io import load_image

  src = _oblique_volume(tmp_path / "mm.nii.gz", shape=(20, 24, 4, 2))
  seg = copy.copy(seg_threshold)  # the same compiled model, reading channel 1
  seg.channel = 1
  views = [load_image(src, window=seg.window, frame=1, slice_index=k) for k in range(4)]
  assert not np.array_equal(views[0], load_image(src, window=seg.window, frame=0, slice_index=0))
  probs = seg.predict(views, PROMPTS[0])
  thr = float(np.median(np.concatenate([p.ravel() for p in probs])))
  result = predict_files(seg, [src], PROMPTS[0], tmp_path / "out", threshold=thr)
  out = nib.load(result.masks[0])
  assert out.shape == (20, 24, 4)
  np.testing.assert_array_equal(out.affine, nib.load(src).affine)
  for k, prob in enumerate(probs):
    np.testing.assert_array_equal(load_image(result.masks[0], window="none", slice_index=k) > 0.5, prob >= thr)
  seg.channel = 2
  with pytest.raises(SegmenterError, match=r"mm\.nii\.gz: channel 2 .* out of range for 2 channels"):
    predict_files(seg, [src], PROMPTS[0], tmp_path / "out2")


def test_the_inverse_of_the_readers_view_and_reorientation():
  """canonical_index + view_to_canonical undo nibabel's as_closest_canonical and the reader's slice view."""
  rng = np.random.default_rng(1)
  shape = (4, 5, 3)
  data = rng.integers(0, 100, size=shape).astype(np.int16)
  for affine in (np.eye(4), np.diag([-1.0, 1.0, -2.0, 1.0]),
                 np.array([[0, 0, -1.0, 0], [1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])):
    canon = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(data, affine)).dataobj)
    index = predict_lib.canonical_index(shape, affine)
    np.testing.assert_array_equal(data.ravel()[index], canon)
    view = np.flip(canon[:, :, 1].T)  # the reader's radiological view of axial slice 1
    np.testing.assert_array_equal(predict_lib.view_to_canonical(view), canon[:, :, 1])


def test_attention_override_keeps_the_parameters_and_changes_the_map(run_dir, seg_threshold):
  full = Segmenter.load(run_dir, attention="full", batch_size=4)
  assert full.cfg.attention == "full" and seg_threshold.cfg.attention == "threshold"
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(seg_threshold.params)):
    np.testing.assert_array_equal(a, b)
  image = _ct_like(64, 64, 4)
  p_full = full.predict(image, PROMPTS[2])[0]
  p_thr = seg_threshold.predict(image, PROMPTS[2])[0]
  assert np.max(np.abs(p_full - p_thr)) > 1e-4


def test_the_kernel_path_under_the_per_image_map_equals_xla(seg_boltzmann):
  """Each image runs as its own batch of one under jax.vmap; the Pallas kernel (interpret mode on CPU)
  must batch there and give the XLA path's maps on the same samples."""
  images = [_ct_like(40, 56, i) for i in range(3)]
  kernel = Segmenter(dataclasses.replace(seg_boltzmann.cfg, kernel_backend="pallas_interpret"), seg_boltzmann.params,
                     seg_boltzmann.tokenizer, batch_size=4)
  for a, b in zip(kernel.predict(images, PROMPTS[0], sample_seed=3), seg_boltzmann.predict(images, PROMPTS[0],
                                                                                           sample_seed=3)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_bad_inputs_give_one_line_errors(tmp_path, run_dir, seg_threshold):
  from mlx_med.vision.io import ImageLoadError

  good = tmp_path / "good.png"
  Image.fromarray(_ct_like(32, 32, 5)).save(good)
  missing = tmp_path / "nope.png"
  with pytest.raises(SegmenterError, match=r"nope\.png: file not found"):
    predict_files(seg_threshold, [good, missing], PROMPTS[0], tmp_path / "out")
  assert not (tmp_path / "out").exists()  # nothing written before every input was checked
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not a png at all")
  with pytest.raises(ImageLoadError, match=r"broken\.png: .*export it again"):
    predict_files(seg_threshold, [broken], PROMPTS[0], tmp_path / "out")
  text = tmp_path / "notes.txt"
  text.write_text("x")
  with pytest.raises(ImageLoadError, match=r"notes\.txt: unsupported file type"):
    predict_files(seg_threshold, [text], PROMPTS[0], tmp_path / "out")
  with pytest.raises(SegmenterError, match="2 prompts for 3 images; pass one prompt for all images or one per image"):
    seg_threshold.predict([_ct_like(32, 32, i) for i in range(3)], PROMPTS[:2])
  with pytest.raises(SegmenterError, match="3 prompts for 1 images"):
    predict_files(seg_threshold, [good], PROMPTS, tmp_path / "out")
  with pytest.raises(SegmenterError, match="prompt 0 is empty"):
    seg_threshold.predict(_ct_like(32, 32, 0), "  ")
  with pytest.raises(SegmenterError, match="attention='sparse' is not one of"):
    Segmenter.load(run_dir, attention="sparse")

  no_ckpt = tmp_path / "no_ckpt"
  no_ckpt.mkdir()
  for name in ("model.json", "tokenizer.json", "data.json"):
    (no_ckpt / name).write_bytes((run_dir / name).read_bytes())
  with pytest.raises(SegmenterError, match=r"no_ckpt/checkpoints: no checkpoint; train the run first"):
    Segmenter.load(no_ckpt)
  (no_ckpt / "model.json").unlink()
  with pytest.raises(SegmenterError, match=r"no_ckpt/model\.json: missing model config; pass the --workdir"):
    predict_files(no_ckpt, [good], PROMPTS[0], tmp_path / "out")
  with pytest.raises(SegmenterError, match=r"nowhere: no such run directory"):
    Segmenter.load(tmp_path / "nowhere")
  for err in (SegmenterError("a\nb"),):
    assert "\n" not in str(err)
