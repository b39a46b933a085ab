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

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxsft.models import quant
from jaxsft.sharding import BATCH


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
    if isinstance(w, quant.Quantized):  # QLoRA: dequantised inside, no gradient to w
        grouped = functools.partial(_matmul, impl=impl)
        return quant.grouped_qmatmul(w.kind, grouped, x, w.codes, w.scale, sizes)
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
    """x [R, D] (rows grouped by expert, `sizes` [E] rows each) @ w [E, D, F] -> [R, F] f32.
    Rows past sum(sizes) are padding: never multiplied, their output is zero."""
    R, D = x.shape
    E, _, F = w.shape
    tile = tile_rows(R, E)
    n_tiles = -(-R // tile) + E  # static bound on sum_e ceil(size_e / tile)
    per_expert = -(-sizes // tile)  # tiles of each expert
    first_tile = jnp.cumsum(per_expert) - per_expert
    group_start = jnp.cumsum(sizes) - sizes
    expert_of_row = jnp.repeat(jnp.arange(E), sizes, total_repeat_length=R)
    dest = first_tile[expert_of_row] * tile + jnp.arange(R) - group_start[expert_of_row]
    dest = jnp.where(jnp.arange(R) < jnp.sum(sizes), dest, n_tiles * tile)  # padding: nowhere
    tiles = jnp.zeros((n_tiles * tile, D), x.dtype).at[dest].set(x, mode="drop")
    tiles = tiles.reshape(n_tiles, tile, D)
    ends = jnp.cumsum(per_expert)
    owner = jnp.minimum(jnp.searchsorted(ends, jnp.arange(n_tiles), side="right"), E - 1)
    used = ends[-1]

    def one(args):
        t, rows, e = args
        return jax.lax.cond(
            t < used,
            lambda: jnp.dot(rows, w[e], preferred_element_type=jnp.float32),
            lambda: _zeros((tile, F), rows, w[e]),
        )

    out = jax.lax.map(one, (jnp.arange(n_tiles), tiles, owner))
    return out.reshape(n_tiles * tile, F).at[dest].get(mode="fill", fill_value=0)


def _zeros(shape, *like):
    """float32 zeros that vary over the manual mesh axes of every array in `like` (inside
    shard_map the two branches of a cond must agree on that; zeros_like carries it)."""
    return sum(jnp.zeros_like(a, shape=shape, dtype=jnp.float32) for a in like)


PROJS = ("gate_proj", "up_proj", "down_proj")


def expert_mlp(xs, sizes, w: dict, act, impl=None, lora_scale: float = 0.0) -> jax.Array:
    """The experts' MLP on rows grouped by expert: xs [R, D], `sizes` [E] rows per expert (rows
    past sum(sizes) are padding: their output is zero) -> [R, D].

    w: gate_proj, up_proj [E, D, F], down_proj [E, F, D], and for each projection that has
    one-adapter-per-expert LoRA, NAME_lora_a [E, in, r] and NAME_lora_b [E, r, out]: the
    delta lora_scale x (x A_e) B_e is two more grouped matmuls."""

    def proj(name, h):
        y = _matmul(h, w[name], sizes, impl)
        if name + "_lora_a" in w:
            a = _matmul(h, w[name + "_lora_a"], sizes, impl)
            delta = _matmul(a, w[name + "_lora_b"], sizes, impl)
            y = y + (lora_scale * delta.astype(jnp.float32)).astype(y.dtype)
        return y

    return proj("down_proj", act(proj("gate_proj", xs)) * proj("up_proj", xs))


def grouped_ffn(x, routing: Routing, w: dict, act, impl=None, lora_scale: float = 0.0):
    """Dropless expert FFN: x [T, D] -> sum_j w_j * down_e(act(gate_e x) * up_e x) for the k
    experts e of each token. w: see expert_mlp. impl: see _matmul."""
    T, k = routing.experts.shape
    E = w["gate_proj"].shape[0]
    flat = routing.experts.reshape(-1)  # [T k]
    order = jnp.argsort(flat, stable=True)  # pairs sorted by expert
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)  # tokens per expert
    ys = expert_mlp(x[order // k], sizes, w, act, impl, lora_scale)  # grouped by expert
    ys = ys.astype(jnp.float32) * routing.weights.reshape(-1)[order][:, None]
    pairs = ys[jnp.argsort(order)].reshape(T, k, -1)  # back in token order
    return jnp.sum(pairs, axis=1).astype(x.dtype)


def exchanged_ffn(x, routing: Routing, w: dict, act, impl=None, lora_scale=0.0, axis="expert"):
    """grouped_ffn with the experts split over mesh axis `axis` (inside shard_map): x [t, D]
    and routing are this device's tokens, w holds its E_l = E / n local experts (experts
    d E_l .. (d+1) E_l - 1 on device d). Each (token, expert) pair is sent to the device of
    its expert (all_to_all), the received rows are grouped by local expert and run through
    expert_mlp, and the outputs go back the same way (all_to_all) to be combined.

    Dropless: a device may receive every pair of every device, so each of the n send chunks
    holds t k rows (memory n x t k x D; the matmuls skip the padding). XLA:CPU has no
    ragged_all_to_all, which would send only the real rows; this runs everywhere."""
    t, k = routing.experts.shape
    D = x.shape[-1]
    E_l = w["gate_proj"].shape[0]
    n = jax.lax.axis_size(axis)
    flat = routing.experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # by expert, hence by device
    chosen = flat[order]
    dest = chosen // E_l
    sizes = jnp.bincount(dest, length=n)
    slot = jnp.arange(t * k) - (jnp.cumsum(sizes) - sizes)[dest]  # row within dest's chunk
    send = jnp.zeros((n, t * k, D), x.dtype).at[dest, slot].set(x[order // k])
    local = jnp.full((n, t * k), E_l, jnp.int32).at[dest, slot].set(chosen % E_l)
    recv = jax.lax.all_to_all(send, axis, 0, 0).reshape(n * t * k, D)  # [source, row]
    ids = jax.lax.all_to_all(local, axis, 0, 0).reshape(-1)  # local expert, E_l = padding
    regroup = jnp.argsort(ids, stable=True)  # real rows by local expert, padding last
    counts = jnp.bincount(ids, length=E_l + 1)[:E_l].astype(jnp.int32)
    ys = expert_mlp(recv[regroup], counts, w, act, impl, lora_scale)
    back = ys[jnp.argsort(regroup)].reshape(n, t * k, D)
    ys = jax.lax.all_to_all(back, axis, 0, 0)[dest, slot]  # my pairs, in sorted order
    ys = ys.astype(jnp.float32) * routing.weights.reshape(-1)[order][:, None]
    pairs = ys[jnp.argsort(order)].reshape(t, k, D)
    return jnp.sum(pairs, axis=1).astype(x.dtype)


def ffn(x, routing, w: dict, act, lora_scale: float = 0.0):
    """grouped_ffn, or under a mesh with an expert axis (mesh.expert > 1) the same FFN
    with the experts split over that axis and the tokens exchanged (exchanged_ffn in a
    shard_map): the token rows are split over every mesh axis whose product divides them, the
    expert weights over `expert` only (gathered over fsdp/tensor for the layer, as FSDP does).
    Rows that the expert axis does not divide (a decode step) take the local path."""
    mesh = jax.sharding.get_abstract_mesh()
    n = 1 if mesh.empty else dict(mesh.shape).get("expert", 1)
    if n == 1 or x.shape[0] % n:
        return grouped_ffn(x, routing, w, act, lora_scale=lora_scale)
    rows, split = {"expert"}, n
    for name in (*BATCH, "tensor"):
        size = mesh.shape[name]
        if name not in rows and size > 1 and x.shape[0] % (split * size) == 0:
            rows, split = rows | {name}, split * size
    order = tuple(a for a in (*BATCH, "tensor") if a in rows)  # the batch's own device order
    r, others = P(order), tuple(a for a in order if a != "expert")

    def local(x, routing, w):
        # The weights, the same on every device of `others`, meet each device's own tokens:
        # marking them varying here puts the gradient's sum over those devices at this one
        # point (not inside the tiled matmul's loop, where devices take different branches).
        if others:
            w = jax.tree.map(lambda a: jax.lax.pcast(a, others, to="varying"), w)
        return exchanged_ffn(x, routing, w, act, lora_scale=lora_scale)

    spec = Routing(r, r, r, r)
    w_spec = {name: P("expert") for name in w}
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(r, spec, w_spec),
        out_specs=r,
    )(x, routing, w)


def dense_ffn(x, routing: Routing, w: dict, act) -> jax.Array:
    """Reference: every token through every expert, weighted by its (dense) routing weights;
    zero weight for the experts a token did not choose. O(T E F): for tests only."""
    gate, up, down = (w[p] for p in PROJS)
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
