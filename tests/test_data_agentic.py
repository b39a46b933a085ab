"""Agentic and reasoning SFT data: tool calls, tool definitions, reasoning, content parts,
weights, data.turns, template drops and the data check (issue 11)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers_fixture import AGENT_KINDS, make_tokenizer

from jaxsft.data import render
from jaxsft.data.chat import KIND_REASONING, KIND_TOOL, render_many
from jaxsft.data.formats import normalize, turn_examples
from jaxsft.errors import UserError

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
SCHEMA = {
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
TOOLS = [{"type": "function", "function": SCHEMA}]
CALL_ID = "abc123xyz"  # Mistral wants 9 characters


def call(args, **kw) -> dict:
    return {
        "id": CALL_ID,
        "type": "function",
        "function": {"name": "get_weather", "arguments": args},
        **kw,
    }


TOOL_MESSAGES = [
    SYSTEM,
    {"role": "user", "content": "What is the weather in paris?"},
    {"role": "assistant", "content": "", "tool_calls": [call({"city": "paris"})]},
    {"role": "tool", "tool_call_id": CALL_ID, "name": "get_weather", "content": '{"w": "sunny"}'},
    {"role": "assistant", "content": "It is sunny in paris."},
]
TOOL_ROW = {"tools": TOOLS, "messages": TOOL_MESSAGES}
# What each template writes for the two assistant turns (after the role header), as shipped.
QWEN_CALL = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris"}}\n</tool_call><|im_end|>'
)
TOOL_RUNS = {
    "qwen25": [
        QWEN_CALL,
        "It is sunny in paris.<|im_end|>",
    ],
    # the last turn gets an empty think block from the template: not supervised
    "qwen3_tools": [
        QWEN_CALL,
        "It is sunny in paris.<|im_end|>",
    ],
    "llama31": [
        '{"name": "get_weather", "parameters": {"city": "paris"}}<|eot_id|>',
        "It is sunny in paris.<|eot_id|>",
    ],
    "mistral": [
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "paris"}, '
        '"id": "abc123xyz"}]</s>',
        "It is sunny in paris.</s>",
    ],
    # Hermes tool_use: the same call syntax, the tools after a preamble in a system turn of
    # its own, results in a `tool` turn
    "hermes": [
        QWEN_CALL,
        "It is sunny in paris.<|im_end|>",
    ],
    # XML calls; the tools are XML <function> blocks in the system turn
    "qwen3_coder": [
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nparis\n</parameter>\n"
        "</function>\n</tool_call><|im_end|>",
        "It is sunny in paris.<|im_end|>",
    ],
}
REASONING_MESSAGES = [
    SYSTEM,
    {"role": "user", "content": "What is two and two?"},
    {"role": "assistant", "content": "It is four.", "reasoning_content": "add them"},
    {"role": "user", "content": "And three and three?"},
    {"role": "assistant", "content": "It is six.", "reasoning_content": "add again"},
]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "data_tokenizers"
    return {k: make_tokenizer(k, root) for k in (*AGENT_KINDS, "phi4mini")}


def render_norm(tok, norm: dict) -> dict:
    """render() of an already normalized example (data.turns expansions)."""
    (out,), _ = render_many(tok, [norm], normalized=True)
    return {**out, **{k: out[k].tolist() for k in ("input_ids", "loss_mask", "kinds")}}


def runs(tok, row, out, **kw) -> list[str]:
    """Text of each contiguous run of supervised tokens; also checks the ids are the template's
    own rendering with the row's tools."""
    text = tok.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=False, **kw)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert out["input_ids"] == enc["input_ids"]
    spans, cur = [], None
    for m, (s, e) in zip(out["loss_mask"], enc["offset_mapping"], strict=True):
        if m:
            cur = [s, e] if cur is None else [cur[0], e]
        elif cur is not None:
            spans, cur = [*spans, text[cur[0] : cur[1]]], None
    return spans + ([text[cur[0] : cur[1]]] if cur else [])


