"""`LocalLM`: a Hugging Face model directory loaded into mlx_med, ready to generate.

Bundles the decoder config, the (optionally sharded) parameters, the tokenizer with
its chat template and a `Sampler`, and turns user-level requests (text prompts or
chat messages, OpenAI-style sampling knobs) into token-level sampler calls.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from mlx_med.core import sharding as sharding_lib
from mlx_med.core.sampler import SampleOutput, Sampler, SamplingParams, StreamUpdate
from mlx_med.core.transformer import Decoder, DecoderConfig, layers_are_stacked, unstack_layers
from mlx_med.llm import checkpoint as checkpoint_lib
from mlx_med.llm import hf_config as hf_config_lib
from mlx_med.llm.tokenizer import ChatTokenizer

Prompt = Union[str, Sequence[int]]


@dataclasses.dataclass
class Generation:
  """One completion. `token_ids` include a stop token that ended it; `text` does not."""

  text: str
  token_ids: list[int]
  logprobs: list[float]
  finish_reason: str
  stop_reason: Any
  prompt_token_ids: list[int]
  top_logprobs: Optional[list[list[tuple[int, float]]]] = None
  forced: list[bool] = dataclasses.field(default_factory=list)

  @classmethod
  def from_sample(cls, out: SampleOutput) -> "Generation":
    return cls(text=out.text or "", token_ids=out.tokens, logprobs=out.logprobs, finish_reason=out.finish_reason,
               stop_reason=out.stop_reason, prompt_token_ids=out.prompt_tokens, top_logprobs=out.top_logprobs,
               forced=out.forced)


def _mean_pooled(cfg: DecoderConfig, rules, params, tokens, lengths, *, normalize: bool):
  """Right-padded tokens [B, T] and real lengths [B] -> mean final hidden state [B, E] (fp32).
  Padding is its own segment (0), so real tokens never attend to it; pad rows (length 0)
  give zeros."""
  real = (jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :] < lengths[:, None]).astype(jnp.int32)
  _, hidden = Decoder(cfg, rules).apply({"params": params}, tokens, segment_ids=real, return_hidden=True)
  weights = real.astype(jnp.float32)[..., None]
  pooled = (hidden.astype(jnp.float32) * weights).sum(axis=1) / jnp.maximum(lengths, 1).astype(jnp.float32)[:, None]
  if normalize:
    pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
  return pooled


class LocalLM:
  """An in-process LLM: `LocalLM.from_pretrained(dir).chat([[{"role": "user", ...}]])`."""

  def __init__(self, cfg: DecoderConfig, params: Any, tokenizer: Optional[ChatTokenizer], *,
               hf_config: Optional[dict] = None, rules: Optional[sharding_lib.ShardingRules] = None,
               name: str = "local", cache_dtype: Optional[str] = None, **bucket_options):
    self.cfg = cfg
    if not cfg.scan_layers and layers_are_stacked(params):
      params = unstack_layers(params, cfg.num_layers)
    elif cfg.scan_layers and not layers_are_stacked(params):
      raise ValueError("cfg.scan_layers is True but the parameters are per-layer (layers_0, ...); "
                       "use mlx_med.core.transformer.stack_layers or a config with scan_layers=False")
    self.params = params
    self.tokenizer = tokenizer
    self.hf_config = hf_config or {}
    self.rules = rules
    self.name = name
    pad = tokenizer.pad_token_id if tokenizer is not None else 0
    if pad >= cfg.vocab_size:
      pad = 0
    # bucket_options: min_prompt_bucket / min_new_bucket / min_batch_bucket of `Sampler`.
    self.sampler = Sampler(cfg, rules, pad_id=pad, cache_dtype=cache_dtype, **bucket_options)
    self._forward = jax.jit(lambda p, t, pos, seg: Decoder(cfg, rules).apply({"params": p}, t, positions=pos,
                                                                              segment_ids=seg))
    self._embed_fn = jax.jit(functools.partial(_mean_pooled, cfg, rules), static_argnames=("normalize",))

  @classmethod
  def from_pretrained(cls, model_dir: str, *, dtype: str = "float32", param_dtype: Optional[str] = None,
                      mesh_shape: Optional[Mapping[str, int]] = None, max_seq_len: Optional[int] = None,
                      attention_backend: str = "xla", name: Optional[str] = None,
                      cache_dtype: Optional[str] = None, scan_layers: bool = False,
                      **bucket_options) -> "LocalLM":
    """Loads config, weights (sharded over `mesh_shape` when given) and tokenizer from a local directory.

    scan_layers=False (the default here) keeps one parameter tree and KV cache per
    layer, the fast layout for generation (see `DecoderConfig.scan_layers`).
    """
    if not os.path.isdir(model_dir):
      raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
    hf = hf_config_lib.read_hf_config(model_dir)
    cfg = hf_config_lib.decoder_config_from_hf(hf, dtype=dtype, param_dtype=param_dtype, max_seq_len=max_seq_len,
                                               attention_backend=attention_backend, scan_layers=scan_layers)
    rules = None
    if mesh_shape is not None:
      rules = sharding_lib.ShardingRules(sharding_lib.make_mesh(dict(mesh_shape)))
    params = checkpoint_lib.load_hf_params(model_dir, cfg, rules)
    tokenizer = ChatTokenizer.from_dir(model_dir)
    return cls(cfg, params, tokenizer, hf_config=hf, rules=rules,
               name=name or os.path.basename(os.path.normpath(model_dir)), cache_dtype=cache_dtype, **bucket_options)

  # ---- requests -> sampler inputs

  def sampling_params(self, *, max_tokens: int = 16, temperature: Optional[float] = None,
                      top_p: Optional[float] = None, top_k: Optional[int] = None, min_p: Optional[float] = None,
                      stop: Union[None, str, Sequence[str]] = None, stop_token_ids: Sequence[int] = (),
                      seed: Optional[int] = None, logprobs: int = 0, ignore_eos: bool = False,
                      include_stop_str_in_output: bool = False, think_budget: Optional[int] = None,
                      think_close: str = "</think>", presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                      repetition_penalty: Optional[float] = None) -> SamplingParams:
    """OpenAI-style knobs -> `SamplingParams`. Unset knobs (temperature, top_p, top_k, min_p,
    repetition_penalty) take generation_config.json's defaults, as vLLM does, then OpenAI's
    (temperature 1, top_p 1); eos ids stop unless ignore_eos."""
    defaults = self.tokenizer.generation_config if self.tokenizer is not None else {}

    def pick(value, key, fallback):
      if value is not None:
        return value
      if defaults.get(key) is not None:
        return defaults[key]
      return fallback

    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    stop_ids = tuple(stop_token_ids)
    if not ignore_eos and self.tokenizer is not None:
      stop_ids = stop_ids + tuple(i for i in self.tokenizer.eos_token_ids if i not in stop_ids)
    close_ids: tuple[int, ...] = ()
    if think_budget is not None:
      if self.tokenizer is None:
        raise ValueError("think_budget needs a tokenizer to encode the closing tag")
      close_ids = self.tokenizer.token_ids_of(think_close)
    top_k_value = pick(top_k, "top_k", 0)
    return SamplingParams(
        max_new_tokens=int(max_tokens), temperature=float(pick(temperature, "temperature", 1.0)),
        top_k=max(0, int(top_k_value)), top_p=float(pick(top_p, "top_p", 1.0)), min_p=float(pick(min_p, "min_p", 0.0)),
        stop_token_ids=stop_ids, stop_strings=stops, include_stop_str_in_output=include_stop_str_in_output,
        seed=seed, num_top_logprobs=int(logprobs or 0), think_budget=think_budget, think_close_ids=close_ids,
        presence_penalty=float(presence_penalty or 0.0), frequency_penalty=float(frequency_penalty or 0.0),
        repetition_penalty=float(pick(repetition_penalty, "repetition_penalty", 1.0)))

  def encode_prompt(self, prompt: Prompt) -> list[int]:
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise ValueError("text prompts need a tokenizer")
      return self.tokenizer.encode(prompt)
    return [int(t) for t in prompt]

  def encode_chat(self, messages: Sequence[Mapping[str, Any]], **template_kwargs) -> list[int]:
    if self.tokenizer is None:
      raise ValueError("chat needs a tokenizer")
    return self.tokenizer.encode_chat(list(messages), **template_kwargs)

  def detokenize(self, ids: list[int]) -> str:
    return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

  # ---- generation

  def generate_tokens(self, prompts: Sequence[Sequence[int]],
                      sampling: Union[SamplingParams, Sequence[SamplingParams]]) -> list[Generation]:
    detok = self.detokenize if self.tokenizer is not None else None
    outs = self.sampler.generate(self.params, prompts, sampling, detokenize=detok)
    return [Generation.from_sample(o) for o in outs]

  def stream_tokens(self, prompts: Sequence[Sequence[int]], sampling: Union[SamplingParams, Sequence[SamplingParams]],
                    chunk_size: int = 16) -> Iterator[list[StreamUpdate]]:
    detok = self.detokenize if self.tokenizer is not None else None
    return self.sampler.stream(self.params, prompts, sampling, detokenize=detok, chunk_size=chunk_size)

  def generate(self, prompts: Sequence[Prompt], sampling: Optional[SamplingParams] = None, **knobs) -> list[Generation]:
    """Completes text (or token-id) prompts. `knobs` are `sampling_params` arguments."""
    sampling = sampling or self.sampling_params(**knobs)
    return self.generate_tokens([self.encode_prompt(p) for p in prompts], sampling)

  def chat(self, conversations: Sequence[Sequence[Mapping[str, Any]]], sampling: Optional[SamplingParams] = None,
           **knobs) -> list[Generation]:
    """Answers chat conversations (lists of {"role", "content"}) through the model's chat template."""
    sampling = sampling or self.sampling_params(**knobs)
    return self.generate_tokens([self.encode_chat(c) for c in conversations], sampling)

  def logits(self, prompts: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """fp32 next-token logits [len, V] for each token prompt (left-padded batch, one call)."""
    length = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), length), self.sampler.pad_id, np.int32)
    segments = np.zeros_like(tokens)
    positions = np.zeros_like(tokens)
    for i, p in enumerate(prompts):
      tokens[i, length - len(p):] = p
      segments[i, length - len(p):] = 1
      positions[i, length - len(p):] = np.arange(len(p))
    out = np.asarray(self._forward(self.params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments)))
    return [out[i, length - len(p):] for i, p in enumerate(prompts)]

  def embed(self, prompts: Sequence[Sequence[int]], *, normalize: bool = True, max_batch: int = 64) -> np.ndarray:
    """Sentence embeddings [N, d_model] float32 of token prompts: the mean of the final-norm
    hidden states (the last layer's output after the model's final RMSNorm, what HF calls
    `last_hidden_state`) over each prompt's own tokens, L2-normalised when `normalize`.

    Prompts are right-padded into power-of-two buckets (rows and length, as the sampler's)
    so a few compiled programs serve every request; padding never enters a mean. At most
    `max_batch` rows go through the model at once.
    """
    if not prompts:
      return np.zeros((0, self.cfg.d_model), np.float32)
    from mlx_med.core.sampler import bucket

    rows = [[int(t) for t in p] for p in prompts]
    for i, p in enumerate(rows):
      if not p:
        raise ValueError(f"prompt {i} is empty; every text to embed needs at least one token")
      if len(p) > self.cfg.max_seq_len:
        raise ValueError(f"prompt {i} has {len(p)} tokens, more than the model's context of {self.cfg.max_seq_len}; "
                         "split the text into shorter chunks")
      if min(p) < 0 or max(p) >= self.cfg.vocab_size:
        raise ValueError(f"prompt {i} holds token ids outside [0, {self.cfg.vocab_size})")
    multiple = self.sampler._batch_multiple()
    out = []
    for start in range(0, len(rows), max_batch):
      chunk = rows[start:start + max_batch]
      batch = bucket(len(chunk), minimum=self.sampler.min_batch_bucket)
      batch = -(-batch // multiple) * multiple
      length = bucket(max(len(p) for p in chunk), minimum=self.sampler.min_prompt_bucket,
                      maximum=self.cfg.max_seq_len)
      tokens = np.full((batch, length), self.sampler.pad_id, np.int32)
      lengths = np.zeros((batch,), np.int32)
      for i, p in enumerate(chunk):
        tokens[i, :len(p)] = p
        lengths[i] = len(p)
      pooled = self._embed_fn(self.params, jnp.asarray(tokens), jnp.asarray(lengths), normalize=normalize)
      out.append(np.asarray(pooled, np.float32)[:len(chunk)])
    return np.concatenate(out, axis=0)

  def save_pretrained(self, out_dir: str, *, dtype: Optional[str] = None, max_shard_size: int | str = "5GB",
                      copy_files_from: Optional[str] = None, overwrite: bool = False) -> str:
    return checkpoint_lib.save_hf_checkpoint(out_dir, self.params, self.cfg, hf_config=self.hf_config, dtype=dtype,
                                             max_shard_size=max_shard_size, copy_files_from=copy_files_from,
                                             overwrite=overwrite)
