"""The human-review queue: thresholds, reviews that never overwrite the prediction, one-line errors,
persistence across a restart (a new object and a fresh interpreter), concurrent submits, the JSONL
export and the `mlx-med apps review` command line."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mlx_med.apps.review import (
  SCHEMA_VERSION,
  ReviewQueue,
  UnknownItemError,
  review_main,
)

REPO = Path(__file__).resolve().parents[2]
TNM = ["T1", "T2", "T3", "T4"]


def fill(q: ReviewQueue) -> None:
  assert q.submit("p1/t_stage", "t_stage", "T2", 0.40, {"note": "Tumor 2.8 cm, pT2."}, choices=TNM) is True
  assert q.submit("p2/t_stage", "t_stage", "T1", 0.95, {"note": "pT1b, 1.4 cm."}, choices=TNM) is False
  assert q.submit("p3/t_stage", "t_stage", "T9", 0.99, {"note": "staging unclear"}, choices=TNM) is True  # not a choice
  assert q.submit("p1/ecog", "ecog", 1, 0.69, {"note": "ECOG 1."}) is True
  assert q.submit("p2/ecog", "ecog", 0, 0.70, {"note": "fully active"}) is False  # threshold is strict: < 0.7 queues


def test_submit_queues_below_threshold_and_records_the_rest_as_auto(tmp_path):
  with ReviewQueue(tmp_path / "q.db", threshold=0.7) as q:
    fill(q)
    assert [it["item_id"] for it in q.pending()] == ["p1/t_stage", "p3/t_stage", "p1/ecog"]
    assert [it["item_id"] for it in q.pending(task="ecog")] == ["p1/ecog"]
    assert len(q.pending(limit=1)) == 1
    auto = q.get("p2/t_stage")
    assert auto["status"] == "auto" and auto["final"] == "T1" and auto["threshold"] == 0.7
    item = q.get("p1/ecog")
    assert item["prediction"] == 1 and item["context"] == {"note": "ECOG 1."} and item["final"] is None
    assert q.stats() == {"pending": 3, "auto": 2, "accepted": 0, "corrected": 0, "total": 5,
                         "by_task": {"ecog": {"pending": 1, "auto": 1, "accepted": 0, "corrected": 0},
                                     "t_stage": {"pending": 2, "auto": 1, "accepted": 0, "corrected": 0}}}


def test_reviews_keep_the_original_prediction_and_happen_once(tmp_path):
  with ReviewQueue(tmp_path / "q.db") as q:
    fill(q)
    q.accept("p1/ecog", reviewer="dr_a")
    q.correct("p1/t_stage", "T3", reviewer="dr_b", note="3.4 cm on re-measurement")
    q.accept("p2/t_stage", reviewer="dr_a")  # an auto item can be spot-checked
    item = q.get("p1/t_stage")
    assert item["status"] == "corrected" and item["prediction"] == "T2" and item["corrected_value"] == "T3"
    assert item["final"] == "T3" and item["reviewer"] == "dr_b" and item["note"] == "3.4 cm on re-measurement"
    assert item["reviewed_at"] >= item["submitted_at"]
    assert q.get("p1/ecog")["final"] == 1
    with pytest.raises(ValueError, match=r"'p1/ecog' was already accepted by dr_a at .*reviewed once"):
      q.accept("p1/ecog")
    with pytest.raises(ValueError, match="already corrected"):
      q.correct("p1/t_stage", "T4")
    with pytest.raises(ValueError, match="already reviewed"):
      q.submit("p1/t_stage", "t_stage", "T1", 0.1, replace=True)
    assert q.get("p1/t_stage")["corrected_value"] == "T3"  # the failed calls changed nothing


def test_bad_input_gives_one_line_errors(tmp_path):
  with ReviewQueue(tmp_path / "q.db") as q:
    fill(q)
    with pytest.raises(UnknownItemError, match="no review item 'nope'") as e:
      q.accept("nope")
    assert str(e.value).startswith("no review item") and "\n" not in str(e.value)
    with pytest.raises(KeyError):
      q.get("nope")
    with pytest.raises(ValueError, match=r"'T7' is not an allowed value; choose one of 'T1', 'T2'"):
      q.correct("p3/t_stage", "T7")
    with pytest.raises(ValueError, match="equals the prediction; accept it instead"):
      q.correct("p1/ecog", 1)
    with pytest.raises(ValueError, match="corrected value is empty"):
      q.correct("p1/ecog", "  ")
    with pytest.raises(ValueError, match="not JSON-serialisable"):
      q.correct("p1/ecog", {1, 2})
    with pytest.raises(ValueError, match=r"confidence must be a number in \[0, 1\]"):
      q.submit("x", "t", "v", 1.5)
    with pytest.raises(ValueError, match="confidence"):
      q.submit("x", "t", "v", float("nan"))
    with pytest.raises(ValueError, match="prediction is not JSON-serialisable"):
      q.submit("x", "t", object(), 0.5)
    with pytest.raises(ValueError, match="already in the queue .pending.; pass replace=True"):
      q.submit("p1/ecog", "ecog", 2, 0.5)
    assert q.submit("p1/ecog", "ecog", 2, 0.9, {"note": "ECOG 2"}, replace=True) is False
    assert q.get("p1/ecog")["prediction"] == 2 and q.get("p1/ecog")["status"] == "auto"
    with pytest.raises(ValueError, match="status 'done' is unknown"):
      q.items(status="done")
  with pytest.raises(FileNotFoundError, match="no review database at"):
    ReviewQueue(tmp_path / "missing.db", create=False)
  (tmp_path / "text.db").write_text("not a database at all, just some text " * 50)
  with pytest.raises(ValueError, match="is not a review database"):
    ReviewQueue(tmp_path / "text.db")
  other = sqlite3.connect(tmp_path / "other.db")
  other.execute("CREATE TABLE patients (id TEXT)")
  other.commit()
  other.close()
  with pytest.raises(ValueError, match=r"other tables \(patients\)"):
    ReviewQueue(tmp_path / "other.db")
  with ReviewQueue(tmp_path / "newer.db"):
    pass
  conn = sqlite3.connect(tmp_path / "newer.db")
  conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
  conn.close()
  with pytest.raises(ValueError, match="newer than this code"):
    ReviewQueue(tmp_path / "newer.db")


def test_the_queue_survives_a_restart_in_a_new_object_and_a_fresh_process(tmp_path):
  db = tmp_path / "runs" / "q.db"
  q = ReviewQueue(db)
  fill(q)
  q.correct("p1/t_stage", "T3", reviewer="dr_b", note="re-measured")
  q.close()

  q2 = ReviewQueue(db)
  assert q2.get("p1/t_stage")["corrected_value"] == "T3" and q2.get("p1/t_stage")["prediction"] == "T2"
  assert [it["item_id"] for it in q2.pending()] == ["p3/t_stage", "p1/ecog"]
  q2.accept("p1/ecog", reviewer="dr_a")
  q2.close()

  # A fresh interpreter sees both reviews, adds one of its own and a new item.
  code = ("import json, sys\n"
          "from mlx_med.apps.review import ReviewQueue\n"
          "q = ReviewQueue(sys.argv[1], create=False)\n"
          "q.correct('p3/t_stage', 'T4', reviewer='dr_c')\n"
          "q.submit('p4/t_stage', 't_stage', 'T2', 0.1, {'note': 'new'})\n"
          "print(json.dumps({'stats': q.stats(), 'p1': q.get('p1/t_stage'), 'ecog': q.get('p1/ecog')['status']}))\n"
          "q.close()\n")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  out = subprocess.run([sys.executable, "-c", code, str(db)], capture_output=True, text=True, env=env, timeout=120,
                       check=True)
  seen = json.loads(out.stdout)
  assert seen["ecog"] == "accepted"
  assert seen["p1"]["corrected_value"] == "T3" and seen["p1"]["note"] == "re-measured"
  assert {k: seen["stats"][k] for k in ("pending", "auto", "accepted", "corrected")} == \
      {"pending": 1, "auto": 2, "accepted": 1, "corrected": 2}

  with ReviewQueue(db) as q3:  # and this process sees the other's writes
    assert q3.get("p3/t_stage")["final"] == "T4" and q3.get("p3/t_stage")["reviewer"] == "dr_c"
    assert [it["item_id"] for it in q3.pending()] == ["p4/t_stage"]
  conn = sqlite3.connect(db)
  assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
  conn.close()


def test_two_processes_submit_to_one_file_at_once(tmp_path):
  db = tmp_path / "q.db"
  ReviewQueue(db).close()
  code = ("import sys\n"
          "from mlx_med.apps.review import ReviewQueue\n"
          "q = ReviewQueue(sys.argv[1])\n"
          "for i in range(60):\n"
          "  q.submit(f'{sys.argv[2]}-{i}', 't', i, (i % 4) / 4)\n"
          "q.close()\n")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
  procs = [subprocess.Popen([sys.executable, "-c", code, str(db), name], env=env, stderr=subprocess.PIPE, text=True)
           for name in ("a", "b")]
  for p in procs:
    assert p.wait(timeout=120) == 0, p.stderr.read()
    p.stderr.close()
  with ReviewQueue(db) as q:
    s = q.stats()
    assert s["total"] == 120 and s["pending"] == 90  # confidences 0, .25, .5 < 0.7 queue; .75 does not
    assert {it["item_id"] for it in q.items()} == {f"{n}-{i}" for n in "ab" for i in range(60)}


def test_concurrent_submits_and_reviews_from_threads(tmp_path):
  q = ReviewQueue(tmp_path / "q.db", threshold=0.5)
  n_threads, per = 8, 25
  errors = []

  def worker(t):
    try:
      for i in range(per):
        conf = ((t * per + i) % 10) / 10  # 0.0 .. 0.9: half below 0.5
        q.submit(f"t{t}-{i}", f"task{t % 2}", f"v{i}", conf, {"i": i})
    except Exception as e:  # pragma: no cover - reported below
      errors.append(e)

  threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
  for th in threads:
    th.start()
  for th in threads:
    th.join()
  assert not errors
  s = q.stats()
  assert s["total"] == n_threads * per and s["pending"] == s["auto"] == n_threads * per // 2

  # Two threads racing to accept the same items: each item is accepted exactly once.
  pending = [it["item_id"] for it in q.pending(limit=None)]
  wins, losses = [], []

  def reviewer(name):
    for item_id in pending:
      try:
        q.accept(item_id, reviewer=name)
        wins.append(item_id)
      except ValueError:
        losses.append(item_id)

  racers = [threading.Thread(target=reviewer, args=(n,)) for n in ("a", "b")]
  for th in racers:
    th.start()
  for th in racers:
    th.join()
  assert sorted(wins) == sorted(pending) and sorted(losses) == sorted(pending)
  assert q.stats()["accepted"] == len(pending)
  q.close()


def test_export_examples_writes_reviewed_items_atomically(tmp_path):
  with ReviewQueue(tmp_path / "q.db") as q:
    fill(q)
    q.correct("p1/t_stage", "T3", reviewer="dr_b")
    q.accept("p1/ecog")
    out = tmp_path / "out" / "examples.jsonl"
    out.parent.mkdir()
    out.write_text("old content\n")
    assert q.export_examples(out) == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [
      {"input": {"note": "Tumor 2.8 cm, pT2."}, "output": "T3", "source": "corrected", "item_id": "p1/t_stage",
       "task": "t_stage"},
      {"input": {"note": "ECOG 1."}, "output": 1, "source": "accepted", "item_id": "p1/ecog", "task": "ecog"}]
    assert q.export_examples(out, task="ecog") == 1
    assert os.listdir(out.parent) == ["examples.jsonl"]  # no temporary file left behind
    assert q.export_examples(tmp_path / "none.jsonl", task="other") == 0
    assert (tmp_path / "none.jsonl").read_text() == ""


# ---------------------------------------------------------------- command line

def test_review_cli_list_accept_correct_export_stats(tmp_path, capsys):
  db = tmp_path / "q.db"
  with ReviewQueue(db) as q:
    fill(q)
  assert review_main(["list", "--db", str(db)]) == 0
  out = capsys.readouterr().out
  assert "p1/t_stage" in out and "p3/t_stage" in out and "p2/t_stage" not in out  # pending only by default
  assert "Tumor 2.8 cm" not in out and "ECOG 1." not in out  # no patient text without --show-text
  assert review_main(["list", "--db", str(db), "--task", "ecog", "--status", "all", "--show-text"]) == 0
  out = capsys.readouterr().out
  assert "p1/ecog" in out and "p2/ecog" in out and "ECOG 1." in out and "t_stage" not in out

  assert review_main(["accept", "--db", str(db), "p1/ecog", "--reviewer", "dr_a"]) == 0
  assert review_main(["correct", "--db", str(db), "p1/t_stage", "--value", "T3", "--note", "3.4 cm"]) == 0
  # A numeric prediction takes a JSON value; a string one the text as is.
  with ReviewQueue(db) as q:
    q.submit("p5/ecog", "ecog", 1, 0.2)
  assert review_main(["correct", "--db", str(db), "p5/ecog", "--value", "2"]) == 0
  capsys.readouterr()
  with ReviewQueue(db) as q:
    assert q.get("p5/ecog")["corrected_value"] == 2
    assert q.get("p1/t_stage")["corrected_value"] == "T3" and q.get("p1/t_stage")["note"] == "3.4 cm"
    assert q.get("p1/ecog")["reviewer"] == "dr_a"

  assert review_main(["export", "--db", str(db), "--out", str(tmp_path / "ex.jsonl")]) == 0
  assert "3 reviewed examples" in capsys.readouterr().out
  assert len((tmp_path / "ex.jsonl").read_text().splitlines()) == 3

  assert review_main(["stats", "--db", str(db), "--json"]) == 0
  stats = json.loads(capsys.readouterr().out)
  assert (stats["pending"], stats["accepted"], stats["corrected"], stats["auto"]) == (1, 1, 2, 2)
  assert review_main(["stats", "--db", str(db)]) == 0
  table = capsys.readouterr().out.splitlines()
  assert table[0].split() == ["task", "pending", "auto", "accepted", "corrected"]
  assert table[-1].split() == ["all", "1", "2", "1", "2"]


def test_review_cli_errors_are_one_line_exit_2(tmp_path, capsys):
  db = tmp_path / "q.db"
  with ReviewQueue(db) as q:
    fill(q)
  cases = [(["accept", "--db", str(db), "nope"], "error: no review item 'nope'"),
           (["correct", "--db", str(db), "p3/t_stage", "--value", "T7"], "error: item 'p3/t_stage': 'T7' is not an "
            "allowed value"),
           (["list", "--db", str(tmp_path / "missing.db")], "error: no review database at")]
  for argv, message in cases:
    assert review_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
  assert not (tmp_path / "missing.db").exists()  # the CLI never creates a database
  assert review_main(["accept", "--db", str(db), "p1/ecog"]) == 0
  assert review_main(["accept", "--db", str(db), "p1/ecog"]) == 2
  assert "already accepted" in capsys.readouterr().err
  assert review_main(["frobnicate"]) == 2  # usage error from argparse
  assert review_main(["list"]) == 2        # --db is required
  capsys.readouterr()
