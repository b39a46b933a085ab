"""Every hand-written backward pass (jax.custom_vjp) against jax.grad of a plain reference.

The references here are plain jnp (no custom_vjp) in float32 at the highest matmul precision.
Each custom path runs once in float32 and once in bfloat16 compute, with its operands cast
where the trainer casts them. Both runs are compared with the float32 reference gradient by
max |grad - ref| / max |ref|. The data have padding, packing (several segments per row,
segment id 0 = padding), sliding windows and softcaps. Find the custom VJPs with
`grep -rn custom_vjp jaxsft`.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.models import attention, ops
from jaxsft.train import loss

DTYPES = ["float32", "bfloat16"]
SEED = 0

# Largest max |grad - ref| / max |ref| allowed, per function and compute dtype. float32 is at
# rounding level (measured <= 8.2e-7; permute_rows is an exact gather), and every element must
# also be within rtol 1e-5, atol 1e-6 * max |ref|. bfloat16 is ~3x the largest error measured
# over seeds 0-9 (after each entry); permute_rows' only error is the bf16 cotangent (<= 2^-9).
TOL = {
    "einsum": {"float32": 1e-5, "bfloat16": 1.5e-2},  # bf16 measured 5.1e-3
    "core": {"float32": 1e-5, "bfloat16": 2.5e-2},  # bf16 measured 8.4e-3
    "attend": {"float32": 1e-5, "bfloat16": 3.5e-2},  # bf16 measured 1.2e-2
    "permute_rows": {"float32": 0.0, "bfloat16": 1e-2},  # bf16 measured 3.2e-3
    "xent_chunk": {"float32": 1e-5, "bfloat16": 2.5e-2},  # bf16 measured 8.6e-3 (softcap)
    "chunked_xent": {"float32": 1e-5, "bfloat16": 2e-2},  # bf16 measured 6.4e-3
    # the forward loss_sum of chunked_xent, |got - ref| / |ref|
    "chunked_xent loss_sum": {"float32": 1e-5, "bfloat16": 1.5e-3},  # bf16 measured 4.8e-4
}


@pytest.fixture(autouse=True)
def _highest_precision():
    """float32 dots at full precision on every backend (GPU/TPU default to TF32/bf16 passes)."""
    with jax.default_matmul_precision("highest"):
        yield


def _check_grad(fn: str, dtype: str, got, ref, what: str) -> None:
    """max |got - ref| / max |ref| <= TOL[fn][dtype]; got must be finite."""
    got, ref = np.asarray(got).astype(np.float64), np.asarray(ref).astype(np.float64)
    assert got.shape == ref.shape, f"{fn} {what} [{dtype}]: shape {got.shape} != {ref.shape}"
    assert np.isfinite(got).all(), f"{fn} {what} [{dtype}]: non-finite gradient"
    scale = np.abs(ref).max()
    if scale == 0:
        assert not got.any(), f"{fn} {what} [{dtype}]: reference is zero, got max {got.max()}"
        return
    err = np.abs(got - ref).max() / scale
    tol = TOL[fn][dtype]
    msg = f"{fn} {what} [{dtype}]: max|err|/max|ref| = {err:.2e} (max|ref| {scale:.2e}), tol {tol}"
    assert err <= tol, msg
    if dtype == "float32":
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * scale, err_msg=msg)


def _grad(f, argnums=0, has_aux=False):
    """Jitted jax.grad: one compiled program instead of op-by-op dispatch (keeps the file fast)."""
    return jax.jit(jax.grad(f, argnums, has_aux=has_aux))


_POOL = 1 << 14  # every draw is a prefix of one fixed-size sample: one compile per kind


def _draw(key, shape, kind: str):
    n = math.prod(shape)
    assert n <= _POOL, shape
    x = getattr(jax.random, kind)(key, (_POOL,), jnp.float32)
    return np.asarray(x)[:n].reshape(shape)


def _normal(key, shape, scale=1.0):
    return jnp.asarray(scale * _draw(key, shape, "normal"))


def _uniform(key, shape):
    """float32 numpy in [0, 1)."""
    return _draw(key, shape, "uniform")


def _randint(key, shape, high):
    return jnp.asarray((_uniform(key, shape) * high).astype(np.int32))


def _dot_loss(f, ct):
    """Scalar sum(f(*args) * ct): a random cotangent on every output element."""
    return lambda *args: (f(*args).astype(jnp.float32) * ct).sum()


def _segments(lengths_per_row, T):
    """[B, T] int32 segment ids 1, 2, ... per row from segment lengths, trailing padding 0."""
    rows = []
    for lengths in lengths_per_row:
        ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
        rows.append(np.pad(ids, (0, T - len(ids))))
    return jnp.asarray(np.stack(rows), jnp.int32)


def _mask(seg, case: str):
    """[B, T, T] packed causal mask. "padding_fully_masked": padding rows see no key at all
    (what decoding builds for padding queries); otherwise padding attends to padding."""
    idx = jnp.arange(seg.shape[1])
    window = 5 if case == "sliding_window" else None
    mask = attention.attention_mask(seg, seg, idx, idx, window)
    if case == "padding_fully_masked":
        mask &= (seg != 0)[:, :, None]
    return mask


# --- ops.einsum ------------------------------------------------------------------------------

# spec -> (a shape, b shape, out dtype; None = the compute dtype), as the trainer uses them.
EINSUM_CASES = {
    "btd,dv->btv": ((2, 5, 16), (16, 24), "float32"),  # unembedding, float32 logits
    "...i,io->...o": ((2, 3, 4, 16), (16, 8), None),  # dense layer
    "cd,dv->cv": ((7, 16), (16, 24), "float32"),  # loss chunk
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", list(EINSUM_CASES))
def test_einsum_grads(spec, dtype):
    a_shape, b_shape, out_dtype = EINSUM_CASES[spec]
    ka, kb, kg = jax.random.split(jax.random.key(SEED), 3)
    a = _normal(ka, a_shape)
    b = _normal(kb, b_shape, b_shape[0] ** -0.5)
    ct = _normal(kg, jax.eval_shape(partial(jnp.einsum, spec), a, b).shape)
    compute, out = jnp.dtype(dtype), jnp.dtype(out_dtype or dtype)
    got = _grad(_dot_loss(lambda a, b: ops.einsum(spec, a, b, compute, out), ct), (0, 1))(a, b)
    ref = _grad(_dot_loss(lambda a, b: jnp.einsum(spec, a, b), ct), (0, 1))(a, b)
    for name, g, r in zip(("da", "db"), got, ref, strict=True):
        assert g.dtype == jnp.float32, f"{spec} {name}: float32 operands get float32 gradients"
        _check_grad("einsum", dtype, g, r, f"{spec} {name}")


# --- attention ---------------------------------------------------------------------------------


def _softcap(x, cap):
    return x if cap is None else cap * jnp.tanh(x / cap)


def _ref_core(q, k, v, mask, softcap=None):
    """Plain softmax attention on heads-major q [B, K, G, T, H], k/v [B, K, S, H]."""
    s = _softcap(jnp.einsum("bkgth,bksh->bkgts", q, k), softcap)
    s = jnp.where(mask[:, None, None], s, -1e30)
    return jnp.einsum("bkgts,bksh->bkgth", jax.nn.softmax(s, axis=-1), v)


def _ref_attend(q, k, v, mask, scale=None, softcap=None):
    """Plain GQA softmax attention: q [B, T, N, H], k/v [B, S, K, H]; q head n uses kv head
    n // G."""
    H, G = q.shape[-1], q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q, k) * (H**-0.5 if scale is None else scale)
    s = jnp.where(mask[:, None], _softcap(s, softcap), -1e30)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, axis=-1), v)


