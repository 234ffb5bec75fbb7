"""One completion interface, two backends: the in-process model or an OpenAI-compatible endpoint.

Research code (METASCALE's meta-thought sampling, UniMedAbstractor's extraction,
ICL studies) calls `client.chat(messages, n=..., logprobs=...)` and does not care
whether the model runs here (`LocalClient`) or behind vLLM / Azure OpenAI
(`OpenAIClient`). Switch with the config; the results have the same shape.

Patient data rules, enforced here rather than left to callers:
* the remote backend has **no default endpoint**: it sends only to a base URL the
  user configured (argument, config or MLX_MED_LLM_BASE_URL), never to a vendor's
  public API by accident (the openai package's own OPENAI_BASE_URL is ignored);
* plain `http://` is refused for non-loopback hosts unless `allow_insecure_http`;
* prompt and completion contents are never logged (only sizes, counts, latency),
  and debug records from the HTTP stack that could carry bodies are dropped.
Timeouts and a bounded number of retries (with backoff, for connection errors, 408,
409, 429 and 5xx) come from the official `openai` client.

Images go in OpenAI's content parts, for both backends (a `LocalClient` over a
vision-language model, or any OpenAI-compatible multimodal endpoint such as
`mlx-med serve` with a VLM)::

  from mlx_med.vlm.messages import image_part
  client.chat([{"role": "user", "content": [image_part("xray.png"),
                                            {"type": "text", "text": "Any fracture? Answer yes or no."}]}],
              max_tokens=8, temperature=0.0)

`image_part` embeds the image as a data: URL, the form every backend accepts.

Structured output and tools, alike on both backends (OpenAI's shapes)::

  client.chat(messages, response_format={"type": "json_schema", "json_schema": {"name": "finding",
                                          "schema": {...}, "strict": True}})
  outs = client.chat(messages, tools=[{"type": "function", "function": {"name": ..., "parameters": {...}}}],
                     tool_choice="required")
  outs[0].tool_calls   # [{"id", "type": "function", "function": {"name", "arguments": "<json>"}}]
  client.embed(["text one", "text two"])   # [2, D] float32, unit rows

`LocalClient` decodes JSON schemas and forced tool calls under the same grammar masks
as `mlx-med serve` (`mlx_med.llm.grammar`), through a `ContinuousEngine` it starts on
first use, so threads calling it at once share one running batch.
"""

from __future__ import annotations

import abc
import dataclasses
import ipaddress
import logging
import os
import threading
import time
from typing import Any, Mapping, Optional, Sequence, Union
from urllib.parse import urlparse

import numpy as np

logger = logging.getLogger("mlx_med.llm.client")

ENV_BASE_URL = "MLX_MED_LLM_BASE_URL"
ENV_API_KEY = "MLX_MED_LLM_API_KEY"
ENV_MODEL = "MLX_MED_LLM_MODEL"

Messages = Sequence[Mapping[str, Any]]


@dataclasses.dataclass
class Completion:
  """One sampled completion, identical in shape for both backends.

  tokens / token_logprobs / top_logprobs are filled when logprobs were requested:
  the text of each generated token, its log-probability and the most likely
  alternatives ({token text: logprob}).
  """

  text: str
  finish_reason: str
  tokens: Optional[list[str]] = None
  token_logprobs: Optional[list[float]] = None
  top_logprobs: Optional[list[dict[str, float]]] = None
  prompt_tokens: Optional[int] = None
  completion_tokens: Optional[int] = None
  tool_calls: Optional[list[dict]] = None  # [{"id", "type": "function", "function": {"name", "arguments": str}}]


