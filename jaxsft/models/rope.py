"""Rotary position embeddings: inverse frequencies per rope type, and their application.

Pure functions. Frequencies follow transformers' `modeling_rope_utils` for the types the
decoder supports (default, linear, llama3, yarn, longrope), so logits match HF checkpoints
exactly. `head_dim` here is the rotary dimension (partial rotary: a share of the head).

LongRoPE (Phi-3.5, Phi-4-mini) has two frequency sets: short_factor for sequences up to
original_max_position_embeddings, long_factor beyond. transformers picks one per forward call
from max(position_ids) + 1; jaxsft picks it per sequence (packed segment, or row of a decode),
from that sequence's largest position, which is what transformers does for that sequence alone
(and keeps a packed batch equal to the same sequences unpacked).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def inv_frequencies(
    head_dim: int, theta: float, scaling: dict | None, max_position_embeddings: int
) -> tuple[np.ndarray, float]:
    """([H/2] inverse frequencies float64, attention factor applied to cos and sin)."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv, 1.0
    if rope_type == "linear":
        return inv / scaling["factor"], 1.0
    if rope_type == "llama3":
        return _llama3(inv, scaling), 1.0
    if rope_type == "yarn":
        return _yarn(head_dim, theta, scaling, max_position_embeddings)
    if rope_type == "longrope":
        return _longrope(head_dim, theta, scaling, max_position_embeddings, "short_factor")
    raise ValueError(f"unsupported rope type {rope_type!r}")


def long_frequencies(head_dim: int, theta: float, scaling: dict | None, max_pos: int):
    """(long-sequence inverse frequencies, switch length) of LongRoPE, or None for other types:
    a sequence whose largest position + 1 exceeds the switch length uses them."""
    if (scaling or {}).get("rope_type") != "longrope":
        return None
    inv, _ = _longrope(head_dim, theta, scaling, max_pos, "long_factor")
    return inv, int(scaling["original_max_position_embeddings"])


def _longrope(dim: int, base: float, s: dict, max_pos: int, which: str):
    orig = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_pos / orig
    attn = s.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    ext = np.asarray(s[which], np.float64)
    inv = 1.0 / (ext * base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    return inv, float(attn)


def _llama3(inv: np.ndarray, s: dict) -> np.ndarray:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled)


def _yarn(dim: int, base: float, s: dict, max_pos: int) -> tuple[np.ndarray, float]:
    orig = s.get("original_max_position_embeddings") or max_pos
    factor = s.get("factor") or max_pos / orig

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = s.get("attention_factor")
    if attn is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attn = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attn = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    inv = (1 / (factor * pos_freqs)) * (1 - extrapolation) + (1 / pos_freqs) * extrapolation
    return inv, float(attn)


def rope_tables(
    positions: jnp.ndarray,
    inv_freq: np.ndarray,
    attn_factor: float,
    long=None,
    segment_ids=None,
    lengths=None,
):
    """cos, sin of shape [B, T, R] (float32; R the rotary dim) for integer positions [B, T].

    long: (inverse frequencies, switch length) of LongRoPE: tokens of a sequence (a segment of
    `segment_ids`, 0 = padding) whose largest position + 1 exceeds the switch use them;
    `lengths` [B] gives each row's sequence length instead (decoding with a cache)."""
    inv = jnp.asarray(inv_freq, jnp.float32)
    if long is not None:
        if lengths is None:
            lengths = sequence_lengths(positions, segment_ids)
        else:
            lengths = jnp.broadcast_to(jnp.asarray(lengths)[:, None], positions.shape)
        use_long = lengths > long[1]
        inv = jnp.where(use_long[..., None], jnp.asarray(long[0], jnp.float32), inv)
    angles = positions.astype(jnp.float32)[..., None] * inv
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * attn_factor, jnp.sin(angles) * attn_factor


def sequence_lengths(positions, segment_ids=None):
    """[B, T]: largest position + 1 of each token's sequence (its segment of the row)."""
    if segment_ids is None:
        return jnp.broadcast_to(positions.max(axis=1, keepdims=True) + 1, positions.shape)
    # A segment max over (row, segment id) pairs: O(B T), no [B, T, T] comparison.
    B, T = positions.shape
    ids = segment_ids + (T + 1) * jnp.arange(B, dtype=segment_ids.dtype)[:, None]
    top = jax.ops.segment_max(positions.ravel(), ids.ravel(), num_segments=B * (T + 1))
    return top[ids] + 1


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [B, T, heads, H] by cos/sin [B, T, R] (HF's rotate_half convention); with a
    partial rotary dim R < H only the first R dims rotate, the rest pass through."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return jnp.concatenate([apply_rope(x[..., :rot], cos, sin), x[..., rot:]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x.dtype)
