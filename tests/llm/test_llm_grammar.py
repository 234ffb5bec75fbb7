"""`mlx_med.llm.grammar`: token masks from JSON schemas and the tool-call format.

A RANDOM-weight decoder samples at temperature 1 (20 seeds) with each constraint applied
by hand (logits -> mask -> sample -> advance, the engine's protocol), and every output
must parse and validate with `jsonschema` (an implementation independent of llguidance).
Without the mask the same model's outputs do not parse, so the checks can fail.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from mlx_med.core import params as params_lib
from mlx_med.core.transformer import Decoder, DecoderConfig, init_cache
from mlx_med.llm import grammar

VOCAB = 384  # larger than the tokenizer's 322 ids: the padding ids must never be allowed
CFG = DecoderConfig(vocab_size=VOCAB, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
                    max_seq_len=2048)
ROWS = 20

SCHEMA = {
    "type": "object",
    "properties": {
        "grade": {"enum": ["low", "high", "unknown"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 999},
        "sites": {"type": "array", "maxItems": 3, "items": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 8},
                           "codes": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}},
            "required": ["name", "codes"], "additionalProperties": False}},
    },
    "required": ["grade", "count", "sites"],
    "additionalProperties": False,
}

TOOLS = [
    {"type": "function", "function": {
        "name": "lookup_code", "description": "Look up a diagnosis code.",
        "parameters": {"type": "object", "properties": {"code": {"type": "string", "maxLength": 6},
                                                        "system": {"enum": ["icd10", "snomed"]}},
                       "required": ["code", "system"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "dose", "parameters": {"type": "object",
                                       "properties": {"mg": {"type": "integer", "minimum": 1, "maximum": 5000},
                                                      "daily": {"type": "boolean"}},
                                       "required": ["mg", "daily"], "additionalProperties": False}}},
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
  from mlx_med.llm.tokenizer import ChatTokenizer

  return ChatTokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def model():
  params = params_lib.init_params(CFG, jax.random.key(0))

  @functools.partial(jax.jit, static_argnums=(2,))
  def prefill(p, tokens, length):
    cache = init_cache(CFG, tokens.shape[0], length)
    logits, cache = Decoder(CFG).apply({"params": p}, tokens, cache=cache, cache_index=0)
    return logits[:, -1], cache

  @jax.jit
  def step(p, token, cache, index):
    logits, cache = Decoder(CFG).apply({"params": p}, token[:, None], cache=cache, cache_index=index)
    return logits[:, 0], cache

  return params, prefill, step


def sample_rows(model, tok, make_constraint, *, max_new: int, rows: int = ROWS, prompt: str = "answer in json"):
  """Samples `rows` completions at temperature 1 (seed = row) with one constraint per row, or
  unconstrained when make_constraint is None. Returns [(text, reason)] with reason 'grammar'
  (the constraint finished), 'eos' or 'length'."""
  params, prefill, step = model
  ids = tok.encode_chat([{"role": "user", "content": prompt}])
  constraints = [make_constraint() if make_constraint else None for _ in range(rows)]
  rngs = [np.random.default_rng(seed) for seed in range(rows)]
  logits, cache = prefill(params, jnp.asarray([ids] * rows), 2048)
  outs: list[list[int]] = [[] for _ in range(rows)]
  reasons = ["length"] * rows
  done = [False] * rows
  words = np.empty(grammar.bitmask_words(VOCAB), np.int32)
  for t in range(max_new):
    host = np.asarray(logits)
    chosen = np.zeros(rows, np.int32)
    for r in range(rows):
      if done[r]:
        continue
      z = host[r].astype(np.float64)
      if constraints[r] is not None:
        words.fill(-1)  # garbage: fill_bitmask must write every word
        constraints[r].fill_bitmask(words)
        z = np.where(grammar.unpack_bitmask(words, VOCAB), z, -np.inf)
      p = np.exp(z - z.max())
      token = int(rngs[r].choice(VOCAB, p=p / p.sum()))
      chosen[r] = token
      if constraints[r] is not None:
        constraints[r].advance(token)
      if token in tok.eos_token_ids:
        done[r], reasons[r] = True, "eos"
        continue
      outs[r].append(token)
      if constraints[r] is not None and constraints[r].is_finished():
        done[r], reasons[r] = True, "grammar"
    if all(done):
      break
    logits, cache = step(params, jnp.asarray(chosen), cache, len(ids) + t)
  return [(tok.decode(o), why) for o, why in zip(outs, reasons)]


def test_schema_outputs_of_a_random_model_validate(model, tok):
  make = lambda: grammar.constraint_for_response_format(
      {"type": "json_schema", "json_schema": {"name": "finding", "schema": SCHEMA, "strict": True}}, tok, VOCAB)
  results = sample_rows(model, tok, make, max_new=400)
  texts = [t for t, _ in results]
  assert all(why in ("grammar", "eos") for _, why in results), results
  for text in texts:
    jsonschema.validate(json.loads(text), SCHEMA)
  assert len(set(texts)) > 10  # the seeds really sampled different documents
  assert {json.loads(t)["grade"] for t in texts} == {"low", "high", "unknown"}


def test_json_object_outputs_of_a_random_model_parse(model, tok):
  make = lambda: grammar.constraint_for_response_format({"type": "json_object"}, tok, VOCAB)
  # Strings are unbounded in a json_object, and a random model closes one with p ~ 1/300 per token.
  results = sample_rows(model, tok, make, max_new=1900)
  assert all(why in ("grammar", "eos") for _, why in results), [(len(t), w) for t, w in results]
  values = [json.loads(t) for t, _ in results]
  assert all(isinstance(v, dict) for v in values)
  assert any(v for v in values)  # not only "{}"


def test_unconstrained_random_outputs_do_not_parse(model, tok):
  """The same sampler without masks: the checks above are not vacuous."""
  results = sample_rows(model, tok, None, max_new=30)

  def parses(text):
    try:
      json.loads(text)
      return True
    except json.JSONDecodeError:
      return False

  assert not any(parses(t) for t, _ in results)


def _check_calls(text: str, tools=TOOLS):
  content, calls = grammar.parse_tool_calls(text, tools)
  assert content is None and calls, text
  schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
  for call in calls:
    assert call["type"] == "function" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
  # The whole output is the calls' exact Hermes text (no stray characters).
  assert text == grammar.render_tool_calls(calls)
  return calls


def test_required_tool_calls_of_a_random_model_validate(model, tok):
  make = lambda: grammar.constraint_for_tools(TOOLS, "required", tok, VOCAB)
  results = sample_rows(model, tok, make, max_new=600)
  assert all(why in ("grammar", "eos") for _, why in results), results
  names = set()
  for text, _ in results:
    calls = _check_calls(text)
    assert 1 <= len(calls) <= grammar.MAX_TOOL_CALLS
    names.update(c["function"]["name"] for c in calls)
  assert names == {"lookup_code", "dose"}


def test_named_tool_choice_gives_exactly_that_call(model, tok):
  choice = {"type": "function", "function": {"name": "dose"}}
  make = lambda: grammar.constraint_for_tools(TOOLS, choice, tok, VOCAB)
  results = sample_rows(model, tok, make, max_new=200)
  for text, why in results:
    assert why == "grammar"  # one call, then the grammar is complete
    calls = _check_calls(text)
    assert [c["function"]["name"] for c in calls] == ["dose"]


def test_mask_and_advance(tok):
  c = grammar.constraint_for_response_format({"type": "json_object"}, tok, VOCAB)
  allowed = c.allowed()
  assert allowed.shape == (VOCAB,) and not allowed[len(tok):].any()
  assert [tok.token_text(i) for i in np.flatnonzero(allowed)] == ["{"]
  with pytest.raises(ValueError, match="not allowed by the json grammar"):
    c.copy().advance(tok.encode("x", add_special_tokens=False)[0])
  for t in tok.encode('{"a": [1, 2]}', add_special_tokens=False):
    c.advance(t)
  assert c.is_finished() and c.is_accepting()
  with pytest.raises(ValueError, match="contiguous int32"):
    c.fill_bitmask(np.zeros(3, np.int32))
  # The compiled tokenizer is built once per (tokenizer, vocabulary size).
  assert grammar.compiled_tokenizer(tok, VOCAB) is grammar.compiled_tokenizer(tok, VOCAB)


def test_text_format_is_unconstrained(tok):
  assert grammar.constraint_for_response_format(None, tok, VOCAB) is None
  assert grammar.constraint_for_response_format({"type": "text"}, tok, VOCAB) is None
  assert grammar.constraint_for_tools(TOOLS, "auto", tok, VOCAB) is None
  assert grammar.constraint_for_tools(TOOLS, "none", tok, VOCAB) is None


@pytest.mark.parametrize("response_format, match", [
    ({"type": "xml"}, "response_format.type must be"),
    ("json", "must be an object"),
    ({"type": "json_schema"}, "json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "name must be"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}, "Invalid type: bogus"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "("}}}}}, "regex parse error"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "must be a JSON schema object"),
])
def test_bad_response_formats_are_one_line_errors(tok, response_format, match):
  with pytest.raises(ValueError, match=match) as info:
    grammar.constraint_for_response_format(response_format, tok, VOCAB)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("tools, choice, match", [
    ("f", "auto", "tools must be a list"),
    ([{"type": "function"}], "auto", r"tools\[0\] must be"),
    ([{"type": "function", "function": {"name": "a b"}}], "auto", "name must be"),
    ([TOOLS[0], TOOLS[0]], "auto", "used by two tools"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "not in tools"),
    (TOOLS, "sometimes", "tool_choice must be"),
    ([], "required", "needs at least one tool"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}], "required",
     "Invalid type"),
])
def test_bad_tools_are_one_line_errors(tok, tools, choice, match):
  with pytest.raises(ValueError, match=match) as info:
    grammar.constraint_for_tools(tools, choice, tok, VOCAB)
  assert "\n" not in str(info.value)


def test_parse_tool_calls_auto_mode():
  text = 'Let me check.\n<tool_call>\n{"name": "dose", "arguments": {"mg": 5, "daily": true}}\n</tool_call>'
  content, calls = grammar.parse_tool_calls(text, TOOLS)
  assert content == "Let me check."
  assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
      ("dose", {"mg": 5, "daily": True})]
  # A missing closing tag at the very end (the model stopped on EOS) still counts.
  assert grammar.parse_tool_calls('<tool_call>{"name": "dose", "arguments": {"mg": 1}}', TOOLS)[1]
  # Arguments already serialised as a string are accepted.
  _, calls = grammar.parse_tool_calls('<tool_call>{"name": "dose", "arguments": "{\\"mg\\": 2}"}</tool_call>')
  assert json.loads(calls[0]["function"]["arguments"]) == {"mg": 2}
  for bad in ("no calls here", '<tool_call>{"name": "dose", "arguments": {</tool_call>',
              '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>',
              '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>["dose"]</tool_call>'):
    assert grammar.parse_tool_calls(bad, TOOLS) == (bad, [])
