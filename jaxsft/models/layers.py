"""Weight-holding modules: Linear (with optional LoRA and a quantised kernel), RMSNorm, Embed.

Each parameter carries logical axis names (`sharding_names`) that jaxsft.sharding maps onto
the mesh. Matmuls take compute-dtype inputs and accumulate in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsft.models import ops, quant
from jaxsft.models.lora import LoraConfig, LoRAParam

INIT_STD = 0.02


def param(rngs, shape, names, dtype, init="normal", kind=nnx.Param):
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "uniform_fan_in":  # PEFT's kaiming_uniform(a=sqrt(5)) on lora_A [.., in, r]
        bound = 1.0 / jnp.sqrt(shape[-2])
        value = jax.random.uniform(rngs.params(), shape, dtype, -bound, bound)
    else:
        value = (INIT_STD * jax.random.normal(rngs.params(), shape)).astype(dtype)
    return kind(value, out_sharding=names, eager_sharding=False)


def matmul(x: jax.Array, w: jax.Array, dtype) -> jax.Array:
    """x [..., i] @ w [i, o] in compute dtype with float32 accumulation (both directions)."""
    return ops.einsum("...i,io->...o", x, w, dtype, dtype)


class QuantKernel(nnx.Module):
    """A frozen kernel [..., in, out] stored quantised (quant.storage_shapes): `codes` and
    `scale`, both with the kernel's logical axis names, so they shard as the kernel would."""

    def __init__(self, kind: str, shape: tuple[int, ...], names):
        codes, scales = quant.storage_shapes(kind, shape)
        self.kind = kind
        self.codes = quant.QuantParam(
            jnp.zeros(codes, quant.CODE_DTYPES[kind]), out_sharding=names, eager_sharding=False
        )
        self.scale = quant.QuantParam(
            jnp.ones(scales, jnp.float32), out_sharding=names, eager_sharding=False
        )

    def __call__(self, x: jax.Array, dtype) -> jax.Array:
        return quant.qmatmul(self.kind, x, self.codes[...], self.scale[...], dtype)

    def stored(self) -> quant.Quantized:
        """The codes and scales as one pytree (the routed experts' grouped matmuls)."""
        return quant.Quantized(self.codes[...], self.scale[...], self.kind)


class Linear(nnx.Module):
    """y = x W (+ b) (+ scale * x A B). kernel [in, out] (the transpose of HF's weight), or
    with `quantize` ("int8" | "nf4") a QuantKernel, dequantised inside the matmul."""

    def __init__(
        self,
        d_in,
        d_out,
        names,
        *,
        bias=False,
        lora: LoraConfig | None = None,
        quantize: str = "",
        dtype=jnp.bfloat16,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        if quantize:
            self.kernel = QuantKernel(quantize, (d_in, d_out), names)
        else:
            self.kernel = param(rngs, (d_in, d_out), names, param_dtype)
        self.bias = param(rngs, (d_out,), names[1:], param_dtype, "zeros") if bias else None
        self.lora_scale = lora.scale if lora else 0.0
        if lora:
            r = lora.rank
            self.lora_a = param(
                rngs, (d_in, r), (names[0], "lora_rank"), param_dtype, "uniform_fan_in", LoRAParam
            )
            self.lora_b = param(
                rngs, (r, d_out), ("lora_rank", names[1]), param_dtype, "zeros", LoRAParam
            )
        else:
            self.lora_a = self.lora_b = None

    def __call__(self, x: jax.Array) -> jax.Array:
        if isinstance(self.kernel, QuantKernel):
            y = self.kernel(x, self.dtype)
        else:
            y = matmul(x, self.kernel[...], self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None:
            delta = matmul(matmul(x, self.lora_a[...], self.dtype), self.lora_b[...], self.dtype)
            y = y + (self.lora_scale * delta).astype(self.dtype)
        return y


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, normalised in float32 (as HF does).

    offset 0 (Llama, Qwen): cast to x's dtype, then times scale. offset 1 (Gemma, which stores
    scale - 1): times (1 + scale) in float32, then cast, as Gemma's RMSNorm does.
    """

    def __init__(
        self, dim, eps, names=("norm",), *, offset=0.0, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.eps = eps
        self.offset = float(offset)
        self.scale = param(rngs, (dim,), names, param_dtype, "zeros" if offset else "ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (normed * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding [V, D]; with `scale`, times sqrt(D) rounded to the compute dtype (as
    Gemma multiplies by a tensor of its hidden states' dtype)."""

    def __init__(
        self, vocab, dim, *, scale=False, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs
    ):
        self.dtype = dtype
        self.multiplier = float(dim) ** 0.5 if scale else None
        self.embedding = param(rngs, (vocab, dim), ("vocab", "embed"), param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)
        if self.multiplier is not None:
            x = x * jnp.asarray(self.multiplier, self.dtype)
        return x


# The MLP activations the decoder implements, by transformers' ACT2FN names.
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
