"""Tool-calling evals (issue 11): generated calls parsed per template family, the golden
`tool_call` metric, golden rows with `tools`, and `generate(tools=...)`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_data_agentic import TOOL_ROW, TOOLS
from tokenizers_fixture import make_tokenizer

from jaxsft.data import render
from jaxsft.errors import UserError
from jaxsft.evals import golden, load_golden
from jaxsft.evals.tool_calls import BAD, calls_match, json_equal, parse_calls

PARIS = {"name": "get_weather", "arguments": {"city": "paris"}}
TYPED_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "book",
            "parameters": {
                "type": "object",
                "properties": {
                    "code": {"type": "string"},
                    "seats": {"type": "integer"},
                    "window": {"type": "boolean"},
                    "meals": {"type": "array"},
                },
            },
        },
    }
]


# --------------------------------------------------------------------------------------------
# Parsing, by hand
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "reply, fmt, calls",
    [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris"}}\n</tool_call>',
         "hermes", [PARIS]),
        ('Sure.\n<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n'
         '{"name": "b", "arguments": "{\\"x\\": 1}"}\n</tool_call>', "auto",
         [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}]),
        ('<think>\nmaybe <tool_call>{"name": "x", "arguments": {}}</tool_call>\n</think>\n\nHi.',
         "auto", []),  # a call inside the reasoning is no call
        ("<tool_call>\n{not json}\n</tool_call>", "auto", [BAD]),
        ('{"name": "get_weather", "parameters": {"city": "paris"}}', "llama3", [PARIS]),
        ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "paris"}}', "auto", [PARIS]),
        ('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"y": [1, 2]}}', "auto",
         [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"y": [1, 2]}}]),
        ('<|python_tag|>brave_search.call(query="paris weather")', "auto",
         [{"name": "brave_search", "arguments": {"query": "paris weather"}}]),
        ('brave_search.call(query="x", n=3)', "auto",
         [{"name": "brave_search", "arguments": {"query": "x", "n": 3}}]),
        ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "paris"}, "id": "a1"}]',
         "mistral", [PARIS]),
        (' [{"name": "get_weather", "arguments": {"city": "paris"}}]', "auto", [PARIS]),
        ("[TOOL_CALLS] [oops", "auto", [BAD]),
        ("<tool_call>\n<function=get_weather>\n<parameter=city>\nparis\n</parameter>\n"
         "</function>\n</tool_call>", "qwen3_coder", [PARIS]),
        ("It is sunny in paris.", "auto", []),
        ("[1] is the first item.", "auto", []),
    ],
)  # fmt: skip
def test_parse_calls_by_hand(reply, fmt, calls):
    assert parse_calls(reply, fmt) == calls


def test_qwen3_coder_values_follow_the_tool_schema():
    reply = (
        "<tool_call>\n<function=book>\n<parameter=code>\n007\n</parameter>\n"
        "<parameter=seats>\n2\n</parameter>\n<parameter=window>\nTrue\n</parameter>\n"
        '<parameter=meals>\n["veg", "fish"]\n</parameter>\n</function>\n</tool_call>'
    )
    args = {"code": "007", "seats": 2, "window": True, "meals": ["veg", "fish"]}
    assert parse_calls(reply, "auto", TYPED_TOOLS) == [{"name": "book", "arguments": args}]
    no_schema = parse_calls(reply)[0]["arguments"]  # values read as JSON, else kept as text
    assert no_schema == {**args, "code": "007"} and parse_calls(reply.replace("007", "7")) == [
        {"name": "book", "arguments": {**args, "code": 7}}
    ]


def test_json_equal_and_calls_match():
    assert json_equal({"a": [1, 2.0]}, {"a": [1.0, 2]})
    assert not json_equal({"a": True}, {"a": 1}) and not json_equal([1, 2], [2, 1])
    assert not json_equal({"a": 1}, {"a": 1, "b": None}) and not json_equal("1", 1)
    a, b = {"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}
    assert calls_match([b, a], [a, b])
    assert not calls_match([a], [a, b]) and not calls_match([a, b], [a])
    assert not calls_match([BAD], [a]) and calls_match([], [])


# --------------------------------------------------------------------------------------------
# Parsing what each template writes, decoded as generation decodes it
# --------------------------------------------------------------------------------------------
FAMILY_FORMATS = {"qwen25": "hermes", "qwen3_tools": "hermes", "llama31": "llama3"}
FAMILY_FORMATS.update(mistral="mistral", qwen3_coder="qwen3_coder")


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "data_tokenizers"
    return {k: make_tokenizer(k, root) for k in FAMILY_FORMATS}


def call_turn_reply(tok, row) -> str:
    """The first supervised turn of the row, decoded with special tokens skipped (as jaxsft
    decodes a generated reply)."""
    out = render(tok, row)
    mask = np.asarray(out["loss_mask"]) > 0
    end = np.argmax(~mask[np.argmax(mask) :]) + np.argmax(mask)
    ids = np.asarray(out["input_ids"])[np.argmax(mask) : end]
    return tok.decode(ids.tolist(), skip_special_tokens=True)


@pytest.mark.parametrize("kind", sorted(FAMILY_FORMATS))
def test_each_family_parses_its_own_rendered_call(toks, kind):
    reply = call_turn_reply(toks[kind], TOOL_ROW)
    assert parse_calls(reply, FAMILY_FORMATS[kind]) == [PARIS]
    assert parse_calls(reply) == [PARIS]


# --------------------------------------------------------------------------------------------
# Golden rows with tools and the tool_call metric
# --------------------------------------------------------------------------------------------
def tool_row(**kw) -> dict:
    return {"messages": TOOL_ROW["messages"][:2], "tools": TOOLS, "expected": PARIS, **kw}


def write(tmp_path, rows) -> str:
    p = tmp_path / "golden.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def test_load_golden_reads_tools_and_tool_call_rows(tmp_path):
    after_result = {
        "messages": TOOL_ROW["messages"][:4],  # call, result: the next turn answers in text
        "tools": json.dumps([TOOLS[0]["function"]]),  # a JSON string of bare schemas
        "expected": "sunny",
        "metric": "contains",
    }
    two = tool_row(expected=[PARIS, {"function": {"name": "get_weather", "arguments": "{}"}}])
    none = tool_row(expected=[], metric="tool_call", tool_format="hermes")
    rows = load_golden(write(tmp_path, [tool_row(), after_result, two, none]))
    assert [r["metric"] for r in rows] == ["tool_call", "contains", "tool_call", "tool_call"]
    assert rows[0]["expected"] == [PARIS] and rows[0]["tools"] == TOOLS
    assert rows[1]["tools"] == TOOLS and rows[1]["messages"][2]["tool_calls"][0]["id"]
    assert rows[2]["expected"] == [PARIS, {"name": "get_weather", "arguments": {}}]
    assert rows[3]["expected"] == [] and rows[3]["tool_format"] == "hermes"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tools": "[{oops"}, "not valid JSON"),
        ({"tools": [{"function": {}}]}, "no function name"),
        ({"expected": {"name": "get_time", "arguments": {}}}, "not among the row's tools"),
        ({"expected": {"name": "get_weather", "arguments": "paris"}}, "not a JSON object"),
        ({"expected": "get_weather", "metric": "tool_call"}, "is not a call"),
        ({"expected": [{"arguments": {}}]}, "no function name"),
        ({"tool_format": "xml"}, "unknown tool_format 'xml'"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "no assistant turn before it"),
    ],
)
def test_load_golden_rejects_bad_tool_rows_with_line(tmp_path, change, message):
    p = write(tmp_path, [tool_row(), tool_row(**change)])
    with pytest.raises(UserError) as e:
        load_golden(p)
    assert e.value.where == f"{p}:2" and message in e.value.message


def test_tool_call_metric_scores_replies(tmp_path):
    rows = load_golden(write(tmp_path, [tool_row(), tool_row(), tool_row(), tool_row()]))
    replies = [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris"}}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "lyon"}}\n</tool_call>',
        "It is sunny in paris.",
        '{"name": "get_weather", "parameters": {"city": "paris"}}',  # Llama's syntax: auto
    ]
    metrics, scored = golden.score_golden(rows, replies)
    assert [r["pass"] for r in scored] == [True, False, False, True]
    assert scored[1]["calls"] == [{"name": "get_weather", "arguments": {"city": "lyon"}}]
    assert metrics["tool_call_accuracy"] == 0.5 and metrics["tool_call_name_accuracy"] == 0.75
    assert metrics["by_metric"] == {"tool_call": 0.5}
    strict = load_golden(write(tmp_path, [tool_row(tool_format="hermes")]))
    assert not golden.score_golden(strict, replies[3:])[1][0]["pass"]
    assert "tool_call_accuracy" not in golden.score_golden(rows[:0], [])[0]


# --------------------------------------------------------------------------------------------
# Generation with tools
# --------------------------------------------------------------------------------------------
def test_generate_renders_tools_in_the_prompt(tmp_path_factory):
    from chat_checkpoint import build_chat_checkpoint

    import jaxsft
    from jaxsft.evals.sample import encode_chat, generate_ids, stop_ids, tools_per_conversation
    from jaxsft.tokenizer import load_tokenizer

    path = build_chat_checkpoint(str(tmp_path_factory.mktemp("tool_ckpt")), "qwen25", 0)
    tok, (model, _) = load_tokenizer(path), jaxsft.load_hf(path)
    msgs = TOOL_ROW["messages"][:2]
    ids = encode_chat(tok, msgs, TOOLS)
    ref = tok.apply_chat_template(msgs, tools=TOOLS, add_generation_prompt=True)["input_ids"]
    assert ids == ref and ids != encode_chat(tok, msgs)
    assert tools_per_conversation(TOOLS, 2) == [TOOLS, TOOLS]
    assert tools_per_conversation([TOOLS, None], 2) == [TOOLS, None]
    rows = [{"messages": msgs, "tools": TOOLS, "expected": [PARIS], "metric": "tool_call"}]
    res = golden.golden_eval(model, tok, rows, max_new_tokens=6)
    (raw,) = generate_ids(model, [ids], 6, stop_ids(model, tok))
    assert res["rows"][0]["output"] == tok.decode(raw, skip_special_tokens=True)
    assert jaxsft.generate(model, tok, [msgs], 6, tools=TOOLS) == [res["rows"][0]["output"]]
