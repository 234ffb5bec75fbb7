"""The human-review queue: low-confidence predictions wait for a person, whose answers become examples.

The system-engineering step of building a clinical LLM application brings human expertise in
where the model is unsure. `ReviewQueue` is that step, persisted in one SQLite file so it
survives restarts and can be shared by the process that predicts and the reviewer's command line:

* `submit(item_id, task, prediction, confidence, context)` records every prediction; one with
  confidence < threshold (or outside the item's allowed `choices`) is queued ("pending"), the
  rest are recorded as "auto" (kept, so a reviewer can still spot-check them);
* a reviewer `accept`s a prediction or `correct`s it (the corrected value, reviewer, note and
  time are stored beside the original prediction, which is never overwritten); an item is
  reviewed once;
* `export_examples(path)` writes the reviewed items as JSON lines {"input": context,
  "output": final value, "source": "accepted" | "corrected", "item_id", "task"}, ready to be
  few-shot examples or fine-tuning data.

Storage: WAL journal (readers do not block the writer, so `mlx-med apps review list` works
while a run submits), one connection per queue object shared by its threads under a lock,
writes in `BEGIN IMMEDIATE` transactions (several processes may write the same file), the
schema version in SQLite's `user_version` (a file from a newer version is refused, not guessed at).
Values are stored as JSON text. The queue holds patient context by design (the reviewer needs
it); the command line shows it only with --show-text, and nothing here logs it.

`review_main(argv)` is `mlx-med apps review`::

  mlx-med apps review list    --db PATH [--task T] [--status pending|auto|accepted|corrected|all] [--limit N] [--show-text]
  mlx-med apps review accept  --db PATH ID [--reviewer R]
  mlx-med apps review correct --db PATH ID --value V [--note N] [--reviewer R]
  mlx-med apps review export  --db PATH --out FILE [--task T]
  mlx-med apps review stats   --db PATH
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sqlite3
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
STATUSES = ("pending", "auto", "accepted", "corrected")
REVIEWED = ("accepted", "corrected")

_SCHEMA = """
CREATE TABLE items (
  item_id TEXT PRIMARY KEY,
  task TEXT NOT NULL,
  prediction TEXT NOT NULL,
  confidence REAL NOT NULL,
  threshold REAL NOT NULL,
  context TEXT,
  choices TEXT,
  status TEXT NOT NULL CHECK (status IN ('pending', 'auto', 'accepted', 'corrected')),
  submitted_at TEXT NOT NULL,
  reviewed_at TEXT,
  reviewer TEXT,
  corrected_value TEXT,
  note TEXT
);
CREATE INDEX items_status_task ON items (status, task);
"""


class UnknownItemError(KeyError):
  """No item with that id (a KeyError whose message reads as a sentence)."""

  def __str__(self) -> str:
    return str(self.args[0]) if self.args else ""


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _to_json(value: Any, what: str) -> str:
  try:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, sort_keys=True)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{what} is not JSON-serialisable ({e}); pass str, numbers, lists or dicts") from None


def _from_json(text: str | None) -> Any:
  return None if text is None else json.loads(text)


class ReviewQueue:
  """Predictions waiting for (or done with) human review, in the SQLite file `path`.

  threshold: a submitted prediction with confidence below it waits for review.
  create: make the file when it does not exist (False: a missing file is FileNotFoundError).
  """

  def __init__(self, path: str | os.PathLike, *, threshold: float = 0.7, create: bool = True):
    if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
      raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    self.path = Path(path)
    self.threshold = float(threshold)
    if not self.path.exists():
      if not create:
        raise FileNotFoundError(f"no review database at {self.path} (create one with ReviewQueue(path) or "
                                "`mlx-med apps abstract --review-db PATH`)")
      self.path.parent.mkdir(parents=True, exist_ok=True)
    self._lock = threading.Lock()
    # Autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE for writes).
    self._conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
    try:
      self._init_schema()
    except sqlite3.DatabaseError as e:
      self._conn.close()
      raise ValueError(f"{self.path} is not a review database ({e})") from None
    except Exception:
      self._conn.close()
      raise

  def _init_schema(self) -> None:
    conn = self._conn
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("BEGIN IMMEDIATE")
    try:
      version = conn.execute("PRAGMA user_version").fetchone()[0]
      if version == 0:
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
        if tables:
          raise ValueError(f"{self.path} is an SQLite file with other tables ({', '.join(t[0] for t in tables)}), "
                           "not a review database; choose another path")
        for statement in _SCHEMA.split(";"):
          if statement.strip():
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
      elif version > SCHEMA_VERSION:
        raise ValueError(f"{self.path} has review schema version {version}, newer than this code's "
                         f"{SCHEMA_VERSION}; upgrade mlx_med to read it")
      conn.execute("COMMIT")
    except BaseException:
      if conn.in_transaction:
        conn.execute("ROLLBACK")
      raise

  # ----------------------------------------------------------------- plumbing

  def _write(self, fn):
    """Runs fn(conn) in one IMMEDIATE transaction under the thread lock."""
    with self._lock:
      conn = self._conn
      conn.execute("BEGIN IMMEDIATE")
      try:
        out = fn(conn)
        conn.execute("COMMIT")
        return out
      except BaseException:
        if conn.in_transaction:
          conn.execute("ROLLBACK")
        raise

  def _read(self, sql: str, params: Sequence[Any] = ()) -> list[dict]:
    with self._lock:
      cur = self._conn.execute(sql, params)
      names = [d[0] for d in cur.description]
      return [dict(zip(names, row)) for row in cur.fetchall()]

  @staticmethod
  def _decode(row: dict) -> dict:
    item = dict(row)
    for key in ("prediction", "context", "choices", "corrected_value"):
      item[key] = _from_json(item[key])
    status = item["status"]
    item["final"] = (item["corrected_value"] if status == "corrected"
                     else item["prediction"] if status in ("accepted", "auto") else None)
    return item

  def _row(self, conn: sqlite3.Connection, item_id: str) -> dict:
    cur = conn.execute("SELECT * FROM items WHERE item_id = ?", (item_id,))
    row = cur.fetchone()
    if row is None:
      raise UnknownItemError(f"no review item {item_id!r} in {self.path}")
    return dict(zip([d[0] for d in cur.description], row))

  # ----------------------------------------------------------------- API

  def submit(self, item_id: str, task: str, prediction: Any, confidence: float, context: dict | None = None, *,
             choices: Sequence[Any] | None = None, replace: bool = False) -> bool:
    """Records a prediction; True when it waits for review (confidence < threshold, or not in `choices`).

    choices: the allowed values (a prediction outside them is always queued; a correction must be one).
    replace: resubmitting an id that is still pending/auto replaces it (a reviewed item never is);
    without it a second submission of the same id is a ValueError.
    """
    if not isinstance(item_id, str) or not item_id:
      raise ValueError(f"item_id must be a non-empty str, got {item_id!r}")
    if not isinstance(task, str) or not task:
      raise ValueError(f"item {item_id!r}: task must be a non-empty str, got {task!r}")
    if (isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not math.isfinite(confidence)
        or not 0.0 <= confidence <= 1.0):
      raise ValueError(f"item {item_id!r}: confidence must be a number in [0, 1], got {confidence!r}")
    if context is not None and not isinstance(context, dict):
      raise ValueError(f"item {item_id!r}: context must be a dict or None, got {type(context).__name__}")
    pred_json = _to_json(prediction, f"item {item_id!r}: prediction")
    ctx_json = None if context is None else _to_json(context, f"item {item_id!r}: context")
    choices_json = None
    if choices is not None:
      choices = list(choices)
      if not choices:
        raise ValueError(f"item {item_id!r}: choices is empty; pass None for free-form values")
      choices_json = _to_json(choices, f"item {item_id!r}: choices")
    queued = confidence < self.threshold or (choices is not None and prediction not in choices)
    status = "pending" if queued else "auto"

    def write(conn):
      existing = conn.execute("SELECT status FROM items WHERE item_id = ?", (item_id,)).fetchone()
      values = (task, pred_json, float(confidence), self.threshold, ctx_json, choices_json, status, _now())
      if existing is None:
        conn.execute("INSERT INTO items (task, prediction, confidence, threshold, context, choices, status, "
                     "submitted_at, item_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (*values, item_id))
      elif existing[0] in REVIEWED:
        raise ValueError(f"item {item_id!r} was already reviewed ({existing[0]}); a reviewed item is never "
                         "replaced, submit it under a new id")
      elif not replace:
        raise ValueError(f"item {item_id!r} is already in the queue ({existing[0]}); pass replace=True to "
                         "resubmit it")
      else:
        conn.execute("UPDATE items SET task = ?, prediction = ?, confidence = ?, threshold = ?, context = ?, "
                     "choices = ?, status = ?, submitted_at = ? WHERE item_id = ?", (*values, item_id))
    self._write(write)
    return queued

  def get(self, item_id: str) -> dict:
    """The item as a dict: the submitted fields, status, review fields and `final` (the value now in force:
    the correction, the accepted or auto prediction, None while pending)."""
    with self._lock:
      return self._decode(self._row(self._conn, item_id))

  def items(self, *, status: str | None = None, task: str | None = None, limit: int | None = None) -> list[dict]:
    """Items in submission order, optionally of one status and task."""
    if status is not None and status not in STATUSES:
      raise ValueError(f"status {status!r} is unknown; choose one of {', '.join(STATUSES)}")
    if limit is not None and limit < 0:
      raise ValueError(f"limit must be >= 0, got {limit}")
    where, params = [], []
    if status is not None:
      where.append("status = ?")
      params.append(status)
    if task is not None:
      where.append("task = ?")
      params.append(task)
    sql = "SELECT * FROM items" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY rowid"
    if limit is not None:
      sql += " LIMIT ?"
      params.append(limit)
    return [self._decode(r) for r in self._read(sql, params)]

  def pending(self, task: str | None = None, limit: int = 100) -> list[dict]:
    """Items waiting for review, oldest first."""
    return self.items(status="pending", task=task, limit=limit)

  def _review(self, item_id: str, status: str, reviewer: str, note: str, value_json: str | None,
              check=None) -> None:
    def write(conn):
      row = self._row(conn, item_id)
      if row["status"] in REVIEWED:
        raise ValueError(f"item {item_id!r} was already {row['status']}"
                         f"{' by ' + row['reviewer'] if row['reviewer'] else ''} at {row['reviewed_at']}; "
                         "an item is reviewed once")
      if check is not None:
        check(row)
      conn.execute("UPDATE items SET status = ?, reviewer = ?, note = ?, corrected_value = ?, reviewed_at = ? "
                   "WHERE item_id = ?", (status, reviewer, note, value_json, _now(), item_id))
    self._write(write)

  def accept(self, item_id: str, reviewer: str = "", note: str = "") -> None:
    """Marks the prediction correct (a pending or auto item; reviewing twice is a ValueError)."""
    self._review(item_id, "accepted", reviewer, note, None)

  def correct(self, item_id: str, value: Any, reviewer: str = "", note: str = "") -> None:
    """Stores `value` as the right answer beside the original prediction (kept unchanged)."""
    if value is None or (isinstance(value, str) and not value.strip()):
      raise ValueError(f"item {item_id!r}: the corrected value is empty")
    value_json = _to_json(value, f"item {item_id!r}: corrected value")

    def check(row):
      choices = _from_json(row["choices"])
      if choices is not None and value not in choices:
        raise ValueError(f"item {item_id!r}: {value!r} is not an allowed value; choose one of "
                         f"{', '.join(map(repr, choices))}")
      if value_json == row["prediction"]:
        raise ValueError(f"item {item_id!r}: the correction equals the prediction; accept it instead")
    self._review(item_id, "corrected", reviewer, note, value_json, check)

  def examples(self, task: str | None = None) -> list[dict]:
    """Reviewed items as training/few-shot examples (see the module docstring), in review order."""
    sql = "SELECT * FROM items WHERE status IN ('accepted', 'corrected')"
    params: list[Any] = []
    if task is not None:
      sql += " AND task = ?"
      params.append(task)
    rows = [self._decode(r) for r in self._read(sql + " ORDER BY reviewed_at, rowid", params)]
    return [{"input": r["context"], "output": r["final"], "source": r["status"], "item_id": r["item_id"],
             "task": r["task"]} for r in rows]

  def export_examples(self, path: str | os.PathLike, *, task: str | None = None) -> int:
    """Writes `examples(task)` as JSON lines to `path` (temporary file, then rename); returns the count."""
    rows = self.examples(task)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r in rows:
          f.write(json.dumps(r, ensure_ascii=False) + "\n")
      os.replace(tmp, target)
    except BaseException:
      if os.path.exists(tmp):
        os.unlink(tmp)
      raise
    return len(rows)

  def stats(self) -> dict:
    """Counts: {"pending", "auto", "accepted", "corrected", "total", "by_task": {task: {status: n}}}."""
    rows = self._read("SELECT task, status, COUNT(*) AS n FROM items GROUP BY task, status ORDER BY task")
    out: dict[str, Any] = {s: 0 for s in STATUSES}
    by_task: dict[str, dict[str, int]] = {}
    for r in rows:
      out[r["status"]] += r["n"]
      by_task.setdefault(r["task"], {s: 0 for s in STATUSES})[r["status"]] = r["n"]
    out["total"] = sum(out[s] for s in STATUSES)
    out["by_task"] = by_task
    return out

  def close(self) -> None:
    with self._lock:
      self._conn.close()

  def __enter__(self) -> ReviewQueue:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# --------------------------------------------------------------------- command line

def _short(value: Any, width: int) -> str:
  text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
  text = " ".join(text.split())
  return text if len(text) <= width else text[:width - 1] + "…"


def _table(rows: list[list[str]], header: list[str]) -> str:
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  lines = ["  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in [header, *rows]]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _cmd_list(q: ReviewQueue, args) -> int:
  status = None if args.status == "all" else args.status
  items = q.items(status=status, task=args.task, limit=args.limit)
  if not items:
    print(f"no {'' if status is None else status + ' '}items" + (f" for task {args.task!r}" if args.task else ""))
    return 0
  rows = [[it["item_id"], it["task"], it["status"], f"{it['confidence']:.2f}", _short(it["prediction"], 32),
           "" if it["status"] != "corrected" else _short(it["corrected_value"], 32)] for it in items]
  print(_table(rows, ["id", "task", "status", "conf", "prediction", "correction"]))
  if args.show_text:
    for it in items:
      print(f"\n[{it['item_id']}] context:")
      print(json.dumps(it["context"], ensure_ascii=False, indent=2))
  return 0


def _parse_value(q: ReviewQueue, item_id: str, text: str) -> Any:
  """--value as the item's type: a string prediction takes the text as is; otherwise JSON when it parses."""
  prediction = q.get(item_id)["prediction"]
  if isinstance(prediction, str):
    return text
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def _cmd_accept(q: ReviewQueue, args) -> int:
  q.accept(args.id, reviewer=args.reviewer, note=args.note)
  print(f"accepted {args.id}")
  return 0


