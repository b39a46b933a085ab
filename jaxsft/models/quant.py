"""Weight-only quantisation of the frozen base of a LoRA run (QLoRA): int8 and NF4.

Pure functions; a kernel [..., in, out] (the leading axes: layers) is stored as
  int8: codes int8 [..., in, out], scales float32 [..., 1, out]: absmax of each output
        channel / 127 (symmetric, round to nearest);
  nf4:  codes uint8 [..., in / 2, out], two 4-bit NormalFloat codes per byte (row 2i in the
        low nibble, row 2i + 1 in the high one), scales float32 [..., in / 64, out]: the absmax
        of each block of 64 consecutive inputs of an output channel, as bitsandbytes blocks
        HF's row-major [out, in] weight (QLoRA, Dettmers et al. 2023; no double quantisation).
Host-side numpy quantises tensor by tensor during the streamed import; `qmatmul` dequantises
inside the matmul, in the compute dtype, and gives no gradient to the codes or scales.

Why no library: google's qwix (0.1.8; int8/int4/nf4, PTQ and a QLoRA provider) quantises by
intercepting flax modules and dot_generals (`quantize_model` with module-path rules) and
quantises an already materialised float tree; this decoder calls its own custom-VJP einsum
from a hand-split layer scan, streams tensors from safetensors into shards, and keeps its own
LoRA variables and PEFT layout, so qwix would fit only by bypassing most of it. aqtp (AQT) is
quantised training of dot_generals (no NF4 codebook). What QLoRA needs here is ~100 lines.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

KINDS = ("int8", "nf4")
NF4_BLOCK = 64
# The 16 NF4 values (QLoRA appendix E; bitsandbytes' NF4 table, float32).
NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
_NF4_MIDPOINTS = (NF4[1:] + NF4[:-1]) / 2  # nearest value = number of midpoints below x
CODE_DTYPES = {"int8": np.dtype(np.int8), "nf4": np.dtype(np.uint8)}


class QuantParam(nnx.Variable):
    """A quantised frozen kernel's codes or scales (layers.QuantKernel): not an nnx.Param, so
    the frozen partition holds it and neither the optimizer nor a gradient ever sees it."""


def kind_of(codes_dtype) -> str:
    """The quantisation of a codes array, from its dtype."""
    return {v: k for k, v in CODE_DTYPES.items()}[np.dtype(codes_dtype)]


def storage_shapes(kind: str, shape: tuple[int, ...]) -> tuple[tuple, tuple]:
    """(codes shape, scales shape) of a kernel of `shape` [..., in, out]."""
    *lead, d_in, d_out = shape
    if kind == "int8":
        return tuple(shape), (*lead, 1, d_out)
    return (*lead, d_in // 2, d_out), (*lead, d_in // NF4_BLOCK, d_out)


def kernel_shape(kind: str, codes_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The kernel shape [..., in, out] that codes of `codes_shape` store."""
    *lead, rows, d_out = codes_shape
    return (*lead, rows * (2 if kind == "nf4" else 1), d_out)


def fits(kind: str, d_in: int) -> bool:
    """Whether a kernel with `d_in` inputs can be stored as `kind` (nf4: whole blocks)."""
    return kind == "int8" or d_in % NF4_BLOCK == 0


def check_dims(kind: str, cfg) -> None:
    """UserError when a quantised kernel's inputs do not split into whole NF4 blocks (the
    inputs of q/k/v/gate/up: hidden_size; o_proj: heads x head_dim; down_proj: the MLP's,
    routed experts' and shared expert's)."""
    from jaxsft.errors import UserError

    dims = {"hidden_size": cfg.hidden_size, "num_heads x head_dim": cfg.num_heads * cfg.head_dim}
    if cfg.num_experts:
        dims["moe_intermediate_size"] = cfg.moe_intermediate_size
    else:
        dims["intermediate_size"] = cfg.intermediate_size
    if cfg.shared_expert_size:
        dims["shared_expert_intermediate_size"] = cfg.shared_expert_size
    bad = {k: v for k, v in dims.items() if not fits(kind, v)}
    if bad:
        name, value = next(iter(bad.items()))
        raise UserError(
            f"model.quantize={kind} quantises blocks of {NF4_BLOCK} inputs, but {name} = {value}",
            where="model.quantize",
            hint="use model.quantize=int8 (per-channel scales) for this model",
        )


