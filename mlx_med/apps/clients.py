"""One way for every `mlx-med apps` command to say which LLM it talks to.

  --model DIR                      the model in this process (LocalClient: continuous batching,
                                   constrained decoding, embeddings; nothing leaves the machine)
  --base-url URL [--model-name M]  any OpenAI-compatible endpoint: `mlx-med serve`, vLLM, Azure
                                   OpenAI (--azure-api-version); the key is read from the
                                   environment variable named by --api-key-env, never a flag

Patient text goes only where the user pointed: there is no default endpoint (see
`mlx_med.llm.client`). With --run-dir every call is logged by `LoggedClient` (hashes, token
counts, latency and cost; the text only with --log-text).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Optional


def add_client_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> argparse.ArgumentParser:
  g = parser.add_argument_group("model (one of --model or --base-url)")
  g.add_argument("--model", default=None, help="a local Hugging Face model directory (run in this process)")
  g.add_argument("--base-url", default=None, help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
  g.add_argument("--model-name", default=None, help="the model (or Azure deployment) name at --base-url "
                 "(default: the first the endpoint lists)")
  g.add_argument("--api-key-env", default=None, help="environment variable holding the endpoint's API key")
  g.add_argument("--azure-api-version", default=None, help="talk to Azure OpenAI with this API version")
  g.add_argument("--allow-insecure-http", action="store_true",
                 help="allow plain http:// to a non-loopback host (patient text would cross the network unencrypted)")
  g.add_argument("--log-text", action="store_true",
                 help="also write prompts and completions to the call log (off: only hashes and counts)")
  parser.set_defaults(_client_required=required)
  return parser


def client_config(args: argparse.Namespace) -> Optional[dict[str, Any]]:
  """The `make_client` config the arguments describe (None when neither --model nor --base-url)."""
  if args.model and args.base_url:
    raise ValueError("give either --model (a local directory) or --base-url (an endpoint), not both")
  if args.model:
    if not os.path.isdir(args.model):
      raise FileNotFoundError(f"--model {args.model!r} is not a directory; give a Hugging Face model directory "
                              "(or --base-url for a served model)")
    return {"backend": "local", "model": args.model}
  if args.base_url:
    cfg: dict[str, Any] = {"backend": "azure" if args.azure_api_version else "openai", "base_url": args.base_url,
                           "allow_insecure_http": bool(args.allow_insecure_http)}
    if args.model_name:
      cfg["model"] = args.model_name
    if args.api_key_env:
      cfg["api_key_env"] = args.api_key_env
    if args.azure_api_version:
      cfg["api_version"] = args.azure_api_version
    return cfg
  if getattr(args, "_client_required", True):
    raise ValueError("no model given: pass --model DIR (a local model) or --base-url URL (a served one)")
  return None


def client_from_args(args: argparse.Namespace, run_dir: Optional[str] = None, *, tag: str = ""):
  """The client for the arguments, wrapped in a call logger writing to `run_dir` when given."""
  from mlx_med.llm.client import make_client

  cfg = client_config(args)
  if cfg is None:
    return None
  client = make_client(cfg)
  if run_dir:
    from mlx_med.apps.calllog import LoggedClient

    client = LoggedClient(client, run_dir, log_text=bool(args.log_text), tag=tag)
  return client
