"""Convert a local copy of MMLU (or any benchmark of the same shape) to jaxsft's MC JSONL.

    python tools/mmlu_to_jsonl.py SRC [SRC ...] --out mmlu_test.jsonl

SRC may be:
- a Parquet file or a directory of them in the Hugging Face `cais/mmlu` layout: columns
  `question`, `choices` (list of strings), `answer` (index), `subject`;
- a CSV file or a directory of them in the original release layout (`data/test/*_test.csv`):
  no header, columns question, A, B, C, D, answer letter; the subject is the file name
  without the `_test`/`_val`/`_dev` suffix.
Each output line is {"question", "choices", "answer", "subject"}, the format of
`python -m jaxsft.evaluate --mc` and `eval.mc` (docs/evaluation.md). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys


def files_of(src: str, ext: str) -> list[str]:
    if os.path.isdir(src):
        return sorted(
            os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs if f.endswith(ext)
        )
    return [src] if src.endswith(ext) else []


def from_parquet(path: str):
    import pyarrow.parquet as pq

    for rec in pq.read_table(path).to_pylist():
        yield {
            "question": rec["question"],
            "choices": list(rec["choices"]),
            "answer": int(rec["answer"]),
            "subject": rec.get("subject") or "",
        }


def from_csv(path: str):
    subject = re.sub(r"_(test|val|dev)$", "", os.path.splitext(os.path.basename(path))[0])
    with open(path, newline="", encoding="utf-8") as f:
        for rec in csv.reader(f):
            if len(rec) < 6:
                continue
            *choices, letter = rec[1:]
            yield {
                "question": rec[0],
                "choices": choices,
                "answer": "ABCDEFGHIJ".index(letter.strip().upper()),
                "subject": subject,
            }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", nargs="+", help="parquet/csv files or directories")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    n = 0
    with open(args.out, "w", encoding="utf-8") as out:
        for src in args.src:
            readers = [from_parquet(p) for p in files_of(src, ".parquet")]
            readers += [from_csv(p) for p in files_of(src, ".csv")]
            if not readers:
                print(f"error: {src}: no .parquet or .csv files", file=sys.stderr)
                return 2
            for rows in readers:
                for row in rows:
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    n += 1
    print(f"{n} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
