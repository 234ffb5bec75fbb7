"""`mlx-med embed images|index|zeroshot|evaluate` end to end on a tiny Hugging Face CLIP directory and
synthetic images (PNG folder plus a DICOM and a corrupt file), checked against direct library calls."""

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from imaging_files import PATIENT, write_dicom

from mlx_med import cli
from mlx_med.embed import synth, zeroshot
from mlx_med.embed.model import Embedder
from mlx_med.vision import io as vio


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  from tiny_clip import tiny_clip_dir

  root = tmp_path_factory.mktemp("embed_cli")
  model_dir = root / "clip"
  model_dir.mkdir()
  tiny_clip_dir(model_dir)
  data = synth.generate_dataset(root / "data", n_train=40, n_test=40, image_size=32, seed=1)
  extra = root / "extra"
  extra.mkdir()
  write_dicom(extra / "scan.dcm", np.arange(32 * 32, dtype=np.int16).reshape(32, 32), slope=1, intercept=-512,
              center=0, width=800)
  (extra / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
  return {"root": root, "model": model_dir, "data": data, "extra": extra}


def run(argv, capsys):
  try:
    code = cli.main([str(a) for a in argv])
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_images_index_and_search(workspace, capsys):
  root, model = workspace["root"], workspace["model"]
  emb_file = root / "emb.parquet"
  code, out, err = run(["embed", "images", "--model", model, "--images", workspace["data"] / "images",
                        workspace["extra"], "--out", emb_file, "--quiet"], capsys)
  assert code == 0, err
  assert "broken.png" in err and "skipped 1 file" in err
  assert PATIENT not in err + out
  table = pq.read_table(emb_file)
  paths = table.column("path").to_pylist()
  emb = np.asarray(table.column("embedding").to_pylist(), np.float32)
  assert len(paths) == 81 and emb.shape == (81, 24)
  assert any(p.endswith("scan.dcm") for p in paths)

  # the CLI's embeddings equal the library's on the same files
  embedder = Embedder.load(model)
  direct = embedder.embed_images(np.stack([vio.load_and_preprocess(p, processor=embedder.processor)
                                           for p in paths[:5]]))
  np.testing.assert_allclose(emb[:5], direct, atol=1e-6)

  index_dir = root / "index"
  code, _, err = run(["embed", "index", "build", "--embeddings", emb_file, "--out", index_dir], capsys)
  assert code == 0, err
  res = root / "search.csv"
  code, _, err = run(["embed", "index", "search", "--index", index_dir, "--queries", emb_file, "--k", 3,
                      "--out", res], capsys)
  assert code == 0, err
  rows = read_csv(res)
  assert len(rows) == 81 * 3
  unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  sims = unit @ unit.T
  want = np.argsort(-sims, axis=1, kind="stable")[:, :3]
  got = np.array([paths.index(r["match"]) for r in rows]).reshape(81, 3)
  np.testing.assert_array_equal(got[:, 0], np.arange(81))  # each image finds itself first
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose([float(r["score"]) for r in rows],
                             np.take_along_axis(sims, want, axis=1).reshape(-1), atol=1e-5)

  # query images instead of embeddings
  code, out, err = run(["embed", "index", "search", "--index", index_dir, "--model", model, "--images",
                        workspace["extra"] / "scan.dcm", "--k", 2], capsys)
  assert code == 0, err
  lines = list(csv.DictReader(out.splitlines()))
  assert lines[0]["match"].endswith("scan.dcm") and float(lines[0]["score"]) == pytest.approx(1.0, abs=1e-5)


def test_zeroshot_matches_the_library(workspace, capsys):
  images = sorted((workspace["data"] / "images").glob("*.png"))[:6]
  out_csv = workspace["root"] / "zs.csv"
  code, _, err = run(["embed", "zeroshot", "--model", workspace["model"], "--images", *images,
                      "--labels", "nodule; melanoma ;effusion", "--out", out_csv, "--quiet"], capsys)
  assert code == 0, err
  rows = read_csv(out_csv)
  assert [r["path"] for r in rows] == [str(p) for p in images]
  probs = np.array([[float(r[k]) for k in ("nodule", "melanoma", "effusion")] for r in rows])
  np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)

  embedder = Embedder.load(workspace["model"])
  emb = embedder.embed_images(np.stack([vio.load_and_preprocess(p, processor=embedder.processor) for p in images]))
  classifier = zeroshot.text_classifier(embedder.embed_texts, ["nodule", "melanoma", "effusion"])
  want = zeroshot.zeroshot_scores(emb, classifier, embedder.logit_scale).probs
  np.testing.assert_allclose(probs, want, atol=1e-5)
  assert [r["top_label"] for r in rows] == [["nodule", "melanoma", "effusion"][i] for i in want.argmax(1)]


@pytest.mark.parametrize("method", ["zeroshot", "knn"])
def test_evaluate_writes_report_and_plots(workspace, capsys, method):
  out_dir = workspace["root"] / f"eval_{method}"
  code, out, err = run(["embed", "evaluate", "--model", workspace["model"], "--data", workspace["data"],
                        "--method", method, "--n-boot", 50, "--out", out_dir, "--quiet"], capsys)
  assert code == 0, err
  report = json.loads((out_dir / "eval.json").read_text())
  assert report["method"] == method and report["n_images"] == 40
  assert set(report["labels"]) <= set(synth.ALL_LABELS)
  scored = [v for v in report["labels"].values() if v["auc"] is not None]
  assert scored and all(0.0 <= v["auc"] <= 1.0 for v in scored)
  # each label is counted only among the held-out images of its own domain
  test_rows = [r for r in read_csv(workspace["data"] / "metadata.csv") if r["split"] == "test"]
  for name, v in report["labels"].items():
    assert v["n"] == sum(r["domain"] == name.split("/")[0] for r in test_rows), name
  assert (out_dir / "roc.png").stat().st_size > 0
  assert "mean AUC" in out and "precision@10" in out


def test_bad_input_is_one_line(workspace, capsys):
  model, img = workspace["model"], next((workspace["data"] / "images").glob("*.png"))
  cases = [
      (["embed", "zeroshot", "--model", model, "--images", img, "--labels", " ; "], "no labels given"),
      (["embed", "zeroshot", "--model", model, "--images", img, "--labels", "a;a"], "repeats"),
      (["embed", "images", "--model", workspace["root"] / "nope", "--images", img, "--out", "x.parquet"],
       "no such run directory"),
      (["embed", "images", "--model", model, "--images", workspace["root"] / "missing.png", "--out", "x.parquet"],
       "no such file or folder"),
      (["embed", "index", "build", "--embeddings", img, "--out", workspace["root"] / "idx2"], "not a readable parquet"),
      (["embed", "index", "search", "--index", workspace["root"] / "no_index", "--queries", img], "no_index"),
  ]
  for argv, message in cases:
    code, _, err = run(argv, capsys)
    assert code == 2, (argv, err)
    assert message in err, (message, err)
    assert len(err.strip().splitlines()) == 1, err
