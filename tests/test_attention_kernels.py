"""The Pallas attention kernels (attention_kernels: pallas_gpu, splash) in interpret mode on CPU
against the einsum path ("xla", dense mask), forward and gradients.

Data: packed rows (several segments, trailing padding, a length that is not a block multiple
so the kernels pad), GQA with N=4 q heads over K=2 kv heads, a sliding window and a softcap
where the kernel takes them. bfloat16 runs compare two bfloat16 computations (kernel and
einsum path round differently; each is ~1e-2 from float32, see test_custom_vjp_grads).
Errors are max |got - ref| / max |ref|, measured over seeds 0-2 (after each TOL entry);
float32 runs at the highest matmul precision.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.models import attention

B, T, N, K, H = 2, 200, 4, 2, 16  # T pads to 256: two 128-blocks
WINDOW = 37
SOFTCAP = 3.0
# kernel -> dtype -> bound on max |got - ref| / max |ref| (outputs and q/k/v gradients)
TOL = {
    "pallas_gpu": {"float32": 1e-5, "bfloat16": 3e-2},  # measured f32 1.0e-6, bf16 1.0e-2
    "splash": {"float32": 1e-5, "bfloat16": 3e-2},  # measured f32 5.9e-7, bf16 8.7e-3
}
CASES = {  # case -> (window, softcap); pallas_gpu runs the first only (no window, no softcap)
    "packed_gqa": (None, None),
    "window": (WINDOW, None),
    "softcap_window": (WINDOW, SOFTCAP),
}


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _segments(lengths_per_row):
    """[B, T] segment ids 1, 2, ... from segment lengths; the rest of the row is padding (0)."""
    rows = []
    for lengths in lengths_per_row:
        ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
        rows.append(np.pad(ids, (0, T - len(ids))))
    return jnp.asarray(np.stack(rows), jnp.int32)


def _inputs(seed, dtype):
    kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32) * 2.0  # peaked softmax
    k = jax.random.normal(kk, (B, T, K, H), jnp.float32)
    v = jax.random.normal(kv, (B, T, K, H), jnp.float32)
    ct = jax.random.normal(kc, (B, T, N, H), jnp.float32)
    seg = _segments([(60, 5, 90, 30), (199,)])  # row 0: 15 padding slots, row 1: 1
    return tuple(x.astype(dtype) for x in (q, k, v)), ct, seg


def _value_and_grads(impl, qkv, ct, seg, window, softcap):
    idx = jnp.arange(T, dtype=jnp.int32)
    spec = attention.MaskSpec(seg, seg, idx, idx, window, True)
    mask = spec if attention.takes_spec(impl) else spec.dense()

    def f(q, k, v):
        out = attention.attend(q, k, v, mask, impl, softcap=softcap)
        return jnp.sum(out.astype(jnp.float32) * ct), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))(*qkv)
    return (out, *grads)


def _rel_err(got, ref):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape and np.isfinite(got).all()
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _compare(kernel, dtype, case, seed=0):
    window, softcap = CASES[case]
    qkv, ct, seg = _inputs(seed, jnp.dtype(dtype))
    got = _value_and_grads(f"{kernel}:interpret", qkv, ct, seg, window, softcap)
    ref = _value_and_grads("xla", qkv, ct, seg, window, softcap)
    errs = {
        name: _rel_err(g, r) for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref, strict=True)
    }
    for name, g in zip(("out", "dq", "dk", "dv"), got, strict=True):
        assert g.dtype == jnp.dtype(dtype), f"{name}: {g.dtype}"
    return errs


def _slow(*args):
    return pytest.param(*args, marks=pytest.mark.slow)


@pytest.mark.parametrize(
    "kernel,case,dtype",
    [
        ("pallas_gpu", "packed_gqa", "float32"),
        ("pallas_gpu", "packed_gqa", "bfloat16"),
        ("splash", "packed_gqa", "float32"),
        ("splash", "softcap_window", "float32"),
        ("splash", "softcap_window", "bfloat16"),
        _slow("splash", "packed_gqa", "bfloat16"),
        _slow("splash", "window", "float32"),
        _slow("splash", "window", "bfloat16"),
    ],
)
def test_kernel_matches_einsum(kernel, case, dtype):
    errs = _compare(kernel, dtype, case)
    assert max(errs.values()) <= TOL[kernel][dtype], errs


def test_splash_per_layer_window_is_a_cond():
    """Inside the layer scan the window is a traced per-layer flag: both settings agree with
    the dense path (Gemma 2 / Qwen2 layer windows)."""
    qkv, _, seg = _inputs(1, jnp.float32)
    idx = jnp.arange(T, dtype=jnp.int32)
    spec = attention.MaskSpec(seg, seg, idx, idx, WINDOW, None)

    @jax.jit
    def both(use):
        mask = attention.layer_mask(spec, use)
        return attention.attend(*qkv, mask, "splash:interpret"), attention.attend(
            *qkv, mask.dense(), "xla"
        )

    for use in (True, False):
        got, ref = both(jnp.asarray(use))
        assert _rel_err(got, ref) <= 1e-5, use


def test_pallas_gpu_falls_back_with_window_and_says_so(caplog):
    qkv, _, seg = _inputs(2, jnp.float32)
    qkv, seg = tuple(x[:, :64] for x in qkv), seg[:, :64]
    idx = jnp.arange(64, dtype=jnp.int32)
    spec = attention.MaskSpec(seg, seg, idx, idx, 9, True)
    attention._log_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="jaxsft.models.attention"):
        got = jax.jit(lambda *a: attention.attend(*a, spec, "pallas_gpu:interpret"))(*qkv)
        attention.attend(*qkv, spec, "pallas_gpu:interpret")
    said = [r for r in caplog.records if "sliding window" in r.getMessage()]
    assert len(said) == 1, caplog.records
    assert _rel_err(got, attention.attend(*qkv, spec.dense(), "xla")) <= 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{family: float32 Transformer} of tiny checkpoints; tests set its attention_impl."""
    from hf_fixtures import build_checkpoint

    import jaxsft

    root = tmp_path_factory.mktemp("kernel_ckpts")
    out = {}
    for name in ("llama", "gemma2"):
        out[name] = jaxsft.load_hf(build_checkpoint(name, root / name), dtype="float32")[0]
    return out