# --------------------------------------------------------------------------------------------
# Tool calls: masks and ids
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(TOOL_RUNS))
def test_tool_calling_turns_supervise_the_call_syntax_and_nothing_of_the_tools(toks, kind):
    tok = toks[kind]
    out = render(tok, TOOL_ROW)
    ref = tok.apply_chat_template(TOOL_MESSAGES, tools=TOOLS, tokenize=True)["input_ids"]
    assert out["input_ids"] == ref
    assert runs(tok, TOOL_ROW, out) == TOOL_RUNS[kind]
    assert out["drops"] == {} and out["turns_without_eot"] == 0
    tool_text = tok.decode(
        [i for i, k in zip(out["input_ids"], out["kinds"], strict=True) if k == KIND_TOOL]
    )
    assert "get_weather" in tool_text and "sunny" not in tool_text


@pytest.mark.parametrize(
    "variant",
    [
        {"arguments": json.dumps({"city": "paris"})},  # arguments as a JSON string
        {"content": None},
        {"content": "absent"},
        {"parts": True},  # the call as a tool_call content part
    ],
    ids=["json-string-arguments", "null-content", "absent-content", "tool-call-part"],
)
def test_tool_call_spellings_render_alike(toks, variant):
    msgs = [dict(m) for m in TOOL_MESSAGES]
    if "arguments" in variant:
        msgs[2]["tool_calls"] = [call(variant["arguments"])]
    elif variant.get("content") == "absent":
        del msgs[2]["content"]
    elif "content" in variant:
        msgs[2]["content"] = None
    else:
        msgs[2] = {
            "role": "assistant",
            "content": [{**call({"city": "paris"}), "type": "tool_call"}],
        }
    for kind in ("qwen25", "llama31"):
        assert render(toks[kind], {"tools": TOOLS, "messages": msgs}) == render(
            toks[kind], TOOL_ROW
        )


def test_content_beside_a_call_is_supervised_with_it(toks):
    msgs = [dict(m) for m in TOOL_MESSAGES]
    msgs[2]["content"] = "Let me check."
    row = {"tools": TOOLS, "messages": msgs}
    out = render(toks["qwen25"], row)
    assert runs(toks["qwen25"], row, out)[0] == (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris"}}'
        "\n</tool_call><|im_end|>"
    )
    # Llama 3.1 writes only the call: the content is a drop ("warn" under on_drop=auto)
    out = render(toks["llama31"], row)
    assert out["drops"] == {"content": 1}
    assert runs(toks["llama31"], row, out)[0] == TOOL_RUNS["llama31"][0]
    with pytest.raises(UserError, match="drops the content"):
        render(toks["llama31"], row, on_drop="error")


def test_glaive_sharegpt_reads_as_openai_tool_calling(toks):
    row = {
        "tools": json.dumps([SCHEMA]),  # a JSON string of bare schemas
        "conversations": [
            {"from": "system", "value": SYSTEM["content"]},
            {"from": "human", "value": TOOL_MESSAGES[1]["content"]},
            {
                "from": "function_call",
                "value": json.dumps({"name": "get_weather", "arguments": {"city": "paris"}}),
            },
            {"from": "observation", "value": TOOL_MESSAGES[3]["content"]},
            {"from": "gpt", "value": TOOL_MESSAGES[4]["content"]},
        ],
    }
    for kind in ("qwen25", "qwen3_tools"):
        assert render(toks[kind], row) == render(toks[kind], TOOL_ROW)


def test_templates_that_drop_tools_or_calls_refuse_the_row_unless_told(toks):
    tok = toks["phi4mini"]  # renders neither tools= nor tool_calls
    with pytest.raises(UserError, match="does not render the example's tools"):
        render(tok, TOOL_ROW)
    out = render(tok, TOOL_ROW, on_drop="allow")
    assert out["drops"] == {"tools": 1, "tool_call": 1}
    assert runs(tok, TOOL_ROW, out) == ["It is sunny in paris.<|end|>"]  # the empty call turn: none


