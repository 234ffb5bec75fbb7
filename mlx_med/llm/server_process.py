"""`mlx-med serve` as a child process on a free loopback port (demos, benchmarks, tests).

  with ServerProcess(model_dir, "--max-num-seqs", "64", log_path="serve.log") as server:
    client = OpenAIClient(server.model, base_url=server.base_url)

The server binds 127.0.0.1 only. `wait_ready` polls GET /health and, when the process dies
first, raises with the tail of its log (the log is a file, so a crashed server's reason is kept).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Optional


def free_port() -> int:
  """A loopback TCP port nobody listens on right now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return int(s.getsockname()[1])


class ServerProcess:
  """A `python -m mlx_med.llm.serve --model DIR [extra ...]` process; a context manager."""

  def __init__(self, model_dir: str, *extra: str, log_path: str, port: Optional[int] = None,
               env: Optional[Mapping[str, str]] = None, ready_timeout_s: float = 600.0):
    self.port = int(port or free_port())
    self.base_url = f"http://127.0.0.1:{self.port}/v1"
    self.model = os.path.basename(os.path.normpath(model_dir))
    self.log_path = log_path
    self.ready_timeout_s = ready_timeout_s
    self.command = [sys.executable, "-m", "mlx_med.llm.serve", "--model", model_dir, "--host", "127.0.0.1",
                    "--port", str(self.port), *extra]
    self._env = dict(os.environ if env is None else env)
    self._log = None
    self.proc: Optional[subprocess.Popen] = None

  def start(self) -> ServerProcess:
    os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
    self._log = open(self.log_path, "w")
    self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self._env)
    return self

  def wait_ready(self, timeout: Optional[float] = None) -> None:
    import httpx

    deadline = time.monotonic() + (self.ready_timeout_s if timeout is None else timeout)
    while time.monotonic() < deadline:
      if self.proc is None or self.proc.poll() is not None:
        code = None if self.proc is None else self.proc.returncode
        raise RuntimeError(f"the server exited (code {code}) before it was ready; its log ends:\n{self.log_tail()}")
      try:
        if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).status_code == 200:
          return
      except httpx.HTTPError:
        pass
      time.sleep(0.3)
    raise RuntimeError(f"the server was not ready after {timeout or self.ready_timeout_s:.0f}s; its log ends:\n"
                       f"{self.log_tail()}")

  def log_tail(self, n: int = 4000) -> str:
    if self._log is not None:
      self._log.flush()
    try:
      with open(self.log_path, errors="replace") as f:
        return f.read()[-n:]
    except OSError:
      return ""

  def stop(self) -> None:
    if self.proc is not None and self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=20)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    if self._log is not None:
      self._log.close()
      self._log = None

  def __enter__(self) -> ServerProcess:
    self.start()
    try:
      self.wait_ready()
    except BaseException:
      self.stop()
      raise
    return self

  def __exit__(self, *exc) -> None:
    self.stop()
