"""Golden-set evaluation: generate a reply per prompt and score it against the expected answer.

A golden file is JSONL, one row per line:

    {"messages": [{"role": "user", "content": "Capital of France?"}], "expected": "Paris",
     "metric": "contains"}

- `messages`: the conversation up to the last user (or tool) turn, read as training rows are
  (assistant `tool_calls`, `tool` results, content parts); `{"prompt": "..."}` is accepted as
  a single user turn;
- `tools` (optional): tool definitions (as in training rows) passed to the generation prompt,
  `apply_chat_template(..., tools=tools, add_generation_prompt=True)`;
- `expected`: a string, or a list of strings (the row passes when any of them matches);
  for `regex` a pattern (Python `re.search` on the raw reply);
- `metric` (optional, default: the file-level default, `exact` unless told otherwise):
  - `exact`: whitespace-normalised reply == expected (strip, runs of whitespace -> one space;
    case-sensitive);
  - `contains`: whitespace-normalised expected occurs in the reply, case-insensitive;
  - `regex`: `re.search(expected, reply)` finds a match (use `(?i)` etc. for flags);
  - `choice`: `options` lists the allowed answers; the reply picks the option it equals
    (normalised, case-insensitive) or else the one it mentions first (whole words); the row
    passes when that option is `expected`;
  - `tool_call` (the default when `expected` is a call object or a list of them): the reply's
    tool calls, parsed in the syntax of the template family (tool_calls.py; `tool_format`
    names one, "auto" by default), are the expected calls {"name", "arguments"}: the same
    names, JSON-equal arguments, in any order; `[]` expects no call. The eval adds
    `tool_call_accuracy` and `tool_call_name_accuracy` over these rows.
Rows marked unanswerable (`"expected": null`, or `"label": "abstain"` without `expected`)
pass when the reply abstains (jaxsft.evals.calibration.ABSTAIN_PHRASES): their metric is
`abstain`, and the eval reports `abstention_rate` on them next to `false_abstention_rate` (the
share of answerable rows whose reply abstains).
Rows that break these rules are a UserError naming file:line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from jaxsft.data import formats
from jaxsft.data.readers import read_jsonl
from jaxsft.errors import UserError
from jaxsft.evals import base, tool_calls
from jaxsft.evals.calibration import abstains

TOOL_CALL = "tool_call"
METRICS = ("exact", "contains", "regex", "choice", TOOL_CALL)
ABSTAIN = "abstain"  # the metric of an unanswerable row: passes when the reply abstains


def normalize(text: str) -> str:
    """Strip and collapse every run of whitespace to one space."""
    return " ".join(str(text).split())


def pick_option(reply: str, options: Sequence[str]) -> str | None:
    """The option the reply names: an exact (normalised, case-insensitive) match, else the one
    mentioned first as whole words (longer options win ties), else None."""
    norm = normalize(reply).casefold()
    for opt in options:
        if normalize(opt).casefold() == norm:
            return opt
    best = None
    for opt in options:
        pattern = r"(?<!\w)" + re.escape(normalize(opt).casefold()) + r"(?!\w)"
        m = re.search(pattern, norm)
        if m and (best is None or (m.start(), -len(opt)) < (best[0], -len(best[1]))):
            best = (m.start(), opt)
    return None if best is None else best[1]


def score_reply(
    metric: str,
    reply: str,
    expected,
    options: Sequence[str] | None = None,
    *,
    tools: Sequence[dict] | None = None,
    tool_format: str = "auto",
) -> bool:
    """True when `reply` passes `metric` against `expected` (a string or a list of strings;
    for tool_call the calls [{"name", "arguments"}], `tools` typing Qwen3-Coder XML values)."""
    if metric == ABSTAIN:
        return abstains(reply)
    if metric == TOOL_CALL:
        return tool_calls.matches(reply, expected, tools, tool_format)
    targets = [expected] if isinstance(expected, str) else list(expected)
    if metric == "exact":
        return any(normalize(reply) == normalize(t) for t in targets)
    if metric == "contains":
        low = normalize(reply).casefold()
        return any(normalize(t).casefold() in low for t in targets)
    if metric == "regex":
        return any(re.search(t, reply) is not None for t in targets)
    if metric == "choice":
        picked = pick_option(reply, options or ())
        return picked is not None and any(
            normalize(picked).casefold() == normalize(t).casefold() for t in targets
        )
    raise ValueError(f"unknown metric {metric!r}")


def load_golden(path: str | os.PathLike, metric: str = "exact", max_rows: int = 0) -> list[dict]:
    """Read and validate a golden JSONL file -> rows {messages, tools, expected, metric,
    options, tool_format, line}.

    `metric` is the default for rows without one; `max_rows` > 0 keeps the first rows only.
    """
    path = os.fspath(path)
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}", hint=f"one of {', '.join(METRICS)}")
    rows = [
        _golden_row(obj, metric, f"{path}:{line}") | {"line": line}
        for line, obj in read_jsonl(path, max_rows)
    ]
    if not rows:
        raise UserError("the golden file has no rows", where=path)
    return rows


def _golden_row(obj, default_metric: str, where: str) -> dict:
    if not isinstance(obj, dict):
        raise UserError("a row must be a JSON object", where=where)
    try:
        row = {"messages": _messages(obj, where), "tools": formats.parse_tools(obj.get("tools"))}
    except formats.InvalidExample as e:
        raise UserError(str(e), where=where, hint=e.hint or None) from None
    row["tool_format"] = obj.get("tool_format", "auto")
    if row["tool_format"] not in tool_calls.FORMATS:
        raise UserError(
            f"unknown tool_format {row['tool_format']!r}",
            where=where,
            hint=f"one of {', '.join(tool_calls.FORMATS)}",
        )
    if _unanswerable(obj, where):
        return row | {"expected": None, "metric": ABSTAIN, "options": None}
    expected = obj["expected"]
    metric = obj.get("metric", TOOL_CALL if _looks_like_calls(expected) else default_metric)
    if metric not in METRICS:
        raise UserError(
            f"unknown metric {metric!r}", where=where, hint=f"one of {', '.join(METRICS)}"
        )
    if metric == TOOL_CALL:
        expected = _expected_calls(expected, row["tools"], where)
    else:
        _check_text_expected(expected, metric, obj.get("options"), where)
    return row | {"expected": expected, "metric": metric, "options": obj.get("options")}


def _messages(obj: dict, where: str) -> list[dict]:
    """The row's conversation (`prompt` is one user turn), validated as training rows are."""
    messages = obj.get("messages")
    if messages is None and isinstance(obj.get("prompt"), str):
        messages = [{"role": "user", "content": obj["prompt"]}]
    if not isinstance(messages, list) or not messages:
        raise UserError("missing 'messages' (a non-empty list) or 'prompt' (a string)", where=where)
    messages = formats.parse_messages(messages)
    if messages[-1]["role"] == "assistant":
        raise UserError(
            "the last message is an assistant turn",
            where=where,
            hint="golden rows end with the user (or tool) turn to answer; the reply goes in "
            "'expected'",
        )
    return messages


