"""`python -m mlx_med.llm.serve` as a real process, driven by the official openai client.

Requests use top_p=0.95 (or temperature 0) throughout so that they share the server's
few compiled programs (see the `server` fixture).

The model is a tiny random Qwen2 with a ChatML template, so texts are gibberish; the
tests check the API contract: shapes, lengths, seeds, stops, streaming, logprobs,
batching of concurrent requests, and OpenAI-style errors that leave the server up.
"""

import concurrent.futures
import json

import httpx
import openai
import pytest

MESSAGES = [{"role": "system", "content": "You are a careful clinician."},
            {"role": "user", "content": "The patient has a fever and a dry cough."}]


@pytest.fixture(scope="module")
def client(server):
  with openai.OpenAI(base_url=server.base_url, api_key="unused", timeout=120.0, max_retries=0) as c:
    yield c


def test_models_lists_the_served_model(client, server):
  models = client.models.list()
  assert [m.id for m in models.data] == [server.model]


def test_chat_completion_shape_usage_and_seed(client, server):
  kwargs = dict(model=server.model, messages=MESSAGES, max_tokens=12, seed=11, top_p=0.9)
  first = client.chat.completions.create(**kwargs)
  again = client.chat.completions.create(**kwargs)
  assert first.object == "chat.completion" and first.model == server.model
  choice = first.choices[0]
  assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
  assert choice.finish_reason in ("stop", "length")
  assert 1 <= first.usage.completion_tokens <= 12
  assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
  assert again.choices[0].message.content == choice.message.content  # same seed, same sample
  many = client.chat.completions.create(**{**kwargs, "n": 3})
  assert [c.index for c in many.choices] == [0, 1, 2]
  assert many.choices[0].message.content == choice.message.content
  assert len({c.message.content for c in many.choices}) > 1


def test_completion_max_tokens_and_stop_string(client, server):
  base = dict(model=server.model, prompt="The patient has a", max_tokens=16, temperature=0.0)
  free = client.completions.create(**base)
  text = free.choices[0].text
  assert free.object == "text_completion" and free.usage.completion_tokens <= 16
  if free.choices[0].finish_reason == "length":
    assert free.usage.completion_tokens == 16
  # Pick a printable two-character stop string from the greedy text and check the cut.
  spots = [i for i in range(2, len(text) - 2) if text[i:i + 2].isprintable() and text[i:i + 2].strip()
           and "\ufffd" not in text[i:i + 2]]
  if not spots:
    pytest.skip("random model produced no printable text")
  stop = text[spots[0]:spots[0] + 2]
  cut = client.completions.create(**base, stop=[stop, "never-happens"])
  assert cut.choices[0].text == text[:text.find(stop)]
  assert cut.choices[0].finish_reason == "stop"


def test_token_id_prompts_and_batched_prompts(client, server):
  out = client.completions.create(model=server.model, prompt=[[5, 6, 7], "hello world"], max_tokens=4, n=2, seed=3,
                                  top_p=0.95)
  assert [c.index for c in out.choices] == [0, 1, 2, 3]


def test_streaming_chat_equals_non_streaming(client, server):
  kwargs = dict(model=server.model, messages=MESSAGES, max_tokens=14, seed=5, top_p=0.95)
  full = client.chat.completions.create(**kwargs).choices[0].message.content
  chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == full
  finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
  assert len(finishes) == 1
  assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_streaming_completion(client, server):
  stream = client.completions.create(model=server.model, prompt="Diagnosis:", max_tokens=10, seed=1, top_p=0.95,
                                     stream=True)
  pieces = list(stream)
  assert pieces and all(p.object == "text_completion" for p in pieces)
  assert pieces[-1].choices[0].finish_reason in ("stop", "length")


def test_logprobs(client, server):
  chat = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=6, seed=2, logprobs=True,
                                        top_logprobs=3, top_p=0.95)
  content = chat.choices[0].logprobs.content
  assert len(content) == chat.usage.completion_tokens
  for item in content:
    assert item.logprob <= 0 and len(item.top_logprobs) == 3
    assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
    assert item.logprob <= item.top_logprobs[0].logprob + 1e-5
  comp = client.completions.create(model=server.model, prompt="hello", max_tokens=5, seed=2, logprobs=2, top_p=0.95)
  lp = comp.choices[0].logprobs
  assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == comp.usage.completion_tokens
  assert all(1 <= len(t) <= 2 for t in lp.top_logprobs)


def test_concurrent_requests_share_a_batch(client, server):
  before = httpx.get(f"http://127.0.0.1:{server.port}/stats").json()

  def one(i):
    return client.chat.completions.create(model=server.model, max_tokens=8, seed=i, top_p=0.95,
                                          messages=[{"role": "user", "content": f"case {i}: cough"}])

  with concurrent.futures.ThreadPoolExecutor(6) as pool:
    results = list(pool.map(one, range(6)))
  assert all(r.choices[0].message.content is not None for r in results)
  after = httpx.get(f"http://127.0.0.1:{server.port}/stats").json()
  assert after["requests"] - before["requests"] == 6
  # They shared the running batch: fewer decode steps than the generated tokens (<= 8 each, the first
  # of each comes from its prefill), which is only possible when one step serves several rows.
  tokens = sum(r.usage.completion_tokens for r in results)
  assert after["steps"] - before["steps"] < tokens - 6
  assert after["max_batch_rows_seen"] >= 2


# ------------------------------------------------------------------ bad requests


