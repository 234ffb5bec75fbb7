"""Writing results so that a reader never sees half of them.

A directory is built under a temporary name beside its target and then swapped in:
`replace_dir(tmp, target)` renames an existing target aside, renames the new one into
place and deletes the old one, so at every moment `target` is either the complete old
version or the complete new one (a crash in between leaves the old version under a
`.name.old-*` name, never a mixture).
"""

from __future__ import annotations

import os
import shutil
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
