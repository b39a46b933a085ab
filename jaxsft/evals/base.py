"""The eval seam: what one eval is, and how any of them is loaded and run.

An eval kind (`Kind`) is a small module-level record: a name, a loader that reads and validates
its file at start (a UserError naming file:line, before anything is written) and either
- `score(rows, replies) -> (metrics, rows)`: a generation eval (golden, ifeval, safety): the
  replies come from greedy generation on each row's `messages`, or from a responses file
  (`python -m jaxsft.evaluate --responses`), so such an eval also scores text without a model;
  a kind with a `judge_prompt` (safety) also takes `verdicts`: a local judge model's replies
  to judge_prompt(row, reply) (Options.judge), or None;
- `run(model, tokenizer, rows, opts) -> rows` and `summarize(rows, opts) -> metrics`: any other
  eval (multiple choice, scored by log-likelihood).
`metrics` is a JSON-able dict; its `keys` are the headline numbers that metrics.jsonl, the
summary and the reports carry as `{name}_{key}` (golden_score, mc_accuracy, ...). `rows` are
the per-row results.

Every process runs every eval: in a multi-process run each process generates (or scores) its
own contiguous share of the rows on its own copy of the model, the replies (or per-row
results) are gathered in row order (`gather`: JSON over jax's process_allgather) and every
process computes the same metrics; process 0 writes them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Sequence

import numpy as np

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
    # {eval name or "judge": new tokens}: overrides max_new_tokens for that eval (0 or absent:
    # max_new_tokens); eval.NAME_max_new_tokens in a run, --NAME-max-new-tokens in the CLI.
    max_new_tokens_by: dict = dataclasses.field(default_factory=dict)
    judge: str = ""  # HF directory of a local judge model (kinds with a judge_prompt)
    judge_dtype: str = "float32"

    def new_tokens(self, name: str) -> int:
        """New tokens per reply of eval `name` (its own setting, else max_new_tokens)."""
        return int(self.max_new_tokens_by.get(name) or self.max_new_tokens)

    def for_eval(self, name: str) -> Options:
        """These options with max_new_tokens set for eval `name`."""
        return dataclasses.replace(self, max_new_tokens=self.new_tokens(name))


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
    score: Callable | None = None  # (rows, replies[, verdicts]) -> (metrics, rows)
    run: Callable | None = None  # (model, tokenizer, rows, opts) -> per-row results
    summarize: Callable | None = None  # (per-row results, opts) -> metrics (with `run`)
    judge_prompt: Callable | None = None  # (row, reply) -> messages for a judge model

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
        """(metrics, per-row results) of the model on every row; in a multi-process run this
        process's share of the rows only is computed here, the rest gathered."""
        mine = process_share(self.rows)
        if not self.kind.generates:
            scored = gather(self.kind.run(model, tokenizer, mine, opts) if mine else [])
            return self.kind.summarize(scored, opts), scored
        replies = generate_replies(model, tokenizer, mine, opts.for_eval(self.name))
        verdicts = self.judge(mine, replies, opts)
        replies = gather(replies)
        return self.score(replies, None if verdicts is None else gather(verdicts))

    def judge(self, rows, replies, opts: Options) -> list[str] | None:
        """The judge model's replies to judge_prompt(row, reply), or None without a judge."""
        if not (opts.judge and self.kind.judge_prompt):
            return None
        prompts = [self.kind.judge_prompt(r, rep) for r, rep in zip(rows, replies, strict=True)]
        model, tokenizer, eos = load_judge(opts.judge, opts.judge_dtype)
        judge_opts = dataclasses.replace(opts.for_eval("judge"), eos_ids=eos)
        return generate_replies(model, tokenizer, [{"messages": p} for p in prompts], judge_opts)

    def score(self, replies: Sequence[str], verdicts=None) -> tuple[dict, list[dict]]:
        if not self.kind.generates:
            raise UserError(f"the {self.name} eval needs a model (--model), not responses")
        if self.kind.judge_prompt:
            return self.kind.score(self.rows, list(replies), verdicts)
        return self.kind.score(self.rows, list(replies))

    def headline(self, metrics: dict) -> dict:
        """{f"{name}_{key}": value} of the headline metrics the run produced."""
        return {f"{self.name}_{k}": metrics[k] for k in self.kind.keys if k in metrics}


def generate_replies(model, tokenizer, rows: Sequence[dict], opts: Options) -> list[str]:
    """Greedy replies to each row's `messages` (chat template with the generation prompt)."""
    from jaxsft.evals.sample import generate

    if not rows:
        return []
    return generate(
        model,
        tokenizer,
        [r["messages"] for r in rows],
        opts.max_new_tokens,
        temperature=0.0,
        batch_size=opts.batch_size,
        eos_ids=opts.eos_ids,
        tools=[r.get("tools") for r in rows],  # golden rows' tool definitions, if any
    )


def share_bounds(n: int, index: int, count: int) -> tuple[int, int]:
    """[start, end) of process `index`'s contiguous share of n rows over `count` processes
    (sizes differ by at most one; the shares in process order are the rows in order)."""
    return index * n // count, (index + 1) * n // count


def process_share(rows: Sequence) -> list:
    """This process's share of the rows (all of them in a one-process run)."""
    import jax

    start, end = share_bounds(len(rows), jax.process_index(), jax.process_count())
    return list(rows[start:end])


def gather(items: Sequence) -> list:
    """Every process's JSON-able `items`, concatenated in process order (the same list on
    every process); `items` itself in a one-process run. Collective: every process calls it."""
    import jax

    if jax.process_count() == 1:
        return list(items)
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(list(items)).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int32))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    every = np.asarray(multihost_utils.process_allgather(padded))
    out = []
    for p, size in enumerate(np.asarray(sizes).reshape(-1)):
        out += json.loads(bytes(every[p, : int(size)]).decode())
    return out


def local_mesh():
    """A mesh over this process's own devices (all on 'fsdp'): where a process-local model
    (a judge, a training run's model copied for generation) lives."""
    import jax

    from jaxsft.sharding import make_mesh

    return make_mesh(1, -1, 1, devices=jax.local_devices())


def check_judge(path: str) -> None:
    """A judge directory must hold an HF checkpoint (config.json); checked at start."""
    if path and not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(
            "the judge model directory has no config.json",
            where=path,
            hint="eval.judge (--judge) takes a local HF checkpoint directory",
        )


@functools.cache
def load_judge(path: str, dtype: str = "float32"):
    """(model, tokenizer, eos ids) of a judge checkpoint, loaded once per process on this
    process's devices and kept for the later evals of the run."""
    import jaxsft
    from jaxsft.evals.sample import generation_config_eos
    from jaxsft.tokenizer import load_tokenizer

    check_judge(path)
    tokenizer = load_tokenizer(path)
    model, _ = jaxsft.load_hf(path, dtype=dtype, param_dtype=dtype, mesh=local_mesh())
    return model, tokenizer, tuple(generation_config_eos(path))


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
