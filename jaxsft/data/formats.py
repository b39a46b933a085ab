"""Row formats -> one canonical form, with validation (the reason names what is wrong).

Formats (INTERFACE.md): conversational `messages` (system/user/assistant/tool), ShareGPT
`conversations` (from: human/gpt/system/tool, value), `prompt`/`completion` (strings or message
lists) and plain `text`.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speaker names -> roles.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
    "function_response": "tool",
    "observation": "tool",
}


class InvalidExample(ValueError):
    """A row that cannot be trained on; the message says why (the caller adds file:line) and
    `hint`, when set, what to do about it."""

    def __init__(self, reason: str, hint: str = ""):
        super().__init__(reason)
        self.hint = hint


# --------------------------------------------------------------------------------------------
# Normalisation: every format -> {"format": ..., ...}
# --------------------------------------------------------------------------------------------
def normalize(example: Any) -> dict:
    """Validate one row and return its canonical form.

    `{"format": "chat", "messages": [...], "supervise_from": k}` (assistant turns with message
    index >= k are supervised), `{"format": "prompt_completion", "prompt": s, "completion": s}`
    or `{"format": "text", "text": s}`. Raises `InvalidExample` with the reason.
    """
    if not isinstance(example, dict):
        raise InvalidExample(f"row is a {type(example).__name__}, expected a JSON object")
    if "messages" in example:
        msgs = _messages(example["messages"], "messages")
        _require_assistant(msgs)
        return {"format": "chat", "messages": msgs, "supervise_from": 0}
    if "conversations" in example:
        msgs = _messages(example["conversations"], "conversations", sharegpt=True)
        _require_assistant(msgs)
        return {"format": "chat", "messages": msgs, "supervise_from": 0}
    if "prompt" in example or "completion" in example:
        return _prompt_completion(example)
    if "text" in example:
        text = example["text"]
        if not isinstance(text, str):
            raise InvalidExample(f"'text' is a {type(text).__name__}, expected a string")
        if not text.strip():
            raise InvalidExample("'text' is empty")
        return {"format": "text", "text": text}
    keys = ", ".join(sorted(map(str, example))) or "none"
    raise InvalidExample(
        f"row has none of 'messages', 'conversations', 'prompt'/'completion', 'text' (keys: {keys})"
    )


def _prompt_completion(example: dict) -> dict:
    if "prompt" not in example or "completion" not in example:
        missing = "prompt" if "prompt" not in example else "completion"
        raise InvalidExample(f"prompt/completion row without '{missing}'")
    prompt, completion = example["prompt"], example["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise InvalidExample("'completion' is empty")
        return {"format": "prompt_completion", "prompt": prompt, "completion": completion}
    if isinstance(prompt, list) and isinstance(completion, (list, str)):
        p = _messages(prompt, "prompt", allow_empty=True)
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        c = _messages(completion, "completion")
        if not any(m["role"] == "assistant" for m in c):
            raise InvalidExample("'completion' has no assistant message")
        return {"format": "chat", "messages": p + c, "supervise_from": len(p)}
    raise InvalidExample(
        f"'prompt' ({type(prompt).__name__}) and 'completion' ({type(completion).__name__}) "
        "must both be strings or both be message lists"
    )


def _messages(raw: Any, key: str, sharegpt: bool = False, allow_empty: bool = False) -> list:
    if not isinstance(raw, list):
        raise InvalidExample(f"'{key}' is a {type(raw).__name__}, expected a list of messages")
    if not raw and not allow_empty:
        raise InvalidExample(f"'{key}' is empty")
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise InvalidExample(f"{key}[{i}] is a {type(m).__name__}, expected an object")
        if role_key not in m:
            raise InvalidExample(f"{key}[{i}] has no '{role_key}'")
        if content_key not in m:
            raise InvalidExample(f"{key}[{i}] has no '{content_key}'")
        role, content = m[role_key], m[content_key]
        role = SHAREGPT_ROLES.get(role) if sharegpt else role
        if role not in ROLES:
            allowed = sorted(SHAREGPT_ROLES) if sharegpt else ROLES
            raise InvalidExample(
                f"{key}[{i}] has unknown {role_key} {m[role_key]!r} (allowed: {', '.join(allowed)})"
            )
        if not isinstance(content, str):
            raise InvalidExample(
                f"{key}[{i}] {content_key} is a {type(content).__name__}, expected a string"
            )
        if role == "assistant" and not content.strip():
            raise InvalidExample(f"{key}[{i}] is an assistant message with empty content")
        extra = {k: v for k, v in m.items() if k not in (role_key, content_key) and v is not None}
        out.append({"role": role, "content": content, **extra})
    return out


def _require_assistant(msgs: list) -> None:
    if not any(m["role"] == "assistant" for m in msgs):
        raise InvalidExample("conversation has no assistant turn (nothing to train on)")
