"""Medical image I/O: DICOM / NIfTI / PNG-JPEG loading checked on files built here with hand-computed
values, each format's bad-file error, folder scans, and preprocessing against transformers' processors."""

import json
import logging

import numpy as np
import pytest

from mlx_med.vision.io import (
  WINDOW_PRESETS,
  ImageLoadError,
  ImageProcessorConfig,
  apply_window,
  load_and_preprocess,
  load_folder,
  load_image,
  preprocess,
  to_rgb,
)

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")
from imaging_files import write_dicom, write_nifti
from PIL import Image
from pydicom.uid import (
  JPEGLSLossless,
)


def linear_window(x, c, w):
  """DICOM PS3.3 C.11.2.1.2.1 LINEAR, written out per value, to [0, 1]."""
  out = np.empty(np.shape(x))
  for i, v in np.ndenumerate(np.asarray(x, float)):
    if v <= c - 0.5 - (w - 1) / 2:
      out[i] = 0.0
    elif v > c - 0.5 + (w - 1) / 2:
      out[i] = 1.0
    else:
      out[i] = (v - (c - 0.5)) / (w - 1) + 0.5
  return out


# ----------------------------------------------------------------------------------------------------
# Windowing


def test_linear_window_by_hand_at_40_400():
  # c - 0.5 - (w - 1)/2 = -160 (black at and below); c - 0.5 + (w - 1)/2 = 239 (white above)
  x = np.array([-1024.0, -160.0, -159.0, 40.0, 238.0, 239.0, 239.5, 3000.0])
  y = apply_window(x, 40, 400)
  # ramp: (x - 39.5) / 399 + 0.5
  expected = [0.0, 0.0, 1 / 399, 0.5 + 0.5 / 399, 398 / 399, 1.0, 1.0, 1.0]
  np.testing.assert_allclose(y, expected, atol=1e-7)
  assert y.dtype == np.float32


def test_window_functions_match_pydicom():
  """LINEAR / LINEAR_EXACT / SIGMOID against pydicom's own apply_windowing (an independent reading of
  the standard), rescaled from its 16-bit output range to [0, 1]."""
  from pydicom.dataset import Dataset
  from pydicom.pixels import apply_windowing

  x = np.arange(-1200, 1300, 7, dtype=np.float64)
  for function in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
    ds = Dataset()
    ds.PhotometricInterpretation, ds.BitsStored, ds.PixelRepresentation = "MONOCHROME2", 16, 0
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 40.0, 400.0, function
    ref = apply_windowing(x.copy(), ds) / 65535.0
    np.testing.assert_allclose(apply_window(x, 40, 400, function), ref, atol=1e-6, err_msg=function)


def test_presets_are_center_width_pairs():
  assert WINDOW_PRESETS["lung"] == (-600.0, 1500.0)
  assert WINDOW_PRESETS["mediastinum"] == (50.0, 350.0)
  assert WINDOW_PRESETS["brain"] == (40.0, 80.0)
  assert all(w >= 1 for _, w in WINDOW_PRESETS.values())


# ----------------------------------------------------------------------------------------------------
# DICOM


STORED = np.array([[0, 400, 1000, 1044], [1064, 1084, 1200, 2047], [1500, 900, 1024, 1100]], dtype=np.int16)
HU = STORED.astype(np.float64) * 2 - 1024  # slope 2, intercept -1024


def test_dicom_rescale_and_windows(tmp_path):
  f = write_dicom(tmp_path / "ct.dcm", STORED, slope=2, intercept=-1024,
                  center=pydicom.multival.MultiValue(float, [40, 300]), width=[400, 1500])
  np.testing.assert_array_equal(load_image(f, window="none"), HU.astype(np.float32))
  # header: the first of several windows (40/400)
  np.testing.assert_allclose(load_image(f), linear_window(HU, 40, 400), atol=1e-6)
  np.testing.assert_allclose(load_image(f, window=(40, 400)), linear_window(HU, 40, 400), atol=1e-6)
  np.testing.assert_allclose(load_image(f, window="lung"), linear_window(HU, -600, 1500), atol=1e-6)
  np.testing.assert_allclose(load_image(f, window="BONE"), linear_window(HU, 400, 1800), atol=1e-6)
  with pytest.raises(ImageLoadError, match=r"ct\.dcm: unknown window 'pancreas'.*preset"):
    load_image(f, window="pancreas")


