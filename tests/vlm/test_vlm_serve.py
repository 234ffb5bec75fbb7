"""Multimodal serving: `mlx-med serve` on a tiny random LLaVA directory, driven by the official
openai client, and `mlx_med.llm.client` over it.

The server is built by `serve.build_server` from the command-line flags (VLM detection,
--allowed-local-media-path, --limit-mm-per-prompt) and runs in this process under uvicorn
on a loopback port, so the tests can watch the network (nothing but loopback may be
reached) and compare with the very `LocalVLM` it serves (one set of compiled programs).
Every generation is greedy with max_tokens=6 so the requests share a few programs.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import socket
import threading
import time
import urllib.request

import numpy as np
import openai
import pytest
from vlm_tiny import image_message, make_llava_dir, sample_image

KNOBS = {"max_tokens": 6, "temperature": 0.0}


class InProcessServer:
  """An app from `serve.build_server`-style parts served by uvicorn on a thread."""

  def __init__(self, server, app):
    import uvicorn

    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.server = server
    self.base_url = f"http://127.0.0.1:{self.port}/v1"
    self.model = server.model_name
    self._uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
    self._thread = threading.Thread(target=self._uv.run, daemon=True)

  def __enter__(self):
    self.server.engine.start()
    self._thread.start()
    deadline = time.monotonic() + 60
    while not self._uv.started:
      if time.monotonic() > deadline or not self._thread.is_alive():
        raise RuntimeError("the test server did not start")
      time.sleep(0.05)
    return self

  def __exit__(self, *exc):
    self._uv.should_exit = True
    self._thread.join(timeout=20)
    self.server.engine.stop()


def _serve_args(model_dir: str, *extra: str) -> argparse.Namespace:
  from mlx_med.llm import serve

  parser = serve.add_serve_arguments(argparse.ArgumentParser())
  return parser.parse_args(["--model", model_dir, "--no-warmup", "--min-prompt-bucket", "32",
                            "--max-batch-rows", "8", "--batch-wait-ms", "150", *extra])


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def served(tmp_path_factory, media_dir):
  from mlx_med.llm import serve

  model_dir = str(tmp_path_factory.mktemp("tiny_llava_served"))
  make_llava_dir(model_dir)
  server, app = serve.build_server(_serve_args(model_dir, "--allowed-local-media-path", str(media_dir),
                                               "--limit-mm-per-prompt", '{"image": 2}'))
  with InProcessServer(server, app) as proc:
    yield proc


@pytest.fixture(scope="module")
def client(served):
  with openai.OpenAI(base_url=served.base_url, api_key="unused", timeout=120.0, max_retries=0) as c:
    yield c


def test_served_directory_is_a_vlm_with_the_flags(served):
  from mlx_med.vlm.local import LocalVLM

  assert isinstance(served.server.lm, LocalVLM) and served.server.multimodal
  assert served.server.limit_mm_per_prompt == 2 and served.server.allowed_local_media_path is not None


def test_data_url_chat_equals_local_vlm(client, served):
  messages = image_message(sample_image(10), "The patient has a fever and a dry cough.")
  resp = client.chat.completions.create(model=served.model, messages=messages, **KNOBS, extra_body={"ignore_eos": True})
  local = served.server.lm.chat([messages], **KNOBS, ignore_eos=True)[0]
  assert resp.choices[0].message.content == local.text
  assert resp.usage.completion_tokens == len(local.token_ids) == 6
  assert resp.usage.prompt_tokens == len(local.prompt_token_ids)  # image tokens counted, as vLLM does


def test_streaming_with_an_image(client, served):
  messages = image_message(sample_image(12), "Describe the findings.")
  full = client.chat.completions.create(model=served.model, messages=messages, **KNOBS).choices[0].message.content
  chunks = list(client.chat.completions.create(model=served.model, messages=messages, stream=True, **KNOBS))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
  assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1


@contextlib.contextmanager
def _no_remote_network():
  """Fails any connection or name lookup that is not loopback, and any urllib fetch; records them."""
  attempts = []
  real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
  loopback = ("127.0.0.1", "localhost", "::1")

  def getaddrinfo(host, *args, **kwargs):
    if host not in loopback:
      attempts.append(("getaddrinfo", host))
      raise OSError(f"test: network lookup of {host!r} refused")
    return real_getaddrinfo(host, *args, **kwargs)

  def connect(sock, address):
    host = address[0] if isinstance(address, tuple) else address
    if host not in loopback:
      attempts.append(("connect", host))
      raise OSError(f"test: connection to {host!r} refused")
    return real_connect(sock, address)

  def urlopen(url, *args, **kwargs):
    attempts.append(("urlopen", str(url)))
    raise OSError("test: urlopen refused")

  saved = (socket.getaddrinfo, socket.socket.connect, urllib.request.urlopen)
  socket.getaddrinfo, socket.socket.connect, urllib.request.urlopen = getaddrinfo, connect, urlopen
  try:
    yield attempts
  finally:
    socket.getaddrinfo, socket.socket.connect, urllib.request.urlopen = saved


@pytest.mark.parametrize("url", ["http://images.example.com/xray.png", "https://203.0.113.7/ct.jpg"])
def test_remote_url_is_400_and_nothing_is_fetched(client, served, url):
  from mlx_med.vlm.messages import REMOTE_REFUSED

  messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                           {"type": "text", "text": "What is shown?"}]}]
  with _no_remote_network() as attempts, pytest.raises(openai.BadRequestError) as info:
    client.chat.completions.create(model=served.model, messages=messages, **KNOBS)
  error = info.value.body
  assert info.value.status_code == 400 and error["type"] == "invalid_request_error"
  assert error["message"] == REMOTE_REFUSED and error["code"] == "image_url_refused"
  assert attempts == []


def test_local_path_inside_the_allowed_directory(client, served, media_dir, tmp_path):
  from PIL import Image

  image = sample_image(13)
  inside = media_dir / "scan.png"
  Image.fromarray(image).save(inside)
  outside = tmp_path / "scan.png"
  Image.fromarray(image).save(outside)

  def ask(url):
    return client.chat.completions.create(model=served.model, **KNOBS, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "Findings?"}]}])

  by_path = ask(str(inside)).choices[0].message.content
  assert ask(inside.as_uri()).choices[0].message.content == by_path
  assert client.chat.completions.create(model=served.model, messages=image_message(image, "Findings?"),
                                        **KNOBS).choices[0].message.content == by_path
  for url in (str(outside), outside.as_uri(), str(media_dir / ".." / outside.parent.name / "scan.png")):
    with pytest.raises(openai.BadRequestError) as info:
      ask(url)
    assert "outside the allowed directory" in info.value.body["message"]


def test_bad_images_and_too_many_images_are_400(client, served):
  garbage = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
  bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": garbage}},
                                      {"type": "text", "text": "?"}]}]
  with pytest.raises(openai.BadRequestError) as info:
    client.chat.completions.create(model=served.model, messages=bad, **KNOBS)
  assert info.value.body["code"] == "invalid_image"
  from mlx_med.vlm.messages import image_part

  three = [{"role": "user", "content": [image_part(sample_image(i)) for i in range(3)] + [{"type": "text", "text": "?"}]}]
  with pytest.raises(openai.BadRequestError) as info:
    client.chat.completions.create(model=served.model, messages=three, **KNOBS)
  assert "at most 2" in info.value.body["message"] and "--limit-mm-per-prompt" in info.value.body["message"]
  odd = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]
  with pytest.raises(openai.BadRequestError) as info:
    client.chat.completions.create(model=served.model, messages=odd, **KNOBS)
  assert info.value.body["param"] == "messages[0].content"
  placeholder = [{"role": "user", "content": "<image>\nWhat is this?"}]  # typed by hand, no image given
  with pytest.raises(openai.BadRequestError) as info:
    client.chat.completions.create(model=served.model, messages=placeholder, **KNOBS)
  assert "image placeholder" in info.value.body["message"]
  with pytest.raises(openai.BadRequestError) as info:
    client.completions.create(model=served.model, prompt="<image>\nFindings:", **KNOBS)
  assert "image placeholder" in info.value.body["message"] and info.value.body["param"] == "prompt"
  text = client.completions.create(model=served.model, prompt="Findings:", **KNOBS)
  assert text.usage.completion_tokens >= 1
  # The server is still up.
  assert client.chat.completions.create(model=served.model, messages=image_message(sample_image(1), "ok?"), **KNOBS)


def test_concurrent_image_and_text_requests_share_a_batch(client, served):
  """Rows with and without images in one batch each get what they get alone."""
  import httpx

  convs = [image_message(sample_image(20), "Diagnosis?"), [{"role": "user", "content": "hello world"}],
           image_message(sample_image(21), "Diagnosis?")]
  alone = [served.server.lm.chat([c], **KNOBS)[0].text for c in convs]
  before = httpx.get(f"http://127.0.0.1:{served.port}/stats").json()
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    texts = list(pool.map(lambda c: client.chat.completions.create(
        model=served.model, messages=c, **KNOBS).choices[0].message.content, convs))
  after = httpx.get(f"http://127.0.0.1:{served.port}/stats").json()
  assert texts == alone
  assert after["requests"] - before["requests"] == 3
  assert after["batches"] - before["batches"] < 3  # at least two requests shared a batch


def test_local_and_openai_clients_agree_on_an_image_request(served):
  from mlx_med.llm.client import LocalClient, OpenAIClient

  messages = image_message(sample_image(14), "Is there a fracture?")
  local = LocalClient(served.server.lm).chat(messages, max_tokens=6, temperature=0.0, logprobs=1)
  remote_client = OpenAIClient(served.model, base_url=served.base_url, timeout=120, max_retries=0)
  try:
    remote = remote_client.chat(messages, max_tokens=6, temperature=0.0, logprobs=1)
  finally:
    remote_client.close()
  assert local[0].text == remote[0].text and local[0].tokens == remote[0].tokens
  np.testing.assert_allclose(local[0].token_logprobs, remote[0].token_logprobs, atol=1e-4, rtol=0)
  assert local[0].prompt_tokens == remote[0].prompt_tokens


def test_text_only_model_refuses_images(tmp_path):
  """A served text model answers image parts with a 400 (and LocalClient with a ValueError)."""
  from hf_tiny import make_hf_model, save_model_dir, write_tokenizer

  from mlx_med.llm import serve
  from mlx_med.llm.client import LocalClient

  tok_dir = str(tmp_path / "tok")
  vocab = write_tokenizer(tok_dir)
  model_dir = save_model_dir(make_hf_model("qwen2", vocab_size=vocab), str(tmp_path / "text_model"), tok_dir)
  server, app = serve.build_server(_serve_args(model_dir))
  assert not server.multimodal
  messages = image_message(sample_image(0), "What is shown?")
  with InProcessServer(server, app) as proc, \
      openai.OpenAI(base_url=proc.base_url, api_key="unused", timeout=60.0, max_retries=0) as c, \
      pytest.raises(openai.BadRequestError) as info:
    c.chat.completions.create(model=proc.model, messages=messages, max_tokens=2)
  body = info.value.body
  assert body["type"] == "invalid_request_error" and body["param"] == "messages[0].content"
  assert "text-only model" in body["message"]
  with pytest.raises(ValueError, match="text-only model"):
    LocalClient(server.lm).chat(messages, max_tokens=2)