def _post(server, path, body, raw=False):
  content = body if raw else json.dumps(body)
  return httpx.post(f"http://127.0.0.1:{server.port}{path}", content=content,
                    headers={"content-type": "application/json"}, timeout=60)


def _assert_error(response, status, param=None, code=None):
  assert response.status_code == status, response.text
  error = response.json()["error"]
  assert set(error) == {"message", "type", "param", "code"} and error["message"]
  if param is not None:
    assert error["param"] == param, error
  if code is not None:
    assert error["code"] == code, error
  return error


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.mark.parametrize("path, change, param", [
    (CHAT, {"temperature": 2.5}, "temperature"),
    (CHAT, {"temperature": "hot"}, "temperature"),
    (CHAT, {"top_p": 0}, "top_p"),
    (CHAT, {"n": 0}, "n"),
    (CHAT, {"n": 1000}, "n"),
    (CHAT, {"max_tokens": 0}, "max_tokens"),
    (CHAT, {"max_tokens": "many"}, "max_tokens"),
    (CHAT, {"seed": 1.5}, "seed"),
    (CHAT, {"stop": ["a"] * 17}, "stop"),
    (CHAT, {"stop": [""]}, "stop"),
    (CHAT, {"top_logprobs": 3}, "top_logprobs"),
    (CHAT, {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0]"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    (CHAT, {"presence_penalty": 2.5}, "presence_penalty"),
    (CHAT, {"repetition_penalty": 0}, "repetition_penalty"),
    (CHAT, {"reasoning_effort": "high"}, "reasoning_effort"),
    (CHAT, {"stream_options": {"include_usage": True}}, "stream_options"),
    (CHAT, {"tools": [{"type": "function"}]}, "tools"),
    (CHAT, {"surprise": 1}, "surprise"),
    (COMPLETIONS, {"logprobs": 21}, "logprobs"),
    (COMPLETIONS, {"echo": True}, "echo"),
    (COMPLETIONS, {"prompt": []}, "prompt"),
    (COMPLETIONS, {"prompt": [[1, 2, 10**9]]}, "prompt"),
    (COMPLETIONS, {"best_of": 3}, "best_of"),
])
def test_bad_parameter_values_are_400(server, path, change, param):
  body = {"model": server.model, "max_tokens": 4}
  body.update({"messages": MESSAGES} if path == CHAT else {"prompt": "hi"})
  body.update(change)
  _assert_error(_post(server, path, body), 400, param=param)


def test_malformed_and_non_object_json(server):
  _assert_error(_post(server, CHAT, '{"model": "x", "messages": [', raw=True), 400, code="invalid_json")
  _assert_error(_post(server, CHAT, "[1, 2]", raw=True), 400, code="invalid_json")
  _assert_error(_post(server, CHAT, b"\xff\xfe", raw=True), 400, code="invalid_json")


def test_missing_and_unknown_model(client, server):
  _assert_error(_post(server, CHAT, {"messages": MESSAGES}), 400, param="model")
  with pytest.raises(openai.NotFoundError) as info:
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
  assert info.value.body["code"] == "model_not_found"


def test_prompt_longer_than_context(client, server):
  long_text = "fever cough " * 400
  with pytest.raises(openai.BadRequestError) as info:
    client.completions.create(model=server.model, prompt=long_text, max_tokens=4)
  assert info.value.body["code"] == "context_length_exceeded"
  with pytest.raises(openai.BadRequestError):  # fits alone, but not with max_tokens
    client.completions.create(model=server.model, prompt="fever", max_tokens=100000)
  _assert_error(_post(server, CHAT, {"model": server.model, "messages": [{"role": "user", "content": long_text}]}),
                400, param="messages", code="context_length_exceeded")


def test_unknown_route_and_method(server):
  _assert_error(httpx.get(f"http://127.0.0.1:{server.port}/v1/nope"), 404)
  _assert_error(httpx.get(f"http://127.0.0.1:{server.port}{CHAT}"), 405)


def test_server_keeps_serving_after_errors(client, server):
  for _ in range(3):
    _post(server, CHAT, "{", raw=True)
  out = client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=3, seed=0, top_p=0.95)
  assert out.choices[0].message.content is not None
  assert server.proc.poll() is None


def test_cli_registers_serve_bound_to_loopback():
  import argparse

  from mlx_med.llm import cli, serve

  parser = argparse.ArgumentParser(prog="mlx-med")
  cli.register(parser.add_subparsers(dest="command"))
  args = parser.parse_args(["serve", "--model", "/models/qwen", "--port", "9001"])
  assert args.command == "serve" and args.func is serve.run_server
  assert (args.model, args.host, args.port) == ("/models/qwen", "127.0.0.1", 9001)


def test_api_key_guards_v1_routes_only():
  import types

  from fastapi.testclient import TestClient

  from mlx_med.llm import serve

  lm = types.SimpleNamespace(cfg=types.SimpleNamespace(max_seq_len=64))  # /v1/models needs no model
  app = serve.create_app(serve.OpenAIServer(lm, None, model_name="m", api_key="s3cret"))
  with TestClient(app) as http:
    assert http.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).json()["data"][0]["id"] == "m"
    for headers in ({}, {"Authorization": "Bearer s3cre"}, {"Authorization": "Bearer s3cret2"},
                    {"Authorization": "s3cret"}, {"Authorization": "Bearer s\u00e9cret".encode()}):
      _assert_error(http.get("/v1/models", headers=headers), 401, code="invalid_api_key")
    assert http.get("/health").status_code == 200
