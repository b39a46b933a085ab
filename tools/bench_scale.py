#!/usr/bin/env python3
"""Start-up time and host memory of a training run as the data grows: for each size N
(synthetic conversations, tools/make_synthetic_data.py), `python -m jaxsft.main` twice on a
tiny Llama, cold (no data cache: it renders and writes one) and warm (a new run_dir, the same
data.cache_dir: it loads the cache). Prints a table and BENCH_SCALE {json}.

    python tools/bench_scale.py [--sizes 10000,100000,1000000] [--work /tmp/bench_scale]

Per run: seconds from launch to the first logged step (log_every=1, so step 1's row is written
once step 1 has run; it includes importing jax; the step's compile comes from a persistent
compilation cache that a priming run filled, as on a pod that restarts), peak RSS of the process
(getrusage via os.wait4), and over steps 2.. the mean step time and the mean host time per
step spent in the data iterator (metrics.jsonl `data_wait_s`). The model is 2 layers of width
128 with max_length 1024 and 8 packed rows a step, so the step is short and any data stall
would show. A warm start of a pod host is the warm column: it reads only the cache's index
(lengths and sources) and the examples of its own rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]

CONFIG = """
from jaxsft.configs import base


def get_config():
    c = base.get_config()
    c.model.path = {model!r}
    c.model.dtype = "float32"
    c.data.train = {train!r}
    c.data.max_length = 1024
    c.data.cache_dir = {cache!r}
    c.data.workers = {workers}
    c.train.batch_size = 8
    c.train.max_steps = {steps}
    c.train.log_every = 1
    c.train.eval_every = 0
    c.train.save_every = 0
    c.train.eval_at_start = False
    c.export.format = "none"
    return c
