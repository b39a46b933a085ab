"""The evals of a training run: held-out loss and the configured evals of jaxsft.evals (golden,
mc, ifeval, safety), read and validated at start and run before, during and after training.

In a multi-process run the held-out loss is one global computation; the other evals run on
every process over its own share of the rows (jaxsft.evals.base), on a copy of the model on
that process's devices (`local_model`: the weights gathered once per eval step, then sharded
over the local devices), and gather the results, so every process holds the same metrics."""

from __future__ import annotations

import contextlib

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jaxsft.data import pipeline


class Evals:
    """What is evaluated on eval steps: held-out loss (data.eval) and every eval the `eval`
    group configures. Files are read and validated at start, before anything is written."""

    def __init__(self, config, data, tokenizer):
        from jaxsft import evals as evals_lib

        self.config, self.data, self.tokenizer = config, data, tokenizer
        self.opts = evals_lib.options_from_config(config.eval, str(config.model.dtype))
        self.suites = evals_lib.from_config(config.eval, self.opts)

    def __call__(self, trainer, details: dict | None = None) -> dict:
        """Flat metrics ({eval_loss, golden_score, mc_accuracy, ...}); with `details`, each
        eval's full result ({**metrics, "rows"}) is stored there under its name."""
        out = held_out_loss(trainer, self.data, self.config)
        if not self.suites:
            return out
        model, mesh = eval_model(trainer.model())
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            for ev in self.suites:
                metrics, rows = ev.run(model, self.tokenizer, self.opts)
                out.update(ev.headline(metrics))
                if details is not None:
                    details[ev.name] = {**metrics, "rows": rows}
        return out


def eval_model(model):
    """(model, mesh to run it under): the model itself in a one-process run (mesh None: the
    caller's), else a copy on this process's devices and the local mesh it lives on."""
    if jax.process_count() == 1:
        return model, None
    from jaxsft.evals.base import local_mesh

    mesh = local_mesh()
    return local_model(model, mesh), mesh


def local_model(model, mesh):
    """A copy of a model whose weights span every process, on `mesh` (this process's devices):
    each weight gathered to the host, then placed with its own partition spec where the local
    mesh divides it (else replicated). Collective: every process calls it."""
    from flax import nnx
    from jax.experimental import multihost_utils

    graphdef, state = nnx.split(model)
    host = multihost_utils.process_allgather(state, tiled=True)
    specs = jax.tree.map(lambda x: getattr(x.sharding, "spec", PartitionSpec()), state)

    def place(value, spec):
        return jax.device_put(value, NamedSharding(mesh, local_spec(spec, value.shape, mesh)))

    return nnx.merge(graphdef, jax.tree.map(place, host, specs))


def local_spec(spec: PartitionSpec, shape, mesh) -> PartitionSpec:
    """`spec` (of the global mesh) on `mesh`: each dimension keeps its mesh axes when they
    divide it there, else it is replicated."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = 1
        for name in names:
            size *= mesh.shape[name]
        out.append(axes if names and dim % size == 0 else None)
    return PartitionSpec(*out)


def held_out_loss(trainer, data, config) -> dict:
    """Held-out loss over data.eval (empty dict when there is no eval set)."""
    if data.eval is None:
        return {}
    totals = {}
    for local in pipeline.eval_iterator(data, config):
        batch = {
            k: jax.make_array_from_process_local_data(trainer.batch_sharding, v)
            for k, v in local.items()
        }
        sums = jax.device_get(
            trainer.eval_step(trainer.state["params"], trainer.frozen, trainer.ref, batch)
        )
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = max(totals.get("count", 0.0), 1.0)
    return {
        "eval_loss": totals["loss_sum"] / count,
        "eval_token_accuracy": totals["correct"] / count,
    }
