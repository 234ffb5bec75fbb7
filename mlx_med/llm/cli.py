"""`mlx-med serve`: the LLM piece of the project CLI.

The project's `mlx_med/cli.py` owns the argparse main; it calls `register(sub)` with
its sub-parsers, and runs `args.func(args)` for the chosen command.
"""

from __future__ import annotations

import argparse

from mlx_med.llm import serve


def register(subparsers: "argparse._SubParsersAction") -> None:
  """Adds `serve` (OpenAI-compatible HTTP server for a local Hugging Face model directory)."""
  parser = subparsers.add_parser(
      "serve", help="serve a local Hugging Face model over an OpenAI-compatible HTTP API",
      description="Serve a local Hugging Face model directory (config.json + safetensors + tokenizer) at "
                  "/v1/models, /v1/completions and /v1/chat/completions. Binds 127.0.0.1 by default.")
  serve.add_serve_arguments(parser)
  parser.set_defaults(func=serve.run_server)
