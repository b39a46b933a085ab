"""Learning-rate schedule and AdamW: linear warmup, cosine decay to end_lr_ratio x peak,
weight decay off norms and biases, global-norm clipping."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

NO_DECAY = ("scale", "bias")  # RMSNorm scales and biases


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def lr_schedule(peak: float, total_steps: int, warmup_ratio: float, end_ratio: float):
    """step -> lr. Linear from 0 over the warmup steps to peak (reached at step = warmup), then
    cosine down to peak * end_ratio, reached exactly at the last step (total_steps - 1)."""
    warm = warmup_steps(total_steps, warmup_ratio)
    decay = max(total_steps - 1 - warm, 1)
    end = peak * end_ratio

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm_lr = peak * step / max(warm, 1)
        progress = jnp.clip((step - warm) / decay, 0.0, 1.0)
        cos_lr = end + (peak - end) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < warm, warm_lr, cos_lr)

    return schedule


def make_optimizer(train_cfg, total_steps: int):
    """optax AdamW per the train.* config; returns (tx, schedule)."""
    schedule = lr_schedule(
        train_cfg.learning_rate, total_steps, train_cfg.warmup_ratio, train_cfg.end_lr_ratio
    )
    parts = []
    if train_cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(train_cfg.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=train_cfg.b1,
            b2=train_cfg.b2,
            eps=train_cfg.eps,
            weight_decay=train_cfg.weight_decay,
            mask=_mask_fn,
        )
    )
    adamw = optax.chain(*parts)

    def init(params):  # the moments in float32 (moment_dtypes)
        return adamw.init(moment_dtypes(params))

    return optax.GradientTransformation(init, adamw.update), schedule


def moment_dtypes(params):
    """What AdamW's moments are built from: float32 for every floating parameter.

    The gradients are float32 whatever the parameter dtype (the division by the token count
    promotes them), so moments of bf16 parameters became float32 after the first step anyway;
    built bf16, the step's state changed dtype on its first call, and the step was compiled
    twice (and the planner counted half their bytes). Leaves without a dtype (optax's
    placeholders in tree_map_params) pass through."""

    def f32(p):
        dtype = getattr(p, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or dtype == jnp.float32:
            return p
        if isinstance(p, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(p.shape, jnp.float32, sharding=p.sharding)
        return p.astype(jnp.float32)

    return jax.tree.map(f32, params)


def _mask_fn(params):
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    leaves = [_decays(path) for path, _ in paths]
    return jax.tree.unflatten(jax.tree.structure(params), leaves)


def _decays(path) -> bool:
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    names = [n for n in names if isinstance(n, str) and n != "value"]
    return bool(names) and names[-1] not in NO_DECAY
