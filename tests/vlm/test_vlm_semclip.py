"""SemCLIP: crops, distant labels, psi's loss and training, crop and token selection (mlx_med.vlm.semclip)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlx_med.vlm import semclip, vstar

# ----------------------------------------------------------------------------- crops


@pytest.mark.parametrize("h, w, scales, overlap", [(256, 256, (1, 2, 3), 0.25), (300, 451, (2, 3, 4), 0.25),
                                                   (97, 64, (1, 3, 5), 0.5), (120, 80, (2,), 0.0)])
def test_crop_grid_covers_every_pixel_at_every_scale(h, w, scales, overlap):
  crops = semclip.crop_grid(h, w, scales, overlap)
  assert len(crops) == sum(s * s for s in scales)
  assert crops == semclip.crop_grid(h, w, scales, overlap)  # deterministic
  start = 0
  for s in scales:
    level = crops[start:start + s * s]
    start += s * s
    cover = np.zeros((h, w), int)
    for x0, y0, x1, y1 in level:
      assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
      cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1
    # row-major order, equal sizes within a scale, neighbours overlap by ~overlap of a crop
    xs = sorted({c[0] for c in level})
    ys = sorted({c[1] for c in level})
    assert [c[:2] for c in level] == [(x, y) for y in ys for x in xs]
    cw, ch = level[0][2] - level[0][0], level[0][3] - level[0][1]
    assert all(c[2] - c[0] == cw and c[3] - c[1] == ch for c in level)
    if s > 1:
      assert abs((level[0][2] - level[1][0]) - overlap * cw) <= 1.0
    else:
      assert level == [(0, 0, w, h)]


def test_crop_grid_bad_arguments():
  with pytest.raises(ValueError, match="overlap"):
    semclip.crop_grid(10, 10, (2,), 1.0)
  with pytest.raises(ValueError, match="positive integer"):
    semclip.crop_grid(10, 10, (0,))


def test_crop_labels_on_hand_made_boxes():
  crops = [(0, 0, 50, 50), (40, 0, 90, 50), (0, 40, 50, 90), (0, 0, 100, 100)]
  # a 10x10 box at x 42..52: fully inside crop 1 and 3; crop 0 holds 8/10 of it
  labels = semclip.crop_labels(crops, [(42, 10, 52, 20)])
  assert labels.tolist() == [False, True, False, True]
  assert semclip.crop_labels(crops, [(42, 10, 52, 20)], cover=0.8).tolist() == [True, True, False, True]
  # the 0.9 edge: 9 of 10 columns inside crop 0 is exactly 0.9 -> positive
  assert semclip.crop_labels(crops, [(41, 10, 51, 20)]).tolist() == [True, True, False, True]
  # two targets: a crop holding either one is positive
  two = semclip.crop_labels(crops, [(5, 5, 15, 15), (5, 60, 15, 70)])
  assert two.tolist() == [True, False, True, True]
  assert semclip.crop_labels(crops, []).tolist() == [False] * 4
  with pytest.raises(ValueError, match="cover"):
    semclip.crop_labels(crops, [], cover=0.0)


def test_extract_crops_cuts_and_resizes():
  image = np.zeros((64, 96, 3), np.uint8)
  image[:, 48:] = (200, 10, 30)
  out = semclip.extract_crops(image, [(0, 0, 48, 64), (48, 0, 96, 64), (32, 16, 64, 48)], 16)
  assert out.shape == (3, 16, 16, 3) and out.dtype == np.uint8
  assert out[0].max() == 0 and (out[1] == np.array([200, 10, 30], np.uint8)).all()
  assert out[2][:, :6].max() == 0 and (out[2][:, 10:] == np.array([200, 10, 30], np.uint8)).all()


# ----------------------------------------------------------------------------- loss


def _numpy_loss(q, c, labels, log_scale, bw):
  """Independent float64 definition of the loss (the module docstring's words)."""
  q, c = q.astype(np.float64), c.astype(np.float64)
  s = np.exp(log_scale)
  b, n, _ = c.shape
  flat = c.reshape(b * n, -1)
  out = np.zeros(b)
  for i in range(b):
    pos = labels[i] > 0
    if not pos.any():
      continue
    lg = s * c[i] @ q[i]
    p = np.exp(lg - lg.max()) / np.exp(lg - lg.max()).sum()
    loss = -np.log(p[pos].sum())
    cross = s * flat @ q[i]
    px = np.exp(cross - cross.max()) / np.exp(cross - cross.max()).sum()
    q2c = -np.log(px[i * n:(i + 1) * n][pos].sum())
    c2q = []
    for k in np.flatnonzero(pos):
      row = s * q @ c[i, k]
      pr = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
      c2q.append(-np.log(pr[i]))
    out[i] = loss + bw * 0.5 * (q2c + np.mean(c2q))
  return out


def test_psi_loss_matches_a_numpy_definition():
  rng = np.random.default_rng(0)
  b, n, e = 4, 7, 5
  q = rng.normal(size=(b, e)); q /= np.linalg.norm(q, axis=-1, keepdims=True)
  c = rng.normal(size=(b, n, e)); c /= np.linalg.norm(c, axis=-1, keepdims=True)
  labels = (rng.uniform(size=(b, n)) < 0.3).astype(np.int32)
  labels[0] = 0  # a question without a positive crop is left out
  labels[1, 2] = 1
  for bw in (0.0, 0.5):
    got, valid = semclip.psi_loss(jnp.asarray(q, jnp.float32), jnp.asarray(c, jnp.float32), jnp.asarray(labels),
                                  jnp.float32(np.log(10.0)), bw)
    want = _numpy_loss(q, c, labels, np.log(10.0), bw)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)  # float32 logsumexp rounding
    assert np.asarray(valid).tolist() == [False, True, True, True] == (labels.sum(1) > 0).tolist()


