"""Row formats -> one canonical form, with validation (the reason names what is wrong).

Formats (INTERFACE.md): conversational `messages` (system/user/assistant/tool), ShareGPT
`conversations` (from: human/gpt/system/tool/function_call/observation, value), `prompt`/
`completion` (strings or message lists) and plain `text`.

Agentic and reasoning rows are read into the form the chat templates of Qwen, Llama, Mistral
and friends take (the OpenAI / TRL layout):
- an assistant message may carry `tool_calls` ([{"type": "function", "function": {"name",
  "arguments"}}], arguments an object or a JSON string of one; content ""/null/absent), and a
  `tool` (or Llama's `ipython`) message answers it (`tool_call_id`/`name` are passed through);
- the example's `tools` (a list of JSON schemas, or a JSON string of one) go to
  `apply_chat_template(..., tools=...)`; a bare {"name", "parameters"} schema is wrapped as
  {"type": "function", "function": ...};
- reasoning in `reasoning_content` (also `reasoning`, `thinking`) becomes `reasoning_content`;
  `<think>...</think>` inside content is left to the template;
- content may be a list of parts: {"type": "text", "text" | "value"}, {"type": "reasoning" |
  "thinking"}, {"type": "tool_call"}; images, audio and other modalities are refused;
- per-message `weight` / `loss_weight` and an example-level `weight` scale the loss of the
  supervised tokens (0 leaves a turn unsupervised).
"""

from __future__ import annotations

import json
import math
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"ipython": "tool"}  # Llama 3.1's role for tool results
# ShareGPT speaker names -> roles ("function_call" turns are assistant tool calls).
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
    "function_response": "tool",
    "observation": "tool",
    "function_call": "assistant",
}
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
WEIGHT_KEYS = ("weight", "loss_weight")
TEXT_PARTS = ("text", "input_text", "output_text")
REASONING_PARTS = ("reasoning", "thinking")
TOOL_CALL_PARTS = ("tool_call", "function_call")
TURN_MODES = ("all", "expand", "last")
# What a chat template can silently leave out of the rendering, and what data.on_drop="auto"
# does about each: tools and tool calls the model would never see teach the wrong thing.
DROP_DEFAULTS = {"tools": "error", "tool_call": "error", "content": "warn", "reasoning": "warn"}
DROP_POLICIES = ("auto", "error", "warn", "allow")


class InvalidExample(ValueError):
    """A row that cannot be trained on; the message says why (the caller adds file:line) and
    `hint`, when set, what to do about it."""

    def __init__(self, reason: str, hint: str = ""):
        super().__init__(reason)
        self.hint = hint


def drop_policy(on_drop: str, reason: str) -> str:
    """ "error", "warn" or "allow" for a dropped `reason` (a DROP_DEFAULTS key) under on_drop."""
    return DROP_DEFAULTS[reason] if on_drop == "auto" else on_drop


# --------------------------------------------------------------------------------------------
# Normalisation: every format -> {"format": ..., ...}
# --------------------------------------------------------------------------------------------
def normalize(example: Any) -> dict:
    """Validate one row and return its canonical form.

    `{"format": "chat", "messages": [...], "supervise_from": k, "tools": [...] | None,
    "weights": [w per message], "weight": w}` (assistant turns with message index >= k and
    weight > 0 are supervised), `{"format": "prompt_completion", "prompt": s, "completion": s,
    "weight": w}` or `{"format": "text", "text": s, "weight": w}`. Raises `InvalidExample`.
    """
    if not isinstance(example, dict):
        raise InvalidExample(f"row is a {type(example).__name__}, expected a JSON object")
    weight = _weight(example, "the row")
    if "messages" in example or "conversations" in example:
        sharegpt = "messages" not in example
        key = "conversations" if sharegpt else "messages"
        msgs, weights = _messages(example[key], key, sharegpt=sharegpt)
        return _chat(msgs, weights, 0, parse_tools(example.get("tools")), weight)
    if "prompt" in example or "completion" in example:
        return _prompt_completion(example, weight)
    if "text" in example:
        text = example["text"]
        if not isinstance(text, str):
            raise InvalidExample(f"'text' is a {type(text).__name__}, expected a string")
        if not text.strip():
            raise InvalidExample("'text' is empty")
        return {"format": "text", "text": text, "weight": weight}
    keys = ", ".join(sorted(map(str, example))) or "none"
    raise InvalidExample(
        f"row has none of 'messages', 'conversations', 'prompt'/'completion', 'text' (keys: {keys})"
    )


