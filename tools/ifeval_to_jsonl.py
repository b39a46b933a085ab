"""Convert the Parquet copy of IFEval's prompts (the `google/IFEval` dataset on the Hugging Face
hub) to the JSONL that `eval.ifeval` and `python -m jaxsft.evaluate --ifeval` read.

    python tools/ifeval_to_jsonl.py train-00000-of-00001.parquet --out ifeval.jsonl

SRC is a Parquet file or a directory of them with the columns `key`, `prompt`,
`instruction_id_list`, `kwargs` (a list of structs holding every argument name, null where an
instruction does not take it). The file is read with pyarrow, so integer arguments stay
integers (pandas turns a nullable integer column into floats: `num_words` 300.0, which the
loader refuses); null arguments are dropped. Each output line is {"key", "prompt",
"instruction_id_list", "kwargs"}, the layout of the google-research `input_data.jsonl`, which
needs no conversion. The rows are validated as the eval validates them (an unknown instruction
or a bad argument stops the command with `error: ...` and exit 2, naming the output row) and
--out is written only when all of them pass. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jaxsft.errors import UserError, run_cli
from jaxsft.evals.ifeval import load_ifeval


def files_of(src: str) -> list[str]:
    if os.path.isdir(src):
        return sorted(
            os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs if f.endswith(".parquet")
        )
    return [src] if src.endswith(".parquet") else []


def from_parquet(path: str):
    import pyarrow.parquet as pq

    for rec in pq.read_table(path).to_pylist():
        yield {
            "key": rec.get("key"),
            "prompt": rec.get("prompt"),
            "instruction_id_list": rec.get("instruction_id_list"),
            "kwargs": [
                {k: v for k, v in (kw or {}).items() if v is not None}
                for kw in rec.get("kwargs") or []
            ],
        }


@run_cli
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", nargs="+", help="parquet files or directories")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows = []
    for src in args.src:
        paths = files_of(src)
        if not paths:
            raise UserError("no .parquet files", where=src)
        rows += [row for p in paths for row in from_parquet(p)]
    tmp = f"{args.out}.tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    try:
        load_ifeval(tmp)  # the eval's own validation, before --out exists
    except UserError as e:
        os.remove(tmp)
        where = (e.where or tmp).replace(tmp, args.out)
        raise UserError(
            e.message, where=where, hint="line of the converted rows; not written"
        ) from None
    os.replace(tmp, args.out)
    print(f"{len(rows)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
