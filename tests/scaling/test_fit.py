"""Scaling-law fits and plots on runs tables simulated from known loss surfaces.

The surfaces are Chinchilla's L(N, D) = E + A/N^alpha + B/D^beta with D = C / (6 N) along each IsoFLOP
budget, so the true compute-optimal exponents are a = beta/(alpha+beta) (N_opt) and b = alpha/(alpha+beta)
(D_opt), independent of both fitting procedures.
"""

import json
import math

import numpy as np
import pytest

from mlx_med.scaling import fit, plots

CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # a = 0.452, b = 0.548
EHR_LIKE = {"E": 1.2, "A": 300.0, "B": 500.0, "alpha": 0.25, "beta": 0.345}  # a = 0.580, b = 0.420, as in the EHR paper


def true_exponents(surface):
  total = surface["alpha"] + surface["beta"]
  return surface["beta"] / total, surface["alpha"] / total


def surface_loss(surface, n, d):
  return surface["E"] + surface["A"] / n ** surface["alpha"] + surface["B"] / d ** surface["beta"]


def simulate_runs(surface, *, budgets=(1e15, 1e16, 1e17, 1e18), sizes=7, width=8.0, noise=0.003, seed=0,
                  centre_jitter=0.0):
  """An IsoFLOP sweep: per budget, `sizes` log-spaced N over a x`width`^2 range around the true optimum
  (shifted by a random factor exp(U(-jitter, jitter)), as a real grid is never centred exactly), D = C/(6N),
  multiplicative log-normal noise of relative size `noise` on the loss."""
  rng = np.random.default_rng(seed)
  alpha, beta = surface["alpha"], surface["beta"]
  g = (alpha * surface["A"] / (beta * surface["B"])) ** (1 / (alpha + beta))
  rows = []
  for c in budgets:
    centre = g * (c / 6) ** (beta / (alpha + beta)) * math.exp(rng.uniform(-centre_jitter, centre_jitter))
    for n in centre * np.geomspace(1 / width, width, sizes):
      d = c / (6 * n)
      loss = surface_loss(surface, n, d) * math.exp(noise * rng.standard_normal())
      rows.append({"run": f"C{c:.0e}_N{n:.3g}", "budget": c, "params_nonembed": n, "params": 1.1 * n,
                   "flops_per_token": 6 * n, "tokens": d, "compute": c, "compute_6nd": c, "val_loss": loss,
                   "train_loss": loss, "status": "done"})
  return rows


@pytest.fixture(scope="module", params=[("chinchilla", CHINCHILLA), ("ehr_like", EHR_LIKE)], ids=lambda p: p[0])
def noisy_fit(request):
  surface = request.param[1]
  rows = simulate_runs(surface, noise=0.003, centre_jitter=0.3, seed=1)
  return surface, rows, fit.fit_scaling(rows, bootstrap=400, seed=0)


def test_approach2_recovers_exponents_within_0_03(noisy_fit):
  surface, _, fits = noisy_fit
  a_true, b_true = true_exponents(surface)
  a2 = fits["approach2"]
  assert all(p["interior"] for p in a2["per_budget"])
  assert len(a2["power_law_budgets"]) == 4
  assert abs(a2["a"] - a_true) <= 0.03, (a2["a"], a_true)
  assert abs(a2["b"] - b_true) <= 0.03, (a2["b"], b_true)
  assert a2["n_opt_coef"][1] == a2["a"] and a2["d_opt_coef"][1] == a2["b"]
  # D_opt = C / (6 N_opt) here, so the two exponents add to one exactly.
  assert a2["a"] + a2["b"] == pytest.approx(1.0, abs=1e-9)


def test_bootstrap_intervals_contain_the_truth(noisy_fit):
  surface, _, fits = noisy_fit
  a_true, b_true = true_exponents(surface)
  a2 = fits["approach2"]
  assert a2["bootstrap"]["kept"] + a2["bootstrap"]["dropped_no_minimum"] == 400
  assert a2["bootstrap"]["kept"] >= 380
  lo, hi = a2["a_ci"]
  assert lo <= a_true <= hi and lo <= a2["a"] <= hi and hi - lo < 0.2
  lo, hi = a2["b_ci"]
  assert lo <= b_true <= hi and lo <= a2["b"] <= hi


def test_approach3_recovers_exponents_within_0_03(noisy_fit):
  surface, _, fits = noisy_fit
  a_true, b_true = true_exponents(surface)
  a3 = fits["approach3"]
  assert abs(a3["a"] - a_true) <= 0.03, (a3, a_true)
  assert abs(a3["b"] - b_true) <= 0.03, (a3, b_true)
  assert a3["a"] == pytest.approx(a3["beta"] / (a3["alpha"] + a3["beta"]))
  assert a3["huber_delta"] == 1e-3 and a3["starts_scored"] == 4500 and a3["starts_optimised"] == 32


