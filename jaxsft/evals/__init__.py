"""Evals: one seam for every eval a run or `python -m jaxsft.evaluate` scores.

    evals = from_config(config.eval)          # [Eval]: files read and validated, at start
    for ev in evals:
        metrics, rows = ev.run(model, tokenizer, Options(...))
        ev.headline(metrics)                   # {"golden_score": ...}: metrics.jsonl, summary

The kinds, in the order they run (config key eval.NAME, CLI flag --NAME):
golden (golden.py: generation, scored against expected answers; abstention on unanswerable
rows), mc (mc.py: multiple choice by log-likelihood, with calibration), ifeval (ifeval.py:
verifiable instructions), safety (safety.py: refusal and over-refusal, by a matcher or a
local judge model). base.py holds the seam (and the split of rows over processes), sample.py
the KV-cache generation, cli.py the evaluate command.
"""

from jaxsft.errors import UserError
from jaxsft.evals import base, golden, ifeval, mc, safety
from jaxsft.evals.base import Eval, Kind, Options
from jaxsft.evals.golden import golden_eval, load_golden
from jaxsft.evals.mc import load_mc, mc_eval

KINDS = {k.name: k for k in (golden.KIND, mc.KIND, ifeval.KIND, safety.KIND)}
# Evals with their own new-token budget (eval.NAME_max_new_tokens, --NAME-max-new-tokens): the
# generation evals and the judge.
TOKEN_BUDGETS = (*(n for n, k in KINDS.items() if k.generates), "judge")

__all__ = [
    "KINDS",
    "TOKEN_BUDGETS",
    "Eval",
    "Kind",
    "Options",
    "from_config",
    "golden_eval",
    "load",
    "load_golden",
    "load_mc",
    "mc_eval",
]


def load(name: str, path: str, opts: Options) -> Eval:
    """Read and validate one eval's file (a UserError naming file:line when it is bad)."""
    kind = KINDS[name]
    return Eval(kind, str(path), kind.load(str(path), opts))


def from_config(eval_config, opts: Options | None = None) -> list[Eval]:
    """The evals a run's `eval` config group names (eval.golden, eval.mc, eval.ifeval,
    eval.safety: a file path each, "" for none), loaded in KINDS order."""
    opts = opts or options_from_config(eval_config)
    base.check_judge(opts.judge)
    return [
        load(name, eval_config[name], opts)
        for name in KINDS
        if name in eval_config and eval_config[name]
    ]


def options_from_config(eval_config, judge_dtype: str = "float32") -> Options:
    """The Options of a run's `eval` config group (negative token budgets are a UserError)."""
    for key in ("max_new_tokens", *(f"{n}_max_new_tokens" for n in TOKEN_BUDGETS)):
        if int(eval_config.get(key, 0)) < 0:
            raise UserError(f"eval.{key} must be >= 0", where=f"eval.{key}")
    return Options(
        max_new_tokens=int(eval_config.max_new_tokens),
        max_rows=int(eval_config.max_rows),
        max_new_tokens_by={
            n: int(eval_config.get(f"{n}_max_new_tokens", 0)) for n in TOKEN_BUDGETS
        },
        judge=str(eval_config.get("judge", "")),
        judge_dtype=judge_dtype,
    )
