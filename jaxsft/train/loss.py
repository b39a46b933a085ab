"""Masked next-token cross-entropy, computed in chunks of tokens.

The [tokens x V] logits are never materialised whole: tokens are reordered so supervised ones
come first, split into chunks, and chunks without a supervised token are skipped (forward and
backward). Returns sums, not means: the divide happens once over the global batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def shift_targets(input_ids, loss_mask, segment_ids):
    """Targets [B, T] (the next token) and float32 weights: 1 where position t predicts a
    supervised token t+1 of the same segment."""
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)
    next_mask = jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1)
    next_seg = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
    same = (next_seg == segment_ids) & (segment_ids != 0)
    return targets, (next_mask * same).astype(jnp.float32)


def chunked_xent(h, kernel, targets, weights, *, chunk: int, dtype, base=None, kl_beta=0.0):
    """Sums over supervised tokens: {"loss_sum", "count", "correct", "kl_sum"}.

    h [B, T, D] final hidden states, kernel [D, V] the unembedding, targets/weights [B, T].
    `base` = (h_base [B, T, D], kernel_base) adds KL(p || p_base) per supervised token.
    Logits and log-softmax are float32.
    """
    B, T, D = h.shape
    n = B * T
    chunk = min(chunk, n)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    w = weights.reshape(n)
    order = jnp.argsort(w == 0, stable=True)  # supervised tokens first

    def prep(x):
        x = jnp.take(x.reshape(n, *x.shape[2:]), order, axis=0)
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(n_chunks, chunk, *x.shape[1:])

    xs = {"h": prep(h), "t": prep(targets), "w": prep(weights)}
    if base is not None:
        xs["hb"] = prep(base[0])

    @jax.checkpoint
    def compute(xc):
        logits = _logits(xc["h"], kernel, dtype)
        logp = jax.nn.log_softmax(logits, axis=-1)
        tgt = jnp.take_along_axis(logp, xc["t"][:, None], axis=-1)[:, 0]
        wc = xc["w"]
        out = {
            "loss_sum": -(tgt * wc).sum(),
            "correct": ((jnp.argmax(logits, -1) == xc["t"]) * wc).sum(),
            "kl_sum": jnp.zeros((), jnp.float32),
        }
        if base is not None:
            logp_b = jax.nn.log_softmax(_logits(xc["hb"], base[1], dtype), axis=-1)
            kl = (jnp.exp(logp) * (logp - jax.lax.stop_gradient(logp_b))).sum(-1)
            out["kl_sum"] = (kl * wc).sum()
        return out

    zeros = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "correct", "kl_sum")}

    def body(acc, xc):
        out = jax.lax.cond(xc["w"].sum() > 0, compute, lambda _: zeros, xc)
        return jax.tree.map(jnp.add, acc, out), None

    sums, _ = jax.lax.scan(body, zeros, xs)
    sums["count"] = w.sum()
    if kl_beta:
        sums["objective_sum"] = sums["loss_sum"] + kl_beta * sums["kl_sum"]
    else:
        sums["objective_sum"] = sums["loss_sum"]
    return sums


def _logits(h, kernel, dtype):
    return jnp.einsum("cd,dv->cv", h.astype(dtype), kernel.astype(dtype),
                      preferred_element_type=jnp.float32)
