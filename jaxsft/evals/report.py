"""The before/after report of a run: report.md (before / after / delta per metric, the
regression verdict, the golden rows that changed the most) and evals.png (one bar pair per
metric beside the loss curve).

A regression is a general-capability metric (each Kind's `general` keys: mc_accuracy, the
IFEval accuracies) that fell by more than eval.max_regression (0 disables the check). It is
advice: the verdict opens the summary and report.md; the run still exits 0.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from collections.abc import Sequence

from jaxsft.errors import WriteFailed

ROWS_SHOWN = 5
REPORT_MD = "report.md"
EVALS_PNG = "evals.png"


def before_file(name: str) -> str:
    """The per-row results of eval `name` before training (golden_before.json, ...)."""
    return f"{name}_before.json"


def after_file(name: str) -> str:
    """The per-row results of eval `name` after training (golden_after.json, ...)."""
    return f"{name}_after.json"


def general_metrics() -> list[str]:
    from jaxsft.evals import KINDS

    return [f"{k.name}_{key}" for k in KINDS.values() for key in k.general]


def regressions(before: dict, after: dict, max_drop: float) -> list[dict]:
    """[{metric, before, after, drop}] of the general-capability metrics that fell by more
    than max_drop (none when max_drop <= 0)."""
    if max_drop <= 0:
        return []
    out = []
    for key in general_metrics():
        b, a = before.get(key), after.get(key)
        if isinstance(b, (int, float)) and isinstance(a, (int, float)) and b - a > max_drop:
            out.append({"metric": key, "before": b, "after": a, "drop": b - a})
    return out


def verdict(found: Sequence[dict], max_drop: float) -> str:
    """One line: which general-capability metrics regressed, or that none did."""
    if max_drop <= 0:
        return "regression check off (eval.max_regression = 0)"
    if not found:
        return f"no general-capability metric fell by more than {max_drop:g}"
    parts = [f"{r['metric']} {r['before']:.4f} -> {r['after']:.4f}" for r in found]
    return f"REGRESSION (drop > eval.max_regression {max_drop:g}): " + ", ".join(parts)


def changed_rows(before_rows: Sequence[dict], after_rows: Sequence[dict]) -> list[dict]:
    """The golden rows that changed the most: pass flips first, then the largest change of
    output text (1 - difflib ratio); at most ROWS_SHOWN, unchanged rows left out."""
    scored = []
    for b, a in zip(before_rows, after_rows, strict=False):
        change = 1.0 - difflib.SequenceMatcher(None, b["output"], a["output"]).ratio()
        flipped = b["pass"] != a["pass"]
        if flipped or change > 0:
            scored.append((flipped, change, b, a))
    scored.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [
        {
            "line": a.get("line"),
            "prompt": a["prompt"],
            "expected": a["expected"],
            "before": b["output"],
            "after": a["output"],
            "before_pass": b["pass"],
            "after_pass": a["pass"],
        }
        for _, _, b, a in scored[:ROWS_SHOWN]
    ]


def markdown(summary: dict, golden_before=None, golden_after=None) -> str:
    """report.md: the verdict, the before/after/delta table, the golden rows that changed."""
    before, after = summary.get("before", {}), summary.get("after", {})
    lines = [
        f"# Evaluation before and after training (step {summary.get('step')})",
        "",
        summary.get("verdict", ""),
        "",
        "| metric | before | after | delta |",
        "|---|---|---|---|",
    ]
    for key in dict.fromkeys([*after, *before]):
        b, a = before.get(key), after.get(key)
        delta = f"{a - b:+.4f}" if b is not None and a is not None else "-"
        lines.append(f"| {key} | {_fmt(b)} | {_fmt(a)} | {delta} |")
    rows = changed_rows(golden_before or [], golden_after or [])
    if rows:
        lines += ["", f"## Golden rows that changed the most ({len(rows)})", ""]
        for r in rows:
            mark = f"{'pass' if r['before_pass'] else 'fail'} -> "
            mark += "pass" if r["after_pass"] else "fail"
            lines.append(f"- line {r['line']} ({mark}): {_quote(r['prompt'])}")
            lines.append(f"  expected {_quote(r['expected'])}")
            lines.append(f"  before {_quote(r['before'])}; after {_quote(r['after'])}")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _quote(text, limit: int = 120) -> str:
    text = " ".join(str(text).split())
    return "`" + (text if len(text) <= limit else text[: limit - 3] + "...") + "`"


def plot(summary: dict, loss_rows: Sequence[dict], out_png: str) -> None:
    """evals.png: before vs after, one bar pair per metric (left), the loss curve (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after = summary.get("before", {}), summary.get("after", {})
    keys = [k for k in dict.fromkeys([*after, *before]) if k != "eval_loss"]
    fig, (bars, curve) = plt.subplots(1, 2, figsize=(13, 4.5))
    xs = range(len(keys))
    bars.bar([x - 0.2 for x in xs], [before.get(k) or 0.0 for k in keys], 0.4, label="before")
    bars.bar([x + 0.2 for x in xs], [after.get(k) or 0.0 for k in keys], 0.4, label="after")
    bars.set_xticks(list(xs), keys, rotation=45, ha="right", fontsize=8)
    bars.set_title("evals before vs after")
    bars.legend()
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        pts = [(r["step"], r[key]) for r in loss_rows if isinstance(r.get(key), (int, float))]
        if pts:
            curve.plot(*zip(*pts, strict=True), style, label=key)
    curve.set_xlabel("step")
    curve.set_title("loss")
    curve.legend()
    curve.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, out_png)
    plt.close(fig)


def _save(fig, out_png: str) -> None:
    """Write the figure whole, then rename it into place (a failed write is WriteFailed)."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out_png)), suffix=".png")
        os.close(fd)
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, out_png)
    except OSError as e:
        raise WriteFailed(f"cannot write the plot: {e.strerror or e}", where=out_png) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
