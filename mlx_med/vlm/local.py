"""`LocalVLM`: a vision-language model (LLaVA or Qwen2.5-VL) in this process, ready to generate.

The multimodal counterpart of `mlx_med.llm.model.LocalLM`, with the same public
surface (cfg, tokenizer, name, sampler, sampling_params, encode_chat, chat,
generate_tokens, stream_tokens, detokenize), so the OpenAI-compatible server and
`LocalClient` drive either one. The language model *is* a `LocalLM` (composition):
sampling knobs, text prompts and text-only batches go through it unchanged.

A chat with images runs in four steps:
1. `messages.split_messages` turns OpenAI `image_url` parts into `{"type": "image"}`
   placeholders and decodes the images (data URLs; local files only under an allowed
   directory; remote URLs are refused, nothing is fetched);
2. the chat template renders the placeholders. Hugging Face VLM templates do that
   themselves; for a template that only knows string contents (checked once with a
   probe), each message's image placeholders are written *before* its text instead:
   `<image>\\n` per image for LLaVA, `<|vision_start|><|image_pad|><|vision_end|>` for
   Qwen2.5-VL (the layout of their processors' own prompts);
3. the image processor turns each image into model inputs, and the family's
   `expand_image_tokens` repeats each placeholder to the image's number of visual tokens;
4. the family's `prompt_inputs` computes the prompt's input embeddings (text
   embeddings with the visual tokens spliced in) and rotary positions, which the core
   `Sampler` prefills from (`prompt_embeds=`, `prompt_positions=`) before decoding with
   its KV cache as usual.

In a batch that mixes rows with and without images, the text-only rows get their
plain token embeddings (and ordinary positions), so one prefill serves every row; a
batch without images takes the language model's token path, exactly as a text model.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mlx_med.core.sampler import SamplingParams, StreamUpdate, bucket
from mlx_med.core.transformer import Decoder, unstack_layers
from mlx_med.llm.model import Generation, LocalLM
from mlx_med.llm.tokenizer import ChatTokenizer

# config.json `model_type` -> module implementing the family (see the package's interfaces).
FAMILIES = {"llava": "mlx_med.vlm.llava", "qwen2_5_vl": "mlx_med.vlm.qwen2_5_vl"}

Messages = Sequence[Mapping[str, Any]]
ImageInputs = list  # one prompt's processed images (the family's `image_inputs` items)
MODEL_SETTING: Any = object()  # `allowed_local_dir` default: the model's `allowed_local_media_path`


def read_config(model_dir: str) -> dict | None:
  """config.json of a model directory as a dict (None when absent or unreadable)."""
  path = os.path.join(model_dir, "config.json")
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return None
  return config if isinstance(config, dict) else None


def is_vlm_dir(model_dir: str) -> bool:
  """True for a Hugging Face directory of a vision-language model (config.json with a
  supported `model_type`, or any config with a `vision_config`)."""
  config = read_config(model_dir)
  return config is not None and (config.get("model_type") in FAMILIES or "vision_config" in config)


def family_module(model_type: str):
  """The module implementing `model_type` (`llava`, `qwen2_5_vl`)."""
  if model_type not in FAMILIES:
    raise ValueError(f"vision-language model_type {model_type!r} is not supported; supported: {sorted(FAMILIES)}")
  return importlib.import_module(FAMILIES[model_type])


def _load_chat_template(tokenizer: ChatTokenizer, model_dir: str) -> None:
  """VLM directories often keep the template beside the processor (chat_template.json or
  chat_template.jinja) rather than in tokenizer_config.json; use it when the tokenizer has none."""
  if tokenizer.has_chat_template:
    return
  jinja = os.path.join(model_dir, "chat_template.jinja")
  as_json = os.path.join(model_dir, "chat_template.json")
  template = None
  if os.path.isfile(jinja):
    with open(jinja, encoding="utf-8") as f:
      template = f.read()
  elif os.path.isfile(as_json):
    try:
      with open(as_json, encoding="utf-8") as f:
        template = json.load(f).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as e:
      raise ValueError(f"{as_json}: expected a JSON object with a chat_template string ({e})") from None
  if template:
    tokenizer.hf.chat_template = template


def _count_image_parts(messages: Messages) -> int:
  n = 0
  for m in messages:
    content = m.get("content") if isinstance(m, Mapping) else None
    if isinstance(content, list):
      n += sum(1 for part in content if isinstance(part, Mapping) and part.get("type") in ("image_url", "image"))
  return n


class LocalVLM:
  """An in-process VLM: `LocalVLM.from_pretrained(dir).chat([[{"role": "user", "content": [image_part(img),
  {"type": "text", "text": "What is shown?"}]}]])`.

  `cfg` is the language model's `DecoderConfig` (what serving reads: context length,
  vocabulary); `model_cfg` the family's config (`LlavaConfig`, `Qwen25VLConfig`).
  `allowed_local_media_path`: a directory whose image files chat messages may name by
  path (default: none; data URLs always work).
  """

  is_multimodal = True

  def __init__(self, family: Any, cfg: Any, params: Any, tokenizer: ChatTokenizer | None, processor: Any, *,
               name: str = "local", hf_config: dict | None = None, cache_dtype: str | None = None,
               allowed_local_media_path: str | None = None, **bucket_options):
    if isinstance(family, str):
      family = family_module(family)
    if "language_model" not in params:
      raise ValueError("VLM parameters need a 'language_model' subtree (the decoder's parameters)")
    self.family = family
    self.model_cfg = cfg
    # The language model is a LocalLM over the decoder's parameters: its sampler, sampling
    # knobs and text paths are the ones every text model uses.
    self.text = LocalLM(cfg.decoder, params["language_model"], tokenizer, name=name, cache_dtype=cache_dtype,
                        **bucket_options)
    self.params = {**params, "language_model": self.text.params}
    self.processor = processor
    self.hf_config = hf_config or {}
    self.allowed_local_media_path = allowed_local_media_path
    self._embed = jax.jit(lambda p, t: Decoder(cfg.decoder).apply({"params": p}, t, method=Decoder.embed_tokens))
    self._takes_image_parts: bool | None = None
    self._forward_embeds = jax.jit(lambda p, e, pos: Decoder(cfg.decoder).apply({"params": p}, None, positions=pos,
                                                                                 embeddings=e))

  # ---- the LocalLM surface

  @property
  def cfg(self):
    return self.text.cfg

  @property
  def tokenizer(self) -> ChatTokenizer | None:
    return self.text.tokenizer

  @property
  def name(self) -> str:
    return self.text.name

  @name.setter
  def name(self, value: str) -> None:
    self.text.name = value

  @property
  def sampler(self):
    return self.text.sampler

  @property
  def rules(self):
    return self.text.rules

  @property
  def image_token_id(self) -> int:
    return int(self.model_cfg.image_token_id)

  def sampling_params(self, **knobs) -> SamplingParams:
    """OpenAI-style knobs -> `SamplingParams` (`LocalLM.sampling_params`, same defaults)."""
    return self.text.sampling_params(**knobs)

  def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
    return self.text.encode_prompt(prompt)

  def detokenize(self, ids: list[int]) -> str:
    return self.text.detokenize(ids)

  @classmethod
  def from_pretrained(cls, model_dir: str, *, dtype: str = "float32", param_dtype: str | None = None,
                      max_seq_len: int | None = None, name: str | None = None,
                      cache_dtype: str | None = None, scan_layers: bool = False,
                      mesh_shape: Mapping[str, int] | None = None,
                      allowed_local_media_path: str | None = None, **bucket_options) -> LocalVLM:
    """Loads a local Hugging Face VLM directory: config.json (`model_type` picks the family),
    safetensors, tokenizer + chat template, preprocessor_config.json.

    scan_layers=False (the default) keeps one parameter tree and KV cache per decoder
    layer, the fast layout for generation (as `LocalLM.from_pretrained`).
    """
    if not os.path.isdir(model_dir):
      raise FileNotFoundError(f"model directory {model_dir!r} does not exist")
    if mesh_shape is not None:
      raise ValueError("sharding a vision-language model over a mesh is not supported yet; drop --mesh/mesh_shape")
    hf_config = read_config(model_dir)
    if hf_config is None:
      raise FileNotFoundError(f"{model_dir!r} has no readable config.json: expected a Hugging Face model directory")
    family = family_module(str(hf_config.get("model_type")))
    cfg, params = family.load_hf(model_dir, dtype=dtype, param_dtype=param_dtype, max_seq_len=max_seq_len)
    if cfg.decoder.scan_layers and not scan_layers:
      params = {**params, "language_model": unstack_layers(params["language_model"], cfg.decoder.num_layers)}
      cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, scan_layers=False))
    elif scan_layers and not cfg.decoder.scan_layers:
      raise ValueError("scan_layers=True needs a family config with decoder.scan_layers=True")
    from mlx_med.vlm.processing import load_image_processor

    tokenizer = ChatTokenizer.from_dir(model_dir)
    _load_chat_template(tokenizer, model_dir)
    processor = load_image_processor(model_dir)
    return cls(family, cfg, params, tokenizer, processor, hf_config=hf_config, cache_dtype=cache_dtype,
               name=name or os.path.basename(os.path.normpath(model_dir)),
               allowed_local_media_path=allowed_local_media_path, **bucket_options)

  # ---- chat messages -> (token ids, image inputs)

  def image_prompt_text(self) -> str:
    """The text standing for one image in a prompt written by hand (and in the fallback
    for chat templates without image parts): LLaVA `<image>\\n`; Qwen2.5-VL
    `<|vision_start|><|image_pad|><|vision_end|>`."""
    tok = self._require_tokenizer()
    pad = tok.hf.convert_ids_to_tokens(self.image_token_id)
    start = getattr(self.model_cfg, "vision_start_token_id", None)
    end = getattr(self.model_cfg, "vision_end_token_id", None)
    if start is not None and end is not None:
      return tok.hf.convert_ids_to_tokens(int(start)) + pad + tok.hf.convert_ids_to_tokens(int(end))
    return pad + "\n"

  def _require_tokenizer(self) -> ChatTokenizer:
    if self.tokenizer is None:
      raise ValueError("chat needs a tokenizer")
    return self.tokenizer

  def template_takes_image_parts(self) -> bool:
    """Whether the chat template renders `{"type": "image"}` content parts itself (probed once)."""
    if self._takes_image_parts is None:
      tok = self._require_tokenizer()
      pad = tok.hf.convert_ids_to_tokens(self.image_token_id)
      probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "probe"}]}]
      try:
        text = tok.render_chat(probe)
        self._takes_image_parts = text.count(pad) == 1 and "probe" in text and "'type'" not in text
      except Exception:  # noqa: BLE001 - a template that fails on list contents does not take parts
        self._takes_image_parts = False
    return self._takes_image_parts

  def _flatten(self, messages: Messages) -> list[dict]:
    """String contents for a template without image parts: image placeholders first, then the text."""
    image_text = self.image_prompt_text()
    out = []
    for m in messages:
      content = m.get("content")
      if isinstance(content, list):
        images = sum(1 for p in content if isinstance(p, Mapping) and p.get("type") == "image")
        text = "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
        content = image_text * images + text
      out.append({**m, "content": content})
    return out

  def render_chat(self, messages: Messages, add_generation_prompt: bool = True, **template_kwargs) -> str:
    """Renders messages whose contents may hold `{"type": "image"}` placeholders to prompt text."""
    tok = self._require_tokenizer()
    if not self.template_takes_image_parts():
      messages = self._flatten(messages)
    return tok.render_chat(list(messages), add_generation_prompt=add_generation_prompt, **template_kwargs)

  def prepare_chat(self, messages: Messages, *, allowed_local_dir: str | None = MODEL_SETTING,
                   add_generation_prompt: bool = True, **template_kwargs) -> tuple[list[int], ImageInputs]:
    """Chat messages (OpenAI format, `image_url` parts allowed) -> (token ids with every image
    placeholder expanded to its visual tokens, the processed images in prompt order).

    Images come from data URLs, or from local paths under `allowed_local_dir` (default: this
    model's `allowed_local_media_path`; None: no local paths); anything else raises
    `messages.ImageRefused`, an undecodable image `messages.ImageInputError` (both ValueErrors).
    """
    from mlx_med.vlm import messages as messages_lib

    tok = self._require_tokenizer()
    allowed = self.allowed_local_media_path if allowed_local_dir is MODEL_SETTING else allowed_local_dir
    placed, images = messages_lib.split_messages(list(messages), allowed_local_dir=allowed)
    text = self.render_chat(placed, add_generation_prompt=add_generation_prompt, **template_kwargs)
    ids = tok.encode(text, add_special_tokens=False)
    image_inputs = [self.processor(image) for image in images]
    return self.expand(ids, image_inputs), image_inputs

  def expand(self, ids: Sequence[int], image_inputs: ImageInputs) -> list[int]:
    """Checks one placeholder per image and expands each to the image's visual tokens."""
    found = sum(1 for t in ids if t == self.image_token_id)
    if found != len(image_inputs):
      pad = self.tokenizer.token_text(self.image_token_id) if self.tokenizer is not None else str(self.image_token_id)
      raise ValueError(f"the prompt holds {found} image placeholder(s) {pad!r} for {len(image_inputs)} image(s); "
                       f"give one image part per image and do not write {pad!r} in the text yourself")
    if not image_inputs:
      return [int(t) for t in ids]
    return [int(t) for t in self.family.expand_image_tokens(list(ids), list(image_inputs), self.model_cfg)]

  def encode_chat(self, messages: Messages, **template_kwargs) -> list[int]:
    """Token ids of text-only messages (images need `prepare_chat`, which also returns them)."""
    if _count_image_parts(messages):
      raise ValueError("these messages hold images: use LocalVLM.prepare_chat (token ids and images) or chat")
    ids, _ = self.prepare_chat(messages, **template_kwargs)
    return ids

  # ---- generation

  def _text_embeddings(self, ids: Sequence[int]) -> np.ndarray:
    n = len(ids)
    tokens = np.full((1, bucket(n, 16)), self.sampler.pad_id, np.int32)
    tokens[0, :n] = np.asarray(ids, np.int32)
    return np.asarray(self._embed(self.text.params, tokens), np.float32)[0, :n]

  def _image_prompt_inputs(self, ids: Sequence[int], image_inputs: ImageInputs) -> tuple[np.ndarray, np.ndarray]:
    """The family's `prompt_inputs` on the prompt padded at the end to a power-of-two length,
    cut back to the prompt: its programs compile per shape, so padding bounds the number of
    compiles to one per length bucket (and image count). Exact: a token's embedding and
    rotary position depend only on it and the tokens before it."""
    n = len(ids)
    special = {self.image_token_id} | {int(t) for t in (getattr(self.model_cfg, "vision_start_token_id", None),
                                                        getattr(self.model_cfg, "video_token_id", None))
                                       if t is not None}
    pad = next(t for t in (self.sampler.pad_id, *range(len(special) + 1)) if t not in special)
    padded = [int(t) for t in ids] + [pad] * (bucket(n, 16, maximum=max(n, self.cfg.max_seq_len)) - n)
    e, pos = self.family.prompt_inputs(self.model_cfg, self.params, padded, list(image_inputs))
    return np.asarray(e)[:n], np.asarray(pos)[:n]

  def multimodal_inputs(self, prompts: Sequence[Sequence[int]],
                        images: Sequence[ImageInputs | None] | None) -> dict:
    """The sampler's `prompt_embeds` / `prompt_positions` for a batch (empty when no row has
    images): image rows through the family's `prompt_inputs`, text rows as plain token
    embeddings with ordinary positions."""
    if images is None or not any(images):
      return {}
    if len(images) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    comps = len(self.cfg.mrope_section) if self.cfg.mrope_section else 0
    embeds, positions = [], []
    for ids, row_images in zip(prompts, images):
      if row_images:
        e, pos = self._image_prompt_inputs(ids, row_images)
      else:
        e = self._text_embeddings(ids)
        pos = np.arange(len(ids), dtype=np.int32)
        if comps:
          pos = np.repeat(pos[:, None], comps, axis=1)
      embeds.append(np.asarray(e, np.float32))
      positions.append(np.asarray(pos, np.int32))
    return {"prompt_embeds": embeds, "prompt_positions": positions}

  def generate_tokens(self, prompts: Sequence[Sequence[int]],
                      sampling: SamplingParams | Sequence[SamplingParams],
                      images: Sequence[ImageInputs | None] | None = None) -> list[Generation]:
    """Token prompts (image placeholders already expanded) with each row's processed images."""
    detok = self.detokenize if self.tokenizer is not None else None
    outs = self.sampler.generate(self.text.params, prompts, sampling, detokenize=detok,
                                 **self.multimodal_inputs(prompts, images))
    return [Generation.from_sample(o) for o in outs]

  def stream_tokens(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams],
                    chunk_size: int = 16,
                    images: Sequence[ImageInputs | None] | None = None) -> Iterator[list[StreamUpdate]]:
    detok = self.detokenize if self.tokenizer is not None else None
    return self.sampler.stream(self.text.params, prompts, sampling, detokenize=detok, chunk_size=chunk_size,
                               **self.multimodal_inputs(prompts, images))

  def logits(self, prompts: Sequence[Sequence[int]],
             images: Sequence[ImageInputs | None] | None = None) -> list[np.ndarray]:
    """fp32 next-token logits [len, V] of each token prompt (placeholders expanded) given its
    processed images, e.g. to score answer options. Rows with images run one at a time."""
    if images is None or not any(images):
      return self.text.logits(prompts)
    if len(images) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    inputs = self.multimodal_inputs(prompts, images)
    out = []
    for e, pos in zip(inputs["prompt_embeds"], inputs["prompt_positions"]):
      logits = self._forward_embeds(self.text.params, jnp.asarray(e)[None], jnp.asarray(pos)[None])
      out.append(np.asarray(logits[0], np.float32))
    return out

  def warm_up_image(self, sampling: SamplingParams, *, chunk_size: int = 16, size: int = 448) -> bool:
    """Compiles the programs of a one-row chat with one grey `size` x `size` image (the
    vision tower at that resolution, prefill from embeddings, decode); False when such a
    prompt does not fit the context."""
    from mlx_med.vlm.messages import image_part

    grey = np.full((size, size, 3), 128, np.uint8)
    ids, image_inputs = self.prepare_chat([{"role": "user", "content": [image_part(grey),
                                                                        {"type": "text", "text": "Describe it."}]}])
    if len(ids) + sampling.max_new_tokens > self.cfg.max_seq_len:
      return False
    for _ in self.stream_tokens([ids], sampling, chunk_size=chunk_size, images=[image_inputs]):
      pass
    return True

  def generate(self, prompts: Sequence[str | Sequence[int]], sampling: SamplingParams | None = None, *,
               images: Sequence[Sequence[Any]] | None = None, **knobs) -> list[Generation]:
    """Completes raw prompts (no chat template). With `images` (per prompt: a list of images
    as uint8 [H, W, 3] arrays or PIL images), each prompt's text holds one image
    placeholder per image (see `image_prompt_text`)."""
    sampling = sampling or self.sampling_params(**knobs)
    ids = [self.encode_prompt(p) for p in prompts]
    if images is None:
      return self.generate_tokens(ids, sampling)
    if len(images) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    inputs = [[self.processor(im) for im in row] for row in images]
    return self.generate_tokens([self.expand(p, row) for p, row in zip(ids, inputs)], sampling, inputs)

  def chat(self, conversations: Sequence[Messages], sampling: SamplingParams | None = None, *,
           allowed_local_dir: str | None = MODEL_SETTING, **knobs) -> list[Generation]:
    """Answers chat conversations whose messages may hold `image_url` parts (see
    `mlx_med.vlm.messages.image_part`) through the model's chat template."""
    sampling = sampling or self.sampling_params(**knobs)
    prepared = [self.prepare_chat(c, allowed_local_dir=allowed_local_dir) for c in conversations]
    return self.generate_tokens([p[0] for p in prepared], sampling, [p[1] for p in prepared])
