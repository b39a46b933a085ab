"""Loss masks from chat templates: supervised text == assistant contents + end-of-turn tokens."""

from __future__ import annotations

import pytest
from tokenizers_fixture import EOT, KINDS, MORE_KINDS, make_tokenizer

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


# --------------------------------------------------------------------------------------------
# Gemma 2 / Gemma 3 / Phi-3.5 / Phi-4 / Phi-4-mini templates
# --------------------------------------------------------------------------------------------
def alternating(*contents: str) -> list[dict]:
    """user, assistant, user, ... messages with these contents."""
    return [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(contents)]


MORE_CONVERSATIONS = {
    "single": CONVERSATIONS["single"],
    # edge whitespace: Gemma trims it, Phi-3.5's rstrip role tags absorb the leading part
    "multi": [SYSTEM]
    + alternating(
        "What is the weather in paris?",
        "  It is sunny in paris.  ",
        "Thanks",
        "\nTwo lines\nof text.\n",
        "Yes",
        "Yes",
    ),
    "repeats": CONVERSATIONS["repeats"],
}
SYSTEM_FIRST = [SYSTEM, *CONVERSATIONS["single"]]
# What follows the last assistant turn's end-of-turn token (never supervised); Phi-4: nothing.
TRAILER = {"gemma2": "\n", "gemma3": "\n", "phi35": "<|endoftext|>", "phi4mini": "<|endoftext|>"}


