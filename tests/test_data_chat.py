"""Loss masks from chat templates: supervised text == assistant contents + end-of-turn tokens."""

from __future__ import annotations

import pytest
from tokenizers_fixture import EOT, KINDS, make_tokenizer

from jaxsft.data import render
from jaxsft.data.formats import normalize
from jaxsft.errors import UserError

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CONVERSATIONS = {
    "single": [
        {"role": "user", "content": "Hello world?"},
        {"role": "assistant", "content": "Hi."},
    ],
    "multi_tool": [
        SYSTEM,
        {"role": "user", "content": "What is the weather in paris?"},
        {"role": "assistant", "content": "I will call the weather tool."},
        {"role": "tool", "content": '{"result": "sunny"}'},
        {"role": "assistant", "content": "  It is sunny in paris.  "},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You are welcome."},
    ],
    # the same text as user and assistant content, and twice as assistant content
    "repeats": [
        {"role": "user", "content": "Yes"},
        {"role": "assistant", "content": "Yes"},
        {"role": "user", "content": "Yes"},
        {"role": "assistant", "content": "Yes"},
        {"role": "user", "content": "Say it again: Yes"},
        {"role": "assistant", "content": "Yes"},
    ],
    "think": [
        SYSTEM,
        {"role": "user", "content": "What is two and two?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\nIt is four."},
        {"role": "user", "content": "And three and three?"},
        {"role": "assistant", "content": "<think>add again</think>It is six."},
    ],
}


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "data_tokenizers"
    return {k: make_tokenizer(k, root) for k in KINDS}


