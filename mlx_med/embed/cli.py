"""`mlx-med embed ...`: train MedImageInsight-style two towers and use their embeddings.

  mlx-med embed train --config configs/embed/medimageinsight.py:smoke --workdir runs/mii [--config.a.b=v]
  mlx-med embed images --model RUN_OR_HFDIR --images PATH [PATH ...] --out emb.parquet
      PATH: image files (DICOM, NIfTI, PNG, JPEG) or folders (searched recursively; unreadable
      files are listed and skipped). Writes a parquet table (path, embedding).
  mlx-med embed index build --embeddings emb.parquet [...] --out INDEX_DIR [--metric cosine|ip|l2]
  mlx-med embed index search --index INDEX_DIR (--queries q.parquet | --model M --images PATH ...) [--k 10]
  mlx-med embed zeroshot --model M --images PATH ... --labels "pneumonia;effusion;normal" [--multi-label]
  mlx-med embed evaluate --model M --data FOLDER [--split test] [--method zeroshot|knn|probe] --out DIR
      FOLDER holds metadata.csv (path, split, labels ";"-joined, optional domain, report) and the images.
      Writes eval.json (per-label ROC AUC with bootstrap 95% CI, Youden-J rule-in and 90%-sensitivity
      rule-out operating points, decision counts) and ROC curve PNGs.

Embeddings and results stay on this machine: nothing here sends data anywhere. Bad input prints one
line and exits with status 2.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("mlx_med.embed")
EXIT_BAD_INPUT = 2


def _bad_input(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  raise SystemExit(EXIT_BAD_INPUT)


# ----------------------------------------------------------------------------- images -> embeddings


def collect_images(inputs: list[str]) -> tuple[list[Path], list[tuple[Path, str]]]:
  """Image files named directly or found under folders; returns (paths, skipped (path, reason))."""
  from mlx_med.vision import io as vio

  paths: list[Path] = []
  skipped: list[tuple[Path, str]] = []
  for item in inputs:
    p = Path(item)
    if p.is_dir():
      scan = vio.load_folder(p)
      paths.extend(scan.paths)
      skipped.extend(scan.skipped)
    elif p.is_file():
      paths.append(p)
    else:
      _bad_input(f"{item}: no such file or folder")
  if not paths:
    _bad_input(f"no readable images in {', '.join(inputs)} ({len(skipped)} file(s) skipped)")
  return paths, skipped


def embed_paths(embedder, paths: list[Path], *, batch_size: int = 64, progress: bool = True,
                **load_kwargs) -> tuple[np.ndarray, list[Path], list[tuple[Path, str]]]:
  """Load, preprocess (the model's processor) and embed images in batches.

  Files that fail to load are skipped with their one-line reason; returns (embeddings [M, E],
  the M embedded paths, skipped).
  """
  from mlx_med.vision import io as vio

  out, kept, skipped = [], [], []
  batch, batch_paths = [], []
  start = time.perf_counter()

  def flush():
    if batch:
      out.append(np.asarray(embedder.embed_images(np.stack(batch)), np.float32))
      kept.extend(batch_paths)
      batch.clear()
      batch_paths.clear()

  for i, path in enumerate(paths):
    try:
      batch.append(vio.load_and_preprocess(path, processor=embedder.processor, **load_kwargs))
      batch_paths.append(path)
    except vio.ImageLoadError as e:
      skipped.append((path, e.reason if hasattr(e, "reason") else str(e)))
    if len(batch) == batch_size:
      flush()
      if progress:
        done = i + 1
        rate = done / max(time.perf_counter() - start, 1e-9)
        print(f"\r{done}/{len(paths)} images, {rate:.1f}/s, ETA {(len(paths) - done) / rate:.0f} s",
              end="", file=sys.stderr, flush=True)
  flush()
  if progress and len(paths) >= batch_size:
    print(file=sys.stderr)
  if not kept:
    return np.zeros((0, 0), np.float32), [], skipped
  return np.concatenate(out), kept, skipped


def write_embeddings(path: str | os.PathLike, paths: list, embeddings: np.ndarray) -> None:
  """parquet table (path: string, embedding: fixed-size list<float32>), written to a temporary name first."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  emb = np.ascontiguousarray(embeddings, np.float32)
  column = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
  table = pa.table({"path": pa.array([str(p) for p in paths], pa.string()), "embedding": column})
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  pq.write_table(table, tmp)
  os.replace(tmp, path)


def read_embeddings(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
  import pyarrow.parquet as pq

  try:
    table = pq.read_table(path)
  except (OSError, ValueError) as e:
    _bad_input(f"{path}: not a readable parquet file ({type(e).__name__}); make it with `mlx-med embed images`")
  if not {"path", "embedding"} <= set(table.column_names):
    _bad_input(f"{path}: needs columns 'path' and 'embedding', found {table.column_names}")
  emb = np.asarray(table.column("embedding").to_pylist(), np.float32)
  if emb.ndim != 2 or len(emb) == 0:
    _bad_input(f"{path}: no embeddings (or rows of different lengths)")
  return table.column("path").to_pylist(), emb


def _report_skipped(skipped: list[tuple[Path, str]]) -> None:
  if skipped:
    print(f"skipped {len(skipped)} file(s):", file=sys.stderr)
    for p, reason in skipped[:20]:
      print(f"  {p}: {reason}", file=sys.stderr)
    if len(skipped) > 20:
      print(f"  ... and {len(skipped) - 20} more", file=sys.stderr)


def _load_embedder(model: str):
  from mlx_med.embed.model import Embedder

  if not Path(model).exists():
    _bad_input(f"--model {model}: no such run directory or Hugging Face CLIP/SigLIP directory")
  return Embedder.load(model)


def _load_kwargs(args) -> dict:
  kw = {}
  if getattr(args, "window", None):
    w = args.window
    if "," in w:
      try:
        c, width = (float(v) for v in w.split(","))
      except ValueError:
        _bad_input(f"--window {w!r}: give CENTER,WIDTH (e.g. -600,1500), a preset name, 'header' or 'none'")
      w = (c, width)
    kw["window"] = w
  if getattr(args, "frame", None) is not None:
    kw["frame"] = args.frame
  return kw


# ----------------------------------------------------------------------------- commands


def _cmd_train(args, overrides) -> int:
  from mlx_med.core import config as config_lib
  from mlx_med.embed import train as train_lib

  config = config_lib.get_config(args.config, overrides)
  if config.get("task") != "medimageinsight":
    raise config_lib.ConfigError(f"{args.config}: config.task={config.get('task')!r}; `mlx-med embed train` takes a "
                                 "two-tower config such as configs/embed/medimageinsight.py:smoke")
  train_lib.run(config, args.workdir, progress=not args.no_progress, allow_config_change=args.allow_config_change)
  return 0


def _cmd_images(args) -> int:
  embedder = _load_embedder(args.model)
  paths, skipped = collect_images(args.images)
  emb, kept, bad = embed_paths(embedder, paths, batch_size=args.batch_size, progress=not args.quiet,
                               **_load_kwargs(args))
  skipped += bad
  _report_skipped(skipped)
  if not kept:
    _bad_input("none of the images could be loaded (see the list above)")
  write_embeddings(args.out, kept, emb)
  print(f"wrote {len(kept)} embeddings of dimension {emb.shape[1]} to {args.out}")
  return 0


def _cmd_index_build(args) -> int:
  from mlx_med.embed.index import ExactIndex

  ids, parts = [], []
  for f in args.embeddings:
    p, e = read_embeddings(f)
    ids.extend(p)
    parts.append(e)
  dims = {e.shape[1] for e in parts}
  if len(dims) != 1:
    _bad_input(f"embedding files have different dimensions {sorted(dims)}; index one model's embeddings at a time")
  index = ExactIndex(np.concatenate(parts), ids, metric=args.metric, dtype=args.dtype)
  out = index.save(args.out)
  print(f"indexed {len(index)} embeddings (dim {index.dim}, {args.metric}, {args.dtype}) in {out}")
  return 0


def _cmd_index_search(args) -> int:
  from mlx_med.embed.index import ExactIndex

  index = ExactIndex.load(args.index)
  if args.queries:
    qids, queries = read_embeddings(args.queries)
  elif args.images:
    if not args.model:
      _bad_input("--images needs --model (the model that made the index's embeddings)")
    embedder = _load_embedder(args.model)
    paths, skipped = collect_images(args.images)
    queries, qpaths, bad = embed_paths(embedder, paths, progress=False, **_load_kwargs(args))
    _report_skipped(skipped + bad)
    qids = [str(p) for p in qpaths]
    if not qids:
      _bad_input("none of the query images could be loaded")
  else:
    _bad_input("give --queries FILE.parquet or --images PATH ... with --model")
  k = min(args.k, len(index))
  scores, indices = index.search(queries, k)
  rows = [(q, r + 1, index.ids[int(j)], float(s)) for q, ss, jj in zip(qids, scores, indices, strict=True)
          for r, (s, j) in enumerate(zip(ss, jj, strict=True))]
  _write_rows(args.out, ("query", "rank", "match", "score"), rows)
  return 0


def _write_rows(out: str | None, header: tuple[str, ...], rows: list[tuple]) -> None:
  if out:
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(header)
      w.writerows(rows)
    os.replace(tmp, out)
    print(f"wrote {len(rows)} rows to {out}")
  else:
    w = csv.writer(sys.stdout)
    w.writerow(header)
    w.writerows(rows)


def _split_labels(text: str) -> list[str]:
  labels = [s.strip() for s in text.split(";") if s.strip()]
  if not labels:
    _bad_input(f"--labels {text!r}: give label names separated by ';' (e.g. \"pneumonia;effusion;normal\")")
  if len(set(labels)) != len(labels):
    _bad_input(f"--labels {text!r}: a label is repeated")
  return labels


def _cmd_zeroshot(args) -> int:
  from mlx_med.embed import zeroshot

  labels = zeroshot.parse_list(args.labels)
  templates = zeroshot.parse_templates(args.template) if args.template else None
  embedder = _load_embedder(args.model)
  paths, skipped = collect_images(args.images)
  emb, kept, bad = embed_paths(embedder, paths, progress=not args.quiet, **_load_kwargs(args))
  _report_skipped(skipped + bad)
  if not kept:
    _bad_input("none of the images could be loaded")
  classifier = zeroshot.text_classifier(embedder.embed_texts, labels, templates)
  mode = "sigmoid" if args.multi_label else "softmax"
  scores = zeroshot.zeroshot_scores(emb, classifier, embedder.logit_scale, mode=mode,
                                    logit_bias=getattr(embedder, "logit_bias", None) if args.multi_label else None)
  rows = [(str(p), labels[int(np.argmax(s))], *(f"{v:.6g}" for v in s))
          for p, s in zip(kept, scores.probs, strict=True)]
  _write_rows(args.out, ("path", "top_label", *labels), rows)
  return 0


def _cmd_evaluate(args) -> int:
  from mlx_med.embed.pipeline import evaluate_folder, format_report

  report = evaluate_folder(_load_embedder(args.model), args.data, method=args.method, split=args.split,
                           train_split=args.train_split, out_dir=args.out, k=args.k,
                           same_domain=not args.all_rows, n_boot=args.n_boot, progress=not args.quiet)
  print(format_report(report))
  print(f"eval.json and ROC plots in {args.out}")
  return 0


# ----------------------------------------------------------------------------- parser


def _image_options(p: argparse.ArgumentParser) -> None:
  p.add_argument("--window", help="DICOM/NIfTI window: 'header' (default), 'none', a preset (lung, bone, brain, ...) "
                                  "or CENTER,WIDTH")
  p.add_argument("--frame", type=int, help="frame of a multi-frame DICOM / time index of a 4D NIfTI")


def register(subparsers) -> None:
  embed = subparsers.add_parser("embed", help="MedImageInsight: train two towers, embed, search, zero-shot, evaluate")
  sub = embed.add_subparsers(dest="embed_command", required=True)

  train = sub.add_parser("train", help="train or resume a two-tower model",
                         description="Overrides: --config.section.key=value (unknown keys are errors).")
  train.add_argument("--config", required=True, help="path/to/medimageinsight.py[:variant]")
  train.add_argument("--workdir", required=True)
  train.add_argument("--no-progress", action="store_true")
  train.add_argument("--allow-config-change", action="store_true", help="see `mlx-med train --help`")
  train.set_defaults(func=_cmd_train, accepts_overrides=True)

  images = sub.add_parser("images", help="embed image files/folders into a parquet table (path, embedding)")
  images.add_argument("--model", required=True, help="a training run directory or a HF CLIP/SigLIP directory")
  images.add_argument("--images", required=True, nargs="+", metavar="PATH")
  images.add_argument("--out", required=True, help="FILE.parquet")
  images.add_argument("--batch-size", type=int, default=64)
  images.add_argument("--quiet", action="store_true")
  _image_options(images)
  images.set_defaults(func=_cmd_images)

  index = sub.add_parser("index", help="exact top-k index over embeddings")
  isub = index.add_subparsers(dest="index_command", required=True)
  build = isub.add_parser("build", help="index parquet embeddings (from `embed images`)")
  build.add_argument("--embeddings", required=True, nargs="+", metavar="FILE.parquet")
  build.add_argument("--out", required=True, help="index directory")
  build.add_argument("--metric", default="cosine", choices=("cosine", "ip", "l2"))
  build.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  build.set_defaults(func=_cmd_index_build)
  search = isub.add_parser("search", help="top-k matches (query, rank, match, score) as CSV")
  search.add_argument("--index", required=True)
  search.add_argument("--queries", help="FILE.parquet of query embeddings")
  search.add_argument("--images", nargs="+", metavar="PATH", help="query images (with --model)")
  search.add_argument("--model")
  search.add_argument("--k", type=int, default=10)
  search.add_argument("--out", help="CSV file (default: stdout)")
  _image_options(search)
  search.set_defaults(func=_cmd_index_search)

  zs = sub.add_parser("zeroshot", help="zero-shot label scores from text prompts")
  zs.add_argument("--model", required=True)
  zs.add_argument("--images", required=True, nargs="+", metavar="PATH")
  zs.add_argument("--labels", required=True, help='label names separated by ";"')
  zs.add_argument("--template", action="append", help="prompt template with {finding} and optionally {domain} (repeatable; default: a built-in set)")
  zs.add_argument("--multi-label", action="store_true", help="independent per-label scores instead of a softmax")
  zs.add_argument("--out", help="CSV file (default: stdout)")
  zs.add_argument("--quiet", action="store_true")
  _image_options(zs)
  zs.set_defaults(func=_cmd_zeroshot)

  ev = sub.add_parser("evaluate", help="per-label ROC AUC (bootstrap CI), operating points and ROC plots")
  ev.add_argument("--model", required=True)
  ev.add_argument("--data", required=True, help="folder with metadata.csv and the images")
  ev.add_argument("--split", default="test")
  ev.add_argument("--train-split", default="train", help="support set of knn / probe")
  ev.add_argument("--method", default="zeroshot", choices=("zeroshot", "knn", "probe"))
  ev.add_argument("--k", type=int, default=10, help="neighbours for knn")
  ev.add_argument("--all-rows", action="store_true",
                  help="score each label on every row (default: only rows of the label's domain, when known)")
  ev.add_argument("--n-boot", type=int, default=1000)
  ev.add_argument("--out", required=True)
  ev.add_argument("--quiet", action="store_true")
  ev.set_defaults(func=_cmd_evaluate)


def main(argv: list[str] | None = None) -> int:
  from mlx_med.cli import main as cli_main

  return cli_main(["embed", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
  sys.exit(main())