def test_dicom_header_voi_function_and_fallback(tmp_path):
  f = write_dicom(tmp_path / "exact.dcm", STORED, slope=2, intercept=-1024, center=40, width=400,
                  voi_function="LINEAR_EXACT")
  x = HU
  expected = np.where(x <= -160, 0.0, np.where(x > 240, 1.0, (x - 40) / 400 + 0.5))
  np.testing.assert_allclose(load_image(f), expected, atol=1e-6)
  g = write_dicom(tmp_path / "nowindow.dcm", STORED, slope=2, intercept=-1024)
  np.testing.assert_allclose(load_image(g), (HU - HU.min()) / (HU.max() - HU.min()), atol=1e-6)


def test_dicom_monochrome1_is_inverted(tmp_path):
  f = write_dicom(tmp_path / "cr.dcm", STORED, photometric="MONOCHROME1", center=1024, width=2048)
  np.testing.assert_allclose(load_image(f), 1.0 - linear_window(STORED, 1024, 2048), atol=1e-6)
  np.testing.assert_array_equal(load_image(f, window="none"), STORED.astype(np.float32))  # values left alone


def test_dicom_multiframe(tmp_path):
  frames = np.stack([STORED, STORED + 10, STORED + 20])
  f = write_dicom(tmp_path / "mf.dcm", frames, frames=3, slope=1, intercept=-1024)
  all_frames = load_image(f, window="none")
  assert all_frames.shape == (3, 3, 4)
  np.testing.assert_array_equal(all_frames, frames.astype(np.float32) - 1024)
  one = load_image(f, window=(40, 400), frame=1)
  np.testing.assert_allclose(one, linear_window(frames[1] - 1024.0, 40, 400), atol=1e-6)
  with pytest.raises(ImageLoadError, match=r"mf\.dcm: frame 3 is out of range: the file has 3 frame"):
    load_image(f, frame=3)


@pytest.mark.parametrize("planar", [0, 1])
def test_dicom_rgb_planar_configurations(tmp_path, planar):
  rgb = np.random.default_rng(planar).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
  f = write_dicom(tmp_path / f"rgb{planar}.dcm", rgb, photometric="RGB", planar=planar)
  out = load_image(f)
  assert out.shape == (5, 7, 3)
  np.testing.assert_allclose(out, rgb / 255.0, atol=1e-7)
  with pytest.raises(ImageLoadError, match="applies to grayscale images"):
    load_image(f, window="lung")