class LLMClient(abc.ABC):
  """Text and chat completion with n samples and optional logprobs."""

  @abc.abstractmethod
  def complete(self, prompt: str, *, max_tokens: int = 256, temperature: Optional[float] = None,
               top_p: Optional[float] = None, n: int = 1, stop: Union[None, str, Sequence[str]] = None,
               seed: Optional[int] = None, logprobs: Optional[int] = None) -> list[Completion]:
    """Continues `prompt`; `logprobs` = number of alternatives per token (0 = only the chosen one)."""

  @abc.abstractmethod
  def chat(self, messages: Messages, *, max_tokens: int = 256, temperature: Optional[float] = None,
           top_p: Optional[float] = None, n: int = 1, stop: Union[None, str, Sequence[str]] = None,
           seed: Optional[int] = None, logprobs: Optional[int] = None,
           response_format: Optional[Mapping[str, Any]] = None, tools: Optional[Sequence[Mapping[str, Any]]] = None,
           tool_choice: Union[None, str, Mapping[str, Any]] = None) -> list[Completion]:
    """Answers a conversation (through the model's chat template); same knobs as `complete`,
    plus OpenAI's response_format (text | json_object | json_schema), tools and tool_choice
    (none | auto | required | {"type": "function", "function": {"name"}})."""

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    """Embeddings [N, D] float32 with unit rows."""
    raise NotImplementedError(f"{type(self).__name__} does not provide embeddings")

  @property
  def model_name(self) -> str:
    return getattr(self, "model", None) or type(self).__name__

  def close(self) -> None:
    pass


def _log_call(backend: str, kind: str, n: int, started: float, outs: list[Completion]) -> None:
  # Sizes and timing only: never the prompt or the completion text.
  tokens = sum(o.completion_tokens or 0 for o in outs)
  logger.info("%s %s: n=%d, %d completion tokens, %.2fs", backend, kind, n, tokens, time.monotonic() - started)


def _has_images(messages: Messages) -> bool:
  return any(isinstance(m, Mapping) and isinstance(m.get("content"), list)
             and any(isinstance(p, Mapping) and p.get("type") in ("image_url", "image") for p in m["content"])
             for m in messages)


