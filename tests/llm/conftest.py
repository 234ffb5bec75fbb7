"""Session fixtures for the LLM tests (helpers live in hf_tiny.py)."""

from __future__ import annotations

import contextlib
import os

import pytest

from hf_tiny import make_hf_model, save_model_dir, write_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
  d = str(tmp_path_factory.mktemp("tokenizer"))
  write_tokenizer(d)
  return d


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory, tokenizer_dir) -> str:
  """A tiny Qwen2 chat model directory (weights + tokenizer + template) shared by several test files."""
  from transformers import AutoTokenizer

  vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))
  model = make_hf_model("qwen2", vocab_size=vocab, eos_token_id=2)
  return save_model_dir(model, str(tmp_path_factory.mktemp("qwen2_chat")), tokenizer_dir)


@pytest.fixture(scope="session")
def local_lm(qwen2_dir):
  """The chat model in-process, with the same buckets as the test server (shared compiles)."""
  from mlx_med.llm.model import LocalLM

  return LocalLM.from_pretrained(qwen2_dir, min_batch_bucket=8, min_prompt_bucket=32)


class ServerProcess:
  """A real `python -m mlx_med.llm.serve` process on a free loopback port."""

  def __init__(self, model_dir: str, log_path: str, *extra: str):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.base_url = f"http://127.0.0.1:{self.port}/v1"
    self.model = os.path.basename(os.path.normpath(model_dir))
    self.log_path = log_path
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one plain CPU device, as a user would run it
    env["JAX_PLATFORMS"] = "cpu"
    self._log = open(log_path, "w")
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_med.llm.serve", "--model", model_dir, "--port", str(self.port), *extra],
        stdout=self._log, stderr=subprocess.STDOUT, env=env)

  def wait_ready(self, timeout: float = 180.0) -> None:
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
      try:
        if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).status_code == 200:
          return
      except httpx.HTTPError:
        pass
      time.sleep(0.3)
    raise RuntimeError(f"server not ready after {timeout}s:\n{self.log_tail()}")

  def log_tail(self, n: int = 4000) -> str:
    self._log.flush()
    with open(self.log_path) as f:
      return f.read()[-n:]

  def stop(self) -> None:
    self.proc.terminate()
    try:
      self.proc.wait(timeout=20)
    except Exception:  # noqa: BLE001 - make sure it is gone
      self.proc.kill()
      self.proc.wait()
    self._log.close()


@contextlib.contextmanager
def served(model_dir: str, log_path: str, *extra_args: str):
  """A running test server. Buckets are pinned (8 rows, 32 prompt tokens) so every batch
  reuses the same few compiled programs; a long batching window makes concurrent requests
  reliably share a batch."""
  proc = ServerProcess(model_dir, log_path, "--min-batch-bucket", "8", "--min-prompt-bucket", "32",
                       "--max-batch-rows", "8", "--batch-wait-ms", "150", *extra_args)
  try:
    proc.wait_ready()
    yield proc
  finally:
    proc.stop()


@pytest.fixture(scope="session")
def server(qwen2_dir, tmp_path_factory):
  """One server for the serving and client tests."""
  with served(qwen2_dir, str(tmp_path_factory.mktemp("server") / "server.log")) as proc:
    yield proc
