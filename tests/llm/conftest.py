"""Session fixtures for the LLM tests (helpers live in hf_tiny.py)."""

from __future__ import annotations

import contextlib
import os

import pytest

from hf_tiny import make_hf_model, save_model_dir, write_tokenizer
from mlx_med.llm.server_process import ServerProcess


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


def server_env() -> dict:
  """The server's environment: one plain CPU device, as a user would run it."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env["JAX_PLATFORMS"] = "cpu"
  return env


@contextlib.contextmanager
def served(model_dir: str, log_path: str, *extra_args: str):
  """A running test server. Buckets are pinned (8 rows, 32 prompt tokens) so every batch
  reuses the same few compiled programs; a long batching window makes concurrent requests
  reliably share a batch."""
  proc = ServerProcess(model_dir, "--min-batch-bucket", "8", "--min-prompt-bucket", "32", "--max-batch-rows", "8",
                       "--batch-wait-ms", "150", *extra_args, log_path=log_path, env=server_env(), ready_timeout_s=180.0)
  with proc:
    yield proc


@pytest.fixture(scope="session")
def server(qwen2_dir, tmp_path_factory):
  """One server for the serving and client tests."""
  with served(qwen2_dir, str(tmp_path_factory.mktemp("server") / "server.log")) as proc:
    yield proc
