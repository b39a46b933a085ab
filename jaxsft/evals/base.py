"""The eval seam: what one eval is, and how any of them is loaded and run.

An eval kind (`Kind`) is a small module-level record: a name, a loader that reads and validates
its file at start (a UserError naming file:line, before anything is written) and either
- `score(rows, replies) -> (metrics, rows)`: a generation eval (golden, ifeval, safety): the
  replies come from greedy generation on each row's `messages`, or from a responses file
  (`python -m jaxsft.evaluate --responses`), so such an eval also scores text without a model;
- `run(model, tokenizer, rows, opts) -> (metrics, rows)`: any other eval (multiple choice,
  scored by log-likelihood).
`metrics` is a JSON-able dict; its `keys` are the headline numbers that metrics.jsonl, the
summary and the reports carry as `{name}_{key}` (golden_score, mc_accuracy, ...). `rows` are
the per-row results.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

from jaxsft.data.readers import read_jsonl
from jaxsft.errors import UserError


@dataclasses.dataclass(frozen=True)
class Options:
    """Knobs shared by the evals (eval.* keys in a run, flags of the evaluate CLI)."""

    max_new_tokens: int = 64
    max_rows: int = 0  # > 0: the first rows of each file only
    batch_size: int | None = None  # generation / scoring rows per batch (None: 8)
    eos_ids: tuple[int, ...] = ()  # extra ids that end a reply
    metric: str = "exact"  # golden rows that name no metric
    mc_style: str = "letter"  # multiple choice: score " A".. or the choice text


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    load: Callable[[str, Options], list[dict]]
    keys: tuple[str, ...]  # headline metrics, logged as f"{name}_{key}"
    pair: tuple[str, ...] = ()  # row fields that --compare pairs as base_FIELD
    verdict: str | None = None  # boolean row field: a compare counts fixed / broken rows
    labels: dict = dataclasses.field(default_factory=dict)  # key -> table label
    lower_better: tuple[str, ...] = ()  # keys where a drop is an improvement
    general: tuple[str, ...] = ()  # general-capability keys: the regression guard watches them
    score: Callable | None = None  # (rows, replies) -> (metrics, rows)
    run: Callable | None = None  # (model, tokenizer, rows, opts) -> (metrics, rows)

    @property
    def generates(self) -> bool:
        return self.score is not None


@dataclasses.dataclass(frozen=True)
class Eval:
    """One configured eval: its kind, its file and the rows validated from it."""

    kind: Kind
    path: str
    rows: list

    @property
    def name(self) -> str:
        return self.kind.name

    def run(self, model, tokenizer, opts: Options) -> tuple[dict, list[dict]]:
        if self.kind.generates:
            return self.kind.score(self.rows, generate_replies(model, tokenizer, self.rows, opts))
        return self.kind.run(model, tokenizer, self.rows, opts)

    def score(self, replies: Sequence[str]) -> tuple[dict, list[dict]]:
        if not self.kind.generates:
            raise UserError(f"the {self.name} eval needs a model (--model), not responses")
        return self.kind.score(self.rows, list(replies))

    def headline(self, metrics: dict) -> dict:
        """{f"{name}_{key}": value} of the headline metrics the run produced."""
        return {f"{self.name}_{k}": metrics[k] for k in self.kind.keys if k in metrics}


def generate_replies(model, tokenizer, rows: Sequence[dict], opts: Options) -> list[str]:
    """Greedy replies to each row's `messages` (chat template with the generation prompt)."""
    from jaxsft.evals.sample import generate

    return generate(
        model,
        tokenizer,
        [r["messages"] for r in rows],
        opts.max_new_tokens,
        temperature=0.0,
        batch_size=opts.batch_size,
        eos_ids=opts.eos_ids,
    )


_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def strip_think(text: str) -> str:
    """The reply without reasoning: every <think>...</think> block removed; a lone </think>
    (the template opened the block in the prompt) drops all before it; a <think> never closed
    (generation stopped inside it) drops all after it."""
    text = _THINK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        text = text.split("<think>", 1)[0]
    return text.strip()


def share(flags: Sequence[bool]) -> float:
    """Share of True in flags (0.0 when empty)."""
    return sum(bool(f) for f in flags) / len(flags) if flags else 0.0


def user_message(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def load_responses(path: str) -> dict[str, str]:
    """{prompt: response} of a responses JSONL ({"prompt", "response"} a line); a prompt given
    twice keeps its first response."""
    out: dict[str, str] = {}
    for line, obj in read_jsonl(path):
        where = f"{path}:{line}"
        if not isinstance(obj, dict):
            raise UserError("a row must be a JSON object", where=where)
        prompt, response = obj.get("prompt"), obj.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise UserError(
                "each row needs 'prompt' and 'response' (strings)",
                where=where,
                hint='{"prompt": "...", "response": "..."}',
            )
        out.setdefault(prompt, response)
    if not out:
        raise UserError("the responses file has no rows", where=path)
    return out


def replies_for(ev: Eval, responses: dict[str, str], path: str) -> list[str]:
    """The response to each row of `ev`, looked up by the row's last (user) message."""
    replies = []
    for row in ev.rows:
        prompt = row["messages"][-1]["content"]
        if prompt not in responses:
            raise UserError(
                f"no response for the prompt of {ev.path}:{row.get('line')} ({prompt[:60]!r})",
                where=path,
                hint="the responses file needs one {prompt, response} row per prompt",
            )
        replies.append(responses[prompt])
    return replies
