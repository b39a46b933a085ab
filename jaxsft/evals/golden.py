"""Golden-set evaluation: generate a reply per prompt and score it against the expected answer.

A golden file is JSONL, one row per line:

    {"messages": [{"role": "user", "content": "Capital of France?"}], "expected": "Paris",
     "metric": "contains"}

- `messages`: the conversation up to the last user (or tool) turn; `{"prompt": "..."}` is
  accepted as a single user turn;
- `expected`: a string, or a list of strings (the row passes when any of them matches);
  for `regex` a pattern (Python `re.search` on the raw reply);
- `metric` (optional, default: the file-level default, `exact` unless told otherwise):
  - `exact`: whitespace-normalised reply == expected (strip, runs of whitespace -> one space;
    case-sensitive);
  - `contains`: whitespace-normalised expected occurs in the reply, case-insensitive;
  - `regex`: `re.search(expected, reply)` finds a match (use `(?i)` etc. for flags);
  - `choice`: `options` lists the allowed answers; the reply picks the option it equals
    (normalised, case-insensitive) or else the one it mentions first (whole words); the row
    passes when that option is `expected`.
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

from jaxsft.data.readers import read_jsonl
from jaxsft.errors import UserError
from jaxsft.evals import base
from jaxsft.evals.calibration import abstains

METRICS = ("exact", "contains", "regex", "choice")
ABSTAIN = "abstain"  # the metric of an unanswerable row: passes when the reply abstains
ROLES = ("system", "user", "assistant", "tool")


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


def score_reply(metric: str, reply: str, expected, options: Sequence[str] | None = None) -> bool:
    """True when `reply` passes `metric` against `expected` (a string or a list of strings)."""
    if metric == ABSTAIN:
        return abstains(reply)
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
    """Read and validate a golden JSONL file -> rows {messages, expected, metric, options, line}.

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
    messages = obj.get("messages")
    if messages is None and isinstance(obj.get("prompt"), str):
        messages = [{"role": "user", "content": obj["prompt"]}]
    _check_messages(messages, where)
    label = obj.get("label")
    if label is not None and label != ABSTAIN:
        raise UserError(
            f"unknown label {label!r}", where=where, hint="'abstain' marks an unanswerable row"
        )
    if label == ABSTAIN and obj.get("expected") is not None:
        raise UserError("a row labelled 'abstain' has no 'expected' answer", where=where)
    if label == ABSTAIN or ("expected" in obj and obj["expected"] is None):
        return {"messages": messages, "expected": None, "metric": ABSTAIN, "options": None}
    if "expected" not in obj:
        raise UserError(
            "missing field 'expected'",
            where=where,
            hint='each row needs {"messages": [...], "expected": ...} '
            '("expected": null for a question the model should decline)',
        )
    expected = obj["expected"]
    if not (
        isinstance(expected, str)
        or (isinstance(expected, list) and expected and all(isinstance(e, str) for e in expected))
    ):
        raise UserError("'expected' must be a string or a non-empty list of strings", where=where)
    metric = obj.get("metric", default_metric)
    if metric not in METRICS:
        raise UserError(
            f"unknown metric {metric!r}", where=where, hint=f"one of {', '.join(METRICS)}"
        )
    options = obj.get("options")
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
    return {"messages": messages, "expected": expected, "metric": metric, "options": options}


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError("missing 'messages' (a non-empty list) or 'prompt' (a string)", where=where)
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ROLES
            or not isinstance(m.get("content"), str)
        ):
            raise UserError(
                f"message {i} needs a role ({', '.join(ROLES)}) and string content", where=where
            )
    if messages[-1]["role"] == "assistant":
        raise UserError(
            "the last message is an assistant turn",
            where=where,
            hint="golden rows end with the user turn to answer; the reply goes in 'expected'",
        )


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
    opts = base.Options(max_new_tokens, batch_size=batch_size, eos_ids=tuple(eos_ids))
    metrics, scored = score_golden(rows, base.generate_replies(model, tokenizer, rows, opts))
    return {**metrics, "rows": scored}


def score_golden(rows: Sequence[dict], replies: Sequence[str]) -> tuple[dict, list[dict]]:
    """(metrics, per-row results) of the replies to the golden rows (see golden_eval)."""
    scored = [
        {
            "line": row.get("line"),
            "prompt": row["messages"][-1]["content"],
            "messages": row["messages"],
            "expected": row["expected"],
            "metric": row["metric"],
            "output": out,
            "pass": score_reply(row["metric"], out, row["expected"], row.get("options")),
        }
        for row, out in zip(rows, replies, strict=True)
    ]
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
    return metrics, scored


def _load(path: str, opts: base.Options) -> list[dict]:
    return load_golden(path, opts.metric, opts.max_rows)


KIND = base.Kind(
    name="golden",
    load=_load,
    keys=("score", "abstention_rate", "false_abstention_rate"),
    pair=("output", "pass"),
    verdict="pass",
    labels={"score": "golden pass rate"},
    lower_better=("false_abstention_rate",),
    score=score_golden,
)
