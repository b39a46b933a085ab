"""IFEval (Zhou et al. 2023, "Instruction-Following Evaluation for Large Language Models").

Input: the public JSONL, one prompt a line:

    {"key": 1000, "prompt": "Write a 300+ word summary ...",
     "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
     "kwargs": [{}, {"relation": "at least", "num_words": 300}]}

`kwargs[i]` holds the arguments of instruction i; null values are dropped (the Hugging Face
copy fills every argument name in). Each prompt is one user turn through the chat template with
the generation prompt; the <think> block of a reasoning model is removed from the reply before
checking. Every instruction is checked strictly (the reply as it is) and loosely (passing on any
of the reply, the reply without its first line, its last line or both, each also without '*').
Metrics, strict and loose: prompt-level accuracy (share of prompts whose instructions all pass)
and instruction-level accuracy (share of all instructions that pass).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from jaxsft.data.readers import read_jsonl
from jaxsft.errors import UserError
from jaxsft.evals import base
from jaxsft.evals.ifeval_checks import CHECKS, RELATION_ARGS, RELATIONS, follows, follows_loose

INT_MIN = {"nth_paragraph": 1}  # smallest allowed value of an int argument (else 0)


def load_ifeval(path: str | os.PathLike, max_rows: int = 0) -> list[dict]:
    """Read and validate IFEval prompts -> rows {key, prompt, instruction_id_list, kwargs
    (null-free), messages, line}."""
    path = os.fspath(path)
    rows = [
        _row(obj, f"{path}:{line}") | {"line": line} for line, obj in read_jsonl(path, max_rows)
    ]
    if not rows:
        raise UserError("the IFEval file has no rows", where=path)
    return rows


def _row(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise UserError("a row must be a JSON object", where=where)
    prompt, ids, kwargs = obj.get("prompt"), obj.get("instruction_id_list"), obj.get("kwargs")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("missing 'prompt' (a string)", where=where)
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise UserError("'instruction_id_list' must be a non-empty list of strings", where=where)
    if kwargs is None:
        kwargs = [{} for _ in ids]
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise UserError(
            f"'kwargs' must be a list of {len(ids)} objects, one per instruction", where=where
        )
    clean = [_instruction_args(i, kw, where) for i, kw in zip(ids, kwargs, strict=True)]
    return {
        "key": obj.get("key"),
        "prompt": prompt,
        "instruction_id_list": ids,
        "kwargs": clean,
        "messages": base.user_message(prompt),
    }


def _instruction_args(iid: str, kw, where: str) -> dict:
    if iid not in CHECKS:
        raise UserError(
            f"unknown instruction {iid!r}",
            where=where,
            hint="IFEval's 25 instruction ids are listed in docs/evaluation.md",
        )
    if not isinstance(kw, dict):
        raise UserError(f"kwargs of {iid} must be an object", where=where)
    kw = {k: v for k, v in kw.items() if v is not None}
    spec = CHECKS[iid][1]
    extra = sorted(set(kw) - set(spec))
    missing = sorted(set(spec) - set(kw))
    if extra or missing:
        raise UserError(
            f"{iid} takes {sorted(spec) or 'no arguments'}; "
            + (f"unknown {extra}" if extra else f"missing {missing}"),
            where=where,
        )
    for name, typ in spec.items():
        _check_arg(iid, name, kw[name], typ, where)
    return kw


def _check_arg(iid: str, name: str, value, typ, where: str) -> None:
    bad = None
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        bad = "an integer"
    elif typ is int and value < INT_MIN.get(name, 0):
        bad = f"an integer >= {INT_MIN.get(name, 0)}"
    elif typ is str and (not isinstance(value, str) or not value.strip()):
        bad = "a non-empty string"
    elif typ is list and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        bad = "a list of strings"
    elif name in RELATION_ARGS and value not in RELATIONS:
        bad = f"one of {list(RELATIONS)}"
    if bad:
        raise UserError(f"{iid}: {name} must be {bad}, got {value!r}", where=where)


def score_ifeval(rows: Sequence[dict], replies: Sequence[str]) -> tuple[dict, list[dict]]:
    """(metrics, per-row results) of the replies to the IFEval rows."""
    scored = []
    for row, reply in zip(rows, replies, strict=True):
        text = base.strip_think(reply)
        pairs = list(zip(row["instruction_id_list"], row["kwargs"], strict=True))
        scored.append(
            {
                "prompt": row["prompt"],
                "instruction_id_list": row["instruction_id_list"],
                "output": reply,
                "strict": [follows(i, text, kw) for i, kw in pairs],
                "loose": [follows_loose(i, text, kw) for i, kw in pairs],
            }
        )
    return aggregate(scored), scored


def aggregate(scored: Sequence[dict]) -> dict:
    """Prompt- and instruction-level accuracy, strict and loose."""
    out = {}
    for mode in ("strict", "loose"):
        out[f"prompt_{mode}"] = base.share([all(r[mode]) for r in scored])
        out[f"instruction_{mode}"] = base.share([f for r in scored for f in r[mode]])
    return out


KIND = base.Kind(
    name="ifeval",
    load=lambda path, opts: load_ifeval(path, opts.max_rows),
    keys=("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose"),
    pair=("strict", "loose"),
    labels={"prompt_strict": "IFEval prompt-level strict accuracy"},
    general=("prompt_strict", "instruction_strict"),
    score=score_ifeval,
)