def quantize_scales(kind: str, w: np.ndarray) -> np.ndarray:
    """The float32 scales of w [..., in, out] alone (absmax per channel or block)."""
    a = np.abs(np.asarray(w, np.float32))
    if kind == "int8":
        return a.max(axis=-2, keepdims=True) / 127.0
    *lead, d_in, d_out = a.shape
    return a.reshape(*lead, d_in // NF4_BLOCK, NF4_BLOCK, d_out).max(axis=-2)


def quantize(kind: str, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [..., in, out] -> (codes, float32 scales) in the layout of the module docstring."""
    w = np.asarray(w, np.float32)
    scale = quantize_scales(kind, w)
    safe = np.where(scale == 0, 1.0, scale)  # an all-zero channel or block: codes of 0.0
    if kind == "int8":
        return np.clip(np.rint(w / safe), -127, 127).astype(np.int8), scale
    *lead, d_in, d_out = w.shape
    blocks = w.reshape(*lead, d_in // NF4_BLOCK, NF4_BLOCK, d_out) / safe[..., None, :]
    codes = np.searchsorted(_NF4_MIDPOINTS, blocks).astype(np.uint8).reshape(w.shape)
    return (codes[..., 0::2, :] | (codes[..., 1::2, :] << 4)).astype(np.uint8), scale


def dequantize(kind: str, codes, scale, dtype=jnp.float32) -> jax.Array:
    """(codes, scales) -> the kernel [..., in, out] in `dtype` (scaled in float32)."""
    scale = jnp.asarray(scale, jnp.float32)
    if kind == "int8":
        return (jnp.asarray(codes).astype(jnp.float32) * scale).astype(dtype)
    codes = jnp.asarray(codes)
    *lead, rows, d_out = codes.shape
    pairs = jnp.stack([codes & 15, codes >> 4], axis=-2)  # [..., in / 2, 2, out]
    values = jnp.take(jnp.asarray(NF4), pairs.astype(jnp.int32))
    blocks = values.reshape(*lead, scale.shape[-2], NF4_BLOCK, d_out) * scale[..., None, :]
    return blocks.reshape(*lead, 2 * rows, d_out).astype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Quantized:
    """A quantised stack of kernels as one pytree (the routed experts' [E, in, out]): what
    moe's grouped matmuls take in place of an array. `shape`: the kernels' shape."""

    codes: jax.Array
    scale: jax.Array
    kind: str = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return kernel_shape(self.kind, tuple(self.codes.shape))


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def grouped_qmatmul(kind: str, matmul, x, codes, scale, sizes):
    """matmul(x, dequantize(codes, scale), sizes) (a grouped matmul of moe.py over [E, in,
    out] kernels) with qmatmul's backward: the kernels are recomputed from the codes, and only
    x gets a gradient."""
    return matmul(x, dequantize(kind, codes, scale, x.dtype), sizes)


def _grouped_fwd(kind, matmul, x, codes, scale, sizes):
    y = grouped_qmatmul(kind, matmul, x, codes, scale, sizes)
    # x[:0]: x's dtype, shape and (inside shard_map) device variance, without keeping x
    return y, (x[:0], codes, scale, sizes)


def _grouped_bwd(kind, matmul, res, g):
    empty, codes, scale, sizes = res
    w = dequantize(kind, codes, scale, empty.dtype)
    x = jnp.zeros_like(empty, shape=(g.shape[0], *empty.shape[1:]))  # linear in x: any point
    _, vjp = jax.vjp(lambda x: matmul(x, w, sizes), x)
    return vjp(g.astype(empty.dtype))[0], None, None, None


grouped_qmatmul.defvjp(_grouped_fwd, _grouped_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def qmatmul(kind: str, x, codes, scale, dtype):
    """x [..., in] @ dequantize(codes, scale) -> [..., out] in `dtype`, float32 accumulation
    (codes [in, out] or [in / 2, out]: one layer's kernel).

    int8 scales the matmul's output per channel (the codes are exact in bf16); nf4
    dequantises one kernel at a time in the compute dtype. The backward pass recomputes the
    kernel from the codes (kept alive anyway) instead of saving a dequantised copy, and only x
    gets a gradient (the frozen base never does)."""
    return _forward(kind, x, codes, scale, dtype)


def _forward(kind, x, codes, scale, dtype):
    x = x.astype(dtype)
    if kind == "int8":
        y = jnp.einsum("...i,io->...o", x, codes.astype(dtype), preferred_element_type=jnp.float32)
        return (y * scale[0].astype(jnp.float32)).astype(dtype)
    w = dequantize(kind, codes, scale, dtype)
    return jnp.einsum("...i,io->...o", x, w, preferred_element_type=jnp.float32).astype(dtype)


def _fwd(kind, x, codes, scale, dtype):
    # Residuals: the codes and scales (alive anyway) and x's dtype only (an empty array).
    return _forward(kind, x, codes, scale, dtype), (jnp.zeros((0,), x.dtype), codes, scale)


def _bwd(kind, dtype, res, g):
    x_dtype, codes, scale = res
    if kind == "int8":
        g = (g.astype(jnp.float32) * scale[0].astype(jnp.float32)).astype(dtype)
        w = codes.astype(dtype)
    else:
        g, w = g.astype(dtype), dequantize(kind, codes, scale, dtype)
    dx = jnp.einsum("...o,io->...i", g, w, preferred_element_type=jnp.float32)
    return dx.astype(x_dtype.dtype), None, None


qmatmul.defvjp(_fwd, _bwd)