def test_dicom_ybr_full_is_converted_to_rgb(tmp_path):
  y = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
  ybr = np.stack([y, np.full_like(y, 128), np.full_like(y, 128)], -1)  # neutral chroma: R = G = B = Y
  out = load_image(write_dicom(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL"))
  np.testing.assert_allclose(out, np.stack([y] * 3, -1) / 255.0, atol=1e-7)


def test_dicom_palette_color(tmp_path):
  idx = np.array([[0, 1, 2], [255, 128, 7]], dtype=np.int16)
  ramp = np.arange(256, dtype=np.uint16)
  red, green, blue = ramp * 256, 65535 - ramp * 256, np.full(256, 1000, np.uint16)
  extra = {"PixelRepresentation": 0}
  for name, lut in (("Red", red), ("Green", green), ("Blue", blue)):
    extra[f"{name}PaletteColorLookupTableDescriptor"] = [256, 0, 16]
    extra[f"{name}PaletteColorLookupTableData"] = lut.astype("<u2").tobytes()
  out = load_image(write_dicom(tmp_path / "pal.dcm", idx, photometric="PALETTE COLOR", extra=extra))
  expected = np.stack([red[idx], green[idx], blue[idx]], -1) / 65535.0
  np.testing.assert_allclose(out, expected, atol=1e-7)


def test_dicom_enhanced_per_frame_rescale_and_window(tmp_path):
  """Enhanced multi-frame objects keep rescale and window per frame in functional group sequences."""
  from pydicom.dataset import Dataset

  def group(intercept, center, width):
    g = Dataset()
    pvt, voi = Dataset(), Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = 1, intercept, "HU"
    voi.WindowCenter, voi.WindowWidth = center, width
    g.PixelValueTransformationSequence, g.FrameVOILUTSequence = [pvt], [voi]
    return g

  frames = np.stack([STORED, STORED])
  f = write_dicom(tmp_path / "enh.dcm", frames, frames=2,
                  extra={"PerFrameFunctionalGroupsSequence": [group(-1024, 40, 400), group(-1000, -600, 1500)]})
  out = load_image(f)
  np.testing.assert_allclose(out[0], linear_window(STORED - 1024.0, 40, 400), atol=1e-6)
  np.testing.assert_allclose(out[1], linear_window(STORED - 1000.0, -600, 1500), atol=1e-6)
  np.testing.assert_array_equal(load_image(f, window="none", frame=1), (STORED - 1000.0).astype(np.float32))


def test_dicom_bad_files(tmp_path):
  empty = tmp_path / "empty.dcm"
  empty.write_bytes(b"")
  with pytest.raises(ImageLoadError, match=r"empty\.dcm: file is empty \(0 bytes\)"):
    load_image(empty)
  junk = tmp_path / "junk.dcm"
  junk.write_bytes(np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8).tobytes())
  with pytest.raises(ImageLoadError, match=r"junk\.dcm: not a DICOM file"):
    load_image(junk)
  nopix = write_dicom(tmp_path / "report.dcm", None, with_pixels=False)
  with pytest.raises(ImageLoadError, match=r"report\.dcm: DICOM without pixel data") as e:
    load_image(nopix)
  assert e.value.kind == "no_pixel_data" and "Doe" not in str(e.value) and "MRN" not in str(e.value)
  short = write_dicom(tmp_path / "truncated.dcm", STORED, pixel_bytes=STORED.astype("<i2").tobytes()[:10])
  with pytest.raises(ImageLoadError, match=r"truncated\.dcm: pixel data cannot be decoded") as e:
    load_image(short)
  assert "\n" not in str(e.value) and "Doe" not in str(e.value)


def test_dicom_compressed_without_decoder(tmp_path):
  from pydicom.encaps import encapsulate
  from pydicom.pixels import get_decoder

  if get_decoder(JPEGLSLossless).is_available:
    pytest.skip("a JPEG-LS decoder is installed here")
  f = write_dicom(tmp_path / "jls.dcm", STORED, transfer_syntax=JPEGLSLossless,
                  pixel_bytes=encapsulate([b"\xff\xd8\xff\xf7" + b"\0" * 20 + b"\xff\xd9"]))
  with pytest.raises(ImageLoadError, match=r"jls\.dcm: compressed transfer syntax JPEG-LS.*needs a pixel-data "
                                           r"decoder; `pip install .*pylibjpeg-libjpeg") as e:
    load_image(f)
  assert e.value.kind == "needs_decoder" and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------
# NIfTI


def _ras_volume():
  return np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) * 3 - 100  # [x, y, z] in RAS+


