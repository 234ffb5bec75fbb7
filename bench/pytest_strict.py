"""Runs pytest and fails unless the tests it was asked for really ran.

  python bench/pytest_strict.py [--min-tests N] -- PYTEST_ARGS...

Exit 0 only when pytest passed, at least N tests (default 1) ran, and none was
skipped: a GPU suite whose GPU tests all skip (no device, a wrong platform
setting) must not report success. The counts come from pytest's JUnit XML.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET


def junit_counts(path: str) -> dict[str, int]:
  root = ET.parse(path).getroot()
  suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
  counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
  for suite in suites:
    for key in counts:
      counts[key] += int(suite.get(key, 0))
  skipped = [f"{case.get('classname')}::{case.get('name')}: {(s.get('message') or '').strip()}"
             for suite in suites for case in suite.iter("testcase") for s in case.findall("skipped")]
  counts["skipped_list"] = skipped
  return counts


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--min-tests", type=int, default=1)
  p.add_argument("pytest_args", nargs=argparse.REMAINDER)
  args = p.parse_args(argv)
  pytest_args = [a for a in args.pytest_args if a != "--"]
  with tempfile.TemporaryDirectory() as tmp:
    xml = os.path.join(tmp, "junit.xml")
    rc = subprocess.call([sys.executable, "-m", "pytest", "-rs", f"--junitxml={xml}", *pytest_args])
    if rc == 5:
      print("pytest_strict: FAIL: no test was collected (pytest exit 5)")
      return 1
    if not os.path.exists(xml):
      print(f"pytest_strict: FAIL: pytest exited {rc} without a report (usage error or crash)")
      return rc or 1
    c = junit_counts(xml)
  ran = c["tests"] - c["skipped"]
  print(f"pytest_strict: {c['tests']} collected, {ran} ran, {c['skipped']} skipped, "
        f"{c['failures']} failed, {c['errors']} errors (pytest exit {rc})")
  if rc != 0:
    return rc
  if c["skipped"]:
    print("pytest_strict: FAIL: tests this step exists for were skipped:")
    for line in c["skipped_list"]:
      print("  " + line)
    return 1
  if ran < args.min_tests:
    print(f"pytest_strict: FAIL: {ran} test(s) ran, fewer than the {args.min_tests} required")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