def _chat(msgs: list, weights: list, supervise_from: int, tools, weight: float) -> dict:
    norm = {
        "format": "chat",
        "messages": msgs,
        "supervise_from": supervise_from,
        "tools": tools,
        "weights": weights,
        "weight": weight,
    }
    if not any(m["role"] == "assistant" for m in msgs[supervise_from:]):
        raise InvalidExample("conversation has no assistant turn (nothing to train on)")
    if weight == 0:
        raise InvalidExample("the row has weight 0 (nothing to train on)")
    if not supervised_turns(norm):
        raise InvalidExample("every assistant turn has weight 0 (nothing to train on)")
    _check_tool_turns(msgs)
    return norm


def supervised_turns(norm: dict) -> list[int]:
    """Message indices of the assistant turns that are trained on (from supervise_from on,
    weight > 0), in order."""
    weights = norm.get("weights") or [1.0] * len(norm["messages"])
    return [
        i
        for i, m in enumerate(norm["messages"])
        if m["role"] == "assistant" and i >= norm["supervise_from"] and weights[i] > 0
    ]


def turn_examples(norm: dict, mode: str) -> list[dict]:
    """The examples one row is trained as under data.turns = mode.

    "all": the row itself; "last": only its final supervised assistant turn is supervised;
    "expand": one example per supervised assistant turn k, the conversation up to and including
    turn k with only turn k supervised (the template renders k as the last turn, as the model
    sees it when it generates k); `generation_prompt` marks it for the renderer, which puts the
    turns before k as the generation prompt renders them where a template writes them
    differently when a turn follows (chat._as_generated).
    """
    if norm["format"] != "chat" or mode == "all":
        return [norm]
    turns = supervised_turns(norm)
    if mode == "last":
        return [{**norm, "supervise_from": turns[-1]}]
    return [
        {
            **norm,
            "messages": norm["messages"][: k + 1],
            "weights": norm["weights"][: k + 1],
            "supervise_from": k,
            "generation_prompt": True,
        }
        for k in turns
    ]


