"""jaxsft logits match transformers' on the tiny checkpoints of every family and quirk.

One [3, T] batch per family covers both cases with one compile:
  rows 0, 1: right padding (lengths 24 and 15; segment_ids 1 on tokens, 0 on pads), compared
             with transformers on the same rows with attention_mask;
  row 2:     a packed row, 3 segments (11, 4, 7 tokens, then 2 pads; segment_ids 1, 2, 3, 0;
             positions restarting at 0), each segment compared with transformers run on that
             segment alone.
Errors are max |jax - hf| over the compared (non-pad) tokens, relative to max |hf logit|.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from hf_fixtures import FAMILIES, VOCAB, build_checkpoint, hf_logits, hf_model

import jaxsft
from jaxsft.errors import UserError

T = 24
PAD_LENGTHS = (24, 15)
SEGMENTS = (11, 4, 7)  # + 2 pads; 11 > the mistral window of 8
FP32_TOL = 1e-4
# bf16 compute (fp32 master weights) against the fp32 reference. Measured on these checkpoints
# (x86 CPU, jax 0.10.2): 1.5e-2 to 2.0e-2 of the logit scale, the same as transformers' own
# bf16 forward (1.3e-2 to 2.1e-2); every quirk moves the logits by > 0.3 of the scale. The
# tolerance is 3e-2, or 1.5x transformers' own bf16 error where that is larger (phi3: 2.7e-2,
# jaxsft 3.7e-2 on one packed segment).
BF16_TOL = 3e-2
BF16_VS_HF = 1.5


def make_batch(seed: int = 0):
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, VOCAB, (3, T)).astype(np.int32)
    seg = np.zeros((3, T), np.int32)
    pos = np.zeros((3, T), np.int32)
    for r, n in enumerate(PAD_LENGTHS):
        seg[r, :n] = 1
        pos[r, :n] = np.arange(n)
    start = 0
    for s, n in enumerate(SEGMENTS, start=1):
        seg[2, start : start + n] = s
        pos[2, start : start + n] = np.arange(n)
        start += n
    ids[seg == 0] = 0
    return ids, pos, seg


def reference(path, ids, seg, dtype="float32"):
    """HF logits laid out like the jax batch (zeros where padding)."""
    ref = np.zeros((3, T, VOCAB), np.float32)
    mask = (seg[:2] > 0).astype(np.int64)
    ref[:2] = hf_logits(path, ids[:2], attention_mask=mask, dtype=dtype)
    start = 0
    for n in SEGMENTS:
        ref[2, start : start + n] = hf_logits(path, ids[2:3, start : start + n], dtype=dtype)[0]
        start += n
    return ref


@nnx.jit
def _forward(model, ids, pos, seg):
    return model(ids, positions=pos, segment_ids=seg)


@nnx.jit
def _decode(model, ids, pos, seg, cache):
    return model.decode(ids, pos, seg, cache)


def _measure(got, ref, mask):
    got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert np.isfinite(got[mask]).all(), "non-finite logits on real tokens"
    scale = float(np.abs(ref[mask]).max())
    err = float(np.abs(got[mask] - ref[mask]).max())
    return err, scale


def _cases(got, ref, seg):
    """{case: (max_abs_err, logit_scale)} for the padded rows and each packed segment."""
    out = {"padded": _measure(got[:2], ref[:2], seg[:2] > 0)}
    for s in range(1, len(SEGMENTS) + 1):
        out[f"packed_seg{s}"] = _measure(got[2:], ref[2:], seg[2:] == s)
    return out


def _check(family, dtype, got, ref, seg, tol, record, **extra):
    failures = []
    worst = (0.0, 1.0)
    for case, (err, scale) in _cases(got, ref, seg).items():
        if err / scale > worst[0] / worst[1]:
            worst = (err, scale)
        if not err <= tol * scale:
            failures.append(
                f"{case}: max|jax-hf| = {err:.3e} > {tol:g} * max|logit| = {tol * scale:.3e}"
            )
    record[f"{family}/{dtype}"] = {
        "max_abs_err": worst[0],
        "logit_scale": worst[1],
        "rel_err": worst[0] / worst[1],
        "tol": tol,
        **extra,
    }
    print(f"\n[parity] {family:20s} {dtype:9s} rel max err {worst[0] / worst[1]:.3e} (tol {tol:g})")
    assert not failures, f"{family} {dtype} logits differ from transformers: " + "; ".join(failures)


@pytest.fixture(scope="module")
def batch():
    return make_batch()


@pytest.fixture(scope="module")
def references(hf_checkpoints, batch):
    ids, _, seg = batch
    return {name: reference(path, ids, seg) for name, path in hf_checkpoints.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_parity(hf_checkpoints, references, batch, parity_record, family):
    model, cfg = jaxsft.load_hf(hf_checkpoints[family], dtype="float32")
    ids, pos, seg = batch
    with jax.default_matmul_precision("highest"):  # no TF32 on GPUs: this checks the math
        got = _forward(model, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg))
    assert got.dtype == jnp.float32
    _check(family, "float32", got, references[family], seg, FP32_TOL, parity_record)


# MoE in bf16: a token whose top-k choice flips between bf16 and fp32 (a near tie of two
# router logits) changes experts, and its logits move by far more than rounding; transformers'
# own bf16 forward flips too (measured max 0.22 mixtral, 0.29 qwen3_moe against its fp32). So
# the MoE check is on the 90th percentile of the per-token error (measured 1.1e-2 to 1.4e-2
# here and in transformers' bf16 alike), with the max recorded, not asserted.
MOE_BF16_PERCENTILE = 90


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_parity(hf_checkpoints, references, batch, parity_record, family):
    model, cfg = jaxsft.load_hf(hf_checkpoints[family], dtype="bfloat16")
    ids, pos, seg = batch
    got = _forward(model, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg))
    assert got.dtype == jnp.float32, "logits are float32 whatever the compute dtype"
    # For context: transformers' own bf16 error on the same tokens (not asserted).
    hf_bf16 = reference(hf_checkpoints[family], ids, seg, dtype="bfloat16")
    hf_err, hf_scale = _measure(hf_bf16, references[family], seg > 0)
    extra = {"hf_bf16_rel_err": hf_err / hf_scale}
    if cfg.num_experts:
        mask = seg > 0
        scale = float(np.abs(references[family][mask]).max())
        tokens = np.abs(np.asarray(got) - references[family]).max(-1)[mask] / scale
        p90 = float(np.percentile(tokens, MOE_BF16_PERCENTILE))
        parity_record[f"{family}/bfloat16"] = {
            "max_abs_err": float(tokens.max()) * scale,
            "logit_scale": scale,
            "rel_err": float(tokens.max()),
            "tol": BF16_TOL,
            "p90_rel_err": p90,
            **extra,
        }
        assert p90 <= BF16_TOL, f"{family}: 90th percentile token error {p90:.3e}"
        return
    tol = max(BF16_TOL, BF16_VS_HF * hf_err / hf_scale)
    _check(family, "bfloat16", got, references[family], seg, tol, parity_record, **extra)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_plain_call(hf_checkpoints, references, batch, family):
    """model(input_ids) with no positions / segment_ids: one causal segment per row."""
    model, _ = jaxsft.load_hf(hf_checkpoints[family], dtype="float32")
    ids = batch[0][:1]  # row 0 has no padding
    with jax.default_matmul_precision("highest"):
        got = np.asarray(model(jnp.asarray(ids)))
    err, scale = _measure(got, references[family][:1], np.ones((1, T), bool))
    assert err <= FP32_TOL * scale, f"{family}: {err:.3e} > {FP32_TOL:g} * {scale:.3f}"


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3", "phi4mini", "qwen2_moe"])
def test_decode_with_cache(hf_checkpoints, family):
    """Prefill 12 tokens then decode one at a time (KV cache, window 8 < 20 tokens; Gemma's
    per-layer windows, RoPE and softcaps), with a left-padded second row: the logits equal
    transformers' full forward. For LongRoPE (phi4mini, switch at 12) the prefill already
    passes the switch on both rows: a sequence that crosses it during decoding is encoded with
    short factors first and long ones after, as transformers' generate does too, and then no
    longer equals one full forward."""
    path = hf_checkpoints[family]
    model, _ = jaxsft.load_hf(path, dtype="float32")
    n, pad, prefill = 20, 3, 16 if family == "phi4mini" else 12
    ids = np.random.RandomState(1).randint(3, VOCAB, (2, n)).astype(np.int32)
    seg = np.ones((2, n), np.int32)
    seg[1, :pad] = 0
    ids[1, :pad] = 0
    pos = np.stack([np.arange(n), np.maximum(np.arange(n) - pad, 0)]).astype(np.int32)
    cache = model.init_cache(2, 32, jnp.float32)
    outs = []
    with jax.default_matmul_precision("highest"):
        for a, b in [(0, prefill)] + [(t, t + 1) for t in range(prefill, n)]:
            args = (jnp.asarray(x[:, a:b]) for x in (ids, pos, seg))
            logits, cache = _decode(model, *args, cache)
            outs.append(np.asarray(logits))
    got = np.concatenate(outs, axis=1)
    for row, start in ((0, 0), (1, pad)):
        ref = hf_logits(path, ids[row : row + 1, start:])[0]
        err, scale = _measure(got[row, start:], ref, np.ones(ref.shape[0], bool))
        assert err <= FP32_TOL * scale, f"row {row}: {err:.3e} > {FP32_TOL:g} * {scale:.3f}"


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_with_empty_experts(hf_checkpoints, family):
    """A row of one repeated token: its tokens have equal hidden states at every layer
    (attention averages equal values), so each layer routes all of them to the same k experts
    and, with 8 experts, k = 2 and 2 layers, at least 4 experts get no token at all; the
    logits still equal transformers'."""
    path = hf_checkpoints[family]
    model, cfg = jaxsft.load_hf(path, dtype="float32")
    ids = np.full((1, T), 7, np.int32)
    _, stats = nnx.jit(lambda m, x: m.hidden_and_router_stats(x))(model, jnp.asarray(ids))
    counts = np.asarray(stats.counts)  # summed over the layers
    used = cfg.num_layers * cfg.num_experts_per_tok
    assert (counts == 0).sum() >= cfg.num_experts - used and counts.sum() == T * used, counts
    with jax.default_matmul_precision("highest"):
        got = np.asarray(model(jnp.asarray(ids)))
    ref = hf_logits(path, ids)
    err, scale = _measure(got, ref, np.ones(ids.shape, bool))
    assert err <= FP32_TOL * scale, f"{err:.3e} > {FP32_TOL:g} * {scale:.3f}"


