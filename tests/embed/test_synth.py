"""The synthetic image-report-label generator: files, determinism, visible findings, faithful reports."""

import csv
import re

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from mlx_med.embed import synth


def _rows(folder):
  with open(folder / "metadata.csv", newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return synth.generate_dataset(tmp_path_factory.mktemp("synth") / "ds", n_train=150, n_test=50, image_size=32,
                                seed=7)


def test_layout_and_columns(dataset):
  rows = _rows(dataset)
  assert list(rows[0]) == ["path", "split", "domain", "labels", "report"]
  assert [r["split"] for r in rows] == ["train"] * 150 + ["test"] * 50
  counts = {d: sum(r["domain"] == d for r in rows) for d in synth.DOMAINS}
  assert set(counts.values()) == {40}  # equal shares of 200 over five modalities
  n_labels = [len(r["labels"].split(";")) if r["labels"] else 0 for r in rows]
  assert 0 in n_labels and max(n_labels) >= 2  # normal images and multi-label images both occur
  for r in rows[:20]:
    img = Image.open(dataset / r["path"])
    assert img.mode == "RGB" and img.size == (32, 32)
    for label in filter(None, r["labels"].split(";")):
      assert label in synth.ALL_LABELS and label.startswith(r["domain"] + "/")
  assert not [p for p in dataset.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_all_labels_order():
  assert synth.ALL_LABELS == [f"{d}/{f}" for d, fs in synth.DOMAINS.items() for f in fs]
  assert len(set(synth.ALL_LABELS)) == len(synth.ALL_LABELS)


def test_deterministic_for_a_seed(dataset, tmp_path):
  again = synth.generate_dataset(tmp_path / "again", n_train=150, n_test=50, image_size=32, seed=7)
  other = synth.generate_dataset(tmp_path / "other", n_train=150, n_test=50, image_size=32, seed=8)
  assert _rows(again) == _rows(dataset)
  assert _rows(other) != _rows(dataset)
  for r in _rows(dataset)[:25]:
    np.testing.assert_array_equal(np.asarray(Image.open(dataset / r["path"])),
                                  np.asarray(Image.open(again / r["path"])))


def test_reports_mention_exactly_the_present_findings(dataset):
  rows = _rows(dataset)
  negations = 0
  for r in rows:
    text = r["report"].lower()
    present = set(filter(None, r["labels"].split(";")))
    for finding in synth.DOMAINS[r["domain"]]:
      word = finding.replace("_", " ")
      negated = f"no {word}." in text
      negations += negated
      positive = re.search(rf"\b{word}\b", text.replace(f"no {word}.", "")) is not None
      assert positive == (f"{r['domain']}/{finding}" in present), (r, finding)
      assert not (negated and positive), r
    if not present:
      assert "normal" in text or "no acute" in text or "no abnormality" in text, r
  assert negations > 0  # some reports carry a negated absent finding


def test_existing_dataset_needs_overwrite(dataset):
  with pytest.raises(FileExistsError, match="overwrite"):
    synth.generate_dataset(dataset, n_train=2, n_test=1)
  with pytest.raises(ValueError, match="unknown domains"):
    synth.generate_dataset(dataset / "x", n_train=2, n_test=1, domains=["mri"])


@pytest.mark.parametrize("domain", list(synth.DOMAINS))
def test_findings_are_visible_to_a_linear_probe(domain):
  """Labels are defined by visible structures: logistic regression on 16x16 downsampled pixels
  separates every finding from its absence on held-out images of the same modality (the small,
  position-free ones, nodule and calcification, least well: a linear model cannot pool)."""
  rng = np.random.default_rng(0)
  present = rng.random((700, len(synth.DOMAINS[domain]))) < 0.35
  images = synth.draw_images(domain, present, image_size=64, seed=1).astype(np.float32) / 255.0
  x = images.reshape(len(images), 16, 4, 16, 4, 3).mean(axis=(2, 4))
  if domain in ("xray", "ct", "oct"):  # grayscale modalities: the three channels are equal
    x = x.mean(-1)
  x = x.reshape(len(images), -1)
  x = (x - x[:500].mean(0)) / (x[:500].std(0) + 1e-3)
  aucs = []
  for j in range(present.shape[1]):
    probe = LogisticRegression(C=0.05, max_iter=2000).fit(x[:500], present[:500, j])
    aucs.append(roc_auc_score(present[500:, j], probe.decision_function(x[500:])))
  assert min(aucs) > 0.62 and np.mean(aucs) > 0.8, dict(zip(synth.DOMAINS[domain], aucs))


def test_difficulty_knobs_change_the_signal():
  present = np.ones((4, 2), bool)
  absent = np.zeros((4, 2), bool)
  strong = synth.draw_images("dermatology", present, seed=0, noise=0.0).astype(float)
  weak = synth.draw_images("dermatology", present, seed=0, noise=0.0, contrast=0.3).astype(float)
  plain = synth.draw_images("dermatology", absent, seed=0, noise=0.0).astype(float)
  assert np.abs(strong - plain).mean() > 2 * np.abs(weak - plain).mean()
  with pytest.raises(ValueError, match=r"present must be \[n, 2\]"):
    synth.draw_images("dermatology", np.ones((4, 3), bool))
