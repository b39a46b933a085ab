"""The agentic part of the data report (its `agentic` section and warnings): tool-calling
examples and calls, calls whose arguments are not a JSON object or that name a function
missing from the example's tools, tool-call and reasoning tokens, what the chat template
dropped (per reason, with the data.on_drop policy) and what data.turns costs."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxsft.data.chat import KIND_REASONING, KIND_TOOL
from jaxsft.data.formats import drop_policy, tool_name
from jaxsft.data.listing import listed


@dataclasses.dataclass
class AgenticStats:
    """Per-example agentic facts gathered while rendering one split (check.SplitStats.agentic)."""

    tokens_unexpanded: int = 0  # tokens of each row's last example (its full conversation)
    tool_examples: int = 0
    tool_calls: int = 0
    bad_arguments: list = dataclasses.field(default_factory=list)  # "where: name"
    unknown_functions: list = dataclasses.field(default_factory=list)  # "where: name"
    reasoning_tokens: int = 0
    tool_tokens: int = 0
    drops: dict = dataclasses.field(default_factory=dict)  # reason -> [where]

    def add(self, row, out: dict, first: bool = True, last: bool = True) -> None:
        """One rendered example of `row` (data.turns=expand: first/last of the row's)."""
        if first:
            n, bad, unknown = tool_findings(row.example)
            self.tool_examples += n > 0
            self.tool_calls += n
            self.bad_arguments += [f"{row.where}: {name}" for name in bad]
            self.unknown_functions += [f"{row.where}: {name}" for name in unknown]
        if last:
            self.tokens_unexpanded += out["length"]
        kinds = out.get("kinds")
        if kinds is not None:
            self.reasoning_tokens += int(np.count_nonzero(kinds == KIND_REASONING))
            self.tool_tokens += int(np.count_nonzero(kinds == KIND_TOOL))
        for reason in out.get("drops", {}):
            self.drops.setdefault(reason, []).append(row.where)


def tool_findings(example: dict) -> tuple[int, list[str], list[str]]:
    """(tool calls, names of the calls whose arguments are not a JSON object, names called but
    missing from the example's tools) of a canonical example."""
    if example["format"] != "chat":
        return 0, [], []
    calls = [c for m in example["messages"] for c in m.get("tool_calls", ())]
    defined = {tool_name(t) for t in example.get("tools") or ()}
    bad = [tool_name(c) for c in calls if not isinstance(c["function"]["arguments"], dict)]
    unknown = [tool_name(c) for c in calls if defined and tool_name(c) not in defined]
    return len(calls), bad, unknown


def agentic_report(s, n_sup: int) -> dict:
    """Tool calls, reasoning, what the template dropped (per reason) and data.turns, of a split
    (`s`: check.SplitStats; n_sup: its supervised tokens)."""
    a = s.agentic
    return {
        "tool_calls": {
            "examples": a.tool_examples,
            "calls": a.tool_calls,
            "tokens": a.tool_tokens,
            "bad_json_arguments": listed(a.bad_arguments),
            "unknown_functions": listed(a.unknown_functions),
        },
        "reasoning_tokens": {
            "count": a.reasoning_tokens,
            "share_of_supervised": round(a.reasoning_tokens / max(n_sup, 1), 4),
        },
        "template_drops": {
            reason: {**listed(wheres), "policy": drop_policy(s.on_drop, reason)}
            for reason, wheres in sorted(a.drops.items())
        },
        "turns": {
            "mode": s.turn_mode,
            "conversations": len(s.rows),
            "examples": len(s.lengths),
            "tokens": int(sum(s.lengths)),
            "tokens_one_example_per_conversation": a.tokens_unexpanded,
        },
    }


def agentic_warnings(a: dict) -> list[str]:
    """Tool calls that will not parse or call an undefined function, and template drops under
    data.on_drop=warn, each with its first examples' file:line (`a`: a report's agentic
    section)."""
    out = []
    for key, what in (
        ("bad_json_arguments", "tool calls whose arguments are not a JSON object"),
        ("unknown_functions", "tool calls of a function missing from the example's tools"),
    ):
        found = a["tool_calls"][key]
        if found["count"]:
            out.append(f"{found['count']} {what} ({', '.join(found['examples'][:3])})")
    for reason, d in a["template_drops"].items():
        if d["policy"] == "warn":
            out.append(
                f"{d['count']} examples where the chat template drops {_DROPPED[reason]} "
                f"(first: {d['examples'][0]}; data.on_drop=allow silences this)"
            )
    return out


_DROPPED = {
    "tools": "the tool definitions",
    "tool_call": "tool calls",
    "content": "the content of tool-calling turns",
    "reasoning": "the reasoning of supervised turns",
}
