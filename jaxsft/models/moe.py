"""Mixture-of-experts feed-forward as pure functions: routing, a dropless grouped FFN, and the
router losses. The decoder's MoE layer (Mixtral, Qwen2-MoE, Qwen3-MoE) is built from these.

Dropless: every token goes to its k experts; no capacity, no token dropped. The T*k (token,
expert) pairs are sorted by expert and run through grouped matmuls over each expert's
contiguous group of rows (`jax.lax.ragged_dot` on TPU/GPU; on CPU, where XLA lowers ragged_dot
to E masked dense matmuls, `tiled_matmul`: tiles of one expert's rows, at most one partly
filled tile per expert, unused tiles skipped; an expert with no token costs nothing), then put
back in token order and summed with the routing weights. Router
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


def _matmul(x, w, sizes, impl=None):
    """Grouped x [R, D] @ w [E, D, F] over row groups of `sizes`, accumulated in float32.

    impl "ragged": jax.lax.ragged_dot (native grouped kernels on TPU/GPU; on CPU XLA lowers it
    to E masked dense matmuls over all rows, E times the FLOPs); "tiled": the rows of each
    group are placed in tiles of one expert and each used tile is one small matmul (padding
    at most one tile per expert, unused tiles skipped). Default: tiled on CPU, else ragged."""
    impl = impl or ("tiled" if jax.default_backend() == "cpu" else "ragged")
    w = jnp.asarray(w, x.dtype)
    if impl == "ragged":
        out = jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32)
    else:
        out = tiled_matmul(x, w, sizes)
    return out.astype(x.dtype)


def tile_rows(rows: int, experts: int) -> int:
    """Rows per tile: about rows / experts rounded down to a power of two, in [8, 128]."""
    t = max(8, min(128, rows // max(experts, 1)))
    return 1 << (t.bit_length() - 1)


def tiled_matmul(x, w, sizes):
    """x [R, D] (rows grouped by expert, `sizes` [E] rows each) @ w [E, D, F] -> [R, F] f32."""
    R, D = x.shape
    E, _, F = w.shape
    tile = tile_rows(R, E)
    n_tiles = -(-R // tile) + E  # static bound on sum_e ceil(size_e / tile)
    per_expert = -(-sizes // tile)  # tiles of each expert
    first_tile = jnp.cumsum(per_expert) - per_expert
    group_start = jnp.cumsum(sizes) - sizes
    expert_of_row = jnp.repeat(jnp.arange(E), sizes, total_repeat_length=R)
    dest = first_tile[expert_of_row] * tile + jnp.arange(R) - group_start[expert_of_row]
    tiles = jnp.zeros((n_tiles * tile, D), x.dtype).at[dest].set(x).reshape(n_tiles, tile, D)
    ends = jnp.cumsum(per_expert)
    owner = jnp.minimum(jnp.searchsorted(ends, jnp.arange(n_tiles), side="right"), E - 1)
    used = ends[-1]

    def one(args):
        t, rows, e = args
        return jax.lax.cond(
            t < used,
            lambda: jnp.dot(rows, w[e], preferred_element_type=jnp.float32),
            lambda: jnp.zeros((tile, F), jnp.float32),
        )

    out = jax.lax.map(one, (jnp.arange(n_tiles), tiles, owner))
    return out.reshape(n_tiles * tile, F)[dest]


def grouped_ffn(x, routing: Routing, gate, up, down, act, impl=None) -> jax.Array:
    """Dropless expert FFN: x [T, D] -> sum_j w_j * down_e(act(gate_e x) * up_e x) for the k
    experts e of each token. gate, up: [E, D, F]; down: [E, F, D]. impl: see _matmul."""
    T, k = routing.experts.shape
    E = gate.shape[0]
    flat = routing.experts.reshape(-1)  # [T k]
    order = jnp.argsort(flat, stable=True)  # pairs sorted by expert
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)  # tokens per expert
    xs = x[order // k]  # [T k, D], grouped by expert
    h = act(_matmul(xs, gate, sizes, impl)) * _matmul(xs, up, sizes, impl)
    ys = _matmul(h, down, sizes, impl)
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
