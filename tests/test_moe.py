"""The MoE layer's pure functions (jaxsft/models/moe.py) against transformers' own sparse MoE
blocks (Mixtral, Qwen2-MoE with its gated shared expert, Qwen3-MoE), against a dense reference
(every token through every expert), gradients against jax.grad of that reference, and the
load-balancing loss against transformers' load_balancing_loss_func.

Routing is forced so that one expert gets no token at all (its router row is very negative):
the grouped matmul must handle an empty group, in the forward and the backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxsft.models import moe
from jaxsft.models.layers import ACTIVATIONS

T, D, F, E, K = 24, 16, 12, 6, 2
EMPTY = 4  # the expert no token chooses


def _params(seed: int, dtype=np.float32):
    rs = np.random.RandomState(seed)
    router = rs.normal(0, 0.5, (D, E)).astype(np.float32)
    router[:, EMPTY] = -50.0  # with x > 0 below, expert EMPTY's logit is far below the rest
    return dict(
        x=np.abs(rs.normal(0, 1, (T, D))).astype(dtype),
        router=router,
        gate=rs.normal(0, 0.3, (E, D, F)).astype(dtype),
        up=rs.normal(0, 0.3, (E, D, F)).astype(dtype),
        down=rs.normal(0, 0.3, (E, F, D)).astype(dtype),
    )


def _forward(p, ffn, renormalize=True, **kw):
    x = jnp.asarray(p["x"])
    routing = moe.route(x.astype(jnp.float32) @ p["router"], K, renormalize)
    return ffn(x, routing, _w(p), ACTIVATIONS["silu"], **kw), routing


def _w(p):
    return dict(zip(moe.PROJS, (p["gate"], p["up"], p["down"]), strict=True))


def test_routing_leaves_an_expert_empty():
    _, routing = _forward(_params(0), moe.grouped_ffn)
    counts = np.bincount(np.asarray(routing.experts).reshape(-1), minlength=E)
    assert counts[EMPTY] == 0 and counts.sum() == T * K and (counts > 0).sum() >= 3


@pytest.mark.parametrize("impl", ["tiled", "ragged"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_grouped_equals_dense_fp32(renormalize, impl):
    p = _params(1)
    got, _ = _forward(p, moe.grouped_ffn, renormalize, impl=impl)
    want, _ = _forward(p, moe.dense_ffn, renormalize)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_tiled_matmul_groups_and_tiles():
    """tiled_matmul == ragged_dot on groups that are empty, of one row, not a multiple of the
    tile and larger than several tiles; forward and gradients."""
    rs = np.random.RandomState(7)
    sizes = jnp.asarray([37, 0, 1, 64, 130, 0], jnp.int32)
    R = int(sizes.sum())
    x = jnp.asarray(rs.normal(0, 1, (R, 8)), jnp.float32)
    w = jnp.asarray(rs.normal(0, 1, (6, 8, 5)), jnp.float32)
    assert moe.tile_rows(R, 6) == 32
    got = moe.tiled_matmul(x, w, sizes)
    want = jax.lax.ragged_dot(x, w, sizes)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    cot = jnp.asarray(rs.normal(0, 1, (R, 5)), jnp.float32)
    g_got = jax.grad(lambda a, b: jnp.sum(moe.tiled_matmul(a, b, sizes) * cot), (0, 1))(x, w)
    g_want = jax.grad(lambda a, b: jnp.sum(jax.lax.ragged_dot(a, b, sizes) * cot), (0, 1))(x, w)
    for g, h in zip(g_got, g_want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(g_got[1][1]).max()) == 0.0  # an empty group gets no gradient


# bf16: both sides round the expert matmuls to bf16 but in a different order (per group vs
# per expert over all tokens); measured max error / max |out| ~ 4e-3.
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_gradients_match_dense_reference(dtype, tol):
    """d/d(x, router, gate, up, down) of <out, cotangent>: grouped (ragged_dot's own VJP,
    through the sort and the routing weights) vs jax.grad of the dense reference."""
    p = {k: jnp.asarray(v) for k, v in _params(2).items()}
    dt = jnp.dtype(dtype)
    p = {k: (v if k == "router" else v.astype(dt)) for k, v in p.items()}
    cot = jnp.asarray(np.random.RandomState(3).normal(0, 1, (T, D)), jnp.float32)

    def loss(ffn, params):
        x = params["x"]
        routing = moe.route(x.astype(jnp.float32) @ params["router"], K, True)
        out = ffn(x, routing, _w(params), jax.nn.silu)
        return jnp.sum(out.astype(jnp.float32) * cot)

    got = jax.grad(lambda q: loss(moe.grouped_ffn, q))(p)
    want = jax.grad(lambda q: loss(moe.dense_ffn, q))(p)
    for name in p:
        g, w = (np.asarray(a[name], np.float32) for a in (got, want))
        scale = max(np.abs(w).max(), 1e-6)
        assert np.abs(g - w).max() / scale < tol, (name, np.abs(g - w).max() / scale)
    assert np.abs(np.asarray(got["gate"][EMPTY], np.float32)).max() == 0  # no token, no grad


def _torch_block(family: str, p, shared=None):
    """transformers' sparse MoE block of `family` holding the weights of `p`."""
    import transformers as tf

    common = dict(hidden_size=D, num_experts_per_tok=K, hidden_act="silu")
    if family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        block = MixtralSparseMoeBlock(
            tf.MixtralConfig(**common, intermediate_size=F, num_local_experts=E)
        )
    elif family == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

        cfg = tf.Qwen2MoeConfig(
            **common,
            moe_intermediate_size=F,
            num_experts=E,
            norm_topk_prob=False,
            shared_expert_intermediate_size=shared["gate"].shape[1],
        )
        block = Qwen2MoeSparseMoeBlock(cfg)
    else:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        cfg = tf.Qwen3MoeConfig(  # norm_topk_prob as Qwen3-30B-A3B ships it (default False)
            **common, moe_intermediate_size=F, num_experts=E, norm_topk_prob=True
        )
        block = Qwen3MoeSparseMoeBlock(cfg)
    t = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
    with torch.no_grad():
        block.gate.weight.copy_(t(p["router"].T))
        gate_up = np.concatenate([p["gate"], p["up"]], axis=2).transpose(0, 2, 1)  # [E, 2F, D]
        block.experts.gate_up_proj.copy_(t(gate_up))
        block.experts.down_proj.copy_(t(p["down"].transpose(0, 2, 1)))  # [E, D, F]
        if shared is not None:
            block.shared_expert.gate_proj.weight.copy_(t(shared["gate"].T))
            block.shared_expert.up_proj.weight.copy_(t(shared["up"].T))
            block.shared_expert.down_proj.weight.copy_(t(shared["down"].T))
            block.shared_expert_gate.weight.copy_(t(shared["gate_w"].T))
    return block.eval()


