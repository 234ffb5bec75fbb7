"""`mlx_med.llm.client`: the local and the remote backend answer alike; data rules hold."""

import http.server
import logging
import threading

import numpy as np
import openai
import pytest

from mlx_med.llm import client as client_lib

SECRET = "Patient Jane Roe, MRN 0042, HIV positive"
MESSAGES = [{"role": "user", "content": SECRET}]


@pytest.fixture(scope="module")
def local(local_lm):
  return client_lib.LocalClient(local_lm)


@pytest.fixture(scope="module")
def remote(server):
  c = client_lib.OpenAIClient(server.model, base_url=server.base_url, timeout=120, max_retries=0)
  yield c
  c.close()


def test_backends_agree(local, remote, caplog):
  caplog.set_level(logging.DEBUG)
  knobs = dict(max_tokens=8, temperature=0.0, logprobs=2)
  for backend in (local, remote):
    assert isinstance(backend, client_lib.LLMClient)
  a = local.chat(MESSAGES, **knobs)
  b = remote.chat(MESSAGES, **knobs)
  assert len(a) == len(b) == 1
  assert a[0].text == b[0].text and a[0].finish_reason == b[0].finish_reason
  assert a[0].tokens == b[0].tokens
  np.testing.assert_allclose(a[0].token_logprobs, b[0].token_logprobs, atol=1e-4, rtol=0)
  assert all(len(t) <= 2 for t in a[0].top_logprobs)
  c = local.complete(SECRET, max_tokens=5, temperature=0.0, logprobs=1)
  d = remote.complete(SECRET, max_tokens=5, temperature=0.0, logprobs=1)
  assert c[0].text == d[0].text and c[0].tokens == d[0].tokens
  assert local.complete(SECRET, max_tokens=5, temperature=0.0, logprobs=1)[0].tokens == c[0].tokens
  # Neither backend (nor the HTTP stack under the remote one) logged the prompt.
  assert SECRET not in caplog.text and "MRN" not in caplog.text
  assert any("completion tokens" in r.getMessage() for r in caplog.records)


def test_n_samples_with_seed(local, remote):
  a = local.chat(MESSAGES, max_tokens=6, n=3, seed=9, top_p=0.95, logprobs=1)
  b = remote.chat(MESSAGES, max_tokens=6, n=3, seed=9, top_p=0.95, logprobs=1)
  assert [x.text for x in a] == [y.text for y in b]
  assert len({x.text for x in a}) > 1


def test_server_log_has_no_prompt_contents(server, remote):
  remote.chat(MESSAGES, max_tokens=2, temperature=0.0, logprobs=1)
  assert SECRET not in server.log_tail(10**6)


def test_remote_needs_an_explicit_endpoint(monkeypatch):
  monkeypatch.delenv(client_lib.ENV_BASE_URL, raising=False)
  monkeypatch.setenv("OPENAI_BASE_URL", "https://api.example.com/v1")  # never used implicitly
  with pytest.raises(ValueError, match="no endpoint configured"):
    client_lib.OpenAIClient("m")
  with pytest.raises(ValueError, match="plain http"):
    client_lib.OpenAIClient("m", base_url="http://10.1.2.3:8000/v1")
  client_lib.OpenAIClient("m", base_url="http://10.1.2.3:8000/v1", allow_insecure_http=True).close()
  monkeypatch.setenv(client_lib.ENV_BASE_URL, "http://localhost:9/v1")
  c = client_lib.OpenAIClient("m")
  assert c.base_url == "http://localhost:9/v1"
  c.close()


def test_make_client_validates_config(monkeypatch, server):
  with pytest.raises(ValueError, match="unknown keys"):
    client_lib.make_client({"backend": "openai", "model": "m", "base_url": server.base_url, "api_key": "x"})
  with pytest.raises(ValueError, match="is unknown"):
    client_lib.make_client({"backend": "bedrock"})
  with pytest.raises(ValueError, match="MY_KEY"):
    client_lib.make_client({"backend": "openai", "model": "m", "base_url": server.base_url, "api_key_env": "MY_KEY"})
  monkeypatch.setenv("MY_KEY", "secret")
  c = client_lib.make_client({"backend": "openai", "model": server.model, "base_url": server.base_url,
                              "api_key_env": "MY_KEY", "timeout": 60, "max_retries": 0})
  assert c.complete("hello", max_tokens=2, temperature=0.0, logprobs=1)[0].finish_reason in ("stop", "length")
  c.close()


class _Failing(http.server.BaseHTTPRequestHandler):
  hits = 0

  def do_POST(self):  # noqa: N802 - http.server's naming
    type(self).hits += 1
    self.rfile.read(int(self.headers.get("content-length", 0)))
    body = b'{"error": {"message": "overloaded", "type": "server_error", "param": null, "code": null}}'
    self.send_response(503)
    self.send_header("content-type", "application/json")
    self.send_header("retry-after-ms", "10")
    self.send_header("content-length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    pass


def test_retries_are_bounded():
  httpd = http.server.HTTPServer(("127.0.0.1", 0), _Failing)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  try:
    c = client_lib.OpenAIClient("m", base_url=f"http://127.0.0.1:{httpd.server_port}/v1", max_retries=2, timeout=5)
    with pytest.raises(openai.APIStatusError):
      c.chat(MESSAGES, max_tokens=2)
    assert _Failing.hits == 3  # the first try and exactly two retries
    c.close()
  finally:
    httpd.shutdown()
