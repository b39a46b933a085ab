"""Evaluate an HF checkpoint directory: golden-set generation and multiple-choice log-likelihood.

    python -m jaxsft.evaluate --model DIR --golden FILE [--out FILE] [--compare BASE_DIR]
                              [--mc FILE] [--max-new-tokens N] [--metric exact]

With --compare, the base directory is scored too (first, then freed) and the report pairs
every row: prompt, expected, base output, tuned output, pass/fail each. The report is JSON
(--out) plus a short Markdown table, printed and saved next to it (same name, .md).
Formats and metrics: jaxsft/golden.py (golden rows) and jaxsft/mc.py (multiple choice);
the workflow: docs/evaluation.md.

Functions the trainer calls during a run (model and tokenizer already loaded):
    rows = load_golden(path, metric="exact", max_rows=0)
    golden_eval(model, tokenizer, rows, max_new_tokens=64) -> {"score", "rows", ...}
    mc_rows = load_mc(path, max_rows=0)
    mc_eval(model, tokenizer, mc_rows) -> {"accuracy", "accuracy_mean", "subjects", "rows", ...}
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

from jaxsft.errors import UserError, run_cli
from jaxsft.golden import METRICS, golden_eval, load_golden, normalize, score_reply
from jaxsft.mc import load_mc, mc_eval

__all__ = [
    "golden_eval",
    "load_golden",
    "mc_eval",
    "load_mc",
    "normalize",
    "score_reply",
    "evaluate_dir",
    "main",
]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m jaxsft.evaluate",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--model", required=True, help="HF checkpoint directory to evaluate")
    ap.add_argument("--golden", help="golden JSONL: messages + expected (+ metric, options)")
    ap.add_argument("--mc", help="multiple-choice JSONL: question, choices, answer (+ subject)")
    ap.add_argument("--compare", metavar="BASE_DIR", help="also evaluate this (base) checkpoint")
    ap.add_argument("--out", help="report JSON path (the Markdown table goes next to it as .md)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
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
    if not args.golden and not args.mc:
        ap.error("give --golden FILE and/or --mc FILE")
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be >= 1")
    return args


def evaluate_dir(
    path: str,
    golden_rows=None,
    mc_rows=None,
    *,
    max_new_tokens=64,
    mc_style="letter",
    batch_size=8,
    dtype="float32",
) -> dict:
    """Load one checkpoint directory (weights + tokenizer) and run the given evals on it."""
    import jaxsft
    from jaxsft.tokenizer import load_tokenizer

    if not os.path.isdir(path):
        raise UserError("model directory not found", where=path)
    tokenizer = load_tokenizer(path)
    model, _ = jaxsft.load_hf(path, dtype=dtype, param_dtype=dtype)
    out = {}
    if golden_rows:
        out["golden"] = golden_eval(
            model,
            tokenizer,
            golden_rows,
            max_new_tokens,
            batch_size=batch_size,
            eos_ids=generation_eos(path),
        )
    if mc_rows:
        out["mc"] = mc_eval(model, tokenizer, mc_rows, style=mc_style, batch_size=batch_size)
    del model
    gc.collect()
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


def build_report(args, tuned: dict, base: dict | None) -> dict:
    report = {"model": args.model, "base": args.compare}
    if "golden" in tuned:
        g = tuned["golden"]
        section = {
            "file": args.golden,
            "default_metric": args.metric,
            "max_new_tokens": args.max_new_tokens,
            "n": g["n"],
            "score": g["score"],
            "by_metric": g["by_metric"],
        }
        rows = _paired_rows(g, base and base["golden"], ("output", "pass"))
        if base:
            b = base["golden"]
            section.update(base_score=b["score"], base_by_metric=b["by_metric"])
            section["fixed"] = sum(r["pass"] and not r["base_pass"] for r in rows)
            section["broken"] = sum(r["base_pass"] and not r["pass"] for r in rows)
        section["rows"] = rows
        report["golden"] = section
    if "mc" in tuned:
        m = tuned["mc"]
        section = {k: m[k] for k in ("accuracy", "accuracy_mean", "n", "style", "subjects")}
        section["file"] = args.mc
        if base:
            b = base["mc"]
            section.update(
                base_accuracy=b["accuracy"],
                base_accuracy_mean=b["accuracy_mean"],
                base_subjects=b["subjects"],
            )
        section["rows"] = _paired_rows(m, base and base["mc"], ("pred", "correct"))
        report["mc"] = section
    return report


def _paired_rows(tuned: dict, base: dict | None, keys: tuple[str, ...]) -> list[dict]:
    """Copies of the tuned eval's rows, each with the base's value of every key as base_KEY."""
    rows = [dict(r) for r in tuned["rows"]]
    if base:
        for r, br in zip(rows, base["rows"], strict=True):
            r.update({f"base_{k}": br[k] for k in keys})
    return rows


def markdown(report: dict) -> str:
    """A short table: one line per eval (and per MC subject), base / tuned / change."""
    compare = report.get("base") is not None
    head = (
        ["| eval | base | tuned | change |", "|---|---|---|---|"]
        if compare
        else ["| eval | score |", "|---|---|"]
    )
    lines = []

    def add(name, tuned, base=None):
        if compare:
            lines.append(f"| {name} | {base:.3f} | {tuned:.3f} | {tuned - base:+.3f} |")
        else:
            lines.append(f"| {name} | {tuned:.3f} |")

    g = report.get("golden")
    if g:
        add(
            f"golden pass rate ({os.path.basename(g['file'])}, n={g['n']})",
            g["score"],
            g.get("base_score"),
        )
        if len(g["by_metric"]) > 1:
            for k, v in g["by_metric"].items():
                add(f"golden: {k}", v, (g.get("base_by_metric") or {}).get(k))
    m = report.get("mc")
    if m:
        add(
            f"multiple-choice accuracy ({os.path.basename(m['file'])}, n={m['n']})",
            m["accuracy"],
            m.get("base_accuracy"),
        )
        for s, v in m["subjects"].items():
            add(
                f"mc: {s} (n={v['n']})",
                v["accuracy"],
                (m.get("base_subjects") or {}).get(s, {}).get("accuracy"),
            )
    title = f"Evaluation of {report['model']}" + (f" against {report['base']}" if compare else "")
    text = "\n".join([f"### {title}", "", *head, *lines])
    if g and compare:
        text += f"\n\nGolden rows fixed by tuning: {g['fixed']}, broken: {g['broken']}."
    return text + "\n"


@run_cli
def main(argv=None) -> int:
    args = parse_args(argv)
    # Read and validate every input before loading a model: a bad row fails in a second.
    golden_rows = load_golden(args.golden, args.metric, args.max_rows) if args.golden else None
    mc_rows = load_mc(args.mc, args.max_rows) if args.mc else None
    if args.out and os.path.isdir(args.out):
        raise UserError(
            "--out is a directory", where=args.out, hint="give a file, e.g. DIR/eval.json"
        )
    kw = dict(
        max_new_tokens=args.max_new_tokens,
        mc_style=args.mc_style,
        batch_size=args.batch_size,
        dtype=args.dtype,
    )
    base = evaluate_dir(args.compare, golden_rows, mc_rows, **kw) if args.compare else None
    tuned = evaluate_dir(args.model, golden_rows, mc_rows, **kw)
    report = build_report(args, tuned, base)
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
