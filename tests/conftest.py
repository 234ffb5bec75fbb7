"""Test-wide setup, done before JAX is imported anywhere.

Normal runs pin JAX to the CPU with 8 fake devices (multi-device tests run
anywhere). A run on an accelerator says so with

  MLX_MED_TEST_PLATFORM=gpu python -m pytest -m gpu ...     (or =tpu)

which leaves JAX_PLATFORMS alone, so JAX finds the accelerator; such a run is
a usage error if JAX then sees a different platform, rather than silently
skipping every accelerator test. Tests marked `gpu` / `tpu` skip on any other
platform.
"""
import os

_PLATFORMS = ("cpu", "gpu", "tpu")
_REQUESTED = os.environ.get("MLX_MED_TEST_PLATFORM", "cpu").strip().lower() or "cpu"
if _REQUESTED not in _PLATFORMS:
  raise RuntimeError(f"MLX_MED_TEST_PLATFORM={_REQUESTED!r}; choose one of {_PLATFORMS} (unset = cpu).")
if _REQUESTED == "cpu":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
  import jax

  platform = jax.default_backend()
  if _REQUESTED != "cpu" and platform != _REQUESTED:
    raise pytest.UsageError(
        f"MLX_MED_TEST_PLATFORM={_REQUESTED} but JAX's default backend is {platform!r} "
        f"(devices: {jax.devices()}); check the accelerator and JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')!r}.")
  for item in items:
    if "gpu" in item.keywords and platform != "gpu":
      item.add_marker(pytest.mark.skip(reason="needs a GPU (run with MLX_MED_TEST_PLATFORM=gpu on one)"))
    if "tpu" in item.keywords and platform != "tpu":
      item.add_marker(pytest.mark.skip(reason="needs a TPU (run with MLX_MED_TEST_PLATFORM=tpu on one)"))
