"""Merge local safety sets (AdvBench, XSTest, JSONL) into one JSONL for `eval.safety`.

    python tools/safety_to_jsonl.py harmful_behaviors.csv xstest_prompts.csv --out safety.jsonl

Each SRC is read as `eval.safety` reads it (jaxsft.evals.safety: AdvBench's goal,target CSV,
XSTest's prompt,type,label CSV, or JSONL {prompt, label}); each output line is
{"prompt", "label": "safe" | "unsafe", "type", "source"}. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jaxsft.errors import run_cli
from jaxsft.evals.safety import load_safety


def merged_rows(sources) -> list[dict]:
    return [
        {
            "prompt": r["prompt"],
            "label": r["label"],
            "type": r["type"],
            "source": os.path.basename(src),
        }
        for src in sources
        for r in load_safety(src)
    ]


@run_cli
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("sources", nargs="+", metavar="SRC")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows = merged_rows(args.sources)
    with open(args.out, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    unsafe = sum(r["label"] == "unsafe" for r in rows)
    print(f"wrote {len(rows)} rows ({unsafe} unsafe, {len(rows) - unsafe} safe) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