def supervised_runs(tok, example, out) -> list[str]:
    """Text of each contiguous run of supervised tokens, through the tokenizer's offsets."""
    text = tok.apply_chat_template(example["messages"], tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == out["input_ids"]
    runs, cur = [], None
    for m, (s, e) in zip(out["loss_mask"], enc["offset_mapping"], strict=True):
        if m:
            cur = [s, e] if cur is None else [cur[0], e]
        elif cur is not None:
            runs.append(text[cur[0] : cur[1]])
            cur = None
    if cur is not None:
        runs.append(text[cur[0] : cur[1]])
    return runs


def _think(content: str) -> tuple[str | None, str]:
    if "</think>" not in content:
        return None, content
    head, _, answer = content.rpartition("</think>")
    return head.split("<think>")[-1].strip("\n"), answer.lstrip("\n")


def expected_runs(kind: str, messages: list[dict]) -> list[str]:
    """What each template family should supervise, written from the templates' semantics."""
    eot = EOT[kind]
    if kind == "llama3":  # content | trim
        return [m["content"].strip() + eot for m in messages if m["role"] == "assistant"]
    if kind != "qwen3":
        return [m["content"] + eot for m in messages if m["role"] == "assistant"]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    out = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        reasoning, answer = _think(m["content"])
        if i > last_user and reasoning is not None:  # re-rendered think block is supervised
            out.append(f"<think>\n{reasoning}\n</think>\n\n{answer}{eot}")
        else:  # history: think block dropped; a template-added empty block is not supervised
            out.append((answer if reasoning is not None else m["content"]) + eot)
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_supervised_text_is_assistant_content_and_eot(toks, kind, name):
    tok, example = toks[kind], {"messages": CONVERSATIONS[name]}
    out = render(tok, example)
    assert supervised_runs(tok, example, out) == expected_runs(kind, example["messages"])
    assert out["loss_mask"][0] == 0
    assert out["n_assistant_turns"] == sum(m["role"] == "assistant" for m in example["messages"])
    assert out["turns_without_eot"] == 0 and not out["truncated"]


@pytest.mark.parametrize("kind", KINDS)
def test_ids_equal_apply_chat_template_and_single_bos(toks, kind):
    tok = toks[kind]
    for messages in CONVERSATIONS.values():
        out = render(tok, {"messages": messages})
        ref = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
        assert out["input_ids"] == ref
        assert len(out["input_ids"]) == len(out["loss_mask"])
        if tok.bos_token_id is not None:
            assert out["input_ids"].count(tok.bos_token_id) == 1
            assert out["input_ids"][0] == tok.bos_token_id


@pytest.mark.parametrize("kind", ["llama3", "chatml"])
def test_repeated_contents_map_to_their_own_turn(toks, kind):
    tok, messages = toks[kind], CONVERSATIONS["repeats"]
    out = render(tok, {"messages": messages})
    text = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    header = "assistant<|end_header_id|>\n\n" if kind == "llama3" else "<|im_start|>assistant\n"
    starts, pos = [], text.find(header)
    while pos >= 0:
        starts.append(pos + len(header))
        pos = text.find(header, pos + 1)
    run_starts = [
        enc["offset_mapping"][t][0]
        for t, m in enumerate(out["loss_mask"])
        if m and not out["loss_mask"][t - 1]
    ]
    assert run_starts == starts


@pytest.mark.parametrize("kind", KINDS)
def test_sharegpt_reads_as_messages(toks, kind):
    messages = CONVERSATIONS["multi_tool"]
    names = {"system": "system", "user": "human", "assistant": "gpt", "tool": "tool"}
    sharegpt = {
        "conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]
    }
    assert render(toks[kind], sharegpt) == render(toks[kind], {"messages": messages})


@pytest.mark.parametrize("kind", ["llama3", "chatml"])
def test_prompt_completion_strings(toks, kind):
    tok = toks[kind]
    out = render(tok, {"prompt": "Question: two and two?", "completion": " It is four."})
    ids = tok("Question: two and two? It is four.", add_special_tokens=False)["input_ids"]
    bos = [tok.bos_token_id] if kind == "llama3" else []
    assert out["input_ids"] == bos + ids + [tok.eos_token_id]
    sup = [i for i, m in zip(out["input_ids"], out["loss_mask"], strict=True) if m]
    assert tok.decode(sup) == " It is four." + tok.eos_token


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_completion_messages_supervise_only_completion(toks, kind):
    tok = toks[kind]
    prompt = CONVERSATIONS["multi_tool"][:-1]  # holds two assistant turns: not supervised
    completion = [CONVERSATIONS["multi_tool"][-1]]
    out = render(tok, {"prompt": prompt, "completion": completion})
    runs = supervised_runs(tok, {"messages": prompt + completion}, out)
    assert runs == [expected_runs(kind, prompt + completion)[-1]]
    assert out == render(tok, {"prompt": prompt, "completion": completion[0]["content"]})


def test_text_supervises_every_token(toks):
    for kind in ("llama3", "chatml"):
        tok = toks[kind]
        out = render(tok, {"text": "Hello world, this is some text."})
        assert out["input_ids"][-1] == tok.eos_token_id
        assert out["loss_mask"] == [0] + [1] * (len(out["input_ids"]) - 1)
        assert out["input_ids"].count(tok.bos_token_id) == (1 if kind == "llama3" else 0)


def test_truncation_keeps_start_and_counts_cut_turns(toks):
    tok = toks["chatml"]
    messages = CONVERSATIONS["multi_tool"]
    full = render(tok, {"messages": messages})
    n = len(full["input_ids"])
    out = render(tok, {"messages": messages}, max_length=n - 3)
    assert out["input_ids"] == full["input_ids"][: n - 3]
    assert out["loss_mask"] == full["loss_mask"][: n - 3]
    assert out["truncated"] and out["assistant_turns_cut"] == 1 and out["turns_without_eot"] == 0
    # so short that no assistant token is left: nothing supervised (the pipeline drops it)
    out = render(tok, {"messages": messages}, max_length=10)
    assert len(out["input_ids"]) == 10 and sum(out["loss_mask"]) == 0
    assert out["assistant_turns_lost"] == 3


def test_unlocatable_assistant_content_is_an_error(toks, tmp_path):
    from tokenizers_fixture import build_tokenizer

    tok = build_tokenizer("chatml")
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | upper }}<|im_end|>\n"
        "{% endfor %}"
    )
    with pytest.raises(UserError, match="assistant message 1") as e:
        render(tok, {"messages": CONVERSATIONS["single"]})
    assert "example 0" in str(e.value)


def test_template_without_end_of_turn_is_reported(toks):
    from tokenizers_fixture import build_tokenizer

    tok = build_tokenizer("chatml")
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}\n{% endfor %}"
    )
    out = render(tok, {"messages": CONVERSATIONS["multi_tool"]})
    assert out["turns_without_eot"] == 3
    assert sum(out["loss_mask"]) > 0


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role"),
        ({"messages": [{"role": "assistant", "content": ["x"]}]}, "expected a string"),
        ({"messages": [{"role": "assistant"}]}, "has no 'content'"),
        ({"messages": [{"content": "x"}]}, "has no 'role'"),
        ({"messages": "hello"}, "expected a list"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "unknown from"),
        ({"prompt": "p"}, "without 'completion'"),
        ({"prompt": "p", "completion": ["x"]}, "must both be"),
        ({"text": ""}, "empty"),
        ({"input": "x"}, "none of"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_invalid_rows_say_why(row, reason):
    with pytest.raises(ValueError, match=reason):
        normalize(row)
