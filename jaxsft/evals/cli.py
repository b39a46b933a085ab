"""Evaluate an HF checkpoint directory, or a file of responses, on any of the evals.

    python -m jaxsft.evaluate --model DIR [--golden F] [--mc F] [--ifeval F] [--safety F]
                              [--out FILE] [--compare BASE_DIR] [--max-new-tokens N]
                              [--NAME-max-new-tokens N] [--judge JUDGE_DIR] ...
    python -m jaxsft.evaluate --responses RESPONSES.jsonl --ifeval F [--golden F] [--safety F]

With --compare, the base directory is scored too (first, then freed) and the report pairs
every row: base and tuned output, pass/fail each. With --responses ({"prompt", "response"} a
line) no model is loaded (but the --judge, if any): the generation evals score those
responses, matched by prompt.
--NAME-max-new-tokens (golden, ifeval, safety, judge) default as eval.NAME_max_new_tokens in
configs/base.py (IFEval 512); 0 means --max-new-tokens. --judge names a local HF checkpoint
that judges the safety replies (jaxsft/evals/safety.py).
The report is JSON (--out) plus a short Markdown table, printed and saved next to it (same
name, .md). Formats and metrics: the modules of jaxsft/evals/ and docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

from jaxsft import evals as evals_lib
from jaxsft.errors import UserError, run_cli
from jaxsft.evals import base
from jaxsft.evals.golden import METRICS

HELP = {
    "golden": "golden JSONL: messages + expected (+ metric, options)",
    "mc": "multiple-choice JSONL: question, choices, answer (+ subject)",
    "ifeval": "IFEval JSONL: key, prompt, instruction_id_list, kwargs",
    "safety": "AdvBench goal,target CSV; XSTest prompt,type,label CSV; or JSONL prompt, label",
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m jaxsft.evaluate",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", help="HF checkpoint directory to evaluate")
    for name in evals_lib.KINDS:
        ap.add_argument(f"--{name}", metavar="FILE", help=HELP.get(name))
    ap.add_argument("--responses", metavar="FILE", help="score these {prompt, response} rows")
    ap.add_argument("--compare", metavar="BASE_DIR", help="also evaluate this (base) checkpoint")
    ap.add_argument("--out", help="report JSON path (the Markdown table goes next to it as .md)")
    defaults = base_eval_config()
    ap.add_argument("--max-new-tokens", type=int, default=int(defaults.max_new_tokens))
    for name in evals_lib.TOKEN_BUDGETS:
        ap.add_argument(
            f"--{name}-max-new-tokens",
            type=int,
            default=int(defaults[f"{name}_max_new_tokens"]),
            metavar="N",
            help=f"new tokens per {name} reply (0: --max-new-tokens)",
        )
    ap.add_argument("--judge", metavar="JUDGE_DIR", default="", help="safety judge checkpoint")
    ap.add_argument(
        "--metric", default="exact", choices=METRICS, help="metric of golden rows that name none"
    )
    ap.add_argument(
        "--mc-style",
        default="letter",
        choices=("letter", "text"),
        help="score ' A'/' B'.. after 'Answer:' (letter) or the choice text",
    )
    ap.add_argument("--max-rows", type=int, default=0, help="first N rows of each file (0: all)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="weights and compute dtype",
    )
    args = ap.parse_args(argv)
    _check_args(ap, args)
    return args


def _check_args(ap, args) -> None:
    if not any(getattr(args, name) for name in evals_lib.KINDS):
        ap.error("give at least one of " + ", ".join(f"--{n} FILE" for n in evals_lib.KINDS))
    if bool(args.model) == bool(args.responses):
        ap.error("give --model DIR (generate and score) or --responses FILE (score only)")
    if args.responses and (args.compare or args.mc):
        ap.error("--responses scores text: --compare and --mc need a model")
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be >= 1")
    if any(budget(args, n) < 0 for n in evals_lib.TOKEN_BUDGETS):
        ap.error("--NAME-max-new-tokens must be >= 0")


def base_eval_config():
    """The `eval` group of configs/base.py: the CLI's defaults are a run's defaults."""
    from jaxsft.configs import base as base_config

    return base_config.get_config().eval


def budget(args, name: str) -> int:
    return getattr(args, f"{name}_max_new_tokens")


def options(args) -> base.Options:
    return base.Options(
        max_new_tokens=args.max_new_tokens,
        max_rows=args.max_rows,
        batch_size=args.batch_size,
        metric=args.metric,
        mc_style=args.mc_style,
        max_new_tokens_by={n: budget(args, n) for n in evals_lib.TOKEN_BUDGETS},
        judge=args.judge,
        judge_dtype=args.dtype,
    )


def load_evals(args, opts: base.Options) -> list[base.Eval]:
    """Every eval named on the command line, read and validated (before any model loads)."""
    base.check_judge(opts.judge)
    return [
        evals_lib.load(name, getattr(args, name), opts)
        for name in evals_lib.KINDS
        if getattr(args, name)
    ]


def evaluate_dir(path: str, evals, opts: base.Options, dtype="float32") -> dict:
    """Load one checkpoint directory (weights + tokenizer) and run the evals on it ->
    {name: (metrics, rows)}."""
    import dataclasses

    import jaxsft
    from jaxsft.tokenizer import load_tokenizer

    if not os.path.isdir(path):
        raise UserError("model directory not found", where=path)
    tokenizer = load_tokenizer(path)
    model, _ = jaxsft.load_hf(path, dtype=dtype, param_dtype=dtype)
    opts = dataclasses.replace(opts, eos_ids=tuple(generation_eos(path)))
    out = {ev.name: ev.run(model, tokenizer, opts) for ev in evals}
    del model
    gc.collect()
    return out


def score_responses(path: str, evals, opts: base.Options) -> dict:
    """{name: (metrics, rows)} of the responses file, for the generation evals (the safety
    replies judged by opts.judge when there is one)."""
    responses = base.load_responses(path)
    out = {}
    for ev in evals:
        replies = base.replies_for(ev, responses, path)
        out[ev.name] = ev.score(replies, ev.judge(ev.rows, replies, opts))
    return out


def generation_eos(path: str) -> list[int]:
    """Extra eos ids from generation_config.json (Qwen and Llama list more there)."""
    f = os.path.join(path, "generation_config.json")
    try:
        with open(f) as fh:
            eos = json.load(fh).get("eos_token_id")
    except (OSError, json.JSONDecodeError, AttributeError):
        return []
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def build_report(args, evals, tuned: dict, base_results: dict | None) -> dict:
    """{"model", "base", "responses", "files", "options", NAME: section} where a section is
    the eval's metrics and its rows (with base_METRIC and base_FIELD under --compare)."""
    report = {"model": args.model, "base": args.compare, "responses": args.responses}
    report["files"] = {ev.name: ev.path for ev in evals}
    report["options"] = {
        "max_new_tokens": args.max_new_tokens,
        **{f"{n}_max_new_tokens": budget(args, n) for n in evals_lib.TOKEN_BUDGETS},
        "judge": args.judge or None,
        "default_metric": args.metric,
        "mc_style": args.mc_style,
    }
    for ev in evals:
        metrics, rows = tuned[ev.name]
        b = base_results and base_results[ev.name]
        report[ev.name] = section(ev.kind, metrics, rows, b)
    return report


