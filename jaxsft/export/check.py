"""The self-check every export ends with: reload what was written and compare logits.

The in-memory model and the reloaded one both run a fixed prompt in float32 compute at
"highest" matmul precision; the largest |difference| must stay below a tolerance relative to
the largest |logit| of the in-memory model. The tolerance depends on the dtype the weights
went through on their way to disk: float32 loses nothing (only summation order differs, e.g.
W x + s (x A) B against (W + s A B) x), bfloat16 rounds every weight to 8 bits of mantissa.
A mismatch raises ExportCheckError, so a broken export fails loudly and is never moved into
place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxsft.export.files import host_array, is_writer

# Max |logit difference| / max |logit| per dtype the weights were stored in.
TOLERANCES = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
PROBE_TOKENS = 16


class ExportCheckError(RuntimeError):
    """The exported files do not reproduce the in-memory model (a bug, not bad input)."""


def probe_ids(vocab_size: int, length: int = PROBE_TOKENS) -> np.ndarray:
    """The fixed prompt [1, T] every check runs."""
    return np.random.RandomState(1234).randint(0, vocab_size, (1, length)).astype(np.int32)


def with_compute_dtype(model: nnx.Module, dtype) -> nnx.Module:
    """A copy of `model` that computes in `dtype`; it shares the weight arrays (no copy)."""
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)
    for _, node in nnx.iter_graph(copy):
        if isinstance(node, nnx.Module) and hasattr(node, "dtype"):
            node.dtype = jnp.dtype(dtype)
    return copy


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def float32_logits(model: nnx.Module, ids: np.ndarray) -> np.ndarray:
    """Host logits [B, T, V] of `model` run in float32 compute (all processes take part).

    Compiled once per graph (the reload of a merged export shares the in-memory model's).
    """
    graphdef, state = nnx.split(with_compute_dtype(model, jnp.float32))
    with jax.default_matmul_precision("highest"):
        return host_array(_forward(graphdef, state, ids)).astype(np.float32)


def model_mesh(model: nnx.Module):
    """The mesh `model` is sharded on (its embedding's), or None when it is not."""
    sharding = getattr(model.embed_tokens.embedding[...], "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


def reload_mesh(model: nnx.Module):
    """The mesh to reload an export on: the model's own on one host, else this host's devices."""
    from jaxsft.sharding import make_mesh

    if jax.process_count() == 1:
        return model_mesh(model)
    return make_mesh(1, -1, 1, devices=jax.local_devices())


def compare(got: np.ndarray, want: np.ndarray, tol: float, what: str) -> float:
    """Relative max error of got vs want; ExportCheckError above tol."""
    if got.shape != want.shape:
        raise ExportCheckError(f"{what}: logits shape {got.shape}, expected {want.shape}")
    if not np.isfinite(got).all():
        raise ExportCheckError(f"{what}: non-finite logits after reloading the export")
    scale = max(float(np.abs(want).max()), 1e-6)
    rel = float(np.abs(got - want).max()) / scale
    if not rel <= tol:
        raise ExportCheckError(
            f"{what}: reloaded logits differ from the in-memory model by {rel:.3e} of the "
            f"logit scale {scale:.3g} (tolerance {tol:.0e}); the export is not written"
        )
    return rel


def on_writer(
    check,
    error: type[Exception] = ExportCheckError,
    failed: str = "the export self-check failed on process 0",
):
    """Run check() on process 0 only and make every process fail if it fails there: process 0
    raises its `error`, the others error(failed)."""
    if jax.process_count() == 1:
        return check()
    from jax.experimental import multihost_utils

    caught, result = None, None
    if is_writer():
        try:
            result = check()
        except error as e:
            caught = e
    ok = multihost_utils.broadcast_one_to_all(np.int32(caught is None))
    if not int(ok):
        raise caught or error(failed)
    return result


def check_merged(model: nnx.Module, out_dir, dtype_name: str) -> float | None:
    """Reload the merged export with jaxsft.load_hf and compare logits with `model`."""
    from jaxsft.hf_io import load_hf

    ids = probe_ids(model.cfg.vocab_size)
    want = float32_logits(model, ids)

    def check():
        reloaded, _ = load_hf(
            out_dir, dtype="float32", param_dtype=dtype_name, mesh=reload_mesh(model)
        )
        got = float32_logits(reloaded, ids)
        return compare(got, want, TOLERANCES[dtype_name], f"merged export {out_dir}")

    return on_writer(check)
