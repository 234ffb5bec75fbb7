"""Vision-language models in mlx_med: LLaVA and Qwen2.5-VL, multimodal serving, SemCLIP, evaluation, ICL."""
