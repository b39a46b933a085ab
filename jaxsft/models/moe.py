"""Mixture-of-experts feed-forward as pure functions: routing, a dropless grouped FFN, and the
router losses. The decoder's MoE layer (Mixtral, Qwen2-MoE, Qwen3-MoE) is built from these.

Dropless: every token goes to its k experts; no capacity, no padding. The T*k (token, expert)
pairs are sorted by expert and run through grouped matmuls (`jax.lax.ragged_dot`: one matmul
per expert over its contiguous group of rows, no FLOPs on padding, an expert with no token
costs nothing), then put back in token order and summed with the routing weights. Router
logits, softmax and top-k are float32, in the order transformers computes them for these
families: softmax over all experts, top-k, then (Mixtral always; Qwen with norm_topk_prob)
renormalise the k weights to sum to one.

Shapes: T tokens, D hidden, F expert hidden, E experts, k experts per token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    weights: jax.Array  # [T, k] float32: the combine weights of the chosen experts
    experts: jax.Array  # [T, k] int32: the chosen experts, best first
    probs: jax.Array  # [T, E] float32: softmax over all experts (for the aux loss)
    logits: jax.Array  # [T, E] float32 (for the z-loss)


def route(logits: jax.Array, k: int, renormalize: bool) -> Routing:
    """Softmax over experts (float32), top-k, optional renormalisation of the k weights."""
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(weights, experts.astype(jnp.int32), probs, logits)


def _matmul(x, w, sizes):
    """Grouped x [R, D] @ w [E, D, F] over row groups of `sizes`, accumulated in float32."""
    out = jax.lax.ragged_dot(x, w.astype(x.dtype), sizes, preferred_element_type=jnp.float32)
    return out.astype(x.dtype)


def grouped_ffn(x, routing: Routing, gate, up, down, act) -> jax.Array:
    """Dropless expert FFN: x [T, D] -> sum_j w_j * down_e(act(gate_e x) * up_e x) for the k
    experts e of each token. gate, up: [E, D, F]; down: [E, F, D]."""
    T, k = routing.experts.shape
    E = gate.shape[0]
    flat = routing.experts.reshape(-1)  # [T k]
    order = jnp.argsort(flat, stable=True)  # pairs sorted by expert
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)  # tokens per expert
    xs = x[order // k]  # [T k, D], grouped by expert
    h = act(_matmul(xs, gate, sizes)) * _matmul(xs, up, sizes)
    ys = _matmul(h, down, sizes)
    ys = ys.astype(jnp.float32) * routing.weights.reshape(-1)[order][:, None]
    pairs = ys[jnp.argsort(order)].reshape(T, k, -1)  # back in token order
    return jnp.sum(pairs, axis=1).astype(x.dtype)


def dense_ffn(x, routing: Routing, gate, up, down, act) -> jax.Array:
    """Reference: every token through every expert, weighted by its (dense) routing weights;
    zero weight for the experts a token did not choose. O(T E F): for tests only."""
    E = gate.shape[0]
    dense = jnp.sum(
        jax.nn.one_hot(routing.experts, E, dtype=jnp.float32) * routing.weights[..., None], axis=1
    )  # [T, E]
    h = act(jnp.einsum("td,edf->etf", x, gate)) * jnp.einsum("td,edf->etf", x, up)
    ys = jnp.einsum("etf,efd->etd", h, down).astype(jnp.float32)
    return jnp.einsum("te,etd->td", dense, ys).astype(x.dtype)


class LoadStats(NamedTuple):
    """Sums over the tokens (and layers) of one batch; the aux loss of any union of batches is
    balance_loss(sum of their stats), so accumulation and hosts can add them before dividing."""

    counts: jax.Array  # [E] float32: (token, expert) assignments, pad tokens excluded
    prob_sums: jax.Array  # [E] float32: summed router probabilities
    rows: jax.Array  # [] float32: tokens x layers counted


def load_stats(routing: Routing, mask: jax.Array | None = None) -> LoadStats:
    """mask [T] (1 for a real token) or None (every token)."""
    T, E = routing.probs.shape
    m = jnp.ones((T,), jnp.float32) if mask is None else mask.reshape(-1).astype(jnp.float32)
    onehot = jax.nn.one_hot(routing.experts, E, dtype=jnp.float32)  # [T, k, E]
    counts = jnp.einsum("tke,t->e", onehot, m)
    return LoadStats(counts, jnp.einsum("te,t->e", routing.probs, m), jnp.sum(m))


def add_stats(a: LoadStats, b: LoadStats) -> LoadStats:
    return LoadStats(*(x + y for x, y in zip(a, b, strict=True)))


def balance_loss(stats: LoadStats) -> jax.Array:
    """transformers' load_balancing_loss_func (Switch Transformer eqs. 4-6), as Mixtral and the
    Qwen MoE models compute it over all layers: E * sum_e f_e P_e, with f_e the assignments
    and P_e the router probability of expert e, each summed over every layer's tokens and
    divided by tokens x layers. f carries no gradient (top-k is not differentiable)."""
    E = stats.counts.shape[0]
    rows = jnp.maximum(stats.rows, 1.0)
    f = jax.lax.stop_gradient(stats.counts) / rows
    return E * jnp.sum(f * stats.prob_sums / rows)


def z_loss(routing: Routing, mask: jax.Array | None = None) -> jax.Array:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(router logits)^2."""
    z = jax.nn.logsumexp(routing.logits, axis=-1) ** 2
    if mask is None:
        return jnp.mean(z)
    m = mask.reshape(-1).astype(jnp.float32)
    return jnp.sum(z * m) / jnp.maximum(jnp.sum(m), 1.0)
