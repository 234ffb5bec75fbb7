"""The experiment's figures (valid PNGs, the kept-key maps they draw), the comparison table, and the
decoder-step benchmark's smoke mode."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mlx_med.seg import plots

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LEVELS = ((2, 2), (4, 4), (8, 8))  # 1/32, 1/16, 1/8 of a 64 px image


def _rows():
  return [
      {"mode": "boltzmann", "steps": 40, "attention_gflops": 0.05, "train_s": 61.25, "eval_s": 3.0,
       "dice": {">1%": {"mean": 0.8, "lo": 0.75, "hi": 0.85, "n": 5}, "<0.1%": {"mean": 0.4, "ci": [0.3, 0.5]},
                "0.1-1%": (0.6, 0.55, 0.65), "all": 0.6}},
      {"mode": "threshold", "steps": 40, "attention_gflops": 0.2, "train_s": 60.0, "eval_s": 2.9,
       "dice": {"<0.1%": {"mean": 0.3, "lo": 0.2, "hi": 0.4}, "0.1-1%": 0.5, ">1%": 0.82, "all": 0.55}},
      {"mode": "full", "steps": 40, "attention_gflops": 0.5, "train_s": 59.0, "eval_s": 2.8,
       "dice": {"<0.1%": 0.35, "0.1-1%": 0.52, ">1%": 0.83, "all": 0.57}},
  ]


def _keep_masks(rng, heads=2, queries=3):
  return [rng.random((heads, queries, h * w)) < 0.3 for i in range(9) for h, w in [LEVELS[i % 3]]]


def _assert_png(path, min_side=100):
  assert os.path.exists(path)
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    assert im.format == "PNG"
    assert min(im.size) >= min_side and max(im.size) <= 4000
  leftovers = [f for f in os.listdir(os.path.dirname(path)) if ".tmp" in f]
  assert leftovers == []


def test_kept_key_maps_average_heads_and_queries():
  # Layer 0: 2 heads x 2 queries over a 2x2 grid; known shares per key.
  m = np.zeros((2, 2, 4), bool)
  m[0, 0, 0] = m[1, 0, 0] = m[0, 1, 0] = m[1, 1, 0] = True  # key 0 kept by all four rows
  m[0, 0, 3] = True  # key 3 by one of four
  m[1, 1, 1] = True  # key 1 by one of four, query 1 only
  all_q = plots.kept_key_maps([m], [(2, 2)])[0]
  np.testing.assert_allclose(all_q, [[1.0, 0.25], [0.0, 0.25]])
  q1 = plots.kept_key_maps([m], [(2, 2)], query=1)[0]
  np.testing.assert_allclose(q1, [[1.0, 0.5], [0.0, 0.0]])
  # Batch axis: `example` picks the row; the grid is row-major (h, w) as the level's tokens.
  batched = np.stack([np.zeros_like(m), m])
  np.testing.assert_allclose(plots.kept_key_maps([batched], [(1, 4)], example=1)[0], [[1.0, 0.25, 0.0, 0.25]])


def test_upsample_nearest_is_cell_replication():
  g = np.arange(6, dtype=np.float32).reshape(2, 3)
  up = plots._upsample_nearest(g, (4, 6))
  np.testing.assert_array_equal(up, np.repeat(np.repeat(g, 2, 0), 2, 1))


def test_plot_kept_keys_writes_png(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
  gt = np.zeros((64, 64), np.uint8)
  gt[20:26, 30:37] = 1
  temps = [1.0 / (2 + i) for i in range(9)]
  out = plots.plot_kept_keys(image, gt, _keep_masks(rng), temps, tmp_path / "kept.png", level_shapes=LEVELS)
  _assert_png(out, min_side=300)
  # One query, float image of an arbitrary range, grayscale, no ground-truth object, per-layer shapes.
  per_layer = [LEVELS[i % 3] for i in range(9)]
  out2 = plots.plot_kept_keys(rng.normal(size=(64, 64)), np.zeros((64, 64)), _keep_masks(rng), temps,
                              str(tmp_path / "sub" / "kept_q1.png"), level_shapes=per_layer, query=1)
  _assert_png(out2, min_side=300)


def test_plot_kept_keys_bad_input(tmp_path):
  rng = np.random.default_rng(0)
  image = np.zeros((64, 64), np.uint8)
  masks = _keep_masks(rng)
  with pytest.raises(ValueError, match="temperatures"):
    plots.plot_kept_keys(image, None, masks, [0.5] * 8, tmp_path / "a.png", level_shapes=LEVELS)
  with pytest.raises(ValueError, match="level grid"):
    plots.plot_kept_keys(image, None, masks, [0.5] * 9, tmp_path / "a.png", level_shapes=LEVELS[::-1])
  with pytest.raises(ValueError, match="gt_mask"):
    plots.plot_kept_keys(image, np.zeros((32, 32)), masks, [0.5] * 9, tmp_path / "a.png", level_shapes=LEVELS)
  # Square grids are inferred without level_shapes; a non-square count asks for them.
  with pytest.raises(ValueError, match="level_shapes"):
    plots.plot_kept_keys(image, None, [np.ones((1, 1, 6), bool)], [0.5], tmp_path / "a.png")
  assert not (tmp_path / "a.png").exists()


def test_dice_and_flops_plots(tmp_path):
  _assert_png(plots.plot_dice_by_bucket(_rows(), tmp_path / "dice.png"))
  as_mapping = {r["mode"]: r["dice"] for r in _rows()}
  _assert_png(plots.plot_dice_by_bucket(as_mapping, tmp_path / "dice2.png"))
  _assert_png(plots.plot_flops_vs_dice(_rows(), tmp_path / "flops.png"))
  with pytest.raises(ValueError, match="fraction"):
    plots.plot_dice_by_bucket({"full": {"<0.1%": 35.0}}, tmp_path / "bad.png")


def test_comparison_table_markdown():
  md = plots.comparison_table_markdown(_rows())
  lines = md.strip().splitlines()
  assert len(lines) == 2 + 3
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  # Buckets smallest first whatever the dict order, "all" last.
  assert header == ["mode", "steps", "Dice % <0.1%", "Dice % 0.1-1%", "Dice % >1%", "Dice % all",
                    "attn GFLOPs/image", "FLOPs vs full", "train s", "eval s"]
  boltz = [c.strip() for c in lines[2].strip("|").split("|")]
  assert boltz == ["boltzmann", "40", "40.0 [30.0, 50.0]", "60.0 [55.0, 65.0]", "80.0 [75.0, 85.0]", "60.0",
                   "0.05", "0.100 (10.0x fewer)", "61.2", "3.0"]
  full = [c.strip() for c in lines[4].strip("|").split("|")]
  assert full[7] == "1.000" and full[2] == "35.0"
  # An explicit ratio wins over the computed one; a missing value prints "-".
  rows = [dict(_rows()[0], ratio_vs_full=0.125, eval_s=None)]
  cells = [c.strip() for c in plots.comparison_table_markdown(rows).splitlines()[2].strip("|").split("|")]
  assert cells[7] == "0.125 (8.0x fewer)" and cells[9] == "-"
  with pytest.raises(ValueError, match="no rows"):
    plots.comparison_table_markdown([])


def test_rows_as_compare_collects_them(tmp_path):
  """Rows with metrics groups under "buckets"/"overall" and the compare module's key names."""
  def group(mean, lo, hi):
    return {"n": 4, "dice": {"mean": mean, "lo": lo, "hi": hi, "n": 4, "n_undefined": 0},
            "iou": {"mean": mean / 2, "lo": lo / 2, "hi": hi / 2, "n": 4, "n_undefined": 0}}
  rows = [{"mode": "boltzmann", "steps": 10, "buckets": {"0.1-1%": group(0.5, 0.4, 0.6),
                                                         "<0.1%": group(0.2, 0.1, 0.3)},
           "overall": group(0.4, 0.3, 0.5), "attention_gflops_per_image": 0.02, "flops_ratio_vs_full": 8.0,
           "train_seconds": 12.0, "predict_seconds": 1.5},
          {"mode": "full", "steps": 10,
           "buckets": {"<0.1%": group(0.1, 0.05, 0.2), "0.1-1%": group(math.nan, math.nan, math.nan)},
           "overall": group(0.3, 0.2, 0.4), "attention_gflops_per_image": 0.16, "flops_ratio_vs_full": 1.0,
           "train_seconds": 11.0, "predict_seconds": 1.4}]
  lines = plots.comparison_table_markdown(rows).strip().splitlines()
  assert [c.strip() for c in lines[0].strip("|").split("|")][2:5] == ["Dice % <0.1%", "Dice % 0.1-1%", "Dice % all"]
  boltz = [c.strip() for c in lines[2].strip("|").split("|")]
  assert boltz == ["boltzmann", "10", "20.0 [10.0, 30.0]", "50.0 [40.0, 60.0]", "40.0 [30.0, 50.0]", "0.02",
                   "0.125 (8.0x fewer)", "12.0", "1.5"]
  assert [c.strip() for c in lines[3].strip("|").split("|")][3] == "-"  # an undefined mean
  _assert_png(plots.plot_dice_by_bucket(rows, tmp_path / "dice.png"))
  _assert_png(plots.plot_flops_vs_dice(rows, tmp_path / "flops.png"))
  # grids= is another name for level_shapes.
  rng = np.random.default_rng(1)
  out = plots.plot_kept_keys(np.zeros((64, 64), np.uint8), np.ones((64, 64), np.uint8), _keep_masks(rng),
                             [0.5] * 9, tmp_path / "kept.png", grids=LEVELS, title="a prompt")
  _assert_png(out, min_side=300)


