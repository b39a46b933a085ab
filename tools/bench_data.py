#!/usr/bin/env python3
"""Rendering and data-cache timings: examples/s with 1 and 2 render workers, cold (render +
report + cache write) and warm (cache load) build_datasets, on tools/make_synthetic_data.py
output. Prints a table and BENCH_DATA {json}.

    python tools/bench_data.py [--n 10000] [--workers 1,2] [--templates chatml,llama3]
        [--on-invalid skip]   (Gemma's templates refuse the synthetic tool turns)

Tokenizers are the test fixtures' (tests/tokenizers_fixture.py: small BPE vocabularies with
the real templates of each family), or --model DIR for a real checkpoint's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def config(train: str, cache_dir: str, workers: int, on_invalid: str):
    from jaxsft.configs.base import get_config

    c = get_config()
    c.data.on_invalid = on_invalid
    c.run_dir = os.path.join(cache_dir, "run")
    c.data.train, c.data.max_length, c.data.cache_dir = train, 1024, cache_dir
    c.data.workers = workers
    return c


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def bench(tok, name: str, train: str, workers: list[int], tmp: str, on_invalid: str) -> list[dict]:
    from jaxsft.data import cache_key, pipeline, splits

    splits.MIN_TASKS_PER_WORKER = 1  # measure the workers even where they do not pay off
    rows = []
    for w in workers:
        cache_dir = os.path.join(tmp, f"cache_{name}_{w}")
        c = config(train, cache_dir, w, on_invalid)
        opts = pipeline._render_options(c.data)
        (ex, _), render_s = timed(splits.load_split, train, tok, 1024, opts, 0, w)
        _, key_s = timed(cache_key.components, c, tok, opts)
        cold, cold_s = timed(pipeline.build_datasets, c, tok)
        warm, warm_s = timed(pipeline.build_datasets, c, tok)
        assert len(warm.train) == len(cold.train) == len(ex)
        size = sum(
            os.path.getsize(os.path.join(cold.cache.path, f)) for f in os.listdir(cold.cache.path)
        )
        rows.append(
            {
                "template": name,
                "workers": w,
                "examples": len(ex),
                "dropped": cold.report["train"]["dropped"]["count"],
                "tokens": int(ex.lengths.sum()),
                "render_s": round(render_s, 2),
                "render_examples_per_s": round(len(ex) / render_s),
                "key_s": round(key_s, 3),
                "cold_build_s": round(cold_s, 2),
                "warm_build_s": round(warm_s, 2),
                "warm_over_cold": round(warm_s / cold_s, 3),
                "cache_mb": round(size / 1e6, 1),
            }
        )
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--templates", default="chatml")
    ap.add_argument("--model", default="", help="a checkpoint dir whose tokenizer to use")
    ap.add_argument("--on-invalid", default="error", choices=["error", "skip"])
    args = ap.parse_args()
    workers = [int(x) for x in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        train = os.path.join(tmp, "train.jsonl")
        subprocess.run(
            [sys.executable, os.path.join(ROOT, "tools", "make_synthetic_data.py")]
            + ["--out", train, "--n", str(args.n), "--seed", "0"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        if args.model:
            from jaxsft.tokenizer import load_tokenizer

            toks = {os.path.basename(args.model.rstrip("/")): load_tokenizer(args.model)}
        else:
            from tokenizers_fixture import make_tokenizer

            toks = {t: make_tokenizer(t, tmp) for t in args.templates.split(",")}
        rows = []
        for name, tok in toks.items():
            rows += bench(tok, name, train, workers, tmp, args.on_invalid)
    cols = list(rows[0])
    print("\n" + " | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[k]) for k in cols))
    print("BENCH_DATA " + json.dumps(rows))


if __name__ == "__main__":
    main()