def _attention_grads(f, ref_f, q, k, v, mask, dtype, **kw):
    """(custom grads, reference grads) w.r.t. float32 q, k, v; f sees them cast to dtype."""
    ct = _normal(jax.random.key(SEED + 1), q.shape)  # the output has q's shape
    dt = jnp.dtype(dtype)
    cast = lambda *xs: [x.astype(dt) for x in xs]
    custom = _dot_loss(lambda q, k, v: f(*cast(q, k, v), mask, **kw), ct)
    plain = _dot_loss(lambda q, k, v: ref_f(q, k, v, mask, **kw), ct)
    return _grad(custom, (0, 1, 2))(q, k, v), _grad(plain, (0, 1, 2))(q, k, v)


# padding_fully_masked: query rows that see no key (decode's padding) get zero gradients.
MASK_CASES = [
    "packed",
    "sliding_window",
    "softcap",  # packed mask, scores softcapped (Gemma 2)
    "padding_fully_masked",
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MASK_CASES)
def test_attention_core_grads(case, dtype):
    B, K, G, T, H = 2, 2, 2, 24, 8
    seg = _segments([[7, 9, 5], [12, 6]], T)  # 3 and 6 padding rows
    kq, kk, kv = jax.random.split(jax.random.key(SEED), 3)
    q = _normal(kq, (B, K, G, T, H), H**-0.5)  # heads-major q comes pre-scaled
    k, v = _normal(kk, (B, K, T, H)), _normal(kv, (B, K, T, H))
    kw = {"softcap": 2.0} if case == "softcap" else {}
    mask = _mask(seg, case)
    got, ref = _attention_grads(attention._core, _ref_core, q, k, v, mask, dtype, **kw)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref, strict=True):
        _check_grad("core", dtype, g, r, f"{case} {name}")
    if case == "padding_fully_masked":
        dq = np.asarray(got[0])
        assert not dq.transpose(0, 3, 1, 2, 4)[np.asarray(seg) == 0].any(), "fully masked dq"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MASK_CASES)