# --------------------------------------------------------------------------------------------
# Reasoning
# --------------------------------------------------------------------------------------------
def test_qwen3_reasoning_content_is_supervised_where_the_template_renders_it(toks):
    tok, row = toks["qwen3_tools"], {"messages": REASONING_MESSAGES}
    out = render(tok, row)
    assert runs(tok, row, out) == [
        "It is four.<|im_end|>",  # history: the template drops its reasoning (counted)
        "<think>\nadd again\n</think>\n\nIt is six.<|im_end|>",
    ]
    assert out["drops"] == {"reasoning": 1}
    think = tok.decode(
        [i for i, k in zip(out["input_ids"], out["kinds"], strict=True) if k == KIND_REASONING]
    )
    assert think == "<think>\nadd again\n</think>"
    with pytest.raises(UserError, match="data.turns=expand"):
        render(tok, row, on_drop="error")


@pytest.mark.parametrize("spelling", ["think-in-content", "reasoning-part", "thinking-key"])
def test_reasoning_spellings_render_alike(toks, spelling):
    msgs = [dict(m) for m in REASONING_MESSAGES]
    last = {"role": "assistant"}
    if spelling == "think-in-content":
        last["content"] = "<think>\nadd again\n</think>\n\nIt is six."
    elif spelling == "reasoning-part":
        last["content"] = [
            {"type": "reasoning", "text": "add again"},
            {"type": "text", "value": "It is six."},
        ]
    else:
        last.update(content="It is six.", thinking="add again")
    msgs[-1] = last
    tok = toks["qwen3_tools"]
    assert render(tok, {"messages": msgs}) == render(tok, {"messages": REASONING_MESSAGES})