@pytest.fixture(scope="module")
def more_toks(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "data_tokenizers"
    return {k: make_tokenizer(k, root) for k in MORE_KINDS}


def accepted(kind: str, messages: list[dict]) -> list[dict]:
    """The conversation as a user would write it for this template (Gemma 2: no system turn)."""
    return messages[1:] if kind == "gemma2" and messages[0]["role"] == "system" else messages


def more_expected(kind: str, messages: list[dict]) -> list[str]:
    """Decoded supervised text per assistant turn: its content as tokenized + end-of-turn."""
    fix = {"gemma2": str.strip, "gemma3": str.strip, "phi35": str.lstrip}.get(kind, str)
    return [fix(m["content"]) + EOT[kind] for m in messages if m["role"] == "assistant"]


def decoded_runs(tok, out) -> list[str]:
    """Each contiguous run of supervised tokens, decoded."""
    runs, cur = [], []
    for i, m in zip(out["input_ids"], out["loss_mask"], strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs, cur = [*runs, tok.decode(cur)], []
    return runs + ([tok.decode(cur)] if cur else [])


def mask_runs(mask: list[int]) -> list[tuple[int, int]]:
    """(first, last inclusive) token of each contiguous run of 1s."""
    runs = []
    for t, m in enumerate(mask):
        if m and (t == 0 or not mask[t - 1]):
            runs.append([t, t])
        elif m:
            runs[-1][1] = t
    return [tuple(r) for r in runs]


@pytest.mark.parametrize("kind", MORE_KINDS)
@pytest.mark.parametrize("name", sorted(MORE_CONVERSATIONS))
def test_more_templates_supervise_content_and_end_of_turn(more_toks, kind, name):
    tok, messages = more_toks[kind], accepted(kind, MORE_CONVERSATIONS[name])
    out = render(tok, {"messages": messages})
    assert decoded_runs(tok, out) == more_expected(kind, messages)
    ids = out["input_ids"]
    assert ids == tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert (ids[0] == tok.bos_token_id) == kind.startswith("gemma")  # the template's own BOS
    assert tok.bos_token_id not in ids[1:-1]
    assert out["n_assistant_turns"] == sum(m["role"] == "assistant" for m in messages)
    assert out["turns_without_eot"] == out["turns_empty"] == 0 and not out["truncated"]


@pytest.mark.parametrize("kind", MORE_KINDS)
def test_more_templates_leave_what_follows_the_last_turn_unsupervised(more_toks, kind):
    tok, messages = more_toks[kind], accepted(kind, MORE_CONVERSATIONS["multi"])
    out = render(tok, {"messages": messages})
    last = tok.decode(out["input_ids"][-1:])
    if kind in TRAILER:
        assert last == TRAILER[kind] and out["loss_mask"][-1] == 0
        assert out["loss_mask"][-2] == 1 and tok.decode(out["input_ids"][-2:-1]) == EOT[kind]
    else:
        assert last == EOT[kind] and out["loss_mask"][-1] == 1


@pytest.mark.parametrize("kind", MORE_KINDS)
def test_more_templates_truncation_keeps_masks_consistent(more_toks, kind):
    tok, example = more_toks[kind], {"messages": accepted(kind, MORE_CONVERSATIONS["multi"])}
    full = render(tok, example)
    n, turns = len(full["input_ids"]), mask_runs(full["loss_mask"])
    assert len(turns) == 3
    for k in range(2, n + 1):
        out = render(tok, example, max_length=k)
        assert out["input_ids"] == full["input_ids"][:k]
        assert out["loss_mask"] == full["loss_mask"][:k]
        assert out["truncated"] == (k < n) and out["length"] == n
        assert out["assistant_turns_cut"] == sum(last >= k for _, last in turns)
        assert out["assistant_turns_lost"] == sum(first >= k for first, _ in turns)
        assert out["turns_without_eot"] == 0


def test_gemma3_folds_the_system_prompt_into_the_first_user_turn(more_toks):
    tok, messages = more_toks["gemma3"], MORE_CONVERSATIONS["multi"]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text.startswith(
        f"<bos><start_of_turn>user\n{SYSTEM['content']}\n\n{messages[1]['content']}<end_of_turn>"
    )
    with_system = render(tok, {"messages": messages})
    assert decoded_runs(tok, with_system) == decoded_runs(
        tok, render(tok, {"messages": messages[1:]})
    )


ALTERNATE = "Conversation roles must alternate user/assistant/user/assistant/..."


@pytest.mark.parametrize(
    "kind, template, messages, said, hint",
    [
        ("gemma2", None, SYSTEM_FIRST, "System role not supported", "merge the system prompt"),
        ("gemma3", None, CONVERSATIONS["multi_tool"][1:], ALTERNATE, "fold tool turns"),
        # any raise_exception message comes through, with a generic hint
        (
            "phi4",
            "{{ raise_exception('Tools are not supported') }}",
            SYSTEM_FIRST,
            "Tools are not supported",
            "rewrite the row",
        ),
    ],
    ids=["gemma2-system", "gemma3-alternation", "any-message"],
)
def test_template_refusals_quote_the_template_and_say_what_to_do(
    more_toks, kind, template, messages, said, hint
):
    tok = more_toks[kind]
    if template:
        from tokenizers_fixture import build_tokenizer

        tok = build_tokenizer(kind)
        tok.chat_template = template
    with pytest.raises(UserError) as e:
        render(tok, {"messages": messages})
    assert e.value.where == "example 0" and e.value.exit_code == 2
    assert e.value.message == f"the chat template refuses this conversation: {said}"
    assert hint in e.value.hint and "data.on_invalid=skip" in e.value.hint


def test_gemma2_system_role_in_a_data_file_is_an_error_naming_file_and_line(more_toks, tmp_path):
    from test_data_pipeline import make_config, write_jsonl

    from jaxsft.data import pipeline

    good = {"messages": MORE_CONVERSATIONS["multi"][1:]}
    path = write_jsonl(tmp_path / "train.jsonl", [good, {"messages": SYSTEM_FIRST}, good])
    cfg = make_config("unused", path)
    with pytest.raises(UserError) as e:
        pipeline.build_datasets(cfg, more_toks["gemma2"])
    assert e.value.where == f"{path}:2" and e.value.exit_code == 2
    assert str(e.value).startswith(
        f"{path}:2: the chat template refuses this conversation: System role not supported\n"
        "  -> this chat template has no system role: merge the system prompt into the first "
        "user turn, or drop the system message"
    )
    cfg.data.on_invalid = "skip"
    data = pipeline.build_datasets(cfg, more_toks["gemma2"])
    assert len(data.train) == 2
    dropped = data.report["train"]["dropped"]["rows"]
    assert [d["where"] for d in dropped] == [f"{path}:2"]
    assert "System role not supported" in dropped[0]["reason"]


def test_template_that_does_not_compile_names_the_tokenizer_not_the_row():
    from tokenizers_fixture import build_tokenizer

    from jaxsft.data.chat import render_many

    tok = build_tokenizer("gemma2")
    tok.chat_template = "{% for m in messages %}{{ m.content }"
    with pytest.raises(UserError, match="not valid Jinja") as e:  # even under skip
        render_many(tok, [{"messages": SYSTEM_FIRST}], on_error="skip")
    assert "first such row: example 0" in e.value.message
