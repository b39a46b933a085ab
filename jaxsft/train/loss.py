"""Masked next-token cross-entropy, computed in chunks of tokens.

The [tokens x V] logits are never materialised whole: tokens are reordered so supervised ones
come first, split into chunks, and chunks without a supervised token are skipped (forward and
backward). Each chunk's cross-entropy has a fused backward pass (softmax - onehot, recomputing
the chunk's logits), so only [chunk x V] float32 logits exist at any time. Returns sums, not
means: the divide happens once over the global batch.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.models import ops


def shift_targets(input_ids, loss_mask, segment_ids):
    """Targets [B, T] (the next token) and float32 weights: 1 where position t predicts a
    supervised token t+1 of the same segment."""
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    next_mask = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
    next_seg = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
    same = (next_seg == segment_ids) & (segment_ids != 0)
    return targets, (next_mask * same).astype(jnp.float32)


def chunked_xent(
    h, kernel, targets, weights, *, chunk: int, dtype, base=None, kl_beta=0.0, softcap=None
):
    """Sums over supervised tokens: {"loss_sum", "count", "correct", "kl_sum", "objective_sum"}.

    h [B, T, D] final hidden states, kernel [D, V] the unembedding, targets/weights [B, T].
    Each chunk's logits come from the model's LM head (ops.head_logits, with the final-logit
    `softcap`). `base` = (h_base [B, T, D], kernel_base) adds KL(p || p_base) per supervised
    token. Logits and log-softmax are float32.
    """
    B, T, D = h.shape
    n = B * T
    chunk = min(chunk, n)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    w = weights.reshape(n)
    order = jnp.argsort(w == 0, stable=True)  # supervised tokens first
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n, dtype=order.dtype))

    def prep(x):
        x = permute_rows(x.reshape(n, *x.shape[2:]), order, inverse)
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(n_chunks, chunk, *x.shape[1:])

    xs = {"h": prep(h), "t": prep(targets), "w": prep(weights)}
    if base is not None:
        xs["hb"] = prep(base[0])
    zero = jnp.zeros((), jnp.float32)

    def compute(xc):
        if base is None:
            loss, correct = xent_chunk(xc["h"], kernel, xc["t"], xc["w"], dtype, softcap)
            return {"loss_sum": loss, "correct": correct, "kl_sum": zero}
        return _xent_kl_chunk(xc, kernel, base[1], dtype, softcap)

    def body(acc, xc):
        out = jax.lax.cond(
            xc["w"].sum() > 0,
            compute,
            lambda _: {"loss_sum": zero, "correct": zero, "kl_sum": zero},
            xc,
        )
        return jax.tree.map(jnp.add, acc, out), None

    sums, _ = jax.lax.scan(body, {"loss_sum": zero, "correct": zero, "kl_sum": zero}, xs)
    sums["count"] = w.sum()
    sums["objective_sum"] = sums["loss_sum"] + kl_beta * sums["kl_sum"]
    return sums


@jax.custom_vjp
def permute_rows(x, order, inverse):
    """x[order]; the backward is the gather g[inverse] (not a scatter-add)."""
    return jnp.take(x, order, axis=0)


permute_rows.defvjp(
    lambda x, order, inverse: (jnp.take(x, order, axis=0), (order, inverse)),
    lambda res, g: (jnp.take(g, res[1], axis=0), _int_zeros(res[0]), _int_zeros(res[1])),
)


def _int_zeros(x):
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def xent_chunk(h, kernel, targets, weights, dtype, softcap=None):
    """(sum of weighted CE, weighted count of argmax hits) for h [c, D], kernel [D, V]."""
    return _xent_forward(h, kernel, targets, weights, dtype, softcap)[0]


def _xent_forward(h, kernel, targets, weights, dtype, softcap):
    logits = ops.head_logits(h, kernel, dtype, softcap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    loss = ((lse - target_logit) * weights).sum()
    correct = ((jnp.argmax(logits, -1) == targets) * weights).sum()
    return (loss, correct), lse


def _xent_fwd(h, kernel, targets, weights, dtype, softcap):
    out, lse = _xent_forward(h, kernel, targets, weights, dtype, softcap)
    return out, (h, kernel, targets, weights, lse)


def _xent_bwd(dtype, softcap, res, g):
    """softmax - onehot on the recomputed logits; through the softcap, times 1 - tanh^2."""
    h, kernel, targets, weights, lse = res
    logits = ops.head_logits(h, kernel, dtype, softcap)
    probs = jnp.exp(logits - lse[:, None])
    onehot = jnp.arange(logits.shape[-1])[None, :] == targets[:, None]
    dlogits = jnp.where(onehot, probs - 1.0, probs) * (weights * g[0])[:, None]
    if softcap:
        dlogits = dlogits * (1.0 - jnp.square(logits / softcap))
    dlogits = dlogits.astype(dtype)
    h_c, k_c = h.astype(dtype), kernel.astype(dtype)
    dh = jnp.einsum("cv,dv->cd", dlogits, k_c, preferred_element_type=jnp.float32)
    dk = jnp.einsum("cd,cv->dv", h_c, dlogits, preferred_element_type=jnp.float32)
    return dh.astype(h.dtype), dk.astype(kernel.dtype), _int_zeros(targets), jnp.zeros_like(weights)


xent_chunk.defvjp(_xent_fwd, _xent_bwd)


@partial(jax.checkpoint, static_argnums=(3, 4))
def _xent_kl_chunk(xc, kernel, base_kernel, dtype, softcap):
    """CE plus KL(p || p_base) for one chunk (autodiff; only used with train.kl_to_base)."""
    logits = ops.head_logits(xc["h"], kernel, dtype, softcap)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tgt = jnp.take_along_axis(logp, xc["t"][:, None], axis=-1)[:, 0]
    wc = xc["w"]
    logp_b = jax.nn.log_softmax(ops.head_logits(xc["hb"], base_kernel, dtype, softcap), axis=-1)
    kl = (jnp.exp(logp) * (logp - jax.lax.stop_gradient(logp_b))).sum(-1)
    return {
        "loss_sum": -(tgt * wc).sum(),
        "correct": ((jnp.argmax(logits, -1) == xc["t"]) * wc).sum(),
        "kl_sum": (kl * wc).sum(),
    }
