"""Segmentation training end to end on a tiny model: the shared trainer, resumption, evaluation under
every attention mode, the comparison report, and the command line's bad-input behaviour."""

import json
import types

import chex
import jax
import numpy as np
import pytest

from mlx_med.core import config as config_lib
from mlx_med.seg import compare as compare_lib
from mlx_med.seg import evaluate as eval_lib
from mlx_med.seg import train as train_lib

CONFIG = "configs/seg/boltzformer.py:smoke"
TINY = [
    "--config.model.image_size=64", "--config.model.hidden_dim=16", "--config.model.num_queries=4",
    "--config.model.num_heads=2", "--config.model.dec_layers=3", "--config.model.dim_feedforward=32",
    "--config.model.mask_dim=16", "--config.model.pixel_decoder_layers=1", "--config.model.pixel_decoder_dim=16",
    "--config.model.pixel_decoder_heads=2", "--config.model.pixel_decoder_ffn=32",
    "--config.model.encoder.dims=(8, 8, 16, 16)", "--config.model.encoder.heads=(1, 1, 2, 2)",
    "--config.model.encoder.window_size=2", "--config.model.text.width=16", "--config.model.text.depth=1",
    "--config.model.text.num_heads=2", "--config.model.text.mlp_dim=32",
    "--config.data.synth_train=24", "--config.data.synth_test=8", "--config.data.tokenizer_vocab_size=300",
    "--config.train.steps=6", "--config.train.batch_size=8", "--config.train.warmup_steps=2",
    "--config.train.log_every=2", "--config.train.eval_every=100", "--config.train.ckpt_every=2",
    "--config.train.async_checkpointing=False", "--config.eval.batch_size=8", "--config.eval.n_boot=50",
    "--config.eval.plot_examples=1",
]


def tiny_config(*extra):
  return config_lib.get_config(CONFIG, [a.removeprefix("--config.") for a in TINY + list(extra)])


