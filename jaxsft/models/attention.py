"""Attention as pure functions: the mask (causal, segment, sliding window) and the kernel.

Grouped-query attention with N q heads over K kv heads (G = N / K q heads per kv head).
The XLA path is einsum + float32 softmax; on GPU jax.nn.dot_product_attention picks cuDNN.
The Pallas kernels (attention_kernels: "pallas_gpu", "splash") take a MaskSpec (segment ids
and the window) instead of the dense mask.
"""

from __future__ import annotations

import functools
import logging
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.models import attention_kernels

NEG_INF = -1e30  # finite, so fully masked (padding) rows stay NaN-free
KERNELS = ("pallas_gpu", "splash")  # impls that take a MaskSpec; a ":interpret" suffix runs
# them in Pallas interpret mode (CPU tests), it is not a config value
log = logging.getLogger(__name__)


class MaskSpec(NamedTuple):
    """The mask of attention_mask as data, for kernels that never build it: segment ids
    q_seg [B, T], k_seg [B, S], slot indices q_idx [B, T] or [T], k_idx [S]; window: the
    sliding window (static int, None: none); use_window: whether this layer uses it (a
    traced bool per layer in the layer scan, or a Python bool)."""

    q_seg: jax.Array
    k_seg: jax.Array
    q_idx: jax.Array
    k_idx: jax.Array
    window: int | None = None
    use_window: jax.Array | bool = True

    def dense(self):
        """The [B, T, S] bool mask (for the XLA / cuDNN paths)."""
        full = attention_mask(self.q_seg, self.k_seg, self.q_idx, self.k_idx)
        if not self.window or self.use_window is False:
            return full
        windowed = attention_mask(self.q_seg, self.k_seg, self.q_idx, self.k_idx, self.window)
        return windowed if self.use_window is True else jnp.where(self.use_window, windowed, full)


def layer_mask(masks, use_window):
    """One layer's mask from what Transformer._masks built: a MaskSpec (its use_window set to
    this layer's when it is None), (mask,) for every layer, or (full, windowed) by use_window."""
    if isinstance(masks, MaskSpec):
        return masks._replace(use_window=use_window) if masks.use_window is None else masks
    return masks[0] if len(masks) == 1 else jnp.where(use_window, masks[1], masks[0])


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


CAUSAL_BLOCK = 128  # query rows per block of the causal-skipping path