def test_r1_distill_drops_every_think_block_and_says_so(toks):
    tok = toks["r1"]
    row = {
        "messages": [
            REASONING_MESSAGES[1],
            {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nIt is four."},
        ]
    }
    out = render(tok, row)
    assert runs(tok, row, out) == ["\n\nIt is four.<｜end▁of▁sentence｜>"]
    assert out["drops"] == {"reasoning": 1}
    assert out["input_ids"].count(tok.bos_token_id) == 1


# --------------------------------------------------------------------------------------------
# data.turns
# --------------------------------------------------------------------------------------------
def test_expand_renders_each_turn_as_the_model_sees_it(toks):
    tok, msgs = toks["qwen3_tools"], REASONING_MESSAGES
    exs = turn_examples(normalize({"messages": msgs}), "expand")
    assert [len(e["messages"]) for e in exs] == [3, 5]
    outs = [render_norm(tok, e) for e in exs]
    assert [runs(tok, e, o) for e, o in zip(exs, outs, strict=True)] == [
        ["<think>\nadd them\n</think>\n\nIt is four.<|im_end|>"],
        ["<think>\nadd again\n</think>\n\nIt is six.<|im_end|>"],
    ]
    for k, out in zip((2, 4), outs, strict=True):
        prompt = tok.apply_chat_template(msgs[:k], add_generation_prompt=True, tokenize=True)[
            "input_ids"
        ]
        assert out["input_ids"][: len(prompt)] == prompt
        assert not any(out["loss_mask"][: len(prompt)]) and out["drops"] == {}
    last = turn_examples(normalize({"messages": msgs}), "last")
    assert runs(tok, last[0], render_norm(tok, last[0])) == [runs(tok, exs[1], outs[1])[0]]


def test_expand_with_tool_calls_matches_the_generation_prompt(toks):
    tok = toks["qwen3_tools"]
    exs = turn_examples(normalize(TOOL_ROW), "expand")
    assert [e["supervise_from"] for e in exs] == [2, 4]
    first = render_norm(tok, exs[0])
    prompt = tok.apply_chat_template(
        TOOL_MESSAGES[:2], tools=TOOLS, add_generation_prompt=True, tokenize=True
    )["input_ids"]
    assert first["input_ids"][: len(prompt)] == prompt
    # the template-written empty think block of a turn without reasoning is not supervised
    assert runs(tok, exs[0], first) == TOOL_RUNS["qwen3_tools"][:1]


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
def test_message_and_example_weights_scale_the_mask(toks):
    tok = toks["qwen25"]
    msgs = [dict(m) for m in TOOL_MESSAGES]
    msgs[2]["weight"] = 0
    out = render(tok, {"tools": TOOLS, "messages": msgs})
    assert runs(tok, TOOL_ROW, out) == TOOL_RUNS["qwen25"][1:]
    msgs[2]["weight"], msgs[4]["loss_weight"] = 0.5, 1
    out = render(tok, {"tools": TOOLS, "messages": msgs, "weight": 2.0})
    full = render(tok, TOOL_ROW)
    assert runs(tok, TOOL_ROW, out) == TOOL_RUNS["qwen25"]
    mask, kinds = np.asarray(out["loss_mask"]), np.asarray(full["kinds"])
    first_turn = np.arange(len(mask)) < np.nonzero(kinds == KIND_TOOL)[0].max() + 2
    assert set(mask[first_turn & (mask > 0)]) == {1.0}  # 0.5 x 2
    assert set(mask[~first_turn & (mask > 0)]) == {2.0}  # 1 x 2


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda r: r["messages"][2].update(tool_calls={"name": "x"}), "expected a list of calls"),
        (
            lambda r: r["messages"][2].update(tool_calls=[{"function": {"arguments": {}}}]),
            "no function name",
        ),
        (lambda r: r.update(tools="[{not json"), "not valid JSON"),
        (lambda r: r.update(tools=[1, 2]), "not a list of objects"),
        (
            lambda r: r["messages"].insert(1, {"role": "tool", "content": "x"}),
            "no assistant turn before it",
        ),
        (lambda r: r["messages"][3].update(tool_call_id="zzz"), "no call of the assistant turn"),
        (
            lambda r: r["messages"][1].update(content=[{"type": "image_url", "image_url": "x"}]),
            "text only",
        ),
        (lambda r: r["messages"][1].update(content=[{"type": "video"}]), "type 'video'"),
        (lambda r: r["messages"][4].update(weight=-1), "expected a number"),
    ],
    ids=[
        "calls-not-list",
        "no-name",
        "tools-bad-json",
        "tools-not-objects",
        "orphan-tool",
        "bad-call-id",
        "image",
        "unknown-part",
        "bad-weight",
    ],
)
def test_bad_agentic_rows_say_what_is_wrong(change, reason):
    row = json.loads(json.dumps(TOOL_ROW))
    change(row)
    with pytest.raises(ValueError, match=reason):
        normalize(row)


def test_bad_rows_in_a_file_exit_2_with_file_and_line_or_are_skipped(toks, tmp_path):
    from test_data_pipeline import make_config, write_jsonl

    from jaxsft.data import pipeline

    bad = json.loads(json.dumps(TOOL_ROW))
    bad["messages"][2]["tool_calls"] = "get_weather(paris)"
    path = write_jsonl(tmp_path / "train.jsonl", [TOOL_ROW, bad, TOOL_ROW])
    cfg = make_config("unused", path, max_length=512)
    with pytest.raises(UserError) as e:
        pipeline.build_datasets(cfg, toks["qwen25"])
    assert e.value.where == f"{path}:2" and e.value.exit_code == 2
    assert "tool_calls is a str, expected a list of calls" in e.value.message
    cfg.data.on_invalid = "skip"
    data = pipeline.build_datasets(cfg, toks["qwen25"])
    assert len(data.train) == 2
    assert [d["where"] for d in data.report["train"]["dropped"]["rows"]] == [f"{path}:2"]


