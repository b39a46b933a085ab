"""The train and eval steps: pure functions of (state, frozen, ref, batch), jitted once.

state = {"step", "params" (the trainable partition), "opt_state", "rng"}; `frozen` is the rest of
the model (the base weights of a LoRA run, empty for full fine-tuning); `ref` is the frozen
reference copy used by the KL-to-base term of a full fine-tune (None otherwise).
Gradient accumulation is a scan over micro-batches inside the step; the loss and gradients are
divided once, by the number of supervised tokens of the whole global batch.

Numerical guard: a step whose loss or gradient norm is not finite keeps the old parameters and
optimizer state (the step counter still advances, the batch counts as consumed) and reports
`skipped` = 1; the loop stops the run after train.max_bad_steps of them in a row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxsft.models import moe
from jaxsft.sharding import constrain
from jaxsft.train.loss import chunked_xent, shift_targets


def make_loss_fn(
    graphdef, *, chunk: int, kl_beta: float = 0.0, lora: bool = False, router_aux: float = 0.0
):
    """(params, frozen, ref, batch) -> (objective_sum, sums).

    MoE models add their router load statistics to the sums (expert_counts, expert_probs
    [E], router_rows), so the logged load-balancing loss is that of the whole global batch;
    with router_aux > 0 the objective gains router_aux x balance loss x supervised tokens of
    this (micro-)batch, so that after the one division by the global token count it weighs as
    the main loss does. The load fractions f of the balance loss carry no gradient; a batch
    that holds `router_counts` and `router_rows` (the global batch's, from make_router_load_fn)
    and `supervised_total` takes its f from them instead of its own, so that the terms of
    the micro-batches of a step add up to the global batch's balance loss and its gradient."""

    def loss_fn(params, frozen, ref, batch):
        model = nnx.merge(graphdef, params, frozen)
        ids, seg, pos = batch["input_ids"], batch["segment_ids"], batch["positions"]
        h, stats = model.hidden_and_router_stats(ids, pos, seg)
        targets, weights = shift_targets(ids, batch["loss_mask"], seg)
        base = None
        if kl_beta:
            # LoRA: the base is the same weights with adapters off (no second copy), unless
            # `ref` holds the base values (trained routers: setup.kl_reference).
            base_params = jax.tree.map(jnp.zeros_like, params) if lora and ref is None else ref
            base_model = nnx.merge(graphdef, base_params, frozen)
            hb = jax.lax.stop_gradient(base_model.hidden(ids, pos, seg))
            base = (hb, jax.lax.stop_gradient(base_model.unembed_kernel()))
        sums = chunked_xent(
            h,
            model.unembed_kernel(),
            targets,
            weights,
            chunk=chunk,
            dtype=model.dtype,
            base=base,
            kl_beta=kl_beta,
            softcap=model.cfg.final_softcap,
        )
        if stats is not None:
            sums.update(
                expert_counts=stats.counts, expert_probs=stats.prob_sums, router_rows=stats.rows
            )
            if router_aux and "router_counts" in batch:  # its share of the global batch's
                share = moe.LoadStats(batch["router_counts"], stats.prob_sums, batch["router_rows"])
                aux = moe.balance_loss(share) * batch["supervised_total"]
                sums["objective_sum"] = sums["objective_sum"] + router_aux * aux
            elif router_aux:
                aux = moe.balance_loss(stats) * sums["count"]
                sums["objective_sum"] = sums["objective_sum"] + router_aux * aux
        return sums["objective_sum"], sums

    return loss_fn


def make_router_load_fn(graphdef):
    """(params, frozen, micro-batches [A, b, T]) -> the extra keys that make each micro-batch's
    balance-loss term use the global batch's load fractions (make_loss_fn): one forward pass
    of the decoder per micro-batch (no head, no backward) for the router statistics."""

    def router_load(params, frozen, mbs):
        model = nnx.merge(graphdef, jax.lax.stop_gradient(params), frozen)

        def stats_of(carry, mb):
            mb = jax.tree.map(lambda x: constrain(x, "batch", None), mb)
            _, stats = model.hidden_and_router_stats(
                mb["input_ids"], mb["positions"], mb["segment_ids"]
            )
            _, weights = shift_targets(mb["input_ids"], mb["loss_mask"], mb["segment_ids"])
            return jax.tree.map(jnp.add, carry, (stats, jnp.sum(weights))), None

        E = model.cfg.num_experts
        zero = (moe.LoadStats(jnp.zeros(E), jnp.zeros(E), jnp.zeros(())), jnp.zeros(()))
        (stats, total), _ = jax.lax.scan(stats_of, zero, mbs)
        return {"router_counts": stats.counts, "router_rows": stats.rows, "supervised_total": total}

    return router_load


def micro_batches(batch, grad_accum: int):
    """[B, T] -> [A, B/A, T], micro-batch a = rows a, A + a, 2A + a, ... so every micro-batch
    spreads evenly over the devices that hold the rows."""

    def split(x):
        B = x.shape[0]
        return x.reshape(B // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, batch)


def make_train_step(loss_fn, tx, schedule, grad_accum: int, router_load=None):
    """router_load (make_router_load_fn, or None): with grad_accum > 1, first the global
    batch's router load, then each micro-batch's balance-loss gradient with it (exact)."""

    def train_step(state, frozen, ref, batch):
        params = state["params"]
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        mbs = micro_batches(batch, grad_accum)
        extra = router_load(params, frozen, mbs) if router_load and grad_accum > 1 else {}

        def accumulate(carry, mb):
            mb = jax.tree.map(lambda x: constrain(x, "batch", None), mb)
            (_, sums), grads = grad_fn(params, frozen, ref, {**mb, **extra})
            return jax.tree.map(jnp.add, carry, (grads, sums)), None

        first = jax.tree.map(lambda x: x[0], mbs)
        _, sums_shape = jax.eval_shape(loss_fn, params, frozen, ref, {**first, **extra})
        zeros = (
            jax.tree.map(jnp.zeros_like, params),
            jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), sums_shape),
        )
        (grads, sums), _ = jax.lax.scan(accumulate, zeros, mbs)
        count = jnp.maximum(sums["count"], 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        finite = jnp.isfinite(sums["objective_sum"]) & jnp.isfinite(grad_norm)
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        new_state = {
            "step": state["step"] + 1,
            "params": keep(optax.apply_updates(params, updates), params),
            "opt_state": keep(opt_state, state["opt_state"]),
            "rng": state["rng"],
        }
        metrics = summarize(sums, batch)
        metrics.update(
            grad_norm=grad_norm,
            learning_rate=schedule(state["step"]),
            skipped=1.0 - finite.astype(jnp.float32),
        )
        return new_state, metrics

    return train_step


def make_eval_step(loss_fn):
    def eval_step(params, frozen, ref, batch):
        _, sums = loss_fn(params, frozen, ref, batch)
        sums = {k: v for k, v in sums.items() if v.ndim == 0}  # token sums (no expert loads)
        sums["tokens"] = (batch["segment_ids"] != 0).sum().astype(jnp.float32)
        return sums

    return eval_step


def summarize(sums, batch):
    """Per-step metrics from token sums (means over supervised tokens)."""
    count = jnp.maximum(sums["count"], 1.0)
    out = {
        "loss": sums["loss_sum"] / count,
        "kl_to_base": sums["kl_sum"] / count,
        "mean_token_accuracy": sums["correct"] / count,
        "supervised_tokens": sums["count"],
        "tokens": (batch["segment_ids"] != 0).sum().astype(jnp.float32),
    }
    if "expert_counts" in sums:  # MoE: the global batch's balance loss and expert load
        stats = moe.LoadStats(sums["expert_counts"], sums["expert_probs"], sums["router_rows"])
        counts = sums["expert_counts"]
        out.update(
            router_aux_loss=moe.balance_loss(stats),
            expert_load_max=jnp.max(counts) / jnp.maximum(jnp.mean(counts), 1e-9),
            expert_load_min=jnp.min(counts) / jnp.maximum(jnp.mean(counts), 1e-9),
        )
    return out