def test_approach3_is_exact_on_noise_free_losses():
  """Without noise the Huber objective is zero at the true parameters; the fit must find them."""
  rows = simulate_runs(EHR_LIKE, noise=0.0, budgets=(1e14, 1e15, 1e16), sizes=5)
  runs = fit.finished_runs(rows)
  a3 = fit.approach3(np.array([r["n"] for r in runs]), np.array([r["tokens"] for r in runs]),
                     np.array([r["loss"] for r in runs]), num_starts=8)
  for key in ("E", "A", "B", "alpha", "beta"):
    assert a3[key] == pytest.approx(EHR_LIKE[key], rel=1e-5), key
  assert a3["loss"] < 1e-16


def test_objective_gradient_matches_finite_differences():
  rng = np.random.default_rng(0)
  log_n, log_d = rng.uniform(12, 18, 20), rng.uniform(16, 24, 20)
  log_loss = rng.uniform(0.5, 1.5, 20)
  theta = np.array([6.0, 7.0, 0.4, 0.35, 0.3])
  for delta in (1e-3, 10.0):  # linear and quadratic Huber regimes
    _, grad = fit.chinchilla_objective(theta, log_n, log_d, log_loss, delta)
    for i in range(5):
      step = np.zeros(5)
      step[i] = 1e-6
      numeric = (fit.chinchilla_objective(theta + step, log_n, log_d, log_loss, delta)[0]
                 - fit.chinchilla_objective(theta - step, log_n, log_d, log_loss, delta)[0]) / 2e-6
      assert grad[i] == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def _parabola_rows(budget, centre, sizes, *, curvature=2.0, floor=3.0, fpt=lambda n: 6 * n, prefix=""):
  return [{"run": f"{prefix}{budget:.0e}_{n:.0e}", "budget": budget, "params_nonembed": n,
           "flops_per_token": fpt(n), "tokens": budget / fpt(n),
           "val_loss": curvature * (math.log(n) - math.log(centre)) ** 2 + floor, "status": "done"}
          for n in sizes]


def test_parabola_vertex_is_exact_by_hand():
  # loss = 2 (ln N - ln 1e6)^2 + 3 on N = 1e5, 1e6, 1e7: the vertex is N = 1e6, loss 3.
  fpt = lambda n: 8 * n + 12345.0
  rows = _parabola_rows(1e15, 1e6, [1e5, 1e6, 1e7], fpt=fpt)
  out = fit.approach2(fit.finished_runs(rows), bootstrap=0)
  (p,) = out["per_budget"]
  x0 = math.log(1e6)
  assert p["coef"] == pytest.approx([2.0, -4 * x0, 2 * x0 ** 2 + 3.0], rel=1e-9)
  assert p["n_opt"] == pytest.approx(1e6, rel=1e-9)
  assert p["loss_opt"] == pytest.approx(3.0, abs=1e-9)
  assert p["d_opt"] == pytest.approx(1e15 / fpt(1e6), rel=1e-9)  # a grid point: interpolation is exact
  assert p["interior"] and p["convex"]
  assert out["a"] is None and "needs >= 2" in out["warnings"][-1]
  warnings = fit.fit_scaling(rows, bootstrap=0, num_starts=1)["warnings"]
  assert any("needs >= 2" in w for w in warnings) and any("single budget" in w for w in warnings)

  # Vertex halfway (in ln N) between two runs: flops/token is their geometric mean.
  centre = math.sqrt(1e5 * 1e6)
  (p,) = fit.approach2(fit.finished_runs(_parabola_rows(1e15, centre, [1e4, 1e5, 1e6, 1e7], fpt=fpt)),
                       bootstrap=0)["per_budget"]
  assert p["n_opt"] == pytest.approx(centre, rel=1e-9)
  assert p["d_opt"] == pytest.approx(1e15 / math.sqrt(fpt(1e5) * fpt(1e6)), rel=1e-9)


def test_exact_power_law_across_budgets():
  """Vertices placed exactly on N_opt = 0.5 C^0.6: the power-law fit returns 0.6 and, with D = C/(6N), 0.4."""
  rows = []
  for c in (1e14, 1e15, 1e16):
    n_opt = 0.5 * c ** 0.6
    rows += _parabola_rows(c, n_opt, n_opt * np.array([0.2, 0.5, 1.3, 3.0, 7.0]))
  out = fit.approach2(fit.finished_runs(rows), bootstrap=50)
  assert out["a"] == pytest.approx(0.6, abs=1e-9)
  assert out["b"] == pytest.approx(0.4, abs=1e-9)
  assert out["n_opt_coef"][0] == pytest.approx(math.log(0.5), abs=1e-7)
  assert out["d_opt_coef"][0] == pytest.approx(-math.log(3.0), abs=1e-7)  # D_opt = C / (6 * 0.5 C^0.6)
  assert out["a_ci"] == pytest.approx([0.6, 0.6], abs=1e-9)  # every resample of an exact parabola is exact