# ----------------------------------------------------------------------------- selection


def test_select_crops_never_exceeds_the_budget_and_takes_the_top():
  rng = np.random.default_rng(1)
  for trial in range(200):
    n = int(rng.integers(1, 30))
    crops = [(k, 0, k + 1, 1) for k in range(n)]
    scores = rng.normal(size=n)
    costs = rng.integers(1, 50, n)
    budget = int(rng.integers(0, 200))
    boxes, idx = semclip.select_crops(scores, crops, budget_tokens=budget, tokens_per_crop=costs,
                                      return_indices=True)
    assert costs[idx].sum() <= budget and len(set(idx)) == len(idx)
    assert boxes == [crops[i] for i in idx]
    assert list(scores[idx]) == sorted(scores[idx], reverse=True)  # in score order
    rest = [i for i in range(n) if i not in idx]
    assert all(costs[i] > budget - costs[idx].sum() for i in rest)  # greedy: nothing left fits
    # uniform cost: exactly the top floor(budget / cost) crops
    k = budget // 16
    top = semclip.select_crops(scores, crops, budget_tokens=budget, tokens_per_crop=16)
    assert top == [crops[i] for i in np.argsort(-scores, kind="stable")[:k]]
  capped = semclip.select_crops([3, 2, 1], crops[:3] if n >= 3 else [(0, 0, 1, 1)] * 3, budget_tokens=100,
                                tokens_per_crop=1, k_max=2)
  assert len(capped) == 2
  with pytest.raises(ValueError, match="scores for"):
    semclip.select_crops([1.0], [], budget_tokens=1, tokens_per_crop=1)


def test_select_tokens_equals_numpy_top_k():
  rng = np.random.default_rng(2)
  tokens = rng.normal(size=(50, 16)).astype(np.float32)
  query = rng.normal(size=16).astype(np.float32)
  cos = tokens @ query / (np.linalg.norm(tokens, axis=1) * np.linalg.norm(query))
  for k in (1, 7, 50):
    got = semclip.select_tokens(tokens, query, k)
    np.testing.assert_array_equal(got, np.sort(np.argsort(-cos)[:k]))
  thr = float(np.sort(cos)[-5:-7:-1].mean())  # midway between the 5th and 6th: exactly 5 tokens above it
  np.testing.assert_array_equal(semclip.select_tokens(tokens, query, 12, threshold=thr),
                                np.sort(np.argsort(-cos)[:5]))
  np.testing.assert_array_equal(semclip.select_tokens(tokens, query, 3, threshold=thr),
                                np.sort(np.argsort(-cos)[:3]))  # the budget caps it
  assert len(semclip.select_tokens(tokens, query, 4, threshold=2.0, min_tokens=2)) == 2
  with pytest.raises(ValueError, match=r"\[N, E\]"):
    semclip.select_tokens(tokens, query[:3], 4)


def _numpy_states(x, idx, heads):
  e = x.shape[-1]
  d = e // heads
  kept = x[idx].astype(np.float64)
  out = np.zeros_like(kept)
  for h in range(heads):
    sl = slice(h * d, (h + 1) * d)
    s = kept[:, sl] @ kept[:, sl].T / np.sqrt(d)
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    out[:, sl] = p @ kept[:, sl]
  return kept + out