def test_nifti_canonical_orientation_and_scaling(tmp_path):
  ras = _ras_volume()
  # Stored as [y, x, z] with x running right-to-left: the affine maps (i, j, k) -> (x, y, z) =
  # (-j + 3, i, k), so nibabel must swap and flip axes to reach RAS+.
  stored = np.transpose(ras[::-1], (1, 0, 2))
  affine = np.array([[0, -1, 0, 3], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
  f = write_nifti(tmp_path / "vol.nii.gz", stored, affine, slope=2.0, inter=-1024.0)
  assert np.allclose(nib.load(f).get_fdata(), stored * 2.0 - 1024)  # the file really is scaled
  hu = ras * 2.0 - 1024
  axial = load_image(f, window="none")  # middle axial slice, z = 3
  np.testing.assert_array_equal(axial, np.flip(hu[:, :, 3].T).astype(np.float32))
  assert axial.shape == (5, 4)
  # by hand: top-left pixel is the most anterior row (y = 4) and the patient's rightmost column (x = 3)
  assert axial[0, 0] == hu[3, 4, 3] and axial[-1, -1] == hu[0, 0, 3]
  coronal = load_image(f, window="none", axis=1, slice_index=1)
  np.testing.assert_array_equal(coronal, np.flip(hu[:, 1, :].T).astype(np.float32))
  sagittal = load_image(f, window=(40, 400), axis=0, slice_index=2)
  np.testing.assert_allclose(sagittal, linear_window(np.flip(hu[2, :, :].T), 40, 400), atol=1e-6)
  with pytest.raises(ImageLoadError, match=r"vol\.nii\.gz: slice_index 9 is out of range along axis 2"):
    load_image(f, slice_index=9)


def test_nifti_header_window_and_4d(tmp_path):
  ras = _ras_volume()
  f = write_nifti(tmp_path / "cal.nii", ras, np.eye(4), cal=(0.0, 100.0))
  sl = np.flip(ras[:, :, 3].T).astype(float)
  np.testing.assert_allclose(load_image(f), np.clip(sl / 100.0, 0, 1), atol=1e-6)
  g = write_nifti(tmp_path / "nocal.nii", ras, np.eye(4))
  np.testing.assert_allclose(load_image(g), (sl - sl.min()) / (sl.max() - sl.min()), atol=1e-6)

  series = np.stack([ras, ras + 1000], axis=-1)
  h = write_nifti(tmp_path / "fmri.nii.gz", series, np.eye(4))
  with pytest.raises(ImageLoadError, match=r"fmri\.nii\.gz: 4D NIfTI with 2 time points.*pass frame=") as e:
    load_image(h)
  assert e.value.kind == "needs_index"
  np.testing.assert_array_equal(load_image(h, window="none", frame=1), (sl + 1000).astype(np.float32))


def test_nifti_bad_files(tmp_path):
  f = write_nifti(tmp_path / "vol.nii.gz", _ras_volume(), np.eye(4))
  cut = tmp_path / "cut.nii.gz"
  cut.write_bytes(f.read_bytes()[:60])
  with pytest.raises(ImageLoadError, match=r"cut\.nii\.gz: (unreadable NIfTI|NIfTI voxel data cannot be read)"):
    load_image(cut)
  junk = tmp_path / "junk.nii"
  junk.write_bytes(b"not a nifti header" * 40)
  with pytest.raises(ImageLoadError, match=r"junk\.nii: unreadable NIfTI"):
    load_image(junk)
  empty = tmp_path / "empty.nii.gz"
  empty.write_bytes(b"")
  with pytest.raises(ImageLoadError, match=r"empty\.nii\.gz: file is empty"):
    load_image(empty)


# ----------------------------------------------------------------------------------------------------
# PNG / JPEG


def test_png_jpeg_loading(tmp_path):
  rng = np.random.default_rng(1)
  gray = rng.integers(0, 256, size=(9, 11), dtype=np.uint8)
  Image.fromarray(gray).save(tmp_path / "g.png")
  np.testing.assert_allclose(load_image(tmp_path / "g.png"), gray / 255.0, atol=1e-7)
  np.testing.assert_allclose(load_image(tmp_path / "g.png", window=(128, 64)), linear_window(gray, 128, 64), atol=1e-6)
  deep = rng.integers(0, 65536, size=(9, 11)).astype(np.uint16)
  Image.fromarray(deep).save(tmp_path / "g16.png")
  np.testing.assert_allclose(load_image(tmp_path / "g16.png"), deep / 65535.0, atol=1e-7)
  rgba = rng.integers(0, 256, size=(6, 8, 4), dtype=np.uint8)
  Image.fromarray(rgba).save(tmp_path / "c.png")
  np.testing.assert_allclose(load_image(tmp_path / "c.png"), rgba[..., :3] / 255.0, atol=1e-7)
  smooth = np.tile(np.linspace(0, 255, 16).astype(np.uint8), (16, 1))
  Image.fromarray(np.stack([smooth] * 3, -1)).save(tmp_path / "c.jpg", quality=95)
  jpg = load_image(tmp_path / "c.JPG" if (tmp_path / "c.JPG").exists() else tmp_path / "c.jpg")
  assert jpg.shape == (16, 16, 3) and np.abs(jpg - smooth[..., None] / 255.0).max() < 0.05  # lossy
  with pytest.raises(ImageLoadError, match=r"g\.png: window preset 'lung' is in Hounsfield units"):
    load_image(tmp_path / "g.png", window="lung")


def test_png_jpeg_bad_files(tmp_path):
  Image.fromarray(np.zeros((64, 64), np.uint8) + 7).save(tmp_path / "ok.png")
  blob = (tmp_path / "ok.png").read_bytes()
  (tmp_path / "cut.png").write_bytes(blob[: len(blob) // 2])
  with pytest.raises(ImageLoadError, match=r"cut\.png: unreadable image"):
    load_image(tmp_path / "cut.png")
  (tmp_path / "text.jpg").write_text("hello, not an image")
  with pytest.raises(ImageLoadError, match=r"text\.jpg: not a readable \.jpg file"):
    load_image(tmp_path / "text.jpg")
  (tmp_path / "empty.png").write_bytes(b"")
  with pytest.raises(ImageLoadError, match=r"empty\.png: file is empty"):
    load_image(tmp_path / "empty.png")
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(ImageLoadError, match=r"notes\.txt: unsupported file type \(\.txt\); convert it to one of") as e:
    load_image(tmp_path / "notes.txt")
  assert e.value.kind == "unsupported"
  with pytest.raises(ImageLoadError, match=r"missing\.png: file not found"):
    load_image(tmp_path / "missing.png")


def test_to_rgb():
  g = np.arange(6, dtype=np.float32).reshape(2, 3)
  rgb = to_rgb(g)
  assert rgb.shape == (2, 3, 3) and all(np.array_equal(rgb[..., c], g) for c in range(3))
  assert to_rgb(rgb) is rgb
  assert to_rgb(np.zeros((2, 3, 4))).shape == (2, 3, 3)
  with pytest.raises(ValueError, match="to_rgb expects"):
    to_rgb(np.zeros((4, 2, 3, 5)))


# ----------------------------------------------------------------------------------------------------
# Folder scans


def test_load_folder_reports_skipped(tmp_path, caplog):
  root = tmp_path / "study"
  (root / "series1").mkdir(parents=True)
  write_dicom(root / "series1" / "IM0001", STORED, slope=1, intercept=0)  # no extension: sniffed
  write_dicom(root / "series1" / "sr.dcm", None, with_pixels=False)
  write_nifti(root / "vol.nii.gz", _ras_volume(), np.eye(4))
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "a.png")
  (root / "b.png").write_bytes(b"")
  (root / "metadata.csv").write_text("path\n")
  (root / ".DS_Store").write_bytes(b"\0\1")
  with caplog.at_level(logging.INFO, logger="mlx_med.vision.io"):
    scan = load_folder(root)
  assert [p.relative_to(root).as_posix() for p in scan.paths] == ["a.png", "series1/IM0001", "vol.nii.gz"]
  reasons = {p.relative_to(root).as_posix(): r for p, r in scan.skipped}
  assert set(reasons) == {"b.png", "metadata.csv", "series1/sr.dcm"}
  assert reasons["b.png"].startswith("file is empty")
  assert reasons["metadata.csv"].startswith("unsupported file type (.csv)")
  assert reasons["series1/sr.dcm"].startswith("DICOM without pixel data")
  lines = [r.getMessage() for r in caplog.records if r.name == "mlx_med.vision.io"]
  assert len(lines) == 1 and "3 image(s) found, 3 file(s) skipped" in lines[0]
  assert all("Doe" not in x and "MRN" not in x for x in lines + list(reasons.values()))
  flat = load_folder(root, recursive=False)
  assert [p.name for p in flat.paths] == ["a.png", "vol.nii.gz"]


def test_load_folder_full_validation_catches_truncated_pixels(tmp_path):
  write_dicom(tmp_path / "ok.dcm", STORED)
  write_dicom(tmp_path / "cut.dcm", STORED, pixel_bytes=STORED.astype("<i2").tobytes()[:10])
  assert len(load_folder(tmp_path).paths) == 2  # the header is fine
  scan = load_folder(tmp_path, validate="full")
  assert [p.name for p in scan.paths] == ["ok.dcm"]
  assert scan.skipped[0][0].name == "cut.dcm" and "pixel data cannot be decoded" in scan.skipped[0][1]


# ----------------------------------------------------------------------------------------------------
# Preprocessing against transformers


@pytest.fixture(scope="module")
def hf_processors():
  from torch_peers import import_torchvision

  import_torchvision()  # transformers' image utilities import torchvision
  from transformers import CLIPImageProcessor, SiglipImageProcessor
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  from transformers.models.siglip.image_processing_pil_siglip import (
    SiglipImageProcessorPil,
  )

  s = 32
  return {
    "clip_pil": (CLIPImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s}),
                 ImageProcessorConfig.clip(s)),
    "siglip_pil": (SiglipImageProcessorPil(size={"height": s, "width": s}), ImageProcessorConfig.siglip(s)),
    "clip_tv": (CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s}),
                ImageProcessorConfig.clip(s)),
    "siglip_tv": (SiglipImageProcessor(size={"height": s, "width": s}), ImageProcessorConfig.siglip(s)),
  }