def test_qwen2_window_on_some_layers(tmp_path):
    """use_sliding_window=true with max_window_layers=1 of 3: either the same logits as
    transformers (window on layers 1 and 2 only) or a UserError naming the key."""
    path = build_checkpoint("qwen2_layer_window", tmp_path / "qwen2_layer_window")
    assert hf_model(path).config.layer_types == [
        "full_attention",
        "sliding_attention",
        "sliding_attention",
    ]
    try:
        model, _ = jaxsft.load_hf(path, dtype="float32")
    except UserError as e:
        assert "max_window_layers" in str(e) or "layer_types" in str(e), str(e)
        return
    ids = make_batch()[0][:1]  # row 0: 24 tokens, no padding
    with jax.default_matmul_precision("highest"):
        got = np.asarray(model(jnp.asarray(ids)))
    err, scale = _measure(got, hf_logits(path, ids), np.ones((1, T), bool))
    assert err <= FP32_TOL * scale, (
        f"{err:.3e} > {FP32_TOL:g} * max|logit| = {FP32_TOL * scale:.3e}"
    )


ARCH_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_parameters",
    "sliding_window",
    "layer_types",
    "attention_bias",
    "mlp_bias",
    "hidden_activation",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "partial_rotary_factor",
    "original_max_position_embeddings",
)


