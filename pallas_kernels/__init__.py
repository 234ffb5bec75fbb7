"""Pallas kernels for sparse attention, each paired with a plain-jnp reference.

Import the modules (as jax's own Pallas ops are organised); re-exporting the
functions here would shadow the module `boltzmann_attention` with the function
of the same name.

pallas_kernels.boltzmann_sampling (BoltzFormer sampling):
  sample_kept_keys / sample_kept_keys_reference   per-key sampling (exact semantics)
  sample_kept_blocks                              hardware-aligned block sampling
  block_sparse_layout(_from_mask)                 kept keys -> kernel layout
  boltzmann_temperature, keep_probability, patch_major_permutation
pallas_kernels.boltzmann_attention:
  boltzmann_attention                             Pallas kernel (custom_vjp)
  boltzmann_attention_reference                   dense fp32 twin
  boltzmann_attention_xla                         memory-bounded XLA fallback
pallas_kernels.token_selection (SemCLIP text-guided token selection):
  cosine_relevance, select_top_k, select_by_budget
  token_selection_attention                       Pallas kernel (custom_vjp)
  token_selection_attention_reference / _xla
Models normally go through `mlx_med.core.sparse_attention`, which picks the
backend from the config. Layout: [batch, heads, length, head_dim]; tile sizes
in `pallas_kernels.common.BlockSizes`.
"""
