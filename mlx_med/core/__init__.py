"""Shared platform: configs, meshes and sharding, the decoder, training, checkpoints.

`core` imports no capability package (ehr, llm, rl, ...); they import it.
"""
