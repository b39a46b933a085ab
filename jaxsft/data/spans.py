"""Where each assistant turn is in a conversation's full rendering (character offsets).

Plain turns are found by their content, searched forward in order (also in the forms
templates write: trimmed, or with the `<think>` block rewritten or removed, as Qwen3 does); a
`<think>` block the template wrote for the turn's reasoning, just before the content, belongs
to the turn. A turn with tool calls is found by rendering the conversation a second time with
that turn's content replaced by a marker and its calls removed: the text where the two
renderings differ is what the template writes for the turn's content and calls (whatever its
tool-call syntax: `<tool_call>{...}</tool_call>`, `[TOOL_CALLS][...]`, a bare JSON object,
XML), and it has to be found in the first rendering at or after the previous turn.

What the template silently leaves out of a turn (a tool call, the content beside calls, the
reasoning) is listed in `Turn.drops`; the caller decides (data.on_drop).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from jaxsft.data.formats import InvalidExample, tool_name

MARKER = "\u27e6jaxsft-turn\u27e7"
THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


@dataclasses.dataclass
class Turn:
    """One assistant turn: message index, char span [start, end), the char span of its
    tool-call syntax (None when it has none) and what the template dropped from it."""

    index: int
    start: int
    end: int
    tool: tuple[int, int] | None = None
    drops: list[str] = dataclasses.field(default_factory=list)


def reasoning_of(m: dict) -> tuple[str | None, str]:
    """(reasoning or None, visible answer) of an assistant message."""
    content = m["content"]
    if isinstance(m.get("reasoning_content"), str) and m["reasoning_content"].strip():
        return m["reasoning_content"].strip(), content
    if "</think>" in content:
        head, _, answer = content.rpartition("</think>")
        return head.split("<think>")[-1].strip() or None, answer
    return None, content


def assistant_turns(text: str, messages: list, follow: re.Pattern, variant: Callable) -> list:
    """[Turn] of every assistant message in `text`, in order. `follow` matches what may come
    right after a content (whitespace and a control token); variant(i) renders the
    conversation with message i's content replaced by MARKER and its tool calls removed (None
    when the template refuses that), variant.cut(i) the same cut after message i (None when
    refused too)."""
    cursor, turns = 0, []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            cursor = _skip(text, m["content"], cursor)
            continue
        if m.get("tool_calls"):
            turn = _tool_turn(text, variant, m, i, cursor)
        else:
            turn = _content_turn(text, m, i, cursor, follow)
        if turn is None:
            raise InvalidExample(
                f"the content of assistant message {i} cannot be found in the chat template's "
                "rendering, so its tokens cannot be supervised"
            )
        turns.append(turn)
        cursor = turn.end
    return turns


def variant_message(m: dict) -> dict:
    """Message m with its answer replaced by MARKER (its think block kept) and no calls."""
    content = m["content"]
    head = content[: content.rfind("</think>") + len("</think>")] if "</think>" in content else ""
    out = {k: v for k, v in m.items() if k != "tool_calls"}
    out["content"] = head + MARKER
    return out


def _skip(text: str, content: str, cursor: int) -> int:
    """The cursor after a non-assistant message's content (unchanged when not found)."""
    for cand in (content, content.strip()):
        pos = text.find(cand, cursor) if cand else -1
        if pos >= 0:
            return pos + len(cand)
    return cursor


def _first_strict(text: str, cand: str, cursor: int, follow: re.Pattern) -> int:
    """First occurrence of `cand` at/after cursor that is followed by a control token, or -1."""
    pos = text.find(cand, cursor)
    while pos >= 0:
        if follow.match(text, pos + len(cand)):
            return pos
        pos = text.find(cand, pos + 1)
    return -1


