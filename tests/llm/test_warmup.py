"""`mlx-med serve --warmup` (the default) compiles the common request shapes before serving."""

import logging

from mlx_med.core import sampler as sampler_lib
from mlx_med.llm import serve


def _compiles() -> int:
  return sampler_lib._prefill._cache_size() + sampler_lib._decode._cache_size()


def test_warm_up_compiles_the_shapes_of_short_requests(local_lm, caplog):
  # local_lm pads batches to >= 8 rows and prompts to >= 32 tokens; with up to 16
  # rows per batch the warm-up covers the 8- and 16-row buckets.
  caplog.set_level(logging.INFO, logger="mlx_med.llm.serve")
  engine = serve.BatchingEngine(local_lm, max_batch_rows=16, chunk_size=16)
  assert engine.warm_up() == 2
  assert any("warm-up: compiling 2 shape(s) (batch rows 8,16" in r.getMessage() for r in caplog.records)
  assert any("warm-up done in" in r.getMessage() for r in caplog.records)
  before = _compiles()
  # Requests of those shapes, in the model's default sampling mode, streamed or not:
  # nothing left to compile.
  sampling = local_lm.sampling_params(max_tokens=5)
  local_lm.generate_tokens([local_lm.encode_prompt("hello world")] * 3, sampling)
  for _ in local_lm.stream_tokens([[5, 6, 7]] * 11, sampling, chunk_size=16):
    pass
  assert _compiles() == before


def test_serve_cli_warmup_flag():
  import argparse

  parser = serve.add_serve_arguments(argparse.ArgumentParser())
  assert parser.parse_args(["--model", "m"]).warmup is True
  assert parser.parse_args(["--model", "m", "--no-warmup"]).warmup is False


def test_server_logs_its_warm_up(server):
  log = server.log_tail(100_000)
  assert "shape(s) (batch rows 8, prompt buckets 32," in log and "warm-up done in" in log