"""


def make_assets(work: str) -> str:
    """A byte-level BPE tokenizer trained on synthetic text and a random tiny Llama that
    takes 1024 tokens (made once)."""
    model = os.path.join(work, "model")
    if os.path.exists(os.path.join(model, "model.safetensors")):
        return model
    import random

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import make_synthetic_data as syn

    from jaxsft import demo

    os.makedirs(model, exist_ok=True)
    rng = random.Random(0)
    corpus = [syn.paragraph(rng, 1, 8) for _ in range(3000)]
    tok = demo.make_tokenizer(model, corpus, vocab_size=2048)
    demo.make_model(model, tok, shape={**demo.MODEL, "max_position_embeddings": 1024})
    return model


def make_data(work: str, n: int) -> str:
    path = os.path.join(work, f"train_{n}.jsonl")
    if not os.path.exists(path):
        tmp = path + ".tmp"
        cmd = [sys.executable, os.path.join(ROOT, "tools", "make_synthetic_data.py")]
        subprocess.run([*cmd, "--out", tmp, "--n", str(n)], check=True)
        os.rename(tmp, path)
    return path


def run(
    work: str,
    name: str,
    model: str,
    train: str,
    cache: str,
    steps: int,
    workers: int,
    data_only: bool = False,
):
    """One subprocess: `jaxsft.main` (data_only=False) or only the data path of its start
    (config, tokenizer, build_datasets with its cache, the iterator, 3 batches)."""
    run_dir = os.path.join(work, "runs", name)
    if os.path.exists(run_dir):
        import shutil

        shutil.rmtree(run_dir)
    cfg = os.path.join(work, f"{name}.py")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(model=model, train=train, cache=cache, workers=workers, steps=steps))
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT,
        HF_HUB_OFFLINE="1",
        # every run reuses the step the priming run compiled: what is timed is the data
        JAX_COMPILATION_CACHE_DIR=os.path.join(work, "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )
    argv = [sys.executable, "-m", "jaxsft.main", "--config", cfg, f"--config.run_dir={run_dir}"]
    if data_only:
        argv = [sys.executable, os.path.abspath(__file__), "--child-data", cfg, run_dir]
    log = open(os.path.join(work, f"{name}.log"), "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    metrics, first = os.path.join(run_dir, "metrics.jsonl"), None
    while True:  # os.wait4, not proc.poll: it also returns the child's own resource usage
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if first is None and os.path.exists(metrics) and '"loss"' in open(metrics).read():
            first = time.perf_counter() - t0
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    log.close()
    if proc.returncode:
        raise SystemExit(f"{name} failed ({proc.returncode}): see {log.name}")
    rss = round(usage.ru_maxrss / 1024, 1)  # ru_maxrss: KiB on Linux
    if data_only:
        with open(os.path.join(work, f"{name}.log")) as f:
            (line,) = [x for x in f if x.startswith("DATA ")]
        return {**json.loads(line[5:]), "peak_rss_mib": rss}
    from jaxsft.metrics import read_rows

    rows = [r for r in read_rows(metrics) if "loss" in r]
    later = rows[1:] or rows
    return {
        "first_step_s": round(first if first is not None else wall, 2),
        "wall_s": round(wall, 2),
        "peak_rss_mib": rss,
        "step_time_s": round(sum(r["step_time_s"] for r in later) / len(later), 4),
        "data_wait_s": round(sum(r["data_wait_s"] for r in later) / len(later), 5),
    }


def child_data(cfg: str, run_dir: str) -> None:
    """--child-data: the data path of a start, timed: DATA {"data_s", "first_batches_s"}."""
    t0 = time.perf_counter()
    from jaxsft import config as config_lib
    from jaxsft.data import pipeline
    from jaxsft.tokenizer import load_tokenizer

    c = config_lib.load(cfg, [f"--config.run_dir={run_dir}"])
    tok = load_tokenizer(c.model.path)
    data = pipeline.build_datasets(c, tok)
    pipeline.save_cache(data)
    steps = pipeline.steps_per_epoch(data, c)
    it = pipeline.train_iterator(data, c, process_index=0, process_count=1)
    t1 = time.perf_counter()
    for _ in range(3):
        next(it)
    t2 = time.perf_counter()
    out = {"data_s": round(t1 - t0, 2), "first_batches_s": round(t2 - t1, 3), "steps": steps}
    print("DATA " + json.dumps(out), flush=True)


def main():
    if sys.argv[1:2] == ["--child-data"]:
        return child_data(*sys.argv[2:4])
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--work", default="/tmp/bench_scale")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--max-cold-train", type=int, default=100_000)
    ap.add_argument(
        "--keep-cache", action="store_true", help="measure warm starts on an existing cache"
    )
    args = ap.parse_args()
    # --work is this tool's: it deletes the runs and caches it made there between runs, so a
    # directory it did not create (no marker file) is refused
    marker = os.path.join(args.work, ".bench_scale")
    if os.path.exists(args.work) and os.listdir(args.work) and not os.path.exists(marker):
        ap.error(f"--work {args.work} exists and was not made by this tool; name a new one")
    os.makedirs(args.work, exist_ok=True)
    open(marker, "a").close()
    model = make_assets(args.work)
    # a priming run fills the persistent compilation cache (the shapes are the same for
    # every size), as a pod's restarts have it; its own numbers are not reported
    prime = make_data(args.work, 2000)
    run(args.work, "prime", model, prime, os.path.join(args.work, "cache_prime"), args.steps, 1)
    results = []
    for n in [int(x) for x in args.sizes.split(",")]:
        train = make_data(args.work, n)
        cache = os.path.join(args.work, f"cache_{n}")
        if os.path.exists(cache) and not args.keep_cache:
            import shutil

            shutil.rmtree(cache)
        row = {"examples": n, "file_mib": round(os.path.getsize(train) / 2**20, 1)}
        # the data path alone, cold (renders and writes the cache) then warm (loads it)
        for kind in ("warm",) if args.keep_cache else ("cold", "warm"):
            name = f"data_{kind}_{n}"
            r = run(args.work, name, model, train, cache, 1, args.workers, data_only=True)
            row.update({f"data_{kind}_{k}": v for k, v in r.items()})
            print(f"{n} {name}: {r}", flush=True)
        # whole starts to the first step: warm on that cache; cold on a fresh one (skipped
        # above --max-cold-train examples: the data path above shows the cold cost)
        kinds = [("warm", cache)]
        if n <= args.max_cold_train:
            kinds.insert(0, ("cold", cache + "_cold"))
        for kind, where in kinds:
            if os.path.exists(where) and where != cache:
                import shutil

                shutil.rmtree(where)
            r = run(args.work, f"{kind}_{n}", model, train, where, args.steps, args.workers)
            row.update({f"{kind}_{k}": v for k, v in r.items()})
            print(f"{n} {kind}: {r}", flush=True)
        with open(os.path.join(args.work, f"warm_{n}.log")) as f:  # the cache it loaded
            key = f.read().split("(key ", 1)[1].split(")", 1)[0]
        idx = [f for f in os.listdir(os.path.join(cache, key)) if f.endswith(".npy")]
        row["cache_mib"] = round(_du(os.path.join(cache, key)) / 2**20, 1)
        row["index_mib"] = round(sum(_du(os.path.join(cache, key, f)) for f in idx) / 2**20, 2)
        if "cold_first_step_s" in row:
            row["warm_over_cold"] = round(row["warm_first_step_s"] / row["cold_first_step_s"], 3)
        if "data_cold_data_s" in row:
            cold = row["data_cold_data_s"]
            row["data_warm_over_cold"] = round(row["data_warm_data_s"] / cold, 3)
        results.append(row)
    cols = [
        ("examples", "examples"),
        ("data_cold_data_s", "data cold s"),
        ("data_warm_data_s", "data warm s"),
        ("data_warm_over_cold", "data warm/cold"),
        ("data_cold_peak_rss_mib", "data cold RSS MiB"),
        ("data_warm_peak_rss_mib", "data warm RSS MiB"),
        ("cold_first_step_s", "cold: first step s"),
        ("warm_first_step_s", "warm: first step s"),
        ("warm_over_cold", "warm/cold"),
        ("cold_peak_rss_mib", "cold peak RSS MiB"),
        ("warm_peak_rss_mib", "warm peak RSS MiB"),
        ("warm_data_wait_s", "warm data wait s/step"),
        ("warm_step_time_s", "warm step s"),
        ("cache_mib", "cache MiB"),
        ("index_mib", "index MiB"),
    ]
    print("| " + " | ".join(h for _, h in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r.get(k, "-")) for k, _ in cols) + " |")
    print("BENCH_SCALE " + json.dumps(results))


def _du(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


if __name__ == "__main__":
    main()