def _hf(processor, img):
  return processor(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


ODD_SHAPES = [(37, 53, 3), (61, 29, 3), (45, 45, 3), (17, 20, 3), (33, 32, 3)]


@pytest.mark.parametrize("name", ["clip_pil", "siglip_pil"])
def test_preprocess_equals_pil_processors(hf_processors, name):
  """PIL resize on uint8 is the same integer arithmetic on both sides: equal to the last bit."""
  hf, cfg = hf_processors[name]
  rng = np.random.default_rng(7)
  for shape in ODD_SHAPES:
    img = rng.integers(0, 256, size=shape, dtype=np.uint8)
    ref, ours = _hf(hf, img), preprocess(img, processor=cfg)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (32, 32, 3)
    np.testing.assert_array_equal(ours, ref, err_msg=f"{name} {shape}")
  gray = rng.integers(0, 256, size=(40, 27), dtype=np.uint8)  # grayscale: channels copied, as PIL's L -> RGB
  np.testing.assert_array_equal(preprocess(gray, processor=cfg), _hf(hf, np.stack([gray] * 3, -1)))


@pytest.mark.parametrize("name", ["clip_tv", "siglip_tv"])
def test_preprocess_close_to_torchvision_processors(hf_processors, name):
  """transformers' default (torchvision) backend resamples uint8 with its own kernels, so it is close
  to PIL rather than equal. Measured here: CLIP (shortest edge + crop) within one 8-bit level with
  under 1% of values off; SigLIP's square resize likewise except some aspect ratios (64x40 -> 32x32:
  up to 9 levels, a quarter of values off, mean 0.26 level). The PIL backend is the reference above."""
  hf, cfg = hf_processors[name]
  rng = np.random.default_rng(8)
  for shape in [(37, 53, 3), (45, 45, 3), (64, 40, 3), (100, 70, 3)]:
    img = rng.integers(0, 256, size=shape, dtype=np.uint8)
    levels = np.abs(_hf(hf, img) - preprocess(img, processor=cfg)) * np.asarray(cfg.image_std) * 255
    assert levels.mean() < 0.3, (name, shape, levels.mean())
    if name == "clip_tv" or shape != (64, 40, 3):
      assert levels.max() <= 1.0 + 1e-3, (name, shape, levels.max())
      assert (levels > 1e-3).mean() < 0.02, (name, shape)


def test_processor_config_from_hf_dir(hf_processors, tmp_path):
  for name in ("clip_pil", "siglip_pil"):
    hf, cfg = hf_processors[name]
    hf.save_pretrained(tmp_path / name)
    loaded = ImageProcessorConfig.from_hf_dir(tmp_path / name)
    assert loaded == cfg, (name, loaded)
  legacy = {"feature_extractor_type": "CLIPFeatureExtractor", "size": 224, "crop_size": 224, "do_center_crop": True,
            "resample": 3, "image_mean": list(ImageProcessorConfig.clip().image_mean),
            "image_std": list(ImageProcessorConfig.clip().image_std)}
  (tmp_path / "legacy").mkdir()
  (tmp_path / "legacy" / "preprocessor_config.json").write_text(json.dumps(legacy))
  assert ImageProcessorConfig.from_hf_dir(tmp_path / "legacy") == ImageProcessorConfig.clip(224)
  with pytest.raises(ValueError, match="no preprocessor_config.json"):
    ImageProcessorConfig.from_hf_dir(tmp_path / "nowhere")


def test_preprocess_float_input_and_file(tmp_path):
  rng = np.random.default_rng(3)
  u8 = rng.integers(0, 256, size=(30, 41), dtype=np.uint8)
  cfg = ImageProcessorConfig.siglip(16)
  np.testing.assert_array_equal(preprocess(u8 / 255.0, processor=cfg), preprocess(u8, processor=cfg))
  Image.fromarray(u8).save(tmp_path / "x.png")
  np.testing.assert_array_equal(load_and_preprocess(tmp_path / "x.png", processor=cfg), preprocess(u8, processor=cfg))
  with pytest.raises(ValueError, match=r"window the image first"):
    preprocess(np.full((4, 4), -1000.0), processor=cfg)
