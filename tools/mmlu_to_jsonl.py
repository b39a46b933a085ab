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
A row that does not convert (too few columns, an answer that is not a choice's letter) stops
the command with `error: FILE:LINE: ...` and exit code 2; --out is written only when every
row converted.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys

from jaxsft.errors import UserError, run_cli

LETTERS = "ABCDEFGHIJ"


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
        reader = csv.reader(f)
        for rec in reader:
            where = f"{path}:{reader.line_num}"
            if not rec:
                continue
            if len(rec) < 4:
                raise UserError(
                    f"{len(rec)} columns; want question, 2+ choices, answer letter", where=where
                )
            *choices, letter = rec[1:]
            letter = letter.strip().upper()
            if len(letter) != 1 or letter not in LETTERS[: len(choices)]:
                raise UserError(
                    f"answer letter must be one of {LETTERS[: len(choices)]}, got {rec[-1]!r}",
                    where=where,
                )
            yield {
                "question": rec[0],
                "choices": choices,
                "answer": LETTERS.index(letter),
                "subject": subject,
            }


def read_rows(src: str) -> list[dict]:
    """Every row of the Parquet and CSV files of `src` (a file or a directory)."""
    paths = files_of(src, ".parquet") + files_of(src, ".csv")
    if not paths:
        raise UserError("no .parquet or .csv files", where=src)
    return [
        row for p in paths for row in (from_parquet(p) if p.endswith(".parquet") else from_csv(p))
    ]


@run_cli
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", nargs="+", help="parquet/csv files or directories")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows = [row for src in args.src for row in read_rows(src)]
    tmp = f"{args.out}.tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(tmp, args.out)
    print(f"{len(rows)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
