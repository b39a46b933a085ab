"""Training an MoE model: the logged load-balancing loss equals transformers' aux_loss on the
same padded batch; it is the loss of the whole global batch whatever grad_accum (the router
statistics are summed before dividing); grad_accum 1 and 2 give the same update; and the aux
term enters the objective weighted like the main loss (its gradient uses each micro-batch's
own load fractions: see step.make_loss_fn)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from hf_fixtures import VOCAB, hf_model

import jaxsft
from jaxsft.train.step import make_loss_fn, make_router_load_fn, make_train_step, summarize

B, T = 4, 16


def _batch():
    rs = np.random.RandomState(0)
    ids = rs.randint(3, VOCAB, (B, T)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[1, 11:] = 0  # right padding: left out of the router statistics
    seg[3, 6:] = 0
    ids[seg == 0] = 0
    pos = np.where(seg > 0, np.arange(T), 0).astype(np.int32)
    mask = (seg > 0).astype(np.int32)
    return {"input_ids": ids, "segment_ids": seg, "positions": pos, "loss_mask": mask}


def _step(model, router_aux: float, grad_accum: int, global_load: bool = True):
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    loss_fn = make_loss_fn(graphdef, chunk=T, router_aux=router_aux)
    tx = optax.sgd(1e-1)
    load = make_router_load_fn(graphdef) if global_load else None
    step = jax.jit(make_train_step(loss_fn, tx, lambda s: 1e-1, grad_accum, load))
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jnp.zeros((2,), jnp.uint32),
    }
    return step(state, frozen, None, _batch())


@pytest.fixture(scope="module")
def moe_model(hf_checkpoints):
    path = hf_checkpoints["qwen3_moe"]
    return path, jaxsft.load_hf(path, dtype="float32")


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_logged_aux_loss_equals_transformers(hf_checkpoints, family):
    path = hf_checkpoints[family]
    model, _ = jaxsft.load_hf(path, dtype="float32")
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    batch = _batch()
    _, sums = jax.jit(make_loss_fn(graphdef, chunk=T))(params, frozen, None, batch)
    metrics = summarize(sums, batch)
    hf = hf_model(path)
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
            attention_mask=torch.tensor(batch["segment_ids"] > 0, dtype=torch.long),
            output_router_logits=True,
            use_cache=False,
        )
    want = out.aux_loss.item()  # load_balancing_loss_func over the layers (before its coef)
    got = float(metrics["router_aux_loss"])
    assert abs(got - want) <= 1e-5 * abs(want), (got, want)
    assert float(metrics["expert_load_max"]) >= 1.0 >= float(metrics["expert_load_min"])


@pytest.mark.slow
def test_grad_accum_keeps_the_global_batch(moe_model):
    """grad_accum 2 vs 1 on one global batch (aux term off): the same logged loss,
    router_aux_loss and expert load (the router statistics are summed over micro-batches
    before dividing), and the same parameters after the step."""
    _, (model, cfg) = moe_model
    one, m1 = _step(model, 0.0, 1)
    two, m2 = _step(model, 0.0, 2)
    for key in ("loss", "router_aux_loss", "expert_load_max", "expert_load_min"):
        np.testing.assert_allclose(float(m1[key]), float(m2[key]), rtol=1e-6)
    diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), one["params"], two["params"])
    assert max(jax.tree.leaves(diffs)) < 1e-6


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), a, b)))


@pytest.mark.slow
def test_grad_accum_with_the_aux_loss_equals_one_big_batch(moe_model):
    """With the aux term on, grad_accum 2 gives the parameters of grad_accum 1 (each
    micro-batch's balance-loss gradient uses the global batch's load fractions, from a
    routing pass first: make_router_load_fn); with each micro-batch's own fractions
    (train.router_aux_global_batch=False) they differ."""
    _, (model, _) = moe_model
    one, m1 = _step(model, 0.5, 1)
    two, m2 = _step(model, 0.5, 2)
    own, _ = _step(model, 0.5, 2, global_load=False)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    exact, approx = _max_diff(one["params"], two["params"]), _max_diff(one["params"], own["params"])
    assert exact < 1e-6 and approx > 30 * max(exact, 1e-8), (exact, approx)


def test_aux_term_weighs_like_the_main_loss(moe_model):
    """objective = sum of token losses + coef x balance loss x supervised tokens, so after the
    one division by the token count the loss gradient is that of mean CE + coef x aux."""
    _, (model, _) = moe_model
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    batch = _batch()
    plain = jax.jit(make_loss_fn(graphdef, chunk=T))(params, frozen, None, batch)
    with_aux = jax.jit(make_loss_fn(graphdef, chunk=T, router_aux=0.25))(
        params, frozen, None, batch
    )
    from jaxsft.models import moe

    stats = moe.LoadStats(*(plain[1][k] for k in ("expert_counts", "expert_probs", "router_rows")))
    want = plain[0] + 0.25 * moe.balance_loss(stats) * plain[1]["count"]
    np.testing.assert_allclose(float(with_aux[0]), float(want), rtol=1e-6)