class LocalClient(LLMClient):
  """Runs a `LocalLM` or a `LocalVLM` (mlx_med.vlm.local) in this process (the data never leaves it).

  A model directory is loaded as a VLM when its config.json describes one. Chat
  messages for a VLM may hold `image_url` parts (data: URLs; local paths only under the
  model's `allowed_local_media_path`).

  A text model generates through a `ContinuousEngine` (started on first use, stopped by
  `close`): calls from many threads join one running batch, and response_format / forced
  tool calls are decoded under grammar masks. A VLM generates with the static sampler
  (no grammar constraints).
  """

  def __init__(self, model: Any, *, max_num_seqs: int = 32, chunk_size: int = 16, **load_kwargs):
    if isinstance(model, str):
      from mlx_med.vlm.local import LocalVLM, is_vlm_dir

      if is_vlm_dir(model):
        model = LocalVLM.from_pretrained(model, **load_kwargs)
      else:
        from mlx_med.llm.model import LocalLM
        model = LocalLM.from_pretrained(model, **load_kwargs)
    self.lm = model
    self.max_num_seqs = int(max_num_seqs)
    self.chunk_size = int(chunk_size)
    self._engine = None
    self._engine_lock = threading.Lock()

  @property
  def model_name(self) -> str:
    return getattr(self.lm, "name", "local")

  @property
  def engine(self):
    """The continuous-batching engine over the model (created and started on first use)."""
    with self._engine_lock:
      if self._engine is None:
        from mlx_med.llm.engine import ContinuousEngine

        self._engine = ContinuousEngine(self.lm, max_num_seqs=self.max_num_seqs, chunk_size=self.chunk_size)
        self._engine.start()
      return self._engine

  def _generate(self, rows: list[list[int]], sampling: list, constraints: Optional[list], images) -> list:
    from mlx_med.llm.model import Generation

    if getattr(self.lm, "is_multimodal", False):
      if constraints is not None:
        raise ValueError(f"model {self.model_name!r} is a vision-language model, which generates without grammar "
                         "constraints; drop response_format / the forced tool_choice")
      return self.lm.generate_tokens(rows, sampling, images=images) if images else self.lm.generate_tokens(rows,
                                                                                                            sampling)
    outs = []
    for start in range(0, len(rows), self.max_num_seqs):  # n above the engine's slots: in turns
      part = slice(start, start + self.max_num_seqs)
      outs += self.engine.generate(rows[part], sampling[part],
                                   constraints=None if constraints is None else constraints[part])
    return [Generation.from_sample(o) for o in outs]

  def _run(self, prompts: list[list[int]], n: int, kind: str, images: Optional[list] = None,
           constraint: Any = None, tools: Optional[list] = None, **knobs) -> list[Completion]:
    started = time.monotonic()
    top = knobs.pop("logprobs")
    rows, sampling = [], []
    for j in range(n):
      seed = knobs.get("seed")
      sp = self.lm.sampling_params(**{**knobs, "seed": None if seed is None else seed + 7919 * j},
                                   logprobs=top or 0)
      rows.append(prompts[0])
      sampling.append(sp)
    constraints = None if constraint is None else [constraint.copy() for _ in range(n)]
    gens = self._generate(rows, sampling, constraints, [images] * n if images else None)
    tok = self.lm.tokenizer
    outs = []
    for g in gens:
      c = Completion(text=g.text, finish_reason=g.finish_reason, prompt_tokens=len(g.prompt_token_ids),
                     completion_tokens=len(g.token_ids))
      if top is not None:
        c.tokens = [tok.token_text(t) for t in g.token_ids]
        c.token_logprobs = list(g.logprobs)
        if g.top_logprobs is not None:
          c.top_logprobs = [{tok.token_text(i): lp for i, lp in alts} for alts in g.top_logprobs]
      if tools:
        from mlx_med.llm.grammar import parse_tool_calls

        content, calls = parse_tool_calls(g.text, tools)
        if calls:
          c.text, c.tool_calls, c.finish_reason = content or "", calls, "tool_calls"
      outs.append(c)
    _log_call("local", kind, n, started, outs)
    return outs

  def complete(self, prompt, *, max_tokens=256, temperature=None, top_p=None, n=1, stop=None, seed=None,
               logprobs=None):
    return self._run([self.lm.encode_prompt(prompt)], n, "completion", max_tokens=max_tokens,
                     temperature=temperature, top_p=top_p, stop=stop, seed=seed, logprobs=logprobs)

  def chat(self, messages, *, max_tokens=256, temperature=None, top_p=None, n=1, stop=None, seed=None,
           logprobs=None, response_format=None, tools=None, tool_choice=None):
    from mlx_med.llm import grammar as grammar_lib

    clean_tools = grammar_lib.validate_tools(list(tools)) if tools is not None else []
    choice = grammar_lib.resolve_tool_choice(tool_choice, clean_tools)
    tools_on = clean_tools if choice != "none" else None
    constraint = None
    if choice not in ("none", "auto"):
      constraint = grammar_lib.constraint_for_tools(clean_tools, choice, self.lm.tokenizer, self.lm.cfg.vocab_size)
    elif response_format is not None:
      constraint = grammar_lib.constraint_for_response_format(response_format, self.lm.tokenizer,
                                                              self.lm.cfg.vocab_size)
    images = None
    if getattr(self.lm, "is_multimodal", False):
      ids, images = self.lm.prepare_chat(messages)
    elif _has_images(messages):
      raise ValueError(f"model {getattr(self.lm, 'name', '')!r} is a text-only model and cannot take images; "
                       "load a vision-language model directory (LLaVA, Qwen2.5-VL) or send text only")
    else:
      msgs, template_kwargs = grammar_lib.chat_with_tools(list(messages), clean_tools or None,
                                                          getattr(self.lm.tokenizer.hf, "chat_template", None))
      ids = self.lm.encode_chat(msgs, **template_kwargs)
    return self._run([ids], n, "chat", images=images, constraint=constraint, tools=tools_on, max_tokens=max_tokens,
                     temperature=temperature, top_p=top_p, stop=stop, seed=seed, logprobs=logprobs)

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    """Mean-pooled final hidden states of each text, L2-normalised (`LocalLM.embed`)."""
    if isinstance(texts, str):
      raise ValueError("embed takes a list of texts; wrap a single text as [text]")
    started = time.monotonic()
    out = self.lm.embed([self.lm.encode_prompt(t) for t in texts])
    logger.info("local embed: %d texts, %.2fs", len(texts), time.monotonic() - started)
    return out

  def close(self) -> None:
    with self._engine_lock:
      engine, self._engine = self._engine, None
    if engine is not None:
      engine.stop()