# --------------------------------------------------------------------------------------------
# The data check
# --------------------------------------------------------------------------------------------
def test_data_check_counts_tool_calls_reasoning_drops_and_expansion(toks, tmp_path):
    from test_data_pipeline import make_config, write_jsonl

    from jaxsft.data import pipeline
    from jaxsft.data.__main__ import marked, summary

    odd = json.loads(json.dumps(TOOL_ROW))
    odd["messages"][2]["tool_calls"] = [
        call("{city: paris"),
        call({}, function={"name": "nope", "arguments": {}}),
    ]
    rows = [TOOL_ROW, odd, {"messages": REASONING_MESSAGES}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = make_config("unused", path, max_length=1024)
    cfg.data.turns = "expand"
    data = pipeline.build_datasets(cfg, toks["qwen3_tools"], show=3)
    a = data.report["train"]["agentic"]
    assert a["tool_calls"]["examples"] == 2 and a["tool_calls"]["calls"] == 3
    assert a["tool_calls"]["bad_json_arguments"]["examples"] == [f"{path}:2: get_weather"]
    assert a["tool_calls"]["unknown_functions"]["examples"] == [f"{path}:2: nope"]
    assert a["template_drops"] == {}
    assert a["turns"]["conversations"] == 3 and a["turns"]["examples"] == 6
    assert a["turns"]["tokens"] > a["turns"]["tokens_one_example_per_conversation"]
    assert 0 < a["reasoning_tokens"]["share_of_supervised"] < 1
    warnings = data.report["warnings"]
    assert any("arguments are not a JSON object" in w and f"{path}:2" in w for w in warnings)
    assert any("missing from the example's tools" in w for w in warnings)
    assert "tool calls: 3 in 2 examples" in summary(data.report)
    shown = marked(
        toks["qwen3_tools"],
        data.train.input_ids[0].tolist(),
        data.train.loss_mask[0],
        False,
        data.train.kinds[0],
    )
    assert "[[tool:<tool_call>" in shown and "[[<|im_end|>]]" in shown
    cfg.data.turns = "all"
    data = pipeline.build_datasets(cfg, toks["qwen3_tools"])
    drops = data.report["train"]["agentic"]["template_drops"]
    assert drops == {"reasoning": {"count": 1, "examples": [f"{path}:3"], "policy": "warn"}}
    assert any("drops the reasoning" in w for w in data.report["warnings"])


def test_float_weights_reach_the_batches(toks, tmp_path):
    from test_data_pipeline import make_config, write_jsonl

    from jaxsft.data import pipeline

    path = write_jsonl(tmp_path / "train.jsonl", [{**TOOL_ROW, "weight": 0.5}, TOOL_ROW])
    cfg = make_config("unused", path, max_length=512, batch_size=2)
    data = pipeline.build_datasets(cfg, toks["qwen25"])
    batch = next(pipeline.train_iterator(data, cfg, process_index=0, process_count=1))
    assert batch["loss_mask"].dtype == np.float32
    assert sorted(set(batch["loss_mask"].ravel().tolist())) == [0.0, 0.5, 1.0]


def test_fractional_weights_change_the_data_fingerprint():
    """Resume compares data fingerprints: a changed per-message weight is a data change, and a
    0/1 mask hashes as it always did (runs started before weights existed still resume)."""
    from types import SimpleNamespace

    from jaxsft.run_dir import data_fingerprint

    def fp(mask):
        ids = [np.arange(4, dtype=np.int32)]
        return data_fingerprint(SimpleNamespace(input_ids=ids, loss_mask=[mask], weights=[1.0]))

    ones = fp(np.array([0, 1, 1, 0], np.int8))
    assert fp(np.array([0, 1, 1, 0], np.float32)) == ones
    assert fp(np.array([0, 1, 0.5, 0], np.float32)) not in (ones, fp(np.array([0, 1, 0.25, 0])))


# --------------------------------------------------------------------------------------------
# More template families: parallel calls over several turns, Hermes, SmolLM3, Llama 3.1
# built-in tools, and data.turns=expand against the generation prompt for each
# --------------------------------------------------------------------------------------------
ROME_ID = "def456uvw"


def city_call(city: str, call_id: str) -> dict:
    return {**call({"city": city}), "id": call_id}


MULTI_MESSAGES = [
    SYSTEM,
    {"role": "user", "content": "Weather in paris and rome?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [city_call("paris", CALL_ID), city_call("rome", ROME_ID)],
    },
    {"role": "tool", "tool_call_id": CALL_ID, "name": "get_weather", "content": '{"w": "sunny"}'},
    {"role": "tool", "tool_call_id": ROME_ID, "name": "get_weather", "content": '{"w": "rainy"}'},
    {"role": "assistant", "content": "Sunny in paris, rainy in rome."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]
MULTI_ROW = {"tools": TOOLS, "messages": MULTI_MESSAGES}
QWEN_TWO_CALLS = QWEN_CALL.replace(
    "<|im_end|>",
    '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "rome"}}\n</tool_call><|im_end|>',
)
MULTI_TAIL = ["Sunny in paris, rainy in rome.<|im_end|>", "You are welcome.<|im_end|>"]
MULTI_RUNS = {
    "hermes": [QWEN_TWO_CALLS, *MULTI_TAIL],
    "qwen25": [QWEN_TWO_CALLS, *MULTI_TAIL],
    "qwen3_tools": [QWEN_TWO_CALLS, *MULTI_TAIL],
    "qwen3_coder": [
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nparis\n</parameter>\n</function>\n"
        "</tool_call>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nrome\n</parameter>\n"
        "</function>\n</tool_call><|im_end|>",
        *MULTI_TAIL,
    ],
    # Mistral v0.3 writes the tools into the last user turn ("Thanks!"), not the calling
    # turn's: its calling turn is found through the cut conversation compared with itself
    "mistral": [
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "paris"}, '
        '"id": "abc123xyz"}, {"name": "get_weather", "arguments": {"city": "rome"}, '
        '"id": "def456uvw"}]</s>',
        "Sunny in paris, rainy in rome.</s>",
        "You are welcome.</s>",
    ],
}


@pytest.mark.parametrize("kind", sorted(MULTI_RUNS))
def test_parallel_calls_and_later_turns_are_each_supervised_whole(toks, kind):
    tok = toks[kind]
    out = render(tok, MULTI_ROW)
    assert runs(tok, MULTI_ROW, out) == MULTI_RUNS[kind]
    assert out["drops"] == {} and out["turns_without_eot"] == 0 and out["n_assistant_turns"] == 3


def test_hermes_tool_use_template_is_picked_by_tools_and_drops_what_it_does_not_write(toks):
    tok = toks["hermes"]
    text = tok.apply_chat_template(TOOL_MESSAGES, tools=TOOLS, tokenize=False)
    assert text.count("<|begin_of_text|>") == 1 and "You are a function calling AI model." in text
    assert "<|im_start|>tool\n<tool_response>\n" in text
    # without tools: the "default" template, plain ChatML; Hermes 3 renders no reasoning
    row = {"messages": REASONING_MESSAGES}
    out = render(tok, row)
    assert runs(tok, row, out) == ["It is four.<|im_end|>", "It is six.<|im_end|>"]
    assert out["drops"] == {"reasoning": 2}
    assert out["input_ids"].count(tok.bos_token_id) == 1
    # the tool_use template writes only the calls of a calling turn: the content is a drop
    msgs = [dict(m) for m in TOOL_MESSAGES]
    msgs[2]["content"] = "Let me check."
    out = render(tok, {"tools": TOOLS, "messages": msgs})
    assert out["drops"] == {"content": 1}
    assert runs(tok, {"tools": TOOLS, "messages": msgs}, out) == TOOL_RUNS["hermes"]


# SmolLM3 reads its tools from xml_tools= (never tools=) and no tool_calls: its own data has
# the calls in the content, in the syntax its tool prompt asks for.
SMOL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "paris"}}\n</tool_call>'
SMOL_TOOLS = {"xml_tools": TOOLS}
SMOL_ROW = {
    "messages": [
        SYSTEM,
        TOOL_MESSAGES[1],
        {"role": "assistant", "content": SMOL_CALL},
        {"role": "tool", "content": '{"w": "sunny"}'},
        {"role": "assistant", "content": "<think>\nit said sunny\n</think>\nIt is sunny in paris."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ]
}
SMOL_HEAD = "<|im_start|>assistant\n"  # inside SmolLM3's {% generation %} blocks


def test_smollm3_supervises_its_generation_blocks_calls_and_think_blocks_in_the_content(toks):
    tok = toks["smollm3"]
    out = render(tok, SMOL_ROW, template_kwargs=SMOL_TOOLS)
    assert runs(tok, SMOL_ROW, out, **SMOL_TOOLS) == [
        f"{SMOL_HEAD}{SMOL_CALL}<|im_end|>\n",
        f"{SMOL_HEAD}<think>\nit said sunny\n</think>\nIt is sunny in paris.<|im_end|>\n",
        f"{SMOL_HEAD}You are welcome.<|im_end|>\n",
    ]
    assert out["drops"] == {} and out["turns_without_eot"] == 0
    text = tok.apply_chat_template(SMOL_ROW["messages"], tokenize=False, **SMOL_TOOLS)
    assert "## Metadata\n\nKnowledge Cutoff Date: June 2025\nToday Date: " in text
    assert "Reasoning Mode: /think" in text and "### Tools" in text and "get_weather" in text
    think = tok.decode(
        [i for i, k in zip(out["input_ids"], out["kinds"], strict=True) if k == KIND_REASONING]
    )
    assert think == "<think>\nit said sunny\n</think>"


def test_smollm3_refuses_tools_and_calls_it_does_not_render(toks):
    """tools= and tool_calls are silently dropped by the SmolLM3 template: the calling turn
    would be trained as an empty reply."""
    tok = toks["smollm3"]
    with pytest.raises(UserError, match="does not render the example's tools"):
        render(tok, TOOL_ROW)
    with pytest.raises(UserError, match="does not render 1 tool call"):
        render(tok, {"messages": TOOL_MESSAGES})
    out = render(tok, TOOL_ROW, on_drop="allow")
    assert out["drops"] == {"tools": 1, "tool_call": 1}
    # reasoning_content is not read either (a think block in the content is)
    out = render(tok, {"messages": REASONING_MESSAGES})
    assert out["drops"] == {"reasoning": 2}


@pytest.mark.parametrize("mode", ["system-flag", "enable_thinking"])
def test_smollm3_no_think_mode_writes_an_empty_think_block_into_each_turn(toks, mode):
    tok = toks["smollm3"]
    msgs = [dict(m) for m in REASONING_MESSAGES]
    for m in msgs:
        m.pop("reasoning_content", None)
    kw = {}
    if mode == "system-flag":
        msgs[0]["content"] = "You are a helpful assistant. /no_think"
    else:
        kw = {"enable_thinking": False}
    row = {"messages": msgs}
    out = render(tok, row, template_kwargs=kw)
    empty = "<think>\n\n</think>\n"
    assert runs(tok, row, out, **kw) == [
        f"{SMOL_HEAD}{empty}It is four.<|im_end|>\n",
        f"{SMOL_HEAD}{empty}It is six.<|im_end|>\n",
    ]
    text = tok.apply_chat_template(msgs, tokenize=False, **kw)
    assert "Reasoning Mode: /no_think\n\n## Custom Instructions\n\nYou are a helpful" in text
    assert "/no_think\n\n<|im_start|>user" not in text  # the flag is not an instruction
    prompt = tok.apply_chat_template(msgs[:2], add_generation_prompt=True, tokenize=False, **kw)
    assert prompt.endswith(SMOL_HEAD + empty)


BUILTIN = {"builtin_tools": ["brave_search", "wolfram_alpha"]}
BUILTIN_ROW = {
    "messages": [
        {"role": "user", "content": "Weather in paris?"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "brave_search", "arguments": {"query": "paris weather"}},
                }
            ],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
}