def _packed_batch():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 256, (2, 40)), jnp.int32)
    seg = jnp.asarray(np.stack([np.r_[[1] * 15, [2] * 20, [0] * 5], np.r_[[1] * 40]]), jnp.int32)
    pos = jnp.asarray(np.stack([np.r_[np.arange(15), np.arange(20), [0] * 5], np.arange(40)]))
    return ids, pos.astype(jnp.int32), seg


def _with_impl(model, impl, fn):
    saved, model.attention_impl = model.attention_impl, impl
    try:
        return fn()
    finally:
        model.attention_impl = saved


@pytest.mark.parametrize(
    "family,kernel", [("llama", "splash"), ("llama", "pallas_gpu"), ("gemma2", "splash")]
)
def test_model_logits_match_xla(models, family, kernel):
    """Whole tiny models (GQA; gemma2: per-layer windows and an attention softcap) give the
    same float32 logits with the kernel as with the einsum path, on a packed batch."""
    ids, pos, seg = _packed_batch()
    model = models[family]
    got, ref = (
        np.asarray(_with_impl(model, impl, lambda: model(ids, pos, seg)))
        for impl in (f"{kernel}:interpret", "xla")
    )
    live = np.asarray(seg) != 0
    assert np.abs(got[live] - ref[live]).max() <= 1e-4 * np.abs(ref[live]).max()


def test_decode_with_a_kernel_impl_uses_the_dense_path(models):
    """The KV-cache path keeps its dense mask: a kernel impl decodes like "xla"."""
    ids, pos, seg = _packed_batch()
    model = models["llama"]
    cache = model.init_cache(2, 48)
    got, ref = (
        np.asarray(_with_impl(model, impl, lambda: model.decode(ids, pos, seg, cache)[0]))
        for impl in ("splash:interpret", "xla")
    )
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


SHARDED = """
import jax, jax.numpy as jnp, numpy as np
import test_attention_kernels as t
from jaxsft import sharding
from jaxsft.models import attention
mesh = sharding.make_mesh(data=2, fsdp=1, tensor=2)
qkv, _, seg = t._inputs(3, jnp.float32)
idx = jnp.arange(t.T, dtype=jnp.int32)
spec = attention.MaskSpec(seg, seg, idx, idx, None, True)
ref = attention.attend(*qkv, spec.dense(), "xla")
for impl in ("splash:interpret", "pallas_gpu:interpret"):
    with jax.set_mesh(mesh):
        f = jax.jit(lambda q, k, v: attention.attend(q, k, v, spec, impl))
        text = f.lower(*qkv).as_text()
        assert "shard_map" in text or "sdy.manual_computation" in text, impl
        got = f(*qkv)
    assert t._rel_err(got, ref) <= 1e-5, impl
print("ok")
"""


@pytest.mark.slow
def test_kernels_under_a_mesh_run_per_device():
    """4 fake CPU devices, batch over data (2) and heads over tensor (2): shard_map'ed kernels
    equal the unsharded einsum path."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-3000:]