class _Stop(Exception):
  pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One uninterrupted tiny run and one stopped after step 3 then resumed (sharing the synthetic data)."""
  root = tmp_path_factory.mktemp("seg_train")
  data = str(root / "synthetic")
  config = tiny_config(f"--config.data.synthetic_dir={data}")
  straight = train_lib.run(config, str(root / "straight"), progress=False, evaluate=True)

  def stop(trainer, step):
    if step == 3:  # checkpoint 2 is durable; step 3 is lost
      raise _Stop

  with pytest.raises(_Stop):
    train_lib.run(config, str(root / "resumed"), progress=False, callbacks=[stop], evaluate=False)
  resumed = train_lib.run(config, str(root / "resumed"), progress=False, evaluate=False)
  return root, config, straight, resumed


def test_resumed_run_equals_uninterrupted(runs):
  root, _, straight, resumed = runs
  assert straight.final_step == resumed.final_step == 6
  chex.assert_trees_all_equal(jax.device_get(resumed.state["params"]), jax.device_get(straight.state["params"]))
  rows = [json.loads(line) for line in (root / "resumed" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]  # the lost step 3 is not reported twice
  timing = json.loads((root / "resumed" / "train_time.json").read_text())
  assert timing["step"] == 6 and timing["seconds"] > 0


def test_run_directory_and_evaluation(runs):
  root, _, _, _ = runs
  run = root / "straight"
  for name in ("model.json", "tokenizer.json", "data.json", "config.json", "metrics.jsonl"):
    assert (run / name).is_file(), name
  report = json.loads((run / "eval_boltzmann" / "report.json").read_text())
  assert report["n_images"] == len(train_lib.scan_split(eval_lib.load_run_config(run), root / "synthetic", "test"))
  assert set(report["buckets"]) <= {"<0.1%", "0.1-1%", ">1%"}
  cost = report["cost"]
  # The kept keys of Boltzmann sampling: the foreground plus about int(0.1 N) draws of the rest.
  assert 0.0 < cost["kept_fraction"] < 0.6 and cost["flops_ratio_vs_full"] > 1.0
  assert len(cost["kept_fraction_per_layer"]) == 3


def test_one_checkpoint_under_every_mode(runs, tmp_path):
  root, config, _, _ = runs
  result = compare_lib.compare(config, tmp_path, ("boltzmann", "threshold", "full"), checkpoint=str(root / "straight"),
                               progress=False, n_boot=50)
  rows = {r["mode"]: r for r in result["summary"]["rows"]}
  assert set(rows) == {"boltzmann", "threshold", "full"}
  assert rows["full"]["kept_fraction"] == pytest.approx(1.0)
  assert rows["full"]["flops_ratio_vs_full"] == pytest.approx(1.0)
  assert rows["boltzmann"]["kept_fraction"] < 1.0
  # Same parameters, different attention: the predictions differ between modes.
  assert rows["full"]["overall"] != rows["threshold"]["overall"] or rows["full"]["kept_fraction"] != rows[
      "threshold"]["kept_fraction"]
  goals = result["summary"]["goals"]
  assert "attention_flops_ratio" in goals and "small_object_dice_gain" in goals
  assert goals["attention_flops_ratio"]["ratio"] == pytest.approx(rows["boltzmann"]["flops_ratio_vs_full"])
  for key in ("table", "json", "dice_by_bucket", "kept_keys_0"):
    assert (tmp_path / result["paths"][key].split("/")[-1]).is_file(), key
  assert "objects under 1% of the image" in result["markdown"]


def test_evaluate_with_another_mode_keeps_parameters(runs, tmp_path):
  root, _, _, _ = runs
  full = eval_lib.evaluate_run(root / "straight", attention="full", out_dir=tmp_path / "full", n_boot=20,
                               progress=False, keep_predictions=True)
  again = eval_lib.evaluate_run(root / "straight", attention="full", out_dir=tmp_path / "again", n_boot=20,
                                progress=False, keep_predictions=True)
  np.testing.assert_array_equal(full["predictions"]["probs"], again["predictions"]["probs"])  # deterministic
  assert full["attention"] == "full"


def test_cli_bad_inputs(tmp_path, capsys):
  from mlx_med.cli import main

  assert main(["seg", "train", "--config", "configs/rl/medrlvr.py:smoke", "--workdir", str(tmp_path / "a")]) == 2
  assert "segmentation config" in capsys.readouterr().err
  assert main(["seg", "compare", "--config", CONFIG, "--workdir", str(tmp_path / "b"), "--modes", "sparse"]) == 2
  assert "choose from" in capsys.readouterr().err
  assert main(["seg", "evaluate", "--workdir", str(tmp_path / "missing")]) == 2
  assert "seg train" in capsys.readouterr().err
  assert main(["seg", "train", "--config", CONFIG, "--workdir", str(tmp_path / "c"),
               "--config.model.attention=sparse"]) == 2
  assert "attention" in capsys.readouterr().err


def test_encoder_from_an_embedding_run_is_shape_checked(runs, monkeypatch):
  from flax import linen as nn

  from mlx_med.embed import model as embed_model
  from mlx_med.seg.predict import Segmenter

  root, _, _, _ = runs
  encoder = nn.unbox(Segmenter.load(root / "straight").params)["encoder"]
  tower = jax.tree.map(lambda x: np.asarray(x) + 1.0, encoder)

  fake = types.SimpleNamespace(params={"image_encoder": tower, "text_encoder": {}})
  monkeypatch.setattr(embed_model.Embedder, "load", classmethod(lambda cls, path: fake))
  got = train_lib.encoder_params_from_embed_run("runs/mii", encoder)
  chex.assert_trees_all_equal(got, tower)
  smaller = jax.tree.map(lambda x: x[..., :1] if np.ndim(x) else x, tower)
  fake.params = {"image_encoder": smaller}
  with pytest.raises(ValueError, match="does not match model.encoder"):
    train_lib.encoder_params_from_embed_run("runs/mii", encoder)