def test_selected_token_states_against_numpy_and_kernel_in_interpret_mode():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 40, 16)).astype(np.float32)
  idx = np.stack([np.sort(rng.choice(40, 8, replace=False)) for _ in range(2)]).astype(np.int32)
  np.testing.assert_array_equal(np.asarray(semclip.selected_token_states(x[0], idx[0], refine=False)), x[0][idx[0]])
  want = np.stack([_numpy_states(x[b], idx[b], 2) for b in range(2)])
  xla = np.asarray(semclip.selected_token_states(x, idx, num_heads=2, backend="xla"))
  np.testing.assert_allclose(xla, want, rtol=1e-5, atol=1e-5)
  ref = np.asarray(semclip.selected_token_states(x, idx, num_heads=2, backend="reference"))
  np.testing.assert_allclose(ref, want, rtol=1e-5, atol=1e-5)
  kernel = np.asarray(semclip.selected_token_states(x, idx, num_heads=2, backend="interpret"))
  np.testing.assert_allclose(kernel, want, rtol=1e-5, atol=1e-5)
  single = np.asarray(semclip.selected_token_states(x[1], idx[1], num_heads=2, backend="xla"))
  np.testing.assert_allclose(single, want[1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- psi training


IMAGE_SIZE = 192


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  config = semclip.default_psi_config("smoke")
  config.data.image_size = IMAGE_SIZE
  config.data.n_train = 512
  config.model.image.patch_size = 4  # 64 tokens per 32 px crop: a 4-10 px target spans a few patches
  config.data.n_eval = 0
  config.model.scales = (2, 3)
  config.train.update({"steps": 160, "batch_size": 16, "lr": 3e-3, "warmup_steps": 15, "eval_every": 0,
                       "log_every": 40, "ckpt_every": 80})
  workdir = tmp_path_factory.mktemp("psi")
  result = semclip.train_psi(config, workdir)
  return config, workdir, result


def _recall(psi, examples):
  hits, chance = [], []
  for ex in examples:
    boxes, scores = psi.image_scores(ex.image, ex.question)
    labels = semclip.crop_labels(boxes, ex.boxes, psi.cfg.cover)
    hits.append(labels[int(np.argmax(scores))])
    chance.append(labels.mean())
  return float(np.mean(hits)), float(np.mean(chance))


def test_psi_training_raises_positive_crop_recall_above_chance(trained):
  config, workdir, result = trained
  assert result.final_step == 160 and np.isfinite(result.final_loss)
  psi = semclip.load_psi(workdir)
  assert psi.step == 160 and psi.cfg.scales == (2, 3)
  held_out = vstar.synth_vstar(96, image_size=IMAGE_SIZE, seed=int(config.data.synth_seed) + 7)
  recall, chance = _recall(psi, held_out)
  untrained = semclip.Psi(psi.cfg, semclip.psi_init(psi.cfg, jax.random.key(5)), psi.tokenizer)
  recall0, _ = _recall(untrained, held_out)
  print(f"psi recall@1 on 96 held-out questions: {recall:.3f} (untrained {recall0:.3f}, chance {chance:.3f})")
  assert 0.1 < chance < 0.35
  # measured (2-core CPU, this config): recall 0.365 against chance 0.225; a tiny model at 160 steps
  assert recall >= chance + 0.1 and recall >= recall0 + 0.05


def test_psi_scores_agree_with_the_task_features(trained):
  _, workdir, _ = trained
  psi = semclip.load_psi(workdir)
  ex = vstar.synth_vstar(2, image_size=IMAGE_SIZE, seed=11)[1]
  boxes = semclip.crop_grid(IMAGE_SIZE, IMAGE_SIZE, psi.cfg.scales, psi.cfg.overlap)
  crops = semclip.extract_crops(ex.image, boxes, psi.crop_size)
  ids = psi.question_ids(ex.question)
  q, c = semclip.psi_embed(psi.cfg, psi.params, jnp.asarray(crops[None]), jnp.asarray(ids))
  want = np.asarray(c[0] @ q[0])
  np.testing.assert_allclose(psi.scores(crops, ex.question), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(semclip.psi_scores(psi, crops, ex.question), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(semclip.psi_scores(psi.params, crops, ids[0], cfg=psi.cfg), want, rtol=1e-4, atol=1e-5)
  got_boxes, scores = psi.image_scores(ex.image, ex.question)
  assert got_boxes == boxes and np.allclose(scores, want, atol=1e-5)
  with pytest.raises(ValueError, match="needs cfg"):
    semclip.psi_scores(psi.params, crops, ids[0])


def test_load_psi_errors(tmp_path):
  with pytest.raises(ValueError, match="no psi.json"):
    semclip.load_psi(tmp_path)