class _DropBodies(logging.Filter):
  """Drops HTTP-stack debug records that could carry request bodies (defence in depth)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno > logging.DEBUG:
      return True
    message = str(record.msg)
    return not any(word in message for word in ("Request options", "json_data", "content", "body"))


_FILTER = _DropBodies()


def _check_endpoint(base_url: str, allow_insecure_http: bool) -> None:
  parsed = urlparse(base_url)
  if parsed.scheme not in ("http", "https") or not parsed.hostname:
    raise ValueError(f"base_url {base_url!r} must be an http(s) URL such as https://host/v1")
  if parsed.scheme == "http" and not allow_insecure_http:
    host = parsed.hostname
    try:
      loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
      loopback = host == "localhost"
    if not loopback:
      raise ValueError(f"refusing plain http to {host}: patient data would cross the network unencrypted; "
                       "use https or set allow_insecure_http=True for a trusted network")


class OpenAIClient(LLMClient):
  """Any OpenAI-compatible endpoint: vLLM, `mlx-med serve`, Azure OpenAI (`azure_api_version`).

  Chat messages are sent as given, image_url content parts included (OpenAI's format).
  """

  def __init__(self, model: Optional[str] = None, *, base_url: Optional[str] = None, api_key: Optional[str] = None,
               timeout: float = 60.0, max_retries: int = 2, azure_api_version: Optional[str] = None,
               allow_insecure_http: bool = False):
    import openai

    base_url = base_url or os.environ.get(ENV_BASE_URL)
    if not base_url:
      raise ValueError(f"no endpoint configured: pass base_url or set {ENV_BASE_URL} "
                       "(there is deliberately no default, so data only goes where you say)")
    _check_endpoint(base_url, allow_insecure_http)
    model = model or os.environ.get(ENV_MODEL)
    if not model:
      raise ValueError(f"no model name: pass model or set {ENV_MODEL}")
    if max_retries < 0 or max_retries > 10:
      raise ValueError("max_retries must be in [0, 10]")
    api_key = api_key or os.environ.get(ENV_API_KEY) or "EMPTY"  # vLLM without --api-key accepts any key
    self.model = model
    self.base_url = base_url
    if azure_api_version:
      self._client = openai.AzureOpenAI(azure_endpoint=base_url, api_version=azure_api_version, api_key=api_key,
                                        timeout=timeout, max_retries=max_retries)
    else:
      self._client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries)
    for name in ("openai", "httpx", "httpx2", "httpcore"):
      log = logging.getLogger(name)
      if _FILTER not in log.filters:
        log.addFilter(_FILTER)

  @staticmethod
  def _common(max_tokens, temperature, top_p, n, stop, seed) -> dict:
    args: dict[str, Any] = {"max_tokens": max_tokens, "n": n}
    for key, value in (("temperature", temperature), ("top_p", top_p), ("stop", stop), ("seed", seed)):
      if value is not None:
        args[key] = list(value) if key == "stop" and not isinstance(value, str) else value
    return args

  def complete(self, prompt, *, max_tokens=256, temperature=None, top_p=None, n=1, stop=None, seed=None,
               logprobs=None):
    started = time.monotonic()
    args = self._common(max_tokens, temperature, top_p, n, stop, seed)
    if logprobs is not None:
      args["logprobs"] = logprobs
    resp = self._client.completions.create(model=self.model, prompt=prompt, **args)
    usage = resp.usage
    outs = []
    for choice in sorted(resp.choices, key=lambda c: c.index):
      c = Completion(text=choice.text, finish_reason=choice.finish_reason,
                     prompt_tokens=usage.prompt_tokens if usage else None)
      if choice.logprobs is not None and logprobs is not None:
        c.tokens = list(choice.logprobs.tokens or [])
        c.token_logprobs = list(choice.logprobs.token_logprobs or [])
        c.top_logprobs = [dict(t) for t in choice.logprobs.top_logprobs] if choice.logprobs.top_logprobs else None
        c.completion_tokens = len(c.tokens)
      outs.append(c)
    self._split_usage(outs, usage)
    _log_call("remote", "completion", n, started, outs)
    return outs

  def chat(self, messages, *, max_tokens=256, temperature=None, top_p=None, n=1, stop=None, seed=None,
           logprobs=None, response_format=None, tools=None, tool_choice=None):
    started = time.monotonic()
    args = self._common(max_tokens, temperature, top_p, n, stop, seed)
    if logprobs is not None:
      args["logprobs"] = True
      if logprobs:
        args["top_logprobs"] = logprobs
    for key, value in (("response_format", response_format), ("tools", tools), ("tool_choice", tool_choice)):
      if value is not None:
        args[key] = list(value) if key == "tools" else value
    resp = self._client.chat.completions.create(model=self.model, messages=list(messages), **args)
    usage = resp.usage
    outs = []
    for choice in sorted(resp.choices, key=lambda c: c.index):
      c = Completion(text=choice.message.content or "", finish_reason=choice.finish_reason,
                     prompt_tokens=usage.prompt_tokens if usage else None)
      if choice.message.tool_calls:
        c.tool_calls = [{"id": t.id, "type": "function",
                         "function": {"name": t.function.name, "arguments": t.function.arguments}}
                        for t in choice.message.tool_calls]
      if logprobs is not None and choice.logprobs is not None and choice.logprobs.content is not None:
        content = choice.logprobs.content
        c.tokens = [t.token for t in content]
        c.token_logprobs = [t.logprob for t in content]
        if logprobs:
          c.top_logprobs = [{a.token: a.logprob for a in t.top_logprobs} for t in content]
        c.completion_tokens = len(content)
      outs.append(c)
    self._split_usage(outs, usage)
    _log_call("remote", "chat", n, started, outs)
    return outs

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    """POST /v1/embeddings; rows returned in input order, L2-normalised."""
    if isinstance(texts, str):
      raise ValueError("embed takes a list of texts; wrap a single text as [text]")
    started = time.monotonic()
    resp = self._client.embeddings.create(model=self.model, input=list(texts), encoding_format="float")
    rows = np.asarray([d.embedding for d in sorted(resp.data, key=lambda d: d.index)], np.float32)
    rows = rows.reshape(len(texts), -1)
    rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    logger.info("remote embed: %d texts, %.2fs", len(texts), time.monotonic() - started)
    return rows

  @property
  def model_name(self) -> str:
    return self.model

  @staticmethod
  def _split_usage(outs: list[Completion], usage) -> None:
    if usage is not None and outs and all(o.completion_tokens is None for o in outs) and len(outs) == 1:
      outs[0].completion_tokens = usage.completion_tokens

  def close(self) -> None:
    self._client.close()


def make_client(config: Mapping[str, Any]) -> LLMClient:
  """A client from a config section, e.g. (ml_collections or dict)::

    {"backend": "local", "model": "/models/Qwen2.5-3B-Instruct", "dtype": "bfloat16"}
    {"backend": "openai", "model": "qwen2.5-7b", "base_url": "http://127.0.0.1:8000/v1",
     "api_key_env": "MY_KEY_VAR", "timeout": 60, "max_retries": 2}
    {"backend": "azure", "model": "<deployment>", "base_url": "https://<res>.openai.azure.com",
     "api_version": "2024-10-21", "api_key_env": "AZURE_OPENAI_API_KEY"}

  Keys are read from the named environment variable, so configs never hold secrets.
  """
  cfg = dict(config)
  backend = cfg.pop("backend", "local")
  known = {"local": {"model", "dtype", "mesh_shape", "max_seq_len", "max_num_seqs"},
           "openai": {"model", "base_url", "api_key_env", "timeout", "max_retries", "allow_insecure_http"},
           "azure": {"model", "base_url", "api_key_env", "timeout", "max_retries", "api_version",
                     "allow_insecure_http"}}
  if backend not in known:
    raise ValueError(f"client backend {backend!r} is unknown; choose one of {sorted(known)}")
  unknown = sorted(set(cfg) - known[backend])
  if unknown:
    raise ValueError(f"client config for backend {backend!r} has unknown keys {unknown}; known: "
                     f"{sorted(known[backend])}")
  if backend == "local":
    model = cfg.pop("model", None)
    if not model:
      raise ValueError("local client config needs 'model' (a Hugging Face model directory)")
    return LocalClient(model, **cfg)
  if backend == "azure" and not cfg.get("api_version"):
    raise ValueError("azure client config needs 'api_version' (e.g. '2024-10-21')")
  key_env = cfg.pop("api_key_env", None)
  api_key = os.environ.get(key_env) if key_env else None
  if key_env and api_key is None:
    raise ValueError(f"environment variable {key_env} (api_key_env) is not set")
  return OpenAIClient(cfg.pop("model", None), base_url=cfg.pop("base_url", None), api_key=api_key,
                      timeout=float(cfg.pop("timeout", 60.0)), max_retries=int(cfg.pop("max_retries", 2)),
                      azure_api_version=cfg.pop("api_version", None) if backend == "azure" else None,
                      allow_insecure_http=bool(cfg.pop("allow_insecure_http", False)))
