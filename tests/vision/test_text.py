"""Text tower and tokenizer: shapes, pooling rules, logical axes, and the tokenizer's rules.

Parity against transformers' CLIPTextModel / SiglipTextModel / CLIPTokenizer is in
test_hf_towers.py.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mlx_med.core.sharding import DEFAULT_RULES
from mlx_med.vision import (
  TextConfig,
  TextTokenizer,
  TextTransformer,
  build_text_encoder,
  train_text_tokenizer,
)

TINY = {"vocab_size": 64, "context_length": 12, "width": 32, "depth": 2, "num_heads": 4, "mlp_dim": 64, "eos_token_id": 5, "pad_token_id": 5}
REPORTS = ["Chest X-ray: small nodule in the left upper lobe.", "No acute findings.",
           "CT shows a 3 mm calcified nodule; follow-up advised.", "Dermoscopy: pigmented lesion, irregular border."]


@pytest.fixture(scope="module")
def clip_tower():
  cfg = TextConfig(style="clip", **TINY)
  model = TextTransformer(cfg)
  ids = jnp.zeros((2, 12), jnp.int32)
  return cfg, model, jax.jit(model.init)(jax.random.PRNGKey(0), ids), jax.jit(model.apply)


def test_clip_pools_at_first_eos_and_is_causal(clip_tower):
  cfg, _, variables, apply = clip_tower
  ids = np.array([[1, 7, 8, 5, 5, 5, 5, 5, 5, 5, 5, 5],
                  [1, 9, 10, 11, 12, 5, 5, 5, 5, 5, 5, 5]], np.int32)
  out = apply(variables, jnp.asarray(ids))
  assert out.pooled.shape == (2, 32) and out.tokens.shape == (2, 12, 32)
  np.testing.assert_array_equal(np.asarray(out.pooled), np.asarray(out.tokens[jnp.arange(2), jnp.array([3, 5])]))
  # Causal: changing tokens after position 3 leaves positions 0..3 unchanged.
  changed = ids.copy()
  changed[0, 4:] = 20
  out2 = apply(variables, jnp.asarray(changed))
  np.testing.assert_allclose(np.asarray(out2.tokens[0, :4]), np.asarray(out.tokens[0, :4]), rtol=1e-6, atol=1e-6)
  assert not np.allclose(np.asarray(out2.tokens[0, 4:]), np.asarray(out.tokens[0, 4:]))
  leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  names = {n for n, _ in DEFAULT_RULES}
  assert all(isinstance(p, nn.Partitioned) and all(a is None or a in names for a in p.names) for p in leaves)
  assert sum(p.size for p in jax.tree.leaves(nn.unbox(variables["params"]))) == cfg.num_params()


def test_siglip_style_is_bidirectional_with_a_head():
  cfg = TextConfig(style="siglip", projection_size=24, act="gelu_tanh", **TINY)
  model = TextTransformer(cfg)
  ids = jnp.asarray(np.arange(24, dtype=np.int32).reshape(2, 12) % 60 + 2)
  variables = model.init(jax.random.PRNGKey(0), ids)
  out = model.apply(variables, ids)
  assert out.pooled.shape == (2, 24)
  p = nn.unbox(variables["params"])["head"]
  np.testing.assert_allclose(np.asarray(out.pooled), np.asarray(out.tokens[:, -1] @ p["kernel"] + p["bias"]), rtol=1e-5, atol=1e-6)
  changed = ids.at[0, -1].set(3)
  out2 = model.apply(variables, changed)
  assert not np.allclose(np.asarray(out2.tokens[0, 0]), np.asarray(out.tokens[0, 0]))  # the first token sees the last


def test_build_text_encoder_and_too_long_input(clip_tower):
  cfg, _, variables, _ = clip_tower
  model = build_text_encoder(ml_collections.ConfigDict(dict(style="clip", **TINY)))
  assert model.cfg == cfg
  with pytest.raises(ValueError, match="L <= 12"):
    model.apply(variables, jnp.zeros((1, 13), jnp.int32))
  with pytest.raises(ValueError, match="unknown keys"):
    build_text_encoder(ml_collections.ConfigDict(dict(depht=1, **TINY)))


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  return train_text_tokenizer(REPORTS * 5, vocab_size=400, path=path, context_length=16)


def test_tokenizer_clip_rules(trained_tokenizer):
  tok = trained_tokenizer
  ids = tok.encode(["no acute findings.", "CT SHOWS a nodule " * 10, ""])
  assert ids.dtype == np.int32 and ids.shape == (3, 16)
  for row in ids:
    assert row[0] == tok.bos_token_id
  # Short text: BOS .. EOS then padding with the pad id (the end token, as HF's CLIP tokenizer).
  n = int(np.argmax(ids[0] == tok.eos_token_id))
  assert n > 1 and np.all(ids[0, n:] == tok.pad_token_id)
  # Truncation keeps the end token in the last slot.
  assert ids[1, -1] == tok.eos_token_id and tok.eos_token_id not in ids[1, :-1]
  assert list(ids[2, :2]) == [tok.bos_token_id, tok.eos_token_id]
  # Case and whitespace are normalised; unseen characters still encode (byte-level, no unknowns).
  np.testing.assert_array_equal(tok.encode(["No   ACUTE findings."]), ids[:1])
  assert tok.decode(ids[0]) == "no acute findings ."
  weird = tok.encode(["zebra ü ☃"])[0]
  assert len(set(weird.tolist()) - {tok.pad_token_id}) > 3
  assert tok.vocab_size <= 400 + 512


def test_tokenizer_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    TextTokenizer.from_file(tmp_path / "missing.json")
  bad = tmp_path / "tokenizer.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="tokenizer.json"):
    TextTokenizer.from_file(bad)


def test_sharded_text_tower_matches_single_device(clip_tower):
  from mlx_med.core import sharding as sharding_lib

  cfg, _, variables, apply = clip_tower
  rules = sharding_lib.ShardingRules(sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  params = nn.unbox(variables["params"])
  shardings = sharding_lib.tree_shardings(rules, nn.get_partition_spec(variables)["params"], params)
  ids = jnp.asarray(np.arange(48, dtype=np.int32).reshape(4, 12) % 60)
  sharded = jax.jit(TextTransformer(cfg, rules=rules).apply)({"params": jax.device_put(params, shardings)},
                                                               jax.device_put(ids, rules.named(("batch", None))))
  single = apply(variables, ids)
  np.testing.assert_allclose(np.asarray(sharded.pooled), np.asarray(single.pooled), rtol=1e-5, atol=1e-5)


def test_siglip_style_tokenizer_pads_to_length(trained_tokenizer):
  tok = TextTokenizer.from_file(trained_tokenizer.path, context_length=16, style="siglip")
  ids = tok.encode(["no acute findings.", "nodule " * 40])
  assert ids.shape == (2, 16) and tok.bos_token_id is None
  clip_ids = trained_tokenizer.encode(["no acute findings."])[0]
  np.testing.assert_array_equal(ids[0], clip_ids)  # same file, same post-processor, same padding id
  assert ids[1, -1] == tok.eos_token_id


def test_medimageinsight_text_preset_size():
  cfg = TextConfig.medimageinsight()
  assert (cfg.width, cfg.depth, cfg.num_heads, cfg.context_length) == (1024, 16, 16, 77)
  assert 250e6 < cfg.num_params() < 254e6  # the model card's "about 252M"
  shapes = jax.eval_shape(TextTransformer(TextConfig.medimageinsight(depth=1)).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 77), jnp.int32))
  n = sum(x.size for x in jax.tree.leaves(nn.unbox(shapes["params"])))
  assert n == TextConfig.medimageinsight(depth=1).num_params()
