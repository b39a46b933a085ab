"""Small pure functions against hand-computed values and transformers' own implementation."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama import modeling_llama

from jaxsft.models import attention
from jaxsft.models.layers import RMSNorm
from jaxsft.models.rope import apply_rope, inv_frequencies, rope_tables

ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    # small original context so that all three llama3 bands occur at head_dim 64
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512,
    },
    "llama3_8b": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
}
HEAD_DIM, THETA, MAX_POS = 64, 500000.0, 16384


def _hf_config(scaling):
    rope = {"rope_theta": THETA, **(scaling or {"rope_type": "default"})}
    return tf.LlamaConfig(
        hidden_size=HEAD_DIM * 4,
        num_attention_heads=4,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POS,
        rope_parameters=rope,
    )


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_inv_frequencies_match_transformers(case):
    scaling = ROPE_CASES[case]
    hf_cfg = _hf_config(scaling)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        want, want_factor = modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(
            hf_cfg
        )
    else:
        want, want_factor = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, None)
    got, factor = inv_frequencies(HEAD_DIM, THETA, scaling, MAX_POS)
    assert got.shape == (HEAD_DIM // 2,)
    # transformers computes in float32; jaxsft in float64: agree to float32 rounding.
    np.testing.assert_allclose(got, want.double().numpy(), rtol=2e-6, err_msg=case)
    assert factor == pytest.approx(want_factor, rel=1e-6), case


def test_llama3_bands_by_hand():
    """High frequencies kept, low ones divided by factor, the middle band interpolated."""
    s = ROPE_CASES["llama3"]
    base, _ = inv_frequencies(HEAD_DIM, THETA, None, MAX_POS)
    got, _ = inv_frequencies(HEAD_DIM, THETA, s, MAX_POS)
    wavelen = 2 * math.pi / base
    high = wavelen < 512 / 4
    low = wavelen > 512 / 1
    mid = ~high & ~low
    assert high.any() and low.any() and mid.any()
    np.testing.assert_array_equal(got[high], base[high])
    np.testing.assert_allclose(got[low], base[low] / 8.0, rtol=1e-12)
    smooth = (512 / wavelen[mid] - 1.0) / (4.0 - 1.0)
    np.testing.assert_allclose(
        got[mid], (1 - smooth) * base[mid] / 8.0 + smooth * base[mid], rtol=1e-12
    )


# Positions where float32 angles agree to ~1e-5 whichever way the inverse frequencies are
# rounded. jaxsft computes inv_freq in float64 and rounds once; transformers computes it in
# float32 (1 ulp off for some frequencies), so cos/sin drift apart by ~pos * 6e-8 rad:
# 2.4e-4 at position 9000, 5e-3 at 131k (see test_rope_long_positions).
SHORT_POSITIONS = [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 77, 300]]


@pytest.mark.parametrize("case", ["default", "llama3", "yarn"])
def test_rope_application_matches_transformers(case, positions=SHORT_POSITIONS, atol=2e-5):
    """rope_tables + apply_rope == LlamaRotaryEmbedding + apply_rotary_pos_emb."""
    hf_cfg = _hf_config(ROPE_CASES[case])
    rotary = modeling_llama.LlamaRotaryEmbedding(hf_cfg)
    pos = np.asarray(positions, np.int32)
    B, T, N = pos.shape + (3,)
    rs = np.random.RandomState(0)
    x = rs.randn(B, T, N, HEAD_DIM).astype(np.float32)

    xt = torch.from_numpy(x).transpose(1, 2)  # HF layout [B, N, T, H]
    cos_t, sin_t = rotary(xt, torch.from_numpy(pos).long())
    want, _ = modeling_llama.apply_rotary_pos_emb(xt, xt, cos_t, sin_t)
    want = want.transpose(1, 2).numpy()

    inv, factor = inv_frequencies(HEAD_DIM, THETA, ROPE_CASES[case], MAX_POS)
    cos, sin = rope_tables(jnp.asarray(pos), inv, factor)
    np.testing.assert_allclose(np.asarray(cos), cos_t.numpy(), atol=atol, err_msg=case)
    np.testing.assert_allclose(np.asarray(sin), sin_t.numpy(), atol=atol, err_msg=case)
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    np.testing.assert_allclose(got, want, atol=4 * atol, err_msg=case)


def test_rope_long_positions():
    """Long-context positions: within the float32 inv_freq rounding drift described above."""
    test_rope_application_matches_transformers(
        "llama3_8b", positions=[[0, 5000, 9000, 32000, 65000, 100000, 131071]], atol=1e-2
    )


def test_apply_rope_by_hand():
    """H=4: pairs (0, 2) and (1, 3) rotate by pos * inv_freq (rotate_half convention)."""
    x = jnp.asarray([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    inv = np.array([1.0, 0.5])
    cos, sin = rope_tables(jnp.asarray([[2]]), inv, 1.0)
    got = np.asarray(apply_rope(x, cos, sin)).ravel()
    a0, a1 = 2 * 1.0, 2 * 0.5
    want = [
        1 * math.cos(a0) - 3 * math.sin(a0),
        2 * math.cos(a1) - 4 * math.sin(a1),
        3 * math.cos(a0) + 1 * math.sin(a0),
        4 * math.cos(a1) + 2 * math.sin(a1),
    ]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # position 0 is the identity
    cos0, sin0 = rope_tables(jnp.zeros((1, 1), jnp.int32), inv, 1.0)
    np.testing.assert_allclose(np.asarray(apply_rope(x, cos0, sin0)), np.asarray(x))


def test_rmsnorm_by_hand():
    norm = RMSNorm(4, 1e-6, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.asarray([1.0, 0.5, 2.0, -1.0])
    x = jnp.asarray([[1.0, 2.0, 3.0, 4.0]])
    rms = math.sqrt((1 + 4 + 9 + 16) / 4 + 1e-6)  # sqrt(7.5 + eps)
    want = np.array([1.0 * 1, 0.5 * 2, 2.0 * 3, -1.0 * 4]) / rms
    np.testing.assert_allclose(np.asarray(norm(x)), want[None], rtol=1e-6)
    # bf16 in, bf16 out; normalised in float32 like HF
    out = norm(x.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), want[None], rtol=1e-2)


def test_rmsnorm_matches_transformers():
    rs = np.random.RandomState(1)
    x = rs.randn(2, 5, 16).astype(np.float32) * 3
    w = (1 + 0.3 * rs.randn(16)).astype(np.float32)
    hf = modeling_llama.LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(torch.from_numpy(w))
        want = hf(torch.from_numpy(x)).numpy()
    norm = RMSNorm(16, 1e-5, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.asarray(w)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, rtol=1e-5, atol=1e-6)


def test_attention_mask_by_hand():
    """Packed row [1 1 1 2 2 0]: causal within each segment; sliding window 2."""
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0]])
    idx = jnp.arange(6)
    m = np.asarray(attention.attention_mask(seg, seg, idx, idx)).astype(int)[0]
    want = np.array(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],  # padding sees only itself (keeps softmax finite)
        ]
    )
    np.testing.assert_array_equal(m[:5], want[:5])
    assert not m[:5, 5].any(), "no real token attends to padding"
    w = np.asarray(attention.attention_mask(seg, seg, idx, idx, sliding_window=2)).astype(int)[0]
    np.testing.assert_array_equal(w[2], [0, 1, 1, 0, 0, 0])  # itself and 1 back
    np.testing.assert_array_equal(w[4], [0, 0, 0, 1, 1, 0])


def test_attention_fully_masked_rows_are_finite():
    B, T, N, K, H = 1, 4, 2, 1, 8
    rs = np.random.RandomState(0)
    q = jnp.asarray(rs.randn(B, T, N, H), jnp.float32)
    k = jnp.asarray(rs.randn(B, T, K, H), jnp.float32)
    v = jnp.asarray(rs.randn(B, T, K, H), jnp.float32)
    mask = jnp.zeros((B, T, T), bool)
    out = attention.attend(q, k, v, mask, "xla")
    assert np.isfinite(np.asarray(out)).all()