@pytest.mark.parametrize(
    "family,renormalize", [("mixtral", True), ("qwen2_moe", False), ("qwen3_moe", True)]
)
def test_block_matches_transformers(family, renormalize):
    """Router (softmax, top-k, renormalisation as each family does it), the grouped experts
    and, for Qwen2-MoE, the shared expert behind its sigmoid gate: fp32 parity with
    transformers' block on the same weights, with one expert receiving no token."""
    p = _params(4)
    shared = None
    if family == "qwen2_moe":
        rs = np.random.RandomState(5)
        shared = dict(
            gate=rs.normal(0, 0.3, (D, 20)).astype(np.float32),
            up=rs.normal(0, 0.3, (D, 20)).astype(np.float32),
            down=rs.normal(0, 0.3, (20, D)).astype(np.float32),
            gate_w=rs.normal(0, 0.3, (D, 1)).astype(np.float32),
        )
    got, _ = _forward(p, moe.grouped_ffn, renormalize)
    if shared is not None:
        x = jnp.asarray(p["x"])
        dense = (jax.nn.silu(x @ shared["gate"]) * (x @ shared["up"])) @ shared["down"]
        got = got + jax.nn.sigmoid(x @ shared["gate_w"]) * dense
    block = _torch_block(family, p, shared)
    with torch.no_grad():
        want = block(torch.tensor(p["x"])[None]).numpy()[0]
    err = np.abs(np.asarray(got) - want).max() / np.abs(want).max()
    assert err < 1e-5, err


def test_balance_loss_matches_transformers():
    """Over two layers and a padding mask; and the stats add: the loss of the union of two
    half-batches from summed stats equals the loss of the whole batch."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    rs = np.random.RandomState(6)
    logits = [rs.normal(0, 1, (T, E)).astype(np.float32) for _ in range(2)]
    mask = (rs.uniform(size=T) > 0.3).astype(np.float32)
    want = load_balancing_loss_func(
        tuple(torch.tensor(lg) for lg in logits), E, K, torch.tensor(mask.reshape(2, T // 2))
    ).item()
    routings = [moe.route(jnp.asarray(lg), K, True) for lg in logits]
    stats = [moe.load_stats(r, jnp.asarray(mask)) for r in routings]
    total = moe.add_stats(*stats)
    assert abs(float(moe.balance_loss(total)) - want) < 1e-6 * max(1.0, abs(want))
    halves = [
        moe.load_stats(moe.Routing(*(a[s] for a in r)), jnp.asarray(mask[s]))
        for r in routings
        for s in (slice(0, T // 2), slice(T // 2, T))
    ]
    summed = halves[0]
    for h in halves[1:]:
        summed = moe.add_stats(summed, h)
    np.testing.assert_allclose(float(moe.balance_loss(summed)), want, rtol=1e-6)
    no_mask = load_balancing_loss_func(tuple(torch.tensor(lg) for lg in logits), E, K).item()
    unmasked = moe.add_stats(*(moe.load_stats(r) for r in routings))
    np.testing.assert_allclose(float(moe.balance_loss(unmasked)), no_mask, rtol=1e-6)


def test_z_loss_value():
    logits = jnp.asarray([[0.0, 0.0], [1.0, 3.0]])
    routing = moe.route(logits, 1, False)
    want = (np.log(2.0) ** 2 + np.log(np.exp(1.0) + np.exp(3.0)) ** 2) / 2
    np.testing.assert_allclose(float(moe.z_loss(routing)), want, rtol=1e-6)
    masked = moe.z_loss(routing, jnp.asarray([0.0, 1.0]))
    np.testing.assert_allclose(float(masked), np.log(np.exp(1.0) + np.exp(3.0)) ** 2, rtol=1e-6)