def _content_turn(text: str, m: dict, i: int, cursor: int, follow) -> Turn | None:
    reasoning, answer = reasoning_of(m)
    content = m["content"]
    cands = [c for c in dict.fromkeys((content, content.strip())) if c]
    if reasoning is not None:
        cands += [c for c in (answer, answer.strip(), answer.lstrip("\n")) if c]
    best = None  # (pos, -len): the earliest strict match wins, on a tie the longer one
    for c in dict.fromkeys(cands):
        pos = _first_strict(text, c, cursor, follow)
        if pos >= 0 and (best is None or (pos, -len(c)) < best):
            best = (pos, -len(c))
    if best is None:  # templates that write text between the content and its end token
        for c in (content, content.strip()):
            pos = text.find(c, cursor) if c else -1
            if pos >= 0:
                best = (pos, -len(c))
                break
    if best is None:
        return None
    return _with_reasoning(text, Turn(i, best[0], best[0] - best[1]), reasoning, cursor)


def _with_reasoning(text: str, turn: Turn, reasoning: str | None, cursor: int) -> Turn:
    """Start the turn at the think block the template wrote for its reasoning just before it;
    a reasoning found nowhere in the turn is a drop."""
    if reasoning is None:
        return turn
    think = re.compile(r"<think>\s*" + re.escape(reasoning) + r"\s*</think>\s*\Z")
    hit = think.search(text, cursor, turn.start)
    if hit:
        turn.start = hit.start()
    elif reasoning not in text[turn.start : turn.end]:
        turn.drops.append("reasoning")
    return turn


def _tool_turn(text: str, variant: Callable, m: dict, i: int, cursor: int) -> Turn | None:
    v = variant(i)
    if v is not None:
        start = common_prefix(text, v)
        end = len(text) - common_suffix(text, v, min(len(text), len(v)) - start)
    else:  # refused (Mistral v3: without the calls, the roles no longer alternate)
        start, end = _in_cut(text, variant, i, cursor)
    if start is None or start < cursor:
        return None
    turn = Turn(i, start, start if end is None else max(end, start))
    reasoning, answer = reasoning_of(m)
    tool_from, answer, limit = start, answer.strip(), len(text) if end is None else turn.end
    if answer:
        pos = text.find(answer, start, limit)
        if pos < 0:
            turn.drops.append("content")
        else:
            tool_from = turn.end = pos + len(answer)
    at, found = tool_from, 0
    for call in m["tool_calls"]:
        pos = text.find(tool_name(call), at, limit)
        if pos < 0:
            turn.drops.append("tool_call")
        else:
            at, found = pos + len(tool_name(call)), found + 1
    if end is None:  # up to the last name found; the end-of-turn token extends it
        turn.end = max(turn.end, at)
    if found and tool_from < turn.end:
        turn.tool = (tool_from, turn.end)
    return _with_reasoning(text, turn, reasoning, cursor)


def _in_cut(text: str, variant: Callable, i: int, cursor: int) -> tuple[int | None, int | None]:
    """(start, end) of turn i in `text`, from the conversation cut after turn i: rendered as
    it is (variant.kept) and with the turn replaced by a marker (variant.cut), the two differ
    exactly in what the template writes for the turn, which is then searched in `text` at or
    after cursor. Templates that write the tools or the system prompt into the last user
    turn (Mistral v3) place them elsewhere in a cut conversation, so the cut is only compared
    with itself. When that fails: (where the marked cut departs from `text`, None)."""
    kept, cut = variant.kept(i), variant.cut(i)
    if cut is None:
        return None, None
    if kept is not None:
        lo = common_prefix(kept, cut)
        seg = kept[lo : len(kept) - common_suffix(kept, cut, min(len(kept), len(cut)) - lo)]
        pos = text.find(seg, cursor) if seg.strip() else -1
        if pos >= 0:
            return pos, pos + len(seg)
    return common_prefix(text, cut), None


def common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix (binary search over C-speed slice compares)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def common_suffix(a: str, b: str, limit: int) -> int:
    """Length of the longest common suffix, at most `limit`."""
    lo, hi = 0, max(limit, 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid :] == b[len(b) - mid :]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def char_parts(text: str, turn: Turn) -> list[tuple[int, int, str]]:
    """[(start, end, "tool" | "reasoning")] inside a turn (the rest of it is the answer)."""
    parts = [
        (h.start(), h.end(), "reasoning") for h in THINK_BLOCK.finditer(text, turn.start, turn.end)
    ]
    if turn.tool:
        parts.append((*turn.tool, "tool"))
    return parts
