"""Pallas flash-attention kernels that take segment ids instead of a dense [B, T, S] mask.

Both are causal self-attention over packed rows (queries and keys are the same T slots, a
token attends to earlier slots of its own segment), q [B, T, N, H], k/v [B, T, K, H]:

- `pallas_gpu`: the Triton flash kernel `jax.experimental.pallas.ops.gpu.attention.mha`
  (segment ids, causal block skipping; no sliding window, no softcap, q and kv heads paired
  one to one, so GQA repeats k/v per group: [B, T, N, H], the size of q, never T x T).
- `splash`: TPU splash attention (`pallas.ops.tpu.splash_attention`) with a CausalMask or a
  LocalMask (sliding window), SegmentIds, native GQA and the logit softcap.

Rows are padded to the kernels' block multiple with a segment id of their own; padded slots
come after every real one, so causality keeps them invisible to real queries. Under a mesh
each kernel runs per device under shard_map (batch over the batch axes, heads over the
tensor axis when the kv heads divide evenly). `interpret=True` runs either on CPU (tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxsft.sharding import logical_spec

PAD_SEGMENT = -1  # segment id of the slots added to reach a block multiple
GPU_BLOCK = 128  # the Triton kernel's largest q/k block
SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides the padded row is used


def pallas_gpu(q, k, v, seg, *, scale: float, interpret: bool = False):
    """Causal packed attention with the Pallas GPU flash kernel; seg [B, T] int32."""
    T = q.shape[1]
    block = min(GPU_BLOCK, max(16, _next_power_of_2(T)))
    return _per_device(
        functools.partial(_pallas_gpu_local, scale=scale, block=block, interpret=interpret),
        q,
        k,
        v,
        _pad_seg(seg, _round_up(T, block)),
        _round_up(T, block),
    )


def _pallas_gpu_local(q, k, v, seg, *, scale, block, interpret):
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    G = q.shape[2] // k.shape[2]
    if G > 1:  # the kernel reads kv head n for q head n
        k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    bwd = min(32, block)
    sizes = gpu_attention.BlockSizes(
        block_q=block,
        block_k=block,
        block_q_dkv=bwd,
        block_kv_dkv=bwd,
        block_q_dq=bwd,
        block_kv_dq=bwd,
    )
    return gpu_attention.mha(
        q, k, v, seg, sm_scale=scale, causal=True, block_sizes=sizes, interpret=interpret
    )


def splash(q, k, v, seg, *, scale: float, window=None, softcap=None, interpret: bool = False):
    """Causal packed attention with TPU splash attention; seg [B, T] int32; window: keys
    q - window < k <= q (None: plain causal); softcap: scores -> softcap * tanh(s / softcap)."""
    Tp = _round_up(q.shape[1], SPLASH_BLOCKS[-1])
    local = functools.partial(
        _splash_local, scale=scale, window=window, softcap=softcap, interpret=interpret
    )
    return _per_device(local, q, k, v, _pad_seg(seg, Tp), Tp)


def _splash_local(q, k, v, seg, *, scale, window, softcap, interpret):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    B, T, N, H = q.shape
    kernel = _splash_kernel(N, T, window, softcap, interpret)
    q = q * jnp.asarray(scale, q.dtype)
    heads_major = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, heads, T, H]

    def row(q, k, v, s):
        return kernel(q, k, v, segment_ids=sa.SegmentIds(s, s))

    return jax.vmap(row)(*heads_major, seg).transpose(0, 2, 1, 3)


@functools.lru_cache(maxsize=64)
def _splash_kernel(N: int, T: int, window, softcap, interpret: bool):
    """The kernel for N q heads over rows of T (a multiple of 128): its block-sparsity tables
    are computed once per shape, on the host."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if window:
        one = sa.LocalMask((T, T), window_size=(window - 1, 0), offset=0)
    else:
        one = sa.CausalMask((T, T))
    b = next(b for b in SPLASH_BLOCKS if T % b == 0)
    sizes = sa.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
    )
    with jax.ensure_compile_time_eval():  # concrete tables, safe to cache across traces
        return sa.make_splash_mha(
            sa.MultiHeadMask([one] * N),
            block_sizes=sizes,
            attn_logits_soft_cap=softcap,
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )


def _per_device(local, q, k, v, seg, Tp):
    """Pad rows to Tp, run `local(q, k, v, seg)` (under shard_map when a mesh is set), cut the
    padding off again."""
    T = q.shape[1]
    pad = [(0, 0), (0, Tp - T), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, pad) if Tp > T else x for x in (q, k, v))
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        # heads split only where the kv heads divide, so each device keeps whole GQA groups
        spec = logical_spec(("batch", None, "kv_heads", None), k.shape, mesh)
        rows = jax.sharding.PartitionSpec(spec[0], None)
        local = jax.shard_map(
            local, in_specs=(spec, spec, spec, rows), out_specs=spec, check_vma=False
        )
    return local(q, k, v, seg)[:, :T]


def _pad_seg(seg, Tp):
    return jnp.pad(seg, [(0, 0), (0, Tp - seg.shape[1])], constant_values=PAD_SEGMENT)


def _round_up(n: int, m: int) -> int:
    return math.ceil(n / m) * m


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