def test_seg_step_bench_smoke(tmp_path):
  """The decoder-step benchmark runs at tiny shapes, checks kernel vs dense, and prints its ratio line."""
  out_json = tmp_path / "seg_step.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "bench", "seg_step.py"), "--smoke", "--check", "--json", str(out_json)],
      capture_output=True, text=True, timeout=180, cwd=REPO, env=env, check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  out = proc.stdout
  assert "# machine:" in out and "load average" in out and "jax " in out
  assert "check boltzmann[xla] vs dense_sampled on the same keep masks: PASS" in out
  ratio_lines = [line for line in out.splitlines() if line.startswith("ratio dense_sampled / boltzmann:")]
  assert len(ratio_lines) == 1 and "kept fraction" in ratio_lines[0]
  payload = json.loads(out_json.read_text())
  assert payload["check"]["ok"] is True
  assert payload["ratio"]["boltzmann"] > 0
  assert len(payload["layers_detail"]) == 3
  # Layer i samples at the temperature of the prediction before it: T = 1 / (2 + (i - 1)).
  assert [round(r["temperature"], 6) for r in payload["layers_detail"]] == [1.0, 0.5, round(1 / 3, 6)]
  assert 0 < payload["kept_fraction"] <= 1


def test_object_query_picks_the_query_focusing_on_the_object(tmp_path):
  # 3 queries over an 8x8 last level of a 64 px image; the object covers grid cells (2..3, 4..5).
  gt = np.zeros((64, 64), np.uint8)
  gt[16:32, 32:48] = 1
  keep = np.zeros((2, 3, 64), bool)
  keep[:, 0] = True  # attends everywhere: no preference
  obj = np.zeros((8, 8), bool)
  obj[2:4, 4:6] = True
  keep[:, 2] = obj.reshape(-1)  # exactly the object
  keep[0, 1, :8] = True  # a row far away
  masks = [np.ones((2, 3, 4), bool), np.ones((2, 3, 16), bool), keep]
  assert plots.object_query(masks, gt, LEVELS) == 2
  # An object smaller than one key cell still picks the query keeping its cell.
  tiny = np.zeros((64, 64), np.uint8)
  tiny[20, 36] = 1
  assert plots.object_query(masks, tiny, [(2, 2), (4, 4), (8, 8)]) == 2
  out = plots.plot_kept_keys(np.zeros((64, 64), np.uint8), gt, masks, [1.0, 0.5, 0.33], tmp_path / "obj.png",
                             query="object", title="a prompt")
  _assert_png(out, min_side=200)
  with pytest.raises(ValueError, match="non-empty gt_mask"):
    plots.plot_kept_keys(np.zeros((64, 64), np.uint8), None, masks, [1.0, 0.5, 0.33], tmp_path / "x.png",
                         query="object")


def test_eval_only_rows_take_their_modes_colour():
  from mlx_med.seg import plots

  assert plots._mode_colour("full (boltzmann checkpoint)") == plots.MODE_COLOURS["full"]
  assert plots._mode_colour("threshold") == plots.MODE_COLOURS["threshold"]
  assert plots._mode_colour("full (boltzmann checkpoint)") != plots._mode_colour("threshold")
