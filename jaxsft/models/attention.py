"""Attention as pure functions: the mask (causal, segment, sliding window) and the kernel.

Grouped-query attention with N q heads over K kv heads (G = N / K q heads per kv head).
The XLA path is einsum + float32 softmax; on GPU jax.nn.dot_product_attention picks cuDNN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully masked (padding) rows stay NaN-free


def attention_mask(q_seg, k_seg, q_idx, k_idx, sliding_window: int | None = None):
    """[B, T, S] bool: same segment, causal by index, and within the sliding window.

    q_seg [B, T], k_seg [B, S] segment ids (0 = padding / empty cache slot);
    q_idx [B, T] or [T], k_idx [S] are slot indices along the row.
    """
    q_idx = jnp.broadcast_to(q_idx, q_seg.shape)
    same = q_seg[:, :, None] == k_seg[:, None, :]
    causal = q_idx[:, :, None] >= k_idx[None, None, :]
    mask = same & causal
    if sliding_window:
        mask &= (q_idx[:, :, None] - k_idx[None, None, :]) < sliding_window
    return mask


def attend(q, k, v, mask, impl: str = "xla"):
    """q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S] -> [B, T, N, H] in q's dtype."""
    if impl == "xla":
        return _attend_einsum(q, k, v, mask)
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None], implementation=None if impl == "auto" else impl
    )
    return out.astype(q.dtype)


def _attend_einsum(q, k, v, mask):
    B, T, N, H = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (H**-0.5)
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(B, T, N, H)


def default_impl() -> str:
    """'auto' (cuDNN when it applies) on GPU, the einsum path elsewhere."""
    return "auto" if jax.default_backend() == "gpu" else "xla"
