"""Writing results so that a reader never sees half of them.

A file is written under a temporary name beside it and renamed into place (`write_text_atomic`,
`write_jsonl`). A directory is built under a temporary name beside its target and then swapped
in: `replace_dir(tmp, target)` renames an existing target aside, renames the new one into
place and deletes the old one, so at every moment `target` is either the complete old
version or the complete new one (a crash in between leaves the old version under a
`.name.old-*` name, never a mixture).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
  """Moves the finished directory `tmp` to `target`, replacing what was there."""
  tmp, target = os.fspath(tmp), os.fspath(target)
  if os.path.exists(target):
    parent, name = os.path.split(os.path.abspath(target))
    old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, target)


def write_text_dir(out_dir: str | os.PathLike, files: dict[str, str]) -> None:
  """Writes `files` (name -> text, UTF-8) as the directory `out_dir`: built under a temporary name
  beside it, then swapped in with `replace_dir` (what was at `out_dir` is replaced)."""
  out_dir = os.path.abspath(os.fspath(out_dir))
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
  try:
    for name, text in files.items():
      with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
        f.write(text)
    replace_dir(tmp, out_dir)
    tmp = None
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` through a temporary file beside it and a rename: a reader sees
  the old file or the new one, never half of it. Parent directories are created."""
  path = os.path.abspath(os.fspath(path))
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_jsonl(path: str | os.PathLike, rows) -> int:
  """Writes `rows` (JSON-serialisable objects) as JSONL, one compact object a line, atomically;
  returns the number of rows."""
  import json

  lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in rows]
  write_text_atomic(path, "".join(lines))
  return len(lines)


def read_jsonl_objects(path: str | os.PathLike, what: str = "a JSON object", error: type = ValueError):
  """Yields (where, object) for each non-blank line of a JSONL file; `where` is "PATH:LINE" for error
  messages. A missing file raises FileNotFoundError; a line that is not JSON or not an object raises
  `error` (a ValueError subclass) with one line naming the file and line; `what` says what each line
  should hold."""
  import json

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist (expected JSONL: {what} a line)")
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg}); each line must be {what}") from None
      if not isinstance(row, dict):
        raise error(f"{where}: expected {what}, got {type(row).__name__}")
      yield where, row
