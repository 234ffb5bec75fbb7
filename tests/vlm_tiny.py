"""A tiny random Hugging Face LLaVA directory for the VLM tests (LocalVLM, serving): the model
(CLIP tower, 2-layer Llama, every parameter redrawn) saved by transformers itself, a byte-level
BPE tokenizer with an `<image>` token and a ChatML template that renders image parts, and a CLIP
image processor config. Nothing is downloaded."""

from __future__ import annotations

import json
import os

import numpy as np
from hf_tiny import write_tokenizer

IMAGE_TOKEN = "<image>"
# A LLaVA-style ChatML template: image parts render as "<image>\n", before or between the text.
VLM_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>\n{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IMAGE_SIZE = 28  # 2 x 2 patches of 14 px: 4 visual tokens per image


def write_vlm_tokenizer(directory: str, template: str = VLM_TEMPLATE,
                        specials: tuple[str, ...] = (IMAGE_TOKEN,)) -> tuple[int, dict[str, int]]:
  """hf_tiny's tokenizer plus the image special tokens and `template`; (vocab size, {token: id})."""
  from tokenizers import AddedToken, Tokenizer

  write_tokenizer(directory)
  path = os.path.join(directory, "tokenizer.json")
  tok = Tokenizer.from_file(path)
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
  tok.save(path)
  config_path = os.path.join(directory, "tokenizer_config.json")
  with open(config_path) as f:
    config = json.load(f)
  config["chat_template"] = template
  with open(config_path, "w") as f:
    json.dump(config, f)
  return tok.get_vocab_size(), {t: tok.token_to_id(t) for t in specials}


def write_clip_processor(directory: str, size: int = IMAGE_SIZE) -> None:
  with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
    json.dump({"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
               "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
               "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
               "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
               "do_convert_rgb": True}, f)


def make_llava_dir(directory: str, template: str = VLM_TEMPLATE, seed: int = 0):
  """A tiny random HF LLaVA directory (CLIP tower, 2-layer Llama) with tokenizer, template and
  processor config; returns the transformers model (eval mode) for references."""
  import torch
  from torch_peers import import_torchvision

  import_torchvision()
  import transformers

  os.makedirs(directory, exist_ok=True)
  vocab, ids = write_vlm_tokenizer(directory, template)
  write_clip_processor(directory)
  vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=14)
  text = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None, eos_token_id=2,
                                  pad_token_id=0)
  cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=ids[IMAGE_TOKEN],
                                 vision_feature_layer=-2, vision_feature_select_strategy="default",
                                 image_seq_length=(IMAGE_SIZE // 14) ** 2)
  torch.manual_seed(seed)
  model = transformers.LlavaForConditionalGeneration(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or "layer_norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory)
  return model


def sample_image(seed: int, size=(40, 48)) -> np.ndarray:
  """A random RGB uint8 image (not square: the processor resizes and crops)."""
  return np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)



def image_message(image: np.ndarray, text: str) -> list[dict]:
  from mlx_med.vlm.messages import image_part

  return [{"role": "user", "content": [image_part(image), {"type": "text", "text": text}]}]
