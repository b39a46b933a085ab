"""Generation throughput on the bench model shape (random weights, nothing downloaded).

    python tools/bench_generate.py [--batch 1 8] [--new 128] [--prompt 64] [--dtype float32]

Random Llama: 8 layers, hidden 512, 8 heads, 4 kv heads, mlp 1536, vocab 8192 (~34M params).
Eos is disabled so every row generates exactly --new tokens; tokens/s counts new tokens of
all rows over the wall time of a warm call (compile excluded, reported separately).
"""

from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft.evals.sample import generate_ids
from jaxsft.models.config import ModelConfig
from jaxsft.models.transformer import Transformer

BENCH = ModelConfig(
    model_type="llama",
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1536,
    num_layers=8,
    num_heads=8,
    num_kv_heads=4,
    head_dim=64,
    rope_theta=500000.0,
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    model = Transformer(BENCH, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    rs = np.random.RandomState(0)
    for b in args.batch:
        prompts = [rs.randint(3, BENCH.vocab_size, args.prompt).tolist() for _ in range(b)]
        t0 = time.perf_counter()
        generate_ids(model, prompts, args.new, eos_ids=(), batch_size=b)
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = generate_ids(model, prompts, args.new, eos_ids=(), batch_size=b)
            times.append(time.perf_counter() - t0)
        assert all(len(o) == args.new for o in out)
        best = min(times)
        print(
            json.dumps(
                {
                    "batch": b,
                    "new_tokens": args.new,
                    "prompt": args.prompt,
                    "dtype": args.dtype,
                    "first_call_s": round(first, 2),
                    "warm_s": [round(t, 3) for t in times],
                    "tokens_per_s": round(b * args.new / best, 1),
                    "ms_per_step": round(1000 * best / args.new, 2),
                }
            )
        )


if __name__ == "__main__":
    main()
