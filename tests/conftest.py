"""Test-wide setup: 8 fake CPU devices, set before JAX is imported anywhere."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
  import jax

  platform = jax.default_backend()
  for item in items:
    if "gpu" in item.keywords and platform != "gpu":
      item.add_marker(pytest.mark.skip(reason="needs a GPU"))
    if "tpu" in item.keywords and platform != "tpu":
      item.add_marker(pytest.mark.skip(reason="needs a TPU"))
