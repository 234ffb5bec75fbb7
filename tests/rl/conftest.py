"""RL tests share the LLM tests' tiny Hugging Face helpers (tests/llm/hf_tiny.py)."""

from __future__ import annotations

import os
import sys

_LLM_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "llm")
if _LLM_TESTS not in sys.path:
  sys.path.insert(0, _LLM_TESTS)