def test_config_round_trip(hf_checkpoints):
    """cfg.to_hf() reads back as the same ModelConfig, for both config.json styles."""
    from jaxsft.models.config import ModelConfig

    for family, path in hf_checkpoints.items():
        cfg = ModelConfig.from_hf(path)
        assert ModelConfig.from_hf(cfg.to_hf()) == cfg, family
        # transformers reads the written dict as the same architecture (what export relies on)
        orig = hf_model(path).config
        back = transformers.AutoConfig.for_model(**cfg.to_hf())
        for key in ARCH_KEYS:
            want, got = getattr(orig, key, None), getattr(back, key, None)
            if key == "head_dim" and want is None:  # Qwen2Config has none: hidden / heads
                want = orig.hidden_size // orig.num_attention_heads
            assert got == want, f"{family}: to_hf() gives {key}={got!r}, checkpoint {want!r}"
    four = ModelConfig.from_hf(hf_checkpoints["llama_4x_config"])
    five = ModelConfig.from_hf(hf_checkpoints["llama"])
    assert four.rope_theta == five.rope_theta == 500000.0
    assert four.rope_scaling == five.rope_scaling and four.head_dim == five.head_dim == 16
    assert ModelConfig.from_hf(hf_checkpoints["qwen2"]).sliding_window is None
    assert ModelConfig.from_hf(hf_checkpoints["mistral"]).sliding_window == 8
    assert ModelConfig.from_hf(hf_checkpoints["qwen3"]).head_dim == 32
    g3, g3_4x = (ModelConfig.from_hf(hf_checkpoints[k]) for k in ("gemma3", "gemma3_4x_config"))
    assert g3.sliding_layers == g3_4x.sliding_layers == (True, True, False)
    assert (g3.rope_theta, g3.local_rope_theta) == (g3_4x.rope_theta, g3_4x.local_rope_theta)
    assert g3.rope_scaling == g3_4x.rope_scaling == {"rope_type": "linear", "factor": 8.0}
