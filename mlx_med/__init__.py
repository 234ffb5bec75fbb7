"""mlx_med: JAX/Flax reference implementations of medical foundation-model research."""

__version__ = "0.1.0"