def section(kind: base.Kind, metrics: dict, rows: list, base_result=None) -> dict:
    out = dict(metrics)
    rows = [dict(r) for r in rows]
    if base_result:
        base_metrics, base_rows = base_result
        out.update({f"base_{k}": v for k, v in base_metrics.items()})
        for r, br in zip(rows, base_rows, strict=True):
            r.update({f"base_{k}": br[k] for k in kind.pair})
        if kind.verdict:
            v = kind.verdict
            out["fixed"] = sum(r[v] and not r[f"base_{v}"] for r in rows)
            out["broken"] = sum(r[f"base_{v}"] and not r[v] for r in rows)
    out["rows"] = rows
    return out


def markdown(report: dict) -> str:
    """A short table: one line per headline metric (and breakdown), base / tuned / change."""
    compare = report.get("base") is not None
    head = (
        ["| eval | base | tuned | change |", "|---|---|---|---|"]
        if compare
        else ["| eval | score |", "|---|---|"]
    )
    lines, notes = [], []
    for name, path in report["files"].items():
        kind, sec = evals_lib.KINDS[name], report[name]
        for label, tuned, base_value in table_rows(kind, sec, os.path.basename(path)):
            if compare and base_value is not None:
                change = tuned - base_value
                lines.append(f"| {label} | {base_value:.3f} | {tuned:.3f} | {change:+.3f} |")
            elif compare:
                lines.append(f"| {label} | - | {tuned:.3f} | - |")
            else:
                lines.append(f"| {label} | {tuned:.3f} |")
        if compare and "fixed" in sec:
            notes.append(f"{name} rows fixed by tuning: {sec['fixed']}, broken: {sec['broken']}.")
    who = report["model"] or f"responses {report['responses']}"
    title = f"Evaluation of {who}" + (f" against {report['base']}" if compare else "")
    text = "\n".join([f"### {title}", "", *head, *lines])
    if notes:
        text += "\n\n" + "\n".join(notes)
    return text + "\n"


