"""Embeddings (`LocalLM.embed`, POST /v1/embeddings), constrained response_format and tool
calls through the served endpoint and the clients.

`LocalLM.embed` is checked against two independent means of the final hidden states: our
own Decoder run on each prompt alone (no padding, no buckets), and transformers'
`last_hidden_state` of the same tiny Qwen2 checkpoint.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

PROMPTS = [[5, 6, 7], [9] * 40, list(range(3, 60)), [17]]


def _reference_means(lm, prompts, normalize=True):
  """Each prompt alone through the Decoder, mean taken in float64 numpy."""
  import jax

  from mlx_med.core.transformer import Decoder

  hidden_of = jax.jit(lambda p, t: Decoder(lm.cfg).apply({"params": p}, t, return_hidden=True)[1])
  out = []
  for p in prompts:
    mean = np.asarray(hidden_of(lm.params, jnp.asarray([p], jnp.int32)), np.float64)[0].mean(axis=0)
    out.append(mean / np.linalg.norm(mean) if normalize else mean)
  return np.stack(out)


def test_embed_is_the_mean_of_the_final_hidden_states(local_lm):
  got = local_lm.embed(PROMPTS)
  assert got.shape == (len(PROMPTS), local_lm.cfg.d_model) and got.dtype == np.float32
  reference = _reference_means(local_lm, PROMPTS, normalize=False)
  np.testing.assert_allclose(got, reference / np.linalg.norm(reference, axis=1, keepdims=True), atol=2e-6, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
  raw = local_lm.embed(PROMPTS, normalize=False)
  np.testing.assert_allclose(raw, reference, atol=1e-5, rtol=1e-5)
  # Alone or batched with longer prompts (more padding), a prompt's embedding is the same.
  np.testing.assert_allclose(local_lm.embed([PROMPTS[0]]), got[:1], atol=2e-6, rtol=0)
  # More rows than one model call takes.
  np.testing.assert_allclose(local_lm.embed(PROMPTS * 3, max_batch=4), np.concatenate([got] * 3), atol=2e-6)
  assert local_lm.embed([]).shape == (0, local_lm.cfg.d_model)


def test_embed_matches_transformers_last_hidden_state(local_lm, qwen2_dir):
  import torch
  from torch_peers import import_torchvision

  import_torchvision()
  import transformers

  model = transformers.AutoModel.from_pretrained(qwen2_dir, local_files_only=True).eval()
  expected = []
  with torch.no_grad():
    for p in PROMPTS:
      hidden = model(input_ids=torch.tensor([p])).last_hidden_state[0].double().numpy()
      mean = hidden.mean(axis=0)
      expected.append(mean / np.linalg.norm(mean))
  np.testing.assert_allclose(local_lm.embed(PROMPTS), np.stack(expected), atol=1e-4, rtol=0)


def test_embed_refuses_bad_prompts(local_lm):
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    local_lm.embed([[1], []])
  with pytest.raises(ValueError, match="more than the model's context"):
    local_lm.embed([[1] * (local_lm.cfg.max_seq_len + 1)])
  with pytest.raises(ValueError, match="outside"):
    local_lm.embed([[local_lm.cfg.vocab_size]])


# ------------------------------------------------------------------ served: response_format, tools, embeddings

# A ChatML template that renders `tools` and assistant `tool_calls` itself (as Qwen's does).
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n{% endif %}"
    "Functions:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}{%- if not (tools and loop.first and m['role'] == 'system') %}"
    "<|im_start|>{{ m['role'] }}\n{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% if m['tool_calls'] is defined and m['tool_calls'] %}{% for c in m['tool_calls'] %}<tool_call>\n"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}\n</tool_call>"
    "{% endfor %}{% endif %}<|im_end|>\n{% endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

SCHEMA = {"type": "object",
          "properties": {"grade": {"enum": ["low", "high", "unknown"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 99},
                         "sites": {"type": "array", "maxItems": 2,
                                   "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}},
                                             "required": ["name"], "additionalProperties": False}}},
          "required": ["grade", "count", "sites"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "finding", "schema": SCHEMA, "strict": True}}
TOOLS = [{"type": "function", "function": {
              "name": "dose", "description": "Dose of a drug.",
              "parameters": {"type": "object", "properties": {"mg": {"type": "integer", "minimum": 1, "maximum": 900}},
                             "required": ["mg"], "additionalProperties": False}}},
         {"type": "function", "function": {
              "name": "code", "parameters": {"type": "object", "properties": {"system": {"enum": ["icd10", "snomed"]}},
                                             "required": ["system"], "additionalProperties": False}}}]
ASK = [{"role": "system", "content": "You are a careful clinician."},
       {"role": "user", "content": "Dose for the patient?"}]


@pytest.fixture(scope="module")
def tools_dir(tmp_path_factory, tokenizer_dir):
  """A tiny random Qwen2 with a 1024-token context and a template that renders tools."""
  from hf_tiny import make_hf_model, save_model_dir
  from transformers import AutoTokenizer

  vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))
  model = make_hf_model("qwen2", vocab_size=vocab, eos_token_id=2, max_position_embeddings=1024, seed=3)
  d = save_model_dir(model, str(tmp_path_factory.mktemp("qwen2_tools")), tokenizer_dir)
  path = f"{d}/tokenizer_config.json"
  with open(path) as f:
    config = json.load(f)
  config.update(chat_template=TOOLS_TEMPLATE, model_max_length=1024)
  with open(path, "w") as f:
    json.dump(config, f)
  return d


@pytest.fixture(scope="module")
def tools_server(tools_dir, tmp_path_factory):
  from conftest import served

  with served(tools_dir, str(tmp_path_factory.mktemp("tools_server") / "server.log")) as proc:
    yield proc


@pytest.fixture(scope="module")
def oai(tools_server):
  import openai

  with openai.OpenAI(base_url=tools_server.base_url, api_key="unused", timeout=120.0, max_retries=0) as c:
    yield c


@pytest.fixture(scope="module")
def tools_lm(tools_dir):
  from mlx_med.llm.model import LocalLM

  return LocalLM.from_pretrained(tools_dir, min_batch_bucket=8, min_prompt_bucket=32)


def test_served_response_format_is_valid_json(oai, tools_server):
  import jsonschema

  out = oai.chat.completions.create(model=tools_server.model, messages=ASK, response_format=FORMAT, n=8,
                                    temperature=1.0, seed=4, max_tokens=300)
  texts = [c.message.content for c in out.choices]
  for c in out.choices:
    assert c.finish_reason == "stop", c
    jsonschema.validate(json.loads(c.message.content), SCHEMA)
  assert len(set(texts)) > 1
  obj = oai.chat.completions.create(model=tools_server.model, messages=ASK, response_format={"type": "json_object"},
                                    n=4, temperature=0.7, seed=1, max_tokens=800)
  for c in obj.choices:
    if c.finish_reason == "stop":  # a random model may write a string longer than max_tokens
      assert isinstance(json.loads(c.message.content), dict)
  assert any(c.finish_reason == "stop" for c in obj.choices)
  # Unconstrained, the same random model does not write JSON.
  free = oai.chat.completions.create(model=tools_server.model, messages=ASK, temperature=1.0, seed=4, max_tokens=40)
  with pytest.raises(json.JSONDecodeError):
    json.loads(free.choices[0].message.content)


def test_tool_call_round_trip(oai, tools_server):
  import jsonschema

  first = oai.chat.completions.create(model=tools_server.model, messages=ASK, tools=TOOLS, tool_choice="required",
                                      temperature=1.0, seed=2, max_tokens=200)
  choice = first.choices[0]
  assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
  schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
  for call in choice.message.tool_calls:
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
  named = oai.chat.completions.create(model=tools_server.model, messages=ASK, tools=TOOLS, temperature=1.0, seed=5,
                                      tool_choice={"type": "function", "function": {"name": "code"}}, max_tokens=100)
  assert [c.function.name for c in named.choices[0].message.tool_calls] == ["code"]
  # Send the results back and get a final answer.
  calls = [c.model_dump() for c in choice.message.tool_calls]
  follow = ASK + [{"role": "assistant", "content": None, "tool_calls": calls}] + [
      {"role": "tool", "tool_call_id": c["id"], "content": json.dumps({"result": "ok"})} for c in calls]
  final = oai.chat.completions.create(model=tools_server.model, messages=follow, tools=TOOLS, tool_choice="none",
                                      temperature=0.0, max_tokens=8)
  assert final.choices[0].finish_reason in ("stop", "length")
  assert final.choices[0].message.tool_calls is None and isinstance(final.choices[0].message.content, str)
  assert final.usage.prompt_tokens > first.usage.prompt_tokens  # the calls and results are in the prompt


def test_streamed_tool_calls_equal_non_streamed(oai, tools_server):
  kwargs = dict(model=tools_server.model, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0,
                seed=7, max_tokens=200)
  whole = oai.chat.completions.create(**kwargs).choices[0].message.tool_calls
  chunks = list(oai.chat.completions.create(**kwargs, stream=True))
  streamed = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
  assert [(t.function.name, t.function.arguments) for t in streamed] == [
      (t.function.name, t.function.arguments) for t in whole]
  assert all(t.id.startswith("call_") for t in streamed)
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
  assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_served_embeddings_equal_local_embed(oai, tools_server, tools_lm):
  texts = ["fever and cough", "oral antibiotics for five days", "asthma"]
  expected = tools_lm.embed([tools_lm.encode_prompt(t) for t in texts])
  got = oai.embeddings.create(model=tools_server.model, input=texts)  # the openai client asks for base64
  assert [d.index for d in got.data] == [0, 1, 2]
  np.testing.assert_allclose(np.asarray([d.embedding for d in got.data]), expected, atol=1e-6, rtol=0)
  assert got.usage.prompt_tokens == sum(len(tools_lm.encode_prompt(t)) for t in texts)
  floats = oai.embeddings.create(model=tools_server.model, input=[5, 6, 7], encoding_format="float")
  np.testing.assert_allclose(floats.data[0].embedding, tools_lm.embed([[5, 6, 7]])[0], atol=1e-6, rtol=0)


def _post(server, path, body):
  import httpx

  return httpx.post(f"http://127.0.0.1:{server.port}{path}", json=body, timeout=60)


@pytest.mark.parametrize("change, param, words", [
    ({"response_format": {"type": "xml"}}, "response_format", "response_format.type must be"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format", "Invalid type: bogus"),
    ({"tools": [{"type": "function"}]}, "tools", "tools[0] must be"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
    ({"tool_choice": "required"}, "tool_choice", "needs at least one tool"),
    ({"messages": ASK + [{"role": "tool", "content": "42"}]}, "messages[2].tool_call_id", "tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{}]}]}, "messages[0].tool_calls", "tool_calls"),
])
def test_bad_structured_requests_are_400(tools_server, change, param, words):
  body = {"model": tools_server.model, "messages": ASK, "max_tokens": 4, **change}
  r = _post(tools_server, "/v1/chat/completions", body)
  assert r.status_code == 400, r.text
  error = r.json()["error"]
  assert error["param"] == param and words in error["message"] and "\n" not in error["message"]


@pytest.mark.parametrize("change, param, words", [
    ({"dimensions": 8}, "dimensions", "dimensions is not supported"),
    ({"input": ""}, "input", "input[0] is empty"),
    ({"input": []}, "input", "input must be"),
    ({"input": [[1, 10**6]]}, "input", "token ids must be in"),
    ({"input": "fever " * 2000}, "input", "maximum context length"),
    ({"encoding_format": "hex"}, "encoding_format", "encoding_format must be"),
    ({"surprise": 1}, "surprise", "Unrecognized"),
])
def test_bad_embedding_requests_are_400(tools_server, change, param, words):
  r = _post(tools_server, "/v1/embeddings", {"model": tools_server.model, "input": "fever", **change})
  assert r.status_code == 400, r.text
  error = r.json()["error"]
  assert error["param"] == param and words in error["message"]


# ------------------------------------------------------------------ clients


def test_clients_agree_on_tools_formats_and_embeddings(tools_lm, tools_server):
  from mlx_med.llm import client as client_lib

  local = client_lib.LocalClient(tools_lm)
  remote = client_lib.OpenAIClient(tools_server.model, base_url=tools_server.base_url, timeout=120, max_retries=0)
  try:
    for kwargs in (dict(response_format=FORMAT), dict(tools=TOOLS, tool_choice="required"),
                   dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "dose"}})):
      a = local.chat(ASK, max_tokens=200, temperature=0.0, **kwargs)[0]
      b = remote.chat(ASK, max_tokens=200, temperature=0.0, **kwargs)[0]
      assert (a.text, a.finish_reason) == (b.text, b.finish_reason)
      if "tools" in kwargs:
        assert a.finish_reason == "tool_calls"
        assert [c["function"] for c in a.tool_calls] == [c["function"] for c in b.tool_calls]
      else:
        json.loads(a.text)
    texts = ["fever", "dry cough since Monday"]
    np.testing.assert_allclose(local.embed(texts), remote.embed(texts), atol=1e-6, rtol=0)
    assert local.model_name == tools_lm.name and remote.model_name == tools_server.model
    # Many threads at once share the local engine and still get the schema's documents.
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      outs = list(pool.map(lambda s: local.chat(ASK, max_tokens=200, temperature=1.0, seed=s,
                                                response_format=FORMAT)[0], range(4)))
    for o in outs:
      assert o.finish_reason == "stop" and set(json.loads(o.text)) == {"grade", "count", "sites"}
  finally:
    local.close()
    remote.close()


def test_templates_without_tools_get_them_as_instructions(local_lm):
  from mlx_med.llm import grammar

  call = {"id": "call_1", "type": "function", "function": {"name": "dose", "arguments": "{\"mg\": 5}"}}
  messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
  msgs, kwargs = grammar.chat_with_tools(messages, TOOLS[:1], local_lm.tokenizer.hf.chat_template)
  assert kwargs == {}
  text = local_lm.tokenizer.render_chat(msgs)
  assert "careful clinician" in text and '"name": "dose"' in text and "<tools>" in text
  assert '<tool_call>\n{"name": "dose", "arguments": {"mg": 5}}\n</tool_call>' in text
  assert "<|im_start|>tool\n42" in text
  # A template that renders tools itself gets them as the tools= argument, calls as objects.
  msgs, kwargs = grammar.chat_with_tools(messages, TOOLS[:1], TOOLS_TEMPLATE)
  assert kwargs == {"tools": TOOLS[:1]} and msgs[2]["tool_calls"][0]["function"]["arguments"] == {"mg": 5}


def test_auto_mode_stream_holds_back_a_starting_tool_call():
  from mlx_med.llm.serve import _ToolStream

  s = _ToolStream(forced=False)
  pieces = [s.feed(p) for p in ("Let me", " check <to", "ol_c", "all>\n{\"name\"", ": \"dose\"}")]
  assert "".join(pieces) == "Let me check " and pieces[1] == " check "
  assert s.rest().startswith("<tool_call>")
  s = _ToolStream(forced=False)
  assert s.feed("a <t") == "a " and s.feed("able") == "<table"  # "<table" is no tag: released at once
  assert _ToolStream(forced=True).feed("anything") == ""
