"""Medical LLM applications on one client interface (local model, `mlx-med serve`, any OpenAI-compatible endpoint)."""
