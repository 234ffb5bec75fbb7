"""A tiny random Hugging Face CLIP directory (config.json, model.safetensors, tokenizer.json,
preprocessor_config.json) saved by transformers itself: the checkpoint the embed tests load."""


def tiny_clip_dir(tmp_path):
  from torch_peers import import_torchvision

  import_torchvision()  # transformers' image utilities import torchvision
  import torch
  import transformers

  from mlx_med.vision.text import train_text_tokenizer

  tok = train_text_tokenizer(["a chest x-ray with a nodule", "normal study, no acute findings",
                              "skin photograph with melanoma"] * 4, 300, str(tmp_path / "tokenizer.json"))
  text = transformers.CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
  vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8)
  config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=24)
  torch.manual_seed(0)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():
    model.logit_scale.fill_(3.1)
  model.save_pretrained(tmp_path)
  processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  processor.save_pretrained(tmp_path)
  return model
