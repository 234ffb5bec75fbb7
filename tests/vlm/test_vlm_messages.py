"""Images in chat messages: data-URL round trips, the local-path policy and one-line refusals."""

import base64
import io
import os

import numpy as np
import pytest
from imaging_files import write_dicom, write_nifti
from PIL import Image

from mlx_med.vlm import messages as M


def _rgb(h=23, w=37, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_bytes(a, mode=None):
  buf = io.BytesIO()
  Image.fromarray(a, mode=mode).save(buf, format="PNG") if mode else Image.fromarray(a).save(buf, format="PNG")
  return buf.getvalue()


def _one_line(exc_info):
  text = str(exc_info.value)
  assert "\n" not in text and text.strip() == text and text
  return text


@pytest.mark.parametrize("shape", [(23, 37, 3), (40, 9, 3)])
def test_data_url_round_trip_is_exact(shape):
  a = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
  part = M.image_part(a)
  assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")
  b = M.load_image_url(part["image_url"]["url"])
  assert b.dtype == np.uint8 and b.shape == shape
  np.testing.assert_array_equal(a, b)
  # PIL input and floats in [0, 1] give the same pixels
  np.testing.assert_array_equal(M.load_image_url(M.image_part(Image.fromarray(a))["image_url"]["url"]), a)
  np.testing.assert_array_equal(M.load_image_url(M.image_part(a / 255.0)["image_url"]["url"]), a)


def test_grey_rgba_and_16bit_decode_like_hf():
  g = _rgb(seed=2)[..., 0]
  out = M.load_image_url(M.image_part(g)["image_url"]["url"])
  np.testing.assert_array_equal(out, np.repeat(g[:, :, None], 3, axis=2))
  # RGBA: composited onto white (transformers' convert_to_rgb, vLLM)
  rgba = np.random.default_rng(3).integers(0, 256, (11, 13, 4), dtype=np.uint8)
  out = M.load_image_url(M.image_part(rgba)["image_url"]["url"])
  alpha = rgba[..., 3:].astype(np.float64) / 255
  want = rgba[..., :3] * alpha + 255 * (1 - alpha)
  assert np.abs(out.astype(np.float64) - want).max() <= 1.0
  # a 16-bit grayscale PNG is scaled to 8 bits, not clipped to white
  g16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
  url = "data:image/png;base64," + base64.b64encode(_png_bytes(g16)).decode()
  out = M.load_image_url(url)
  np.testing.assert_array_equal(out[..., 0], np.round(g16 / 65535 * 255).astype(np.uint8))


def test_jpeg_and_url_safe_base64():
  yy, xx = np.mgrid[0:24, 0:40]
  smooth = np.stack([yy * 10, xx * 6, (yy + xx) * 4], axis=-1).astype(np.uint8)
  url = M.image_part(smooth, format="jpeg")["image_url"]["url"]
  assert url.startswith("data:image/jpeg;base64,")
  back = M.load_image_url(url)
  assert back.shape == smooth.shape and np.abs(back.astype(int) - smooth).mean() < 4  # lossy but close
  a = _rgb(seed=4)
  raw = _png_bytes(a)
  urlsafe = "data:image/png;base64," + base64.urlsafe_b64encode(raw).decode().rstrip("=")
  np.testing.assert_array_equal(M.load_image_url(urlsafe), a)


def test_local_files_inside_allowed_dir(tmp_path):
  a = _rgb(seed=5)
  Image.fromarray(a).save(tmp_path / "x.png")
  (tmp_path / "sub").mkdir()
  Image.fromarray(a).save(tmp_path / "sub" / "y.png")
  np.testing.assert_array_equal(M.load_image_url(str(tmp_path / "x.png"), allowed_local_dir=tmp_path), a)
  np.testing.assert_array_equal(M.load_image_url((tmp_path / "sub" / "y.png").as_uri(), allowed_local_dir=tmp_path), a)
  # `..` that stays inside is fine
  np.testing.assert_array_equal(M.load_image_url(f"{tmp_path}/sub/../x.png", allowed_local_dir=tmp_path), a)
  # image_part reads a path itself (no policy: the caller's own file)
  np.testing.assert_array_equal(M.load_image_url(M.image_part(tmp_path / "x.png")["image_url"]["url"]), a)


def test_dicom_path_and_data_url(tmp_path):
  px = np.arange(20 * 30, dtype=np.int16).reshape(20, 30) - 100
  path = write_dicom(tmp_path / "ct.dcm", px, center=200.0, width=400.0)
  out = M.load_image_url(str(path), allowed_local_dir=tmp_path)
  assert out.shape == (20, 30, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255  # the header window: -100 -> black, 499 -> white
  url = "data:application/dicom;base64," + base64.b64encode(path.read_bytes()).decode()
  np.testing.assert_array_equal(M.load_image_url(url), out)
  np.testing.assert_array_equal(M.load_image_url(M.image_part(path)["image_url"]["url"]), out)


def test_nifti_path_gives_the_middle_slice(tmp_path):
  from mlx_med.vision.io import load_image

  vol = np.random.default_rng(9).integers(-500, 500, (6, 7, 5)).astype(np.int16)
  path = write_nifti(tmp_path / "vol.nii.gz", vol, np.eye(4))
  out = M.load_image_url(path.as_uri(), allowed_local_dir=tmp_path)
  want = np.round(np.clip(load_image(path), 0, 1) * 255).astype(np.uint8)
  assert out.shape == want.shape + (3,)
  np.testing.assert_array_equal(out[..., 1], want)


def test_remote_urls_refused():
  for url in ("http://example.com/a.png", "https://example.com/a.png", "HTTPS://x/y.jpg"):
    with pytest.raises(M.ImageRefused) as e:
      M.load_image_url(url, allowed_local_dir="/")
    assert _one_line(e) == M.REMOTE_REFUSED
  assert issubclass(M.ImageRefused, ValueError)


def test_local_path_refusals(tmp_path):
  allowed = tmp_path / "allowed"
  allowed.mkdir()
  outside = tmp_path / "secret.png"
  Image.fromarray(_rgb()).save(outside)
  # no allowed directory at all
  with pytest.raises(M.ImageRefused, match="no allowed local directory") as e:
    M.load_image_url(str(outside))
  _one_line(e)
  # a path outside the directory, plain and as file://
  for url in (str(outside), outside.as_uri()):
    with pytest.raises(M.ImageRefused, match="outside the allowed directory") as e:
      M.load_image_url(url, allowed_local_dir=allowed)
    _one_line(e)
  # `..` escape
  with pytest.raises(M.ImageRefused, match="outside the allowed directory") as e:
    M.load_image_url(f"{allowed}/../secret.png", allowed_local_dir=allowed)
  _one_line(e)
  # symlink escape: a link inside pointing outside, and a linked directory
  os.symlink(outside, allowed / "link.png")
  os.symlink(tmp_path, allowed / "linkdir")
  for url in (str(allowed / "link.png"), str(allowed / "linkdir" / "secret.png")):
    with pytest.raises(M.ImageRefused, match="outside the allowed directory") as e:
      M.load_image_url(url, allowed_local_dir=allowed)
    _one_line(e)
  # a sibling directory whose name merely starts with the allowed one's
  (tmp_path / "allowed2").mkdir()
  Image.fromarray(_rgb()).save(tmp_path / "allowed2" / "z.png")
  with pytest.raises(M.ImageRefused):
    M.load_image_url(str(tmp_path / "allowed2" / "z.png"), allowed_local_dir=allowed)
  # relative paths, other schemes and remote file hosts
  for url, what in (("x.png", "neither a data: URL"), ("ftp://h/x.png", "scheme 'ftp'"),
                    ("file://otherhost/x.png", "names host")):
    with pytest.raises(M.ImageRefused, match=what) as e:
      M.load_image_url(url, allowed_local_dir=allowed)
    _one_line(e)
  # inside, but missing: an input error, not a refusal
  with pytest.raises(M.ImageInputError, match="file not found") as e:
    M.load_image_url(str(allowed / "nope.png"), allowed_local_dir=allowed)
  assert not isinstance(e.value, M.ImageRefused)


def test_malformed_inputs_one_line(tmp_path):
  good = base64.b64encode(_png_bytes(_rgb())).decode()
  cases = [
    ("data:image/png;base64", "malformed data URL"),
    ("data:image/png," + good, "not base64-encoded"),
    ("data:text/plain;base64," + good, "is not an image"),
    ("data:image/png;base64,@@@not*base64!!", "invalid base64"),
    ("data:image/png;base64," + base64.b64encode(b"hello, this is text").decode(), "not an image PIL can decode"),
    ("data:image/png;base64," + base64.b64encode(_png_bytes(_rgb())[:60]).decode(), "truncated or corrupt"),
    ("data:image/png;base64,", "empty"),
  ]
  for url, what in cases:
    with pytest.raises(M.ImageInputError, match=what) as e:
      M.load_image_url(url)
    text = _one_line(e)
    assert good[:20] not in text  # the payload is never echoed
  (tmp_path / "fake.png").write_text("not an image\n")
  with pytest.raises(M.ImageInputError, match="fake.png: not an image") as e:
    M.load_image_url(str(tmp_path / "fake.png"), allowed_local_dir=tmp_path)
  _one_line(e)


def test_size_caps_and_decompression_bomb(tmp_path):
  big = np.zeros((300, 400), np.uint8)
  url = M.image_part(big)["image_url"]["url"]
  with pytest.raises(M.ImageInputError, match="Mpx limit") as e:
    M.load_image_url(url, max_pixels=100_000)
  _one_line(e)
  with pytest.raises(M.ImageInputError, match="MiB limit") as e:
    M.load_image_url(url, max_bytes=100)
  _one_line(e)
  Image.fromarray(big).save(tmp_path / "big.png")
  with pytest.raises(M.ImageInputError, match="MiB limit"):
    M.load_image_url(str(tmp_path / "big.png"), allowed_local_dir=tmp_path, max_bytes=100)
  # PIL's own bomb guard (a header claiming a huge size) is caught before any pixel is decoded
  old = Image.MAX_IMAGE_PIXELS
  Image.MAX_IMAGE_PIXELS = 1000
  try:
    with pytest.raises(M.ImageInputError, match="decompression bomb") as e:
      M.load_image_url(url, max_pixels=10**9)
    _one_line(e)
  finally:
    Image.MAX_IMAGE_PIXELS = old


def test_split_messages(tmp_path):
  a, b = _rgb(seed=7), _rgb(9, 11, seed=8)
  Image.fromarray(b).save(tmp_path / "b.png")
  msgs = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": [{"type": "text", "text": "compare"}, M.image_part(a),
                                 {"type": "image_url", "image_url": {"url": str(tmp_path / "b.png"), "detail": "low"}}]},
    {"role": "assistant", "content": "ok"},
    {"role": "user", "content": [{"type": "image_url", "image_url": M.image_part(b)["image_url"]["url"]},
                                 {"type": "text", "text": "and this?"}]},
  ]
  before = repr(msgs)
  out, images = M.split_messages(msgs, allowed_local_dir=tmp_path)
  assert repr(msgs) == before  # input untouched
  assert out[0] == {"role": "system", "content": "be brief"} and out[2] == msgs[2]
  assert out[1]["content"] == [{"type": "text", "text": "compare"}, {"type": "image"}, {"type": "image"}]
  assert out[3]["content"] == [{"type": "image"}, {"type": "text", "text": "and this?"}]
  assert len(images) == 3
  for got, want in zip(images, [a, b, b]):
    np.testing.assert_array_equal(got, want)
  # without an allowed dir the local path is refused; other part types are rejected
  with pytest.raises(M.ImageRefused):
    M.split_messages(msgs)
  with pytest.raises(M.ImageInputError, match="part type 'input_audio'") as e:
    M.split_messages([{"role": "user", "content": [{"type": "input_audio"}]}])
  _one_line(e)
  with pytest.raises(M.ImageInputError, match="needs") as e:
    M.split_messages([{"role": "user", "content": [{"type": "image_url"}]}])
  _one_line(e)
