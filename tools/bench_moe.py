#!/usr/bin/env python3
"""MoE vs dense on this machine: train-step tokens/s of a small Qwen3-MoE-shaped model against
a dense model with the same active parameters per token, and the share of the MoE layer's
forward + backward time spent routing and sorting (everything but the expert matmuls).

    python tools/bench_moe.py [--dtype float32|bfloat16] [--steps 10] [--experts 8 --k 2]

Random init, no checkpoint. Dense: intermediate = k x moe_intermediate (the MoE model's active
MLP per token); the router's D x E parameters are the only active difference. Prints one
BENCH_MOE {json} line. Not a test: numbers depend on the CPU (name it when you quote them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsft.models import moe
from jaxsft.models.config import ModelConfig
from jaxsft.models.layers import ACTIVATIONS
from jaxsft.models.transformer import Transformer
from jaxsft.train.step import make_loss_fn, make_train_step


def configs(args) -> tuple[ModelConfig, ModelConfig]:
    base = ModelConfig(
        model_type="qwen3_moe",
        vocab_size=4096,
        hidden_size=args.hidden,
        intermediate_size=args.k * args.moe_hidden,
        num_layers=args.layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=args.hidden // 4,
        qk_norm=True,
        num_experts=args.experts,
        num_experts_per_tok=args.k,
        moe_intermediate_size=args.moe_hidden,
        norm_topk_prob=True,
    )
    dense = dataclasses.replace(
        base, model_type="qwen3", num_experts=0, num_experts_per_tok=0, moe_intermediate_size=0
    )
    return base, dense


def batch(args):
    rs = np.random.RandomState(0)
    B, T = args.batch, args.seq
    ids = rs.randint(3, 4096, (B, T)).astype(np.int32)
    return {
        "input_ids": ids,
        "segment_ids": np.ones((B, T), np.int32),
        "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
        "loss_mask": np.ones((B, T), np.int32),
    }


def step_time(cfg: ModelConfig, args) -> tuple[float, float]:
    """(mean seconds per train step after 2 warm-up steps, compile + first step seconds)."""
    dtype = jnp.dtype(args.dtype)
    model = Transformer(cfg, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    frozen = nnx.State({})
    tx = optax.adamw(1e-4)
    loss_fn = make_loss_fn(graphdef, chunk=1024, router_aux=0.001 if cfg.num_experts else 0.0)
    step = jax.jit(make_train_step(loss_fn, tx, lambda s: 1e-4, 1), donate_argnums=(0,))
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jnp.zeros((2,), jnp.uint32),
    }
    b = batch(args)
    t0 = time.perf_counter()
    state, m = step(state, frozen, None, b)
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    state, m = step(state, frozen, None, b)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, m = step(state, frozen, None, b)
    jax.block_until_ready(m)
    return (time.perf_counter() - t0) / args.steps, first


def routing_share(cfg: ModelConfig, args) -> dict:
    """Forward + backward of one MoE layer's expert part on T = batch x seq tokens, and of the
    same data movement without the expert matmuls (route, argsort, gather, unsort, combine)."""
    dtype = jnp.dtype(args.dtype)
    N, D, E, F, k = (
        args.batch * args.seq,
        cfg.hidden_size,
        cfg.num_experts,
        args.moe_hidden,
        cfg.num_experts_per_tok,
    )
    rs = np.random.RandomState(1)
    x = jnp.asarray(rs.normal(0, 1, (N, D)), dtype)
    router = jnp.asarray(rs.normal(0, 0.1, (D, E)), jnp.float32)
    w = [jnp.asarray(rs.normal(0, 0.05, s), jnp.float32) for s in ((E, D, F), (E, D, F), (E, F, D))]
    act = ACTIVATIONS["silu"]

    def full(x, router, *w):
        r = moe.route(x.astype(jnp.float32) @ router, k, True)
        y = moe.grouped_ffn(x, r, dict(zip(moe.PROJS, w, strict=True)), act)
        return jnp.sum(y.astype(jnp.float32))

    def movement(x, router, *w):
        r = moe.route(x.astype(jnp.float32) @ router, k, True)
        flat = r.experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        xs = x[order // k].astype(jnp.float32) * r.weights.reshape(-1)[order][:, None]
        back = xs[jnp.argsort(order)].reshape(N, k, D).sum(1)
        return jnp.sum(back) + 0.0 * sum(jnp.sum(a) for a in w)

    def timed(fn):
        g = jax.jit(jax.grad(fn, argnums=(0, 1, 2, 3, 4)))
        jax.block_until_ready(g(x, router, *w))
        t0 = time.perf_counter()
        for _ in range(args.steps):
            out = g(x, router, *w)
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / args.steps

    t_full, t_move = timed(full), timed(movement)
    return {
        "moe_layer_fwd_bwd_s": t_full,
        "routing_sorting_s": t_move,
        "routing_share": t_move / t_full,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--moe-hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    moe_cfg, dense_cfg = configs(args)
    tokens = args.batch * args.seq
    moe_s, moe_first = step_time(moe_cfg, args)
    dense_s, dense_first = step_time(dense_cfg, args)
    result = {
        "dtype": args.dtype,
        "tokens_per_step": tokens,
        "experts": args.experts,
        "k": args.k,
        "moe_tok_s": tokens / moe_s,
        "dense_same_active_tok_s": tokens / dense_s,
        "moe_over_dense": dense_s / moe_s,
        "moe_step_s": moe_s,
        "dense_step_s": dense_s,
        "moe_compile_and_first_step_s": moe_first,
        "dense_compile_and_first_step_s": dense_first,
        **routing_share(moe_cfg, args),
        "devices": str(jax.devices()[0].device_kind),
    }
    print("BENCH_MOE " + json.dumps(result))


if __name__ == "__main__":
    main()