def test_llama31_builtin_tool_calls_supervise_the_python_tag_and_eom(toks):
    tok = toks["llama31"]
    out = render(tok, BUILTIN_ROW, template_kwargs=BUILTIN)
    assert runs(tok, BUILTIN_ROW, out, **BUILTIN) == [
        '<|python_tag|>brave_search.call(query="paris weather")<|eom_id|>',
        "It is sunny.<|eot_id|>",
    ]
    assert out["drops"] == {} and out["turns_without_eot"] == 0
    tool_text = tok.decode(
        [i for i, k in zip(out["input_ids"], out["kinds"], strict=True) if k == KIND_TOOL]
    )
    assert tool_text.startswith('<|python_tag|>brave_search.call(query="paris weather")')
    text = tok.apply_chat_template(BUILTIN_ROW["messages"], tokenize=False, **BUILTIN)
    assert "Environment: ipython\nTools: brave_search, wolfram_alpha\n\n" in text
    # in ipython mode a custom (JSON) call ends with <|eom_id|> too
    out = render(tok, TOOL_ROW, template_kwargs=BUILTIN)
    assert runs(tok, TOOL_ROW, out, **BUILTIN)[0] == (
        '{"name": "get_weather", "parameters": {"city": "paris"}}<|eom_id|>'
    )