def table_rows(kind: base.Kind, sec: dict, file: str) -> list[tuple[str, float, float | None]]:
    """(label, tuned, base or None) for each headline metric of a report section, then the
    golden per-metric and MC per-subject breakdowns."""
    n = len(sec["rows"])
    out = [
        (f"{kind.labels.get(k, f'{kind.name} {k}')} ({file}, n={n})", sec[k], sec.get(f"base_{k}"))
        for k in kind.keys
        if k in sec
    ]
    by_metric = sec.get("by_metric") or {}
    if len(by_metric) > 1:
        base_by = sec.get("base_by_metric") or {}
        out += [(f"golden: {k}", v, base_by.get(k)) for k, v in by_metric.items()]
    base_subjects = sec.get("base_subjects") or {}
    for s, v in (sec.get("subjects") or {}).items():
        b = base_subjects.get(s, {}).get("accuracy")
        out.append((f"mc: {s} (n={v['n']})", v["accuracy"], b))
    return out


@run_cli
def main(argv=None) -> int:
    args = parse_args(argv)
    opts = options(args)
    # Read and validate every input before loading a model: a bad row fails in a second.
    evals = load_evals(args, opts)
    if args.out and os.path.isdir(args.out):
        raise UserError(
            "--out is a directory", where=args.out, hint="give a file, e.g. DIR/eval.json"
        )
    if args.responses:
        base_results, tuned = None, score_responses(args.responses, evals, opts)
    else:
        base_results = evaluate_dir(args.compare, evals, opts, args.dtype) if args.compare else None
        tuned = evaluate_dir(args.model, evals, opts, args.dtype)
    report = build_report(args, evals, tuned, base_results)
    table = markdown(report)
    print(table)
    if args.out:
        md_path = write_report(args.out, report, table)
        print(f"report: {args.out}, {md_path}", file=sys.stderr)
    return 0


def write_report(path: str, report: dict, table: str) -> str:
    """Write the JSON report to path and the Markdown table next to it; return the .md path."""
    md_path = os.path.splitext(path)[0] + ".md"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
        with open(md_path, "w") as f:
            f.write(table)
    except OSError as e:
        raise UserError(
            f"cannot write the report: {e.strerror or e}", where=e.filename or path
        ) from None
    return md_path


if __name__ == "__main__":
    sys.exit(main())
