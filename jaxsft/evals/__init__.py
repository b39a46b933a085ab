"""Evals: one seam for every eval a run or `python -m jaxsft.evaluate` scores.

    evals = from_config(config.eval)          # [Eval]: files read and validated, at start
    for ev in evals:
        metrics, rows = ev.run(model, tokenizer, Options(...))
        ev.headline(metrics)                   # {"golden_score": ...}: metrics.jsonl, summary

The kinds, in the order they run (config key eval.NAME, CLI flag --NAME):
golden (golden.py: generation, scored against expected answers; abstention on unanswerable
rows), mc (mc.py: multiple choice by log-likelihood, with calibration), ifeval (ifeval.py:
verifiable instructions), safety (safety.py: refusal and over-refusal). base.py holds the seam,
sample.py the KV-cache generation, cli.py the evaluate command.
"""

from jaxsft.evals import golden, ifeval, mc, safety
from jaxsft.evals.base import Eval, Kind, Options
from jaxsft.evals.golden import golden_eval, load_golden
from jaxsft.evals.mc import load_mc, mc_eval

KINDS = {k.name: k for k in (golden.KIND, mc.KIND, ifeval.KIND, safety.KIND)}

__all__ = [
    "KINDS",
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
    return [
        load(name, eval_config[name], opts)
        for name in KINDS
        if name in eval_config and eval_config[name]
    ]


def options_from_config(eval_config) -> Options:
    return Options(
        max_new_tokens=int(eval_config.max_new_tokens), max_rows=int(eval_config.max_rows)
    )