def test_template_kwargs_cannot_override_what_render_sets(toks):
    with pytest.raises(UserError, match="tools are set by the renderer"):
        render(toks["qwen25"], TOOL_ROW, template_kwargs={"tools": TOOLS})


PLAIN_ROW = {"messages": [dict(m) for m in REASONING_MESSAGES]}
for _m in PLAIN_ROW["messages"]:
    _m.pop("reasoning_content", None)
# kind -> (row, template keywords) of the expansion test
EXPAND_CASES = {
    "hermes": (MULTI_ROW, {}),
    "qwen25": (MULTI_ROW, {}),
    "qwen3_tools": (MULTI_ROW, {}),
    "qwen3_coder": (MULTI_ROW, {}),
    "mistral": (MULTI_ROW, {}),
    "llama31": (BUILTIN_ROW, BUILTIN),
    "smollm3": (SMOL_ROW, SMOL_TOOLS),
    "phi4mini": (PLAIN_ROW, {}),
}


@pytest.mark.parametrize("kind", sorted(EXPAND_CASES))
def test_expand_examples_are_the_generation_prompt_then_the_turn(toks, kind):
    """Each data.turns=expand example starts with the template's own generation prompt for the
    turns before it, token for token, and supervises what the full rendering supervises for
    that turn. Hermes needs the renderer's splice: its last tool result renders differently
    when it is the last message (no newline before <|im_end|>)."""
    tok, (row, kw) = toks[kind], EXPAND_CASES[kind]
    whole = runs(tok, row, render(tok, row, template_kwargs=kw), **kw)
    exs = turn_examples(normalize(row), "expand")
    assert len(exs) == len(whole)
    for ex, expected in zip(exs, whole, strict=True):
        (out,), _ = render_many(tok, [ex], normalized=True, template_kwargs=kw)
        ids, mask = out["input_ids"].tolist(), out["loss_mask"]
        prompt = tok.apply_chat_template(
            ex["messages"][:-1],
            tools=row.get("tools"),
            add_generation_prompt=True,
            tokenize=True,
            **kw,
        )["input_ids"]
        assert ids[: len(prompt)] == prompt
        supervised = [i for i, m in zip(ids, mask, strict=True) if m]
        assert tok.decode(supervised) == expected
        if kind == "smollm3":  # its generation blocks hold the role line the prompt ends with
            assert (
                tok.decode([i for i, m in zip(ids[: len(prompt)], mask, strict=False) if m])
                == SMOL_HEAD
            )
        else:
            assert not any(mask[: len(prompt)])
