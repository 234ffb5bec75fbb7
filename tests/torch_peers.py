"""Import the PyTorch imaging references (timm, open_clip) on a CPU-only torch.

PyPI's torchvision wheels link against torch's CUDA libraries. With the CPU torch build that
`make test` installs (offline machines cannot reach PyTorch's own index for a CPU torchvision),
torchvision's compiled detection ops (nms, roi_align, ...) fail to load, and its import then
stops while registering fake kernels for those ops. timm and open_clip import torchvision only
for transforms and dataset helpers, never for those ops. `import_torchvision()` declares the
missing op names (placeholders that raise if ever called) so the pure-Python part of torchvision
imports; when the compiled ops did load, it changes nothing.

Used by the parity tests (tests/vision) and the benchmarks (bench/embed_train.py).
"""
from __future__ import annotations

import importlib.util
import pathlib
import re

_LIBRARY = None  # keeps the torch.library registration alive


def _compiled_ops_loaded(torch) -> bool:
  try:
    _ = torch.ops.torchvision.nms
    return True
  except (AttributeError, RuntimeError):
    return False


def import_torchvision():
  """Return the torchvision module, declaring its compiled-op names first if they are absent."""
  global _LIBRARY
  import torch

  spec = importlib.util.find_spec("torchvision")
  if spec is None:
    raise ImportError("torchvision is not installed: run `make test` (it installs the `hf` extra)")
  if _LIBRARY is None and not _compiled_ops_loaded(torch):
    root = pathlib.Path(next(iter(spec.submodule_search_locations)))
    text = "".join((root / f).read_text() for f in ("_meta_registrations.py", "_autograd_registrations.py")
                   if (root / f).exists())
    names = sorted(set(re.findall(r'"torchvision::([A-Za-z_0-9]+)"', text)))
    lib = torch.library.Library("torchvision", "DEF")
    for name in names:
      lib.define(f"{name}(Tensor[] args) -> Tensor")
    _LIBRARY = lib
  import torchvision
  return torchvision


def import_timm():
  import_torchvision()
  import timm
  return timm


def import_open_clip():
  import_torchvision()
  import open_clip
  return open_clip