def _cmd_correct(q: ReviewQueue, args) -> int:
  q.correct(args.id, _parse_value(q, args.id, args.value), reviewer=args.reviewer, note=args.note)
  print(f"corrected {args.id}")
  return 0


def _cmd_export(q: ReviewQueue, args) -> int:
  n = q.export_examples(args.out, task=args.task)
  print(f"{n} reviewed examples -> {args.out}")
  return 0


def _cmd_stats(q: ReviewQueue, args) -> int:
  s = q.stats()
  if args.json:
    print(json.dumps(s, indent=2, sort_keys=True))
    return 0
  rows = [[task, *(str(c[k]) for k in STATUSES)] for task, c in s["by_task"].items()]
  rows.append(["all", *(str(s[k]) for k in STATUSES)])
  print(_table(rows, ["task", *STATUSES]))
  return 0


def _parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--db", required=True, help="the review database (SQLite file)")
  reviewer = argparse.ArgumentParser(add_help=False)
  reviewer.add_argument("--reviewer", default=os.environ.get("USER", ""), help="who reviews (default: $USER)")
  reviewer.add_argument("--note", default="", help="a free-text note stored with the review")

  parser = argparse.ArgumentParser(prog="mlx-med apps review", description="The human-review queue.")
  sub = parser.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("list", parents=[common], help="items waiting for review (a table; no patient text "
                     "unless --show-text)")
  p.add_argument("--task", default=None)
  p.add_argument("--status", default="pending", choices=[*STATUSES, "all"])
  p.add_argument("--limit", type=int, default=50)
  p.add_argument("--show-text", action="store_true", help="also print each item's context (patient text)")
  p.set_defaults(func=_cmd_list)
  p = sub.add_parser("accept", parents=[common, reviewer], help="mark a prediction correct")
  p.add_argument("id")
  p.set_defaults(func=_cmd_accept)
  p = sub.add_parser("correct", parents=[common, reviewer], help="store the right value for an item")
  p.add_argument("id")
  p.add_argument("--value", required=True, help="the corrected value (JSON for non-string predictions)")
  p.set_defaults(func=_cmd_correct)
  p = sub.add_parser("export", parents=[common], help="write reviewed items as JSONL examples")
  p.add_argument("--out", required=True)
  p.add_argument("--task", default=None)
  p.set_defaults(func=_cmd_export)
  p = sub.add_parser("stats", parents=[common], help="counts per status and task")
  p.add_argument("--json", action="store_true")
  p.set_defaults(func=_cmd_stats)
  return parser


def review_main(argv: Sequence[str] | None = None) -> int:
  """`mlx-med apps review ...`; returns the exit status (2 with a one-line error on bad input)."""
  try:
    args = _parser().parse_args(None if argv is None else list(argv))
  except SystemExit as e:  # --help (0) or a usage error (2, already printed by argparse)
    return e.code if isinstance(e.code, int) else 2
  try:
    with ReviewQueue(args.db, create=False) as q:
      return args.func(q, args)
  except (ValueError, KeyError, FileNotFoundError, sqlite3.Error) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(review_main(sys.argv[1:]))