def _unanswerable(obj: dict, where: str) -> bool:
    """Whether the row is a question the model should decline (checks 'label' / 'expected')."""
    label = obj.get("label")
    if label is not None and label != ABSTAIN:
        raise UserError(
            f"unknown label {label!r}", where=where, hint="'abstain' marks an unanswerable row"
        )
    if label == ABSTAIN and obj.get("expected") is not None:
        raise UserError("a row labelled 'abstain' has no 'expected' answer", where=where)
    if label == ABSTAIN or ("expected" in obj and obj["expected"] is None):
        return True
    if "expected" not in obj:
        raise UserError(
            "missing field 'expected'",
            where=where,
            hint='each row needs {"messages": [...], "expected": ...} '
            '("expected": null for a question the model should decline)',
        )
    return False


def _looks_like_calls(expected) -> bool:
    return isinstance(expected, dict) or (
        isinstance(expected, list) and bool(expected) and all(isinstance(e, dict) for e in expected)
    )


def _expected_calls(expected, tools, where: str) -> list[dict]:
    """[{"name", "arguments"}] of a tool_call row's `expected`: a call, a list of calls (all
    of them, in any order) or [] (no call); arguments objects; names among the row's tools."""
    hint = 'write {"name": "get_weather", "arguments": {"city": "Paris"}} or a list of them'
    if not (isinstance(expected, list) or _looks_like_calls(expected)):
        raise UserError("'expected' of a tool_call row is not a call", where=where, hint=hint)
    try:
        calls = formats.parse_tool_calls(
            [expected] if isinstance(expected, dict) else expected, "expected"
        )
    except formats.InvalidExample as e:
        raise UserError(str(e), where=where, hint=hint) from None
    defined = {formats.tool_name(t) for t in tools or ()}
    for c in calls:
        name, args = formats.tool_name(c), c["function"]["arguments"]
        if not isinstance(args, dict):
            raise UserError(f"the arguments of {name!r} are not a JSON object", where=where)
        if defined and name not in defined:
            raise UserError(
                f"'expected' calls {name!r}, which is not among the row's tools "
                f"({', '.join(sorted(defined))})",
                where=where,
            )
    return [{"name": formats.tool_name(c), "arguments": c["function"]["arguments"]} for c in calls]