def attend(q, k, v, mask, impl: str = "xla", *, scale=None, softcap=None):
    """q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S] or MaskSpec -> [B, T, N, H] in q's dtype.

    scale: of q.k (default H**-0.5); softcap: scores -> softcap * tanh(scores / softcap)
    before the mask (Gemma 2; the einsum path and splash). The mask must be causal (it always
    is here). When queries and keys are the same T positions, the einsum path skips key
    blocks after each query block (~40% less work at T=512, more for longer rows).
    impl: "xla", "cudnn", "auto" (jax.nn.dot_product_attention's choice) take the dense mask
    (built here from a MaskSpec); "pallas_gpu" and "splash" take a MaskSpec of causal
    self-attention (q_idx = k_idx = the row's slots) and fall back to "auto" / "xla" where
    they do not apply (logged once per reason).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if isinstance(mask, MaskSpec):
        out = _attend_kernel(q, k, v, mask, impl, scale, softcap)
        if out is not None:
            return out
        mask = mask.dense()
    impl = _fallback(impl)  # a kernel impl given a dense mask (decoding) or not applying
    if impl == "xla" or softcap:  # cuDNN / dot_product_attention take no softcap
        if q.shape[1] == k.shape[1] and q.shape[1] > CAUSAL_BLOCK:
            return _attend_causal_blocks(q, k, v, mask, CAUSAL_BLOCK, scale, softcap)
        return _attend_einsum(q, k, v, mask, scale, softcap)
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None], scale=scale, implementation=None if impl == "auto" else impl
    )
    return out.astype(q.dtype)


def _attend_causal_blocks(q, k, v, mask, block, scale, softcap):
    """Query block i attends to keys [0, (i + 1) * block) only: later keys are masked anyway."""
    q5, k4, v4 = _to_heads_major(q, k, v, scale)
    T = q.shape[1]
    outs = []
    for start in range(0, T, block):
        end = min(start + block, T)
        qb, kb, vb = q5[:, :, :, start:end], k4[:, :, :end], v4[:, :, :end]
        outs.append(_core(qb, kb, vb, mask[:, start:end, :end], softcap))
    return _from_heads_major(jnp.concatenate(outs, axis=3))


def _attend_einsum(q, k, v, mask, scale, softcap):
    q5, k4, v4 = _to_heads_major(q, k, v, scale)
    return _from_heads_major(_core(q5, k4, v4, mask, softcap))


def _to_heads_major(q, k, v, scale):
    """q [B, T, N, H] -> [B, K, G, T, H] (pre-scaled by `scale`); k, v -> [B, K, S, H]."""
    B, T, N, H = q.shape
    K = k.shape[2]
    q = (q * jnp.asarray(scale, q.dtype)).reshape(B, T, K, N // K, H)
    return q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _from_heads_major(o):
    B, K, G, T, H = o.shape
    return o.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, H)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _core(q, k, v, mask, softcap=None):
    """Softmax attention on heads-major operands: q [B, K, G, T, H], k/v [B, K, S, H],
    mask [B, T, S] -> [B, K, G, T, H]. Batched GEMMs over (B, K) with the G q heads of a kv
    head stacked along the rows; float32 scores (softcapped when `softcap`) and softmax."""
    return _core_fwd(q, k, v, mask, softcap)[0]


def _scores(q, k):
    B, K, G, T, H = q.shape
    return jnp.einsum(
        "bkqh,bksh->bkqs", q.reshape(B, K, G * T, H), k, preferred_element_type=jnp.float32
    ).reshape(B, K, G, T, -1)


def _core_fwd(q, k, v, mask, softcap):
    dt = q.dtype
    s = _scores(q, k)
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(mask[:, None, None], s, NEG_INF)
    p = jnp.exp(s - s.max(-1, keepdims=True))
    p = (p / p.sum(-1, keepdims=True)).astype(dt)
    o = jnp.einsum("bkgts,bksh->bkgth", p, v, preferred_element_type=jnp.float32).astype(dt)
    return o, (q, k, v, p, o, mask.any(-1))


def _core_bwd(softcap, res, do):
    """Standard softmax-attention gradients from the saved (compute-dtype) probabilities;
    every GEMM takes compute-dtype operands with float32 accumulation. With a softcap the
    score gradient is scaled by 1 - tanh^2 of the raw scores (recomputed: one more GEMM rather
    than a saved [.., T, S] float32 tensor)."""
    q, k, v, p, o, live = res
    dt = q.dtype
    f32 = jnp.float32
    dv = jnp.einsum("bkgts,bkgth->bksh", p, do, preferred_element_type=f32)
    dp = jnp.einsum("bkgth,bksh->bkgts", do, v, preferred_element_type=f32)
    delta = (do.astype(f32) * o.astype(f32)).sum(-1, keepdims=True)
    ds = p.astype(f32) * (dp - delta)
    if softcap:
        ds = ds * (1.0 - jnp.square(jnp.tanh(_scores(q, k) / softcap)))
    # A query row that sees no key (decode's padding) has a uniform softmax over masked keys
    # in the forward; its scores do not depend on q or k, so no gradient flows from it.
    ds = jnp.where(live[:, None, None, :, None], ds, 0.0).astype(dt)
    dq = jnp.einsum("bkgts,bksh->bkgth", ds, k, preferred_element_type=f32)
    dk = jnp.einsum("bkgts,bkgth->bksh", ds, q, preferred_element_type=f32)
    return (
        dq.astype(dt),
        dk.astype(k.dtype),
        dv.astype(v.dtype),
        np.zeros(p.shape[:1] + p.shape[3:], jax.dtypes.float0),
    )


_core.defvjp(_core_fwd, _core_bwd)


def _attend_kernel(q, k, v, spec: MaskSpec, impl: str, scale: float, softcap):
    """The Pallas kernel's output, or None where it does not apply (then logged once)."""
    name, _, mode = impl.partition(":")
    interpret = mode == "interpret"
    T = q.shape[1]
    if name not in KERNELS or k.shape[1] != T:
        if name in KERNELS:
            _log_once(f"attention {name}: queries and keys differ in length (decoding)")
        return None
    window = spec.window if spec.window and spec.window < T else None  # wider: no effect
    if name == "pallas_gpu":
        if softcap or (window and spec.use_window is not False):
            what = "a logit softcap" if softcap else "a sliding window"
            _log_once(f"attention pallas_gpu takes no {what}: dense-mask fallback")
            return None
        return attention_kernels.pallas_gpu(q, k, v, spec.q_seg, scale=scale, interpret=interpret)
    kernel = partial(
        attention_kernels.splash, q, k, v, spec.q_seg, scale=scale, softcap=softcap or None
    )
    if not window or spec.use_window is False:
        return kernel(interpret=interpret)
    if spec.use_window is True:
        return kernel(window=window, interpret=interpret)
    return jax.lax.cond(  # per-layer window inside the layer scan: one kernel of the two runs
        spec.use_window,
        lambda: kernel(window=window, interpret=interpret),
        lambda: kernel(interpret=interpret),
    )


def _fallback(impl: str) -> str:
    """The dense-mask impl for a kernel impl that does not apply."""
    name = impl.partition(":")[0]
    if name == "pallas_gpu":
        return "auto"
    return "xla" if name == "splash" else impl


@functools.cache
def _log_once(message: str) -> None:
    log.warning(message)


def default_impl() -> str:
    """What "auto" means: splash on TPU (XLA would materialise every layer's float32 scores),
    jax.nn.dot_product_attention on GPU (cuDNN where it applies: the Pallas kernel is not the
    default until it is measured faster on a GPU), the einsum path elsewhere. Kernels fall
    back per call where they do not apply (see attend)."""
    return {"gpu": "auto", "tpu": "splash"}.get(jax.default_backend(), "xla")


def takes_spec(impl: str) -> bool:
    """Whether `impl` wants a MaskSpec rather than the dense mask."""
    return impl.partition(":")[0] in KERNELS
