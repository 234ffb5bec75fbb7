"""Vision encoders and image I/O shared by the imaging capabilities (embed, seg, vlm).

Encoders take NHWC images already normalised with their checkpoint's processor and return
a `VisionOutput` (pooled vector, last hidden tokens, per-stage feature maps); the text
tower and its tokenizer serve the image-text models. Hugging Face CLIP / SigLIP
directories load as towers through `load_hf_towers`.
"""

from mlx_med.vision.common import VisionOutput
from mlx_med.vision.davit import DaViT, DaViTConfig, convert_timm_state_dict
from mlx_med.vision.encoders import build_image_encoder, build_text_encoder, image_encoder_config, text_encoder_config
from mlx_med.vision.hf import HFTowers, load_hf_towers
from mlx_med.vision.io import (WINDOW_PRESETS, FolderScan, ImageLoadError, ImageProcessorConfig, apply_window,
                               load_and_preprocess, load_folder, load_image, preprocess, to_rgb)
from mlx_med.vision.text import TextConfig, TextOutput, TextTokenizer, TextTransformer, train_text_tokenizer
from mlx_med.vision.vit import ViT, ViTConfig

__all__ = [
    # encoders
    "VisionOutput", "ViT", "ViTConfig", "DaViT", "DaViTConfig", "convert_timm_state_dict",
    "build_image_encoder", "build_text_encoder", "image_encoder_config", "text_encoder_config",
    # text tower
    "TextConfig", "TextOutput", "TextTokenizer", "TextTransformer", "train_text_tokenizer",
    # Hugging Face checkpoints
    "HFTowers", "load_hf_towers",
    # image I/O
    "WINDOW_PRESETS", "FolderScan", "ImageLoadError", "ImageProcessorConfig", "apply_window",
    "load_and_preprocess", "load_folder", "load_image", "preprocess", "to_rgb",
]