def _check_text_expected(expected, metric: str, options, where: str) -> None:
    if not (
        isinstance(expected, str)
        or (isinstance(expected, list) and expected and all(isinstance(e, str) for e in expected))
    ):
        raise UserError("'expected' must be a string or a non-empty list of strings", where=where)
    if metric == "regex":
        for pattern in [expected] if isinstance(expected, str) else expected:
            try:
                re.compile(pattern)
            except re.error as e:
                raise UserError(f"bad regex {pattern!r}: {e}", where=where) from None
    if metric == "choice":
        if not (
            isinstance(options, list)
            and len(options) >= 2
            and all(isinstance(o, str) and o.strip() for o in options)
        ):
            raise UserError(
                "metric 'choice' needs 'options': a list of at least 2 strings", where=where
            )
        allowed = {normalize(o).casefold() for o in options}
        targets = [expected] if isinstance(expected, str) else expected
        if any(normalize(t).casefold() not in allowed for t in targets):
            raise UserError("'expected' is not one of 'options'", where=where)


def golden_eval(
    model,
    tokenizer,
    rows: Sequence[dict],
    max_new_tokens: int = 64,
    *,
    batch_size: int | None = None,
    eos_ids: Sequence[int] = (),
) -> dict:
    """Generate greedily for every row and score it.

    Returns {"score": pass share, "passed", "n", "by_metric": {metric: share}, "rows": [{line,
    prompt (last message), messages, expected, metric, output, pass}]} (+ abstention_rate and
    false_abstention_rate when some rows are unanswerable).
    """
    from jaxsft.evals.sample import generate

    replies = generate(
        model,
        tokenizer,
        [r["messages"] for r in rows],
        max_new_tokens,
        batch_size=batch_size,
        eos_ids=eos_ids,
        tools=[r.get("tools") for r in rows],
    )
    metrics, scored = score_golden(rows, replies)
    return {**metrics, "rows": scored}


def score_golden(rows: Sequence[dict], replies: Sequence[str]) -> tuple[dict, list[dict]]:
    """(metrics, per-row results) of the replies to the golden rows (see golden_eval)."""
    scored = [_scored(row, out) for row, out in zip(rows, replies, strict=True)]
    by_metric = {
        m: base.share([r["pass"] for r in scored if r["metric"] == m])
        for m in sorted({r["metric"] for r in scored})
    }
    passed = sum(r["pass"] for r in scored)
    metrics = {"score": base.share([r["pass"] for r in scored]), "passed": passed}
    metrics.update(n=len(scored), by_metric=by_metric)
    unanswerable = [r for r in scored if r["metric"] == ABSTAIN]
    if unanswerable:
        answerable = [r for r in scored if r["metric"] != ABSTAIN]
        metrics["abstention_rate"] = base.share([r["pass"] for r in unanswerable])
        metrics["false_abstention_rate"] = base.share([abstains(r["output"]) for r in answerable])
    return metrics | tool_call_metrics(scored), scored


def _scored(row: dict, reply: str) -> dict:
    """The per-row result; a tool_call row also lists the calls parsed from the reply."""
    tools, fmt = row.get("tools"), row.get("tool_format", "auto")
    out = {
        "line": row.get("line"),
        "prompt": row["messages"][-1]["content"],
        "messages": row["messages"],
        "expected": row["expected"],
        "metric": row["metric"],
        "output": reply,
        "pass": score_reply(
            row["metric"], reply, row["expected"], row.get("options"), tools=tools, tool_format=fmt
        ),
    }
    if row["metric"] == TOOL_CALL:
        out["calls"] = tool_calls.parse_calls(reply, fmt, tools)
    return out


def tool_call_metrics(scored: Sequence[dict]) -> dict:
    """tool_call_accuracy (right names and arguments) and tool_call_name_accuracy (right
    function names, arguments aside) over the tool_call rows ({} when there are none)."""
    rows = [r for r in scored if r["metric"] == TOOL_CALL]
    if not rows:
        return {}
    names = [
        sorted(str(c["name"]) for c in r["calls"]) == sorted(c["name"] for c in r["expected"])
        for r in rows
    ]
    return {
        "tool_call_accuracy": base.share([r["pass"] for r in rows]),
        "tool_call_name_accuracy": base.share(names),
    }


def _load(path: str, opts: base.Options) -> list[dict]:
    return load_golden(path, opts.metric, opts.max_rows)


KIND = base.Kind(
    name="golden",
    load=_load,
    keys=(
        "score",
        "abstention_rate",
        "false_abstention_rate",
        "tool_call_accuracy",
        "tool_call_name_accuracy",
    ),
    pair=("output", "pass"),
    verdict="pass",
    labels={
        "score": "golden pass rate",
        "tool_call_accuracy": "golden tool calls right (name and arguments)",
        "tool_call_name_accuracy": "golden tool calls naming the right function",
    },
    lower_better=("false_abstention_rate",),
    score=score_golden,
)
