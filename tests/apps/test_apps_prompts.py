"""PromptTemplate: named parts, composition, field discovery, optional parts and clear errors."""

from __future__ import annotations

import pytest

from mlx_med.apps.prompts import PromptTemplate


def _uma_like() -> PromptTemplate:
  return PromptTemplate([("task", "Extract the {attribute} of the patient."),
                         ("values", "Allowed values: {values}"),
                         ("examples", "Examples:\n{examples}"),
                         ("note", "Note ({date}):\n{note}")],
                        system="You are a careful {role}.")


def test_names_fields_and_render_order():
  t = _uma_like()
  assert t.names == ("task", "values", "examples", "note")
  assert t.fields == frozenset({"attribute", "values", "examples", "date", "note", "role"})
  assert t.part_fields("note") == ("date", "note")
  text = t.render(attribute="histology", values="adenocarcinoma, squamous", examples="x -> adenocarcinoma",
                  date="2024-01-02", note="Biopsy shows adenocarcinoma.")
  assert text == ("Extract the histology of the patient.\n\nAllowed values: adenocarcinoma, squamous\n\n"
                  "Examples:\nx -> adenocarcinoma\n\nNote (2024-01-02):\nBiopsy shows adenocarcinoma.")


def test_mapping_parts_keep_order_and_custom_joiner():
  t = PromptTemplate({"b": "B={b}", "a": "A={a}"}, joiner=" | ")
  assert t.names == ("b", "a")
  assert t.render(a=1, b=2) == "B=2 | A=1"


def test_empty_value_drops_optional_part_but_missing_value_is_an_error():
  t = _uma_like()
  text = t.render(attribute="stage", values="I, II", examples="", date="2024-01-02", note="n")
  assert "Examples" not in text
  assert text.count("\n\n") == 2  # three parts left, no doubled separators
  # None counts as empty too
  assert "Examples" not in t.render(attribute="s", values="v", examples=None, date="d", note="n")
  with pytest.raises(KeyError) as err:
    t.render(attribute="stage", values="I", date="2024-01-02", note="n")
  msg = str(err.value)
  assert "'examples'" in msg and "part 'examples'" in msg
  # a part with several fields is kept when only some of them are empty
  assert "Note ():\nn" in t.render(attribute="s", values="v", examples="", date="", note="n")


def test_messages_with_and_without_system():
  t = _uma_like()
  msgs = t.messages(role="abstractor", attribute="a", values="v", examples="", date="d", note="n")
  assert msgs[0] == {"role": "system", "content": "You are a careful abstractor."}
  assert msgs[1]["role"] == "user" and msgs[1]["content"].startswith("Extract the a")
  with pytest.raises(KeyError, match="system message"):
    t.messages(attribute="a", values="v", examples="", date="d", note="n")
  plain = t.with_system(None)
  assert [m["role"] for m in plain.messages(attribute="a", values="v", examples="", date="d", note="n")] == ["user"]


def test_compose_replace_insert_without_add():
  t = _uma_like()
  t2 = t.replace("task", "Find the {attribute}.")
  assert t2.names == t.names and t2["task"] == "Find the {attribute}." and t["task"].startswith("Extract")
  t3 = t.insert("context", "Relevant passages:\n{context}", before="note")
  assert t3.names == ("task", "values", "examples", "context", "note")
  assert "context" in t3.fields and "context" not in t.fields
  t4 = t.insert("schema", "Schema: {schema}", after="values")
  assert t4.names == ("task", "values", "schema", "examples", "note")
  assert t.insert("tail", "end").names[-1] == "tail"
  t5 = t.without("examples", "values")
  assert t5.names == ("task", "note") and "examples" not in t5.fields
  joined = PromptTemplate([("a", "A {x}")], system="S") + PromptTemplate([("b", "B {y}")])
  assert joined.names == ("a", "b") and joined.system == "S"
  assert joined.render(x=1, y=2) == "A 1\n\nB 2"
  assert (joined + ("c", "C")).names == ("a", "b", "c")
  # templates are values
  assert t.replace("task", t["task"]) == t and hash(t.replace("task", t["task"])) == hash(t)


def test_composition_errors_name_the_problem():
  t = _uma_like()
  with pytest.raises(KeyError, match="no part 'missing'"):
    t.replace("missing", "x")
  with pytest.raises(KeyError, match="no part 'nope'"):
    t.without("nope")
  with pytest.raises(ValueError, match="already has a part 'note'"):
    t.insert("note", "x")
  with pytest.raises(ValueError, match="not both"):
    t.insert("x", "x", after="task", before="note")
  with pytest.raises(ValueError, match=r"both have part\(s\) \['task'\]"):
    t + PromptTemplate([("task", "other")])
  with pytest.raises(ValueError, match="two different system"):
    PromptTemplate([("a", "a")], system="one") + PromptTemplate([("b", "b")], system="two")
  with pytest.raises(ValueError, match="appears twice"):
    PromptTemplate([("a", "x"), ("a", "y")])


def test_literal_braces_attribute_access_and_bad_syntax():
  t = PromptTemplate([("schema", 'Reply as {{"value": ...}} for {item.name} ({scores[0]:.2f})')])
  assert t.fields == frozenset({"item", "scores"})

  class Item:
    name = "ECOG"

  assert t.render(item=Item(), scores=[0.5]) == 'Reply as {"value": ...} for ECOG (0.50)'
  with pytest.raises(ValueError, match="part 'bad'.*doubled"):
    PromptTemplate([("bad", "a { b")])
  with pytest.raises(ValueError, match="positional field"):
    PromptTemplate([("pos", "a {} b")])
  with pytest.raises(AttributeError, match="part 'schema'"):
    t.render(item=object(), scores=[1.0])


def test_partial_binds_fields_and_survives_edits():
  t = _uma_like().partial(attribute="histology", values="adenocarcinoma, squamous", role="abstractor")
  assert t.bound == {"attribute": "histology", "values": "adenocarcinoma, squamous", "role": "abstractor"}
  msgs = t.messages(examples="", date="d", note="n")
  assert msgs[0]["content"] == "You are a careful abstractor." and msgs[1]["content"].startswith("Extract the histology")
  assert t.render(attribute="stage", values="I", examples="", date="d", note="n").startswith("Extract the stage")
  t2 = t.without("examples").insert("ctx", "Context: {ctx}", before="note")
  assert t2.bound == t.bound and "Context: c" in t2.render(ctx="c", date="d", note="n")
  assert t != _uma_like() and t.partial() == t
  with pytest.raises(KeyError, match=r"\['nope'\]"):
    t.partial(nope=1)
  joined = PromptTemplate([("a", "{x}")]).partial(x=1) + PromptTemplate([("b", "{y}")]).partial(y=2)
  assert joined.render() == "1\n\n2"
  with pytest.raises(ValueError, match=r"fix field\(s\) \['x'\]"):
    PromptTemplate([("a", "{x}")]).partial(x=1) + PromptTemplate([("b", "{x}")]).partial(x=2)
