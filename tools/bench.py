#!/usr/bin/env python3
"""jaxsft on the TRL benchmark assets: prints BENCH_RESULT {json} like trl_baseline.py.

    python tools/bench.py --assets ASSETS --config full_bf16_bfd [--config.KEY=VALUE ...]

Configs: {full,lora}_{fp32,bf16}_{pad,bfd}. Throughput is measured over steps 3..12 (steps 1-2,
compilation included, are excluded), from the per-step rows of metrics.jsonl:
non-pad tokens/s, supervised (loss) tokens/s, step time, MFU (docs/performance.md), peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def overrides(name: str, run_dir: str) -> list[str]:
    kind, dtype, layout = name.split("_")
    out = [
        f"--config.run_dir={run_dir}",
        f"--config.model.dtype={'bfloat16' if dtype == 'bf16' else 'float32'}",
        f"--config.data.packing={layout == 'bfd'}",
    ]
    if kind == "lora":
        out.append("--config.lora.rank=16")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", required=True)
    ap.add_argument("--config", default="full_bf16_bfd")
    args, extra = ap.parse_known_args()  # the rest: --config.KEY=VALUE overrides
    os.environ["JAXSFT_BENCH_ASSETS"] = os.path.abspath(args.assets)
    run_dir = os.path.join(ROOT, "bench_out", "runs", args.config)
    shutil.rmtree(run_dir, ignore_errors=True)
    from jaxsft import config as config_lib
    from jaxsft.train.loop import run

    config = config_lib.load(
        os.path.join(ROOT, "configs", "bench.py"), overrides(args.config, run_dir) + extra
    )
    run(config)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(x) for x in f if x.strip()]
    steady = [r for r in rows if "loss" in r and 3 <= r["step"] <= 12]
    t = sum(r["step_time_s"] for r in steady)
    tok = sum(r["tokens_per_sec"] * r["step_time_s"] for r in steady)
    sup = sum(r["supervised_tokens_per_sec"] * r["step_time_s"] for r in steady)
    result = {
        "config": args.config,
        "nonpad_tok_s": tok / t,
        "loss_tok_s": sup / t,
        "mean_step_s": t / len(steady),
        "mfu": sum(r["mfu"] * r["step_time_s"] for r in steady) / t,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "losses": [round(r["loss"], 4) for r in rows if "loss" in r],
    }
    print("BENCH_RESULT " + json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