def test_attend_causal_blocks_grads(case, dtype):
    """attend(impl="xla") with T > CAUSAL_BLOCK: query blocks see only earlier key blocks."""
    B, T, N, K, H = 2, 160, 4, 2, 8
    assert T > attention.CAUSAL_BLOCK
    seg = _segments([[50, 70, 30], [100, 45]], T)  # segments cross the block edge; padding
    kq, kk, kv = jax.random.split(jax.random.key(SEED), 3)
    q = _normal(kq, (B, T, N, H))
    k, v = _normal(kk, (B, T, K, H)), _normal(kv, (B, T, K, H))

    def attend(q, k, v, mask, **kw):
        return attention.attend(q, k, v, mask, impl="xla", **kw)

    kw = {"scale": 0.25, "softcap": 2.0} if case == "softcap" else {}
    got, ref = _attention_grads(attend, _ref_attend, q, k, v, _mask(seg, case), dtype, **kw)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref, strict=True):
        _check_grad("attend", dtype, g, r, f"{case} {name}")


# --- loss --------------------------------------------------------------------------------------


def _ref_xent(h, kernel, targets, weights, softcap=None):
    """(sum of weighted CE, weighted argmax hits) from the full float32 (softcapped) logits."""
    logits = _softcap(jnp.einsum("...d,dv->...v", h, kernel), softcap)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return (nll * weights).sum(), ((jnp.argmax(logits, -1) == targets) * weights).sum()


@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_rows_grad(dtype):
    n, D = 23, 6
    kx, kw, kp, kg = jax.random.split(jax.random.key(SEED), 4)
    supervised = jnp.asarray(_uniform(kw, (n,)) < 0.4)
    orders = {
        "supervised first": jnp.argsort(~supervised, stable=True),  # as chunked_xent sorts
        "random": jax.random.permutation(kp, n),
    }
    dt = jnp.dtype(dtype)
    for shape in [(n, D), (n,)]:
        x, ct = _normal(kx, shape), _normal(kg, shape)
        for label, order in orders.items():
            inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n, dtype=order.dtype))
            permute = lambda x, order=order, inverse=inverse: loss.permute_rows(x, order, inverse)
            np.testing.assert_array_equal(permute(x), x[order])
            got = _grad(_dot_loss(lambda x, p=permute: p(x.astype(dt)), ct))(x)
            ref = _grad(_dot_loss(lambda x, order=order: x[order], ct))(x)
            _check_grad("permute_rows", dtype, got, ref, f"{label} {shape}")


