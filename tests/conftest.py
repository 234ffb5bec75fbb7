"""Test-wide setup, done before JAX is imported anywhere.

Normal runs pin JAX to the CPU with 8 fake devices (multi-device tests run
anywhere). A run on an accelerator says so with

  MLX_MED_TEST_PLATFORM=gpu python -m pytest -m gpu ...     (or =tpu)

which leaves JAX_PLATFORMS alone, so JAX finds the accelerator; such a run is
a usage error if JAX then sees a different platform, rather than silently
skipping every accelerator test. Tests marked `gpu` / `tpu` skip on any other
platform.
"""
import importlib.util
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

# Persistent XLA compilation cache: a rerun loads compiled programs instead of compiling them
# again. Set as environment variables so the processes tests start (the CLI, the server) use
# it too. Most programs here compile in 0.1-5 s on a CPU, below JAX's default 1 s threshold.
# MLX_MED_TEST_COMPILE_CACHE names another directory; set it empty to turn the cache off.
_compile_cache = os.environ.get("MLX_MED_TEST_COMPILE_CACHE",
                                os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                             ".pytest-jax-cache"))
if _compile_cache:
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _compile_cache)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
  if importlib.util.find_spec("filelock"):  # JAX needs it to bound the cache (and then locks it across processes)
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 << 30))  # bytes; least recently used go first

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


@pytest.fixture
def fresh_compiles():
  """XLA really compiles during this test: no persistent-cache hits (nor writes).

  For tests that read what the compiler prints (e.g. SPMD partitioner warnings): a cache
  hit skips the compiler and its warnings, so a run after a failing one could pass.
  """
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()