def _prompt_completion(example: dict, weight: float) -> dict:
    if "prompt" not in example or "completion" not in example:
        missing = "prompt" if "prompt" not in example else "completion"
        raise InvalidExample(f"prompt/completion row without '{missing}'")
    prompt, completion = example["prompt"], example["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise InvalidExample("'completion' is empty")
        return {
            "format": "prompt_completion",
            "prompt": prompt,
            "completion": completion,
            "weight": weight,
        }
    if isinstance(prompt, list) and isinstance(completion, (list, str)):
        p, wp = _messages(prompt, "prompt", allow_empty=True)
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        c, wc = _messages(completion, "completion")
        if not any(m["role"] == "assistant" for m in c):
            raise InvalidExample("'completion' has no assistant message")
        return _chat(p + c, wp + wc, len(p), parse_tools(example.get("tools")), weight)
    raise InvalidExample(
        f"'prompt' ({type(prompt).__name__}) and 'completion' ({type(completion).__name__}) "
        "must both be strings or both be message lists"
    )


def _messages(
    raw: Any, key: str, sharegpt: bool = False, allow_empty: bool = False
) -> tuple[list, list]:
    """(canonical messages, loss weight of each)."""
    if not isinstance(raw, list):
        raise InvalidExample(f"'{key}' is a {type(raw).__name__}, expected a list of messages")
    if not raw and not allow_empty:
        raise InvalidExample(f"'{key}' is empty")
    pairs = [_message(m, f"{key}[{i}]", sharegpt) for i, m in enumerate(raw)]
    return [m for m, _ in pairs], [w for _, w in pairs]


def _message(m: Any, where: str, sharegpt: bool) -> tuple[dict, float]:
    if not isinstance(m, dict):
        raise InvalidExample(f"{where} is a {type(m).__name__}, expected an object")
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    if role_key not in m:
        raise InvalidExample(f"{where} has no '{role_key}'")
    if sharegpt and m[role_key] == "function_call":
        return _sharegpt_call(m, where), _weight(m, where)
    role = (
        SHAREGPT_ROLES.get(m[role_key]) if sharegpt else ROLE_ALIASES.get(m[role_key], m[role_key])
    )
    if role not in ROLES:
        allowed = sorted(SHAREGPT_ROLES) if sharegpt else ROLES
        raise InvalidExample(
            f"{where} has unknown {role_key} {m[role_key]!r} (allowed: {', '.join(allowed)})"
        )
    calls_given = m.get("tool_calls") is not None
    if content_key not in m and not (role == "assistant" and calls_given):
        raise InvalidExample(f"{where} has no '{content_key}'")
    content, reasoning, calls = _content(m.get(content_key), f"{where} {content_key}", role)
    reasoning = next((m[k] for k in REASONING_KEYS if isinstance(m.get(k), str)), reasoning)
    if calls_given:
        calls = parse_tool_calls(m["tool_calls"], f"{where} tool_calls") + calls
    if role != "assistant" and (calls or reasoning is not None):
        what = "tool_calls" if calls else "reasoning"
        raise InvalidExample(f"{where} is a {role} message with {what} (only assistants have them)")
    if role == "assistant" and not content.strip() and not calls:
        raise InvalidExample(f"{where} is an assistant message with empty content")
    skip = {role_key, content_key, "tool_calls", *REASONING_KEYS, *WEIGHT_KEYS}
    out = {"role": role, "content": content}
    out.update((k, v) for k, v in m.items() if k not in skip and v is not None)
    if reasoning is not None:
        out["reasoning_content"] = reasoning
    if calls:
        out["tool_calls"] = calls
    return out, _weight(m, where)


def parse_messages(raw: Any, key: str = "messages") -> list[dict]:
    """Canonical messages of a message list, validated as a training row's are (tool calls,
    content parts, reasoning, tool results after their call); loss weights are dropped."""
    msgs, _ = _messages(raw, key)
    _check_tool_turns(msgs)
    return msgs


def _weight(m: dict, where: str) -> float:
    """The loss weight of a message or row (`weight` or `loss_weight`, default 1)."""
    key = next((k for k in WEIGHT_KEYS if m.get(k) is not None), None)
    if key is None:
        return 1.0
    w = m[key]
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise InvalidExample(f"{where} has {key}={w!r}, expected a number >= 0")
    return float(w)


def _content(value: Any, where: str, role: str) -> tuple[str, str | None, list]:
    """(text, reasoning or None, tool calls) of a message's content: a string, null, a list
    of content parts, or (tool results) a JSON object."""
    if value is None:
        return "", None, []
    if isinstance(value, str):
        return value, None, []
    if isinstance(value, dict) and role == "tool":
        return json.dumps(value, ensure_ascii=False), None, []
    if not isinstance(value, list):
        raise InvalidExample(f"{where} is a {type(value).__name__}, expected a string")
    texts, reasoning, calls = [], [], []
    for j, part in enumerate(value):
        kind, text = _part(part, f"{where}[{j}]")
        if kind == "tool_call":
            calls += parse_tool_calls([part], f"{where}[{j}]")
        else:
            (reasoning if kind == "reasoning" else texts).append(text)
    return "".join(texts), ("\n".join(reasoning) if reasoning else None), calls


def _part(part: Any, where: str) -> tuple[str, str]:
    """("text" | "reasoning" | "tool_call", text) of one content part."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        got = type(part).__name__ if not isinstance(part, dict) else "an object without 'type'"
        raise InvalidExample(
            f"{where} is {got}, expected a string or a list of content parts "
            '({"type": "text", "text": ...})'
        )
    kind = part["type"]
    if kind in TOOL_CALL_PARTS:
        return "tool_call", ""
    if kind not in TEXT_PARTS + REASONING_PARTS:
        raise InvalidExample(
            f"{where} is a content part of type {kind!r}: jaxsft trains on text only "
            f"(known part types: text, reasoning, thinking, tool_call)",
            hint="remove the non-text parts (images, audio, files) or the row",
        )
    keys = ("text", "value", "reasoning", "thinking", "content")
    text = next((part[k] for k in keys if isinstance(part.get(k), str)), None)
    if text is None:
        raise InvalidExample(f"{where} is a {kind!r} part without a 'text' string")
    return ("reasoning" if kind in REASONING_PARTS else "text"), text


def parse_tool_calls(raw: Any, where: str) -> list[dict]:
    """Canonical calls [{"type": "function", "function": {"name", "arguments"}, "id"?}];
    arguments given as a JSON string of an object become the object (a string that is not
    one stays a string: the data check reports it)."""
    if not isinstance(raw, list):
        raise InvalidExample(f"{where} is a {type(raw).__name__}, expected a list of calls")
    out = []
    for j, call in enumerate(raw):
        w = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise InvalidExample(f"{w} is a {type(call).__name__}, expected an object")
        fn = call["function"] if isinstance(call.get("function"), dict) else call
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidExample(f"{w} has no function name", hint='write {"function": {"name"}}')
        args = fn.get("arguments", fn.get("parameters", {}))
        if isinstance(args, str) and _json_object(args) is not None:
            args = _json_object(args)
        if not isinstance(args, (dict, str)):
            raise InvalidExample(f"{w} arguments are a {type(args).__name__}, expected an object")
        canon = {"type": "function", "function": {"name": name, "arguments": args}}
        if call.get("id") is not None:
            canon["id"] = call["id"]
        out.append(canon)
    return out


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _sharegpt_call(m: dict, where: str) -> dict:
    """A ShareGPT function_call turn (value: a JSON call or list of calls) -> assistant."""
    value = m.get("value")
    try:
        calls = json.loads(value) if isinstance(value, str) else value
    except ValueError as e:
        raise InvalidExample(f"{where} function_call value is not JSON ({e})") from None
    calls = calls if isinstance(calls, list) else [calls]
    return {"role": "assistant", "content": "", "tool_calls": parse_tool_calls(calls, where)}


def parse_tools(raw: Any) -> list[dict] | None:
    """The example's tool definitions, each {"type": "function", "function": {...}}."""
    if raw is None:
        return None
    if isinstance(raw, str):
        if not raw.strip():
            return None
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise InvalidExample(f"'tools' is a string that is not valid JSON ({e})") from None
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise InvalidExample(
            "'tools' is not a list of objects (JSON schemas of functions)",
            hint='write [{"type": "function", "function": {"name", "description", "parameters"}}]',
        )
    tools = [
        t if isinstance(t.get("function"), dict) else {"type": "function", "function": t}
        for t in raw
    ]
    for i, t in enumerate(tools):
        if not isinstance(t["function"].get("name"), str) or not t["function"]["name"]:
            raise InvalidExample(f"tools[{i}] has no function name")
    return tools or None


def tool_name(tool: dict) -> str:
    """The function name of a canonical tool definition or tool call."""
    return tool["function"]["name"]


def _check_tool_turns(msgs: list) -> None:
    """A tool message answers the assistant turn just before it (directly or after other tool
    messages), and names one of its calls when both carry ids."""
    ids: list = []
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            ids = [c["id"] for c in m.get("tool_calls", []) if "id" in c]
        elif m["role"] != "tool":
            ids = []
        elif i == 0 or msgs[i - 1]["role"] not in ("assistant", "tool"):
            raise InvalidExample(
                f"message {i} is a tool result with no assistant turn before it that called "
                "the tool",
                hint="put the assistant message with the tool_calls before its tool results",
            )
        elif ids and m.get("tool_call_id") is not None and m["tool_call_id"] not in ids:
            raise InvalidExample(
                f"message {i} answers tool_call_id {m['tool_call_id']!r}, which no call of the "
                f"assistant turn before it has (ids: {', '.join(map(str, ids))})"
            )