def _xent_inputs(key, lead, D, V):
    kh, kk, kt = jax.random.split(key, 3)
    h = _normal(kh, (*lead, D))
    kernel = _normal(kk, (D, V), 2 * D**-0.5)  # logits with std ~2
    return h, kernel, _randint(kt, lead, V)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_xent_chunk_grads(softcap, dtype):
    c, D, V = 12, 16, 40
    h, kernel, targets = _xent_inputs(jax.random.key(SEED), (c,), D, V)
    weights = jnp.asarray([1, 1, 0, 1, 0.5, 0, 0, 1, 1, 0, 1, 0], jnp.float32)  # zero rows
    dt = jnp.dtype(dtype)

    def objective(f):
        # a cotangent != 1 on the loss; `correct` is a count and has no gradient
        return lambda h, kernel: jnp.dot(jnp.asarray([2.5, 0.7]), jnp.stack(f(h, kernel)))

    def chunk(h, kernel):
        return loss.xent_chunk(h.astype(dt), kernel, targets, weights, dt, softcap)

    custom = objective(chunk)
    plain = objective(lambda h, kernel: _ref_xent(h, kernel, targets, weights, softcap))
    got = _grad(custom, (0, 1))(h, kernel)
    ref = _grad(plain, (0, 1))(h, kernel)
    _check_grad("xent_chunk", dtype, got[0], ref[0], f"softcap={softcap} dh")
    _check_grad("xent_chunk", dtype, got[1], ref[1], f"softcap={softcap} dkernel")
    assert not np.asarray(got[0])[np.asarray(weights) == 0].any(), "zero-weight rows get dh 0"


def _packed_batch(key, B, T, V):
    """(targets, weights) [B, T] from shift_targets on packed rows with padding, ~40% of the
    tokens supervised."""
    seg = _segments([[10, 15, 8], [T], [20, 9]], T)
    ki, km = jax.random.split(key)
    input_ids = _randint(ki, (B, T), V)
    loss_mask = jnp.asarray(_uniform(km, (B, T)) < 0.4, jnp.int32) * (seg != 0)
    return loss.shift_targets(input_ids, loss_mask, seg)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["chunk7", "chunk16_softcap", "chunk_over_n", "no_supervision"])
def test_chunked_xent_grads(case, dtype):
    B, T, D, V = 3, 37, 16, 40
    chunk = {"chunk7": 7, "chunk_over_n": 500}.get(case, 16)
    softcap = 3.0 if case.endswith("softcap") else None
    kd, kb = jax.random.split(jax.random.key(SEED))
    h, kernel, _ = _xent_inputs(kd, (B, T), D, V)
    targets, weights = _packed_batch(kb, B, T, V)
    if case == "no_supervision":
        weights = jnp.zeros_like(weights)
    n, count = B * T, int(weights.sum())
    if chunk < n:  # the supervised tokens fill fewer chunks than there are: some are skipped
        assert n % chunk and -(-count // chunk) < -(-n // chunk)
    dt = jnp.dtype(dtype)

    def custom(h, kernel):
        sums = loss.chunked_xent(
            h.astype(dt), kernel, targets, weights, chunk=chunk, dtype=dt, softcap=softcap
        )
        return 1.7 * sums["loss_sum"], sums

    def plain(h, kernel):
        loss_sum, correct = _ref_xent(h, kernel, targets, weights, softcap)
        return 1.7 * loss_sum, correct

    got, sums = _grad(custom, (0, 1), has_aux=True)(h, kernel)
    ref, correct = _grad(plain, (0, 1), has_aux=True)(h, kernel)
    _check_grad("chunked_xent", dtype, got[0], ref[0], f"{case} dh")
    _check_grad("chunked_xent", dtype, got[1], ref[1], f"{case} dkernel")
    assert float(sums["count"]) == count
    ref_loss = float(plain(h, kernel)[0]) / 1.7
    tol = TOL["chunked_xent loss_sum"][dtype]
    err = abs(float(sums["loss_sum"]) - ref_loss) / max(abs(ref_loss), 1e-30)
    msg = f"chunked_xent {case} loss_sum [{dtype}]: |err|/|ref| = {err:.2e}, tol {tol}"
    assert (err <= tol) if count else float(sums["loss_sum"]) == 0, msg
    if dtype == "float32":
        assert float(sums["correct"]) == float(correct)