def test_d_opt_without_flops_per_token_uses_6n_and_says_so():
  rows = _parabola_rows(1e15, 1e6, [1e5, 1e6, 1e7], fpt=lambda n: 9 * n)
  for r in rows:
    del r["flops_per_token"]
  out = fit.approach2(fit.finished_runs(rows), bootstrap=0)
  assert out["per_budget"][0]["d_opt"] == pytest.approx(1e15 / 6e6, rel=1e-9)
  assert out["d_opt_method"].startswith("C / (6 N_opt)")


def test_minimum_outside_the_grid_is_flagged_and_left_out():
  rows = []
  for c in (1e14, 1e15, 1e16):
    n_opt = 0.5 * c ** 0.6
    rows += _parabola_rows(c, n_opt, n_opt * np.array([0.2, 0.5, 1.3, 3.0]), prefix="in")
  edge_budget = 1e17
  n_opt = 0.5 * edge_budget ** 0.6
  rows += _parabola_rows(edge_budget, n_opt * 10, n_opt * np.array([0.2, 0.5, 1.3, 3.0]))  # still falling
  out = fit.approach2(fit.finished_runs(rows), bootstrap=0)
  flags = {p["budget"]: p["interior"] for p in out["per_budget"]}
  assert flags == {1e14: True, 1e15: True, 1e16: True, 1e17: False}
  assert out["power_law_budgets"] == [1e14, 1e15, 1e16]
  assert out["a"] == pytest.approx(0.6, abs=1e-9)
  assert any("1e+17" in w and "outside" in w for w in out["warnings"])
  # Asked to, the edge budget joins the power law (and, being off the line, moves it).
  loose = fit.approach2(fit.finished_runs(rows), bootstrap=0, interior_only=False)
  assert loose["power_law_budgets"] == [1e14, 1e15, 1e16, 1e17] and loose["a"] > 0.65


def test_concave_budget_has_no_minimum():
  rows = _parabola_rows(1e15, 1e6, [1e5, 1e6, 1e7], curvature=-0.1, floor=5.0)
  (p,) = fit.approach2(fit.finished_runs(rows), bootstrap=0)["per_budget"]
  assert not p["convex"] and not p["interior"]
  assert p["n_opt"] in (1e5, 1e7)  # the best run stands in for the plots


@pytest.mark.parametrize("mutate, pattern", [
    (lambda rows: rows.pop(0), r"budget 1e\+15 has 2 finished size\(s\) .* a parabola needs >= 3"),
    (lambda rows: rows[1].update(val_loss=0.0), r"run r1: column 'val_loss' = 0 must be > 0"),
    (lambda rows: rows[2].update(val_loss=float("nan")), r"run r2: column 'val_loss' is nan"),
    (lambda rows: rows[0].update(params_nonembed="abc"), r"run r0: column 'params_nonembed' = 'abc' is not a number"),
    (lambda rows: [r.pop("val_loss") for r in rows], r"runs table has no column 'val_loss'"),
    (lambda rows: [r.pop("budget") for r in rows], r"runs table has no column 'budget'"),
    (lambda rows: rows[0].update(**{"auroc.mortality.probe": 1.4}), r"run r0: column 'auroc.mortality.probe' = 1.4 is not"),
    (lambda rows: [r.update(status="failed") for r in rows], r"none of the 3 runs has status 'done'"),
])
def test_bad_input_is_a_one_line_value_error(mutate, pattern):
  rows = [{"run": f"r{i}", "budget": 1e15, "params_nonembed": n, "flops_per_token": 6 * n, "tokens": 1e15 / (6 * n),
           "val_loss": 3.0 + i, "status": "done"} for i, n in enumerate((1e5, 1e6, 1e7))]
  mutate(rows)
  with pytest.raises(ValueError, match=pattern) as info:
    fit.fit_scaling(rows, bootstrap=0, num_starts=1)
  assert "\n" not in str(info.value)


def test_empty_table_is_a_value_error():
  with pytest.raises(ValueError, match="runs table is empty"):
    fit.fit_scaling([])


def with_aurocs(rows):
  """Exact linear AUROCs: zero-shot in log10 compute, probe in the loss; a constant baseline with a gap."""
  for r in rows:
    r["auroc.mortality.zero_shot"] = 0.5 + 0.04 * math.log10(r["compute"] / 1e14)
    r["auroc.mortality.probe"] = 1.0 - 0.02 * r["val_loss"]  # losses here are 5-30 nats
    r["auroc.long_stay.baseline"] = "" if r is rows[0] else 0.6  # one missing value; otherwise constant
  return rows


def test_utility_trends_are_exact_lines():
  rows = with_aurocs(simulate_runs(CHINCHILLA, budgets=(1e14, 1e15, 1e16), sizes=5, noise=0.0))
  utility = fit.fit_scaling(rows, bootstrap=0, num_starts=1)["utility"]
  assert sorted(utility) == ["long_stay.baseline", "mortality.probe", "mortality.zero_shot"]
  zs = utility["mortality.zero_shot"]["vs_log_compute"]
  assert zs["slope"] == pytest.approx(0.04, abs=1e-9) and zs["intercept"] == pytest.approx(0.5 - 0.56, abs=1e-9)
  assert zs["r"] == pytest.approx(1.0, abs=1e-9) and zs["n"] == 15
  probe = utility["mortality.probe"]["vs_val_loss"]
  assert probe["slope"] == pytest.approx(-0.02, abs=1e-9) and probe["r"] == pytest.approx(-1.0, abs=1e-9)
  baseline = utility["long_stay.baseline"]["vs_log_compute"]
  assert baseline["n"] == 14 and baseline["slope"] == pytest.approx(0.0, abs=1e-12) and baseline["r"] is None
  assert set(utility["mortality.probe"]) == {"vs_log_compute", "vs_log_params", "vs_val_loss"}


def test_write_fits_takes_csv_strings_writes_json_and_skips_unfinished(tmp_path):
  rows = simulate_runs(CHINCHILLA, budgets=(1e14, 1e15, 1e16), sizes=5)
  as_csv = [{k: (v if isinstance(v, str) else repr(float(v))) for k, v in r.items()} for r in rows]
  as_csv.append({"run": "pending_one", "budget": "1e16", "params_nonembed": "", "val_loss": "",
                 "status": "pending"})
  fits = fit.write_fits(str(tmp_path), as_csv, bootstrap=50, num_starts=4)
  on_disk = json.loads((tmp_path / "fits.json").read_text())
  assert on_disk == fits
  assert not list(tmp_path.glob("*.tmp"))
  assert on_disk["skipped_runs"] == ["pending_one"] and on_disk["num_runs"] == 15
  a2 = on_disk["approach2"]
  for key in ("per_budget", "a", "a_ci", "b", "b_ci", "n_opt_coef", "d_opt_coef"):
    assert key in a2
  for p in a2["per_budget"]:
    assert set(p) >= {"budget", "n_opt", "d_opt", "loss_opt", "coef", "interior"} and len(p["coef"]) == 3
  assert set(on_disk["approach3"]) >= {"E", "A", "B", "alpha", "beta", "a", "b", "huber_delta", "loss"}
  assert on_disk["warnings"] == []
  assert on_disk["approach2"]["a"] == pytest.approx(fit.fit_scaling(rows, bootstrap=50, num_starts=4)["approach2"]["a"])


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
  import matplotlib.image

  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  image = matplotlib.image.imread(path)
  assert image.shape[0] > 300 and image.shape[1] > 500
  assert image[..., :3].std() > 0.05  # something was drawn


def test_plots_are_written_as_pngs(tmp_path):
  rows = with_aurocs(simulate_runs(CHINCHILLA, budgets=(1e14, 1e15, 1e16), sizes=5))
  fits = fit.fit_scaling(rows, bootstrap=50, num_starts=2)
  paths = plots.plot_all(str(tmp_path), rows, fits)
  assert [p.split("/")[-1] for p in paths] == list(plots.PLOT_NAMES)
  for p in paths:
    _assert_png(p)
  assert sorted(f.name for f in (tmp_path / "plots").iterdir()) == sorted(plots.PLOT_NAMES)


def test_plots_without_auroc_or_power_law(tmp_path):
  """Two budgets, one with its minimum off the grid: no power law, no auroc columns; three plots still drawn."""
  rows = _parabola_rows(1e15, 1e6, [1e5, 1e6, 1e7]) + _parabola_rows(1e16, 1e9, [1e5, 1e6, 1e7])
  fits = fit.fit_scaling(rows, bootstrap=0, num_starts=1)
  assert fits["approach2"]["a"] is None
  paths = plots.plot_all(str(tmp_path), rows, fits)
  assert [p.split("/")[-1] for p in paths] == list(plots.PLOT_NAMES[:3])
  for p in paths:
    _assert_png(p)
