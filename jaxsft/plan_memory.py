"""Per-device memory of a run's train step, from shapes alone (nothing allocated, no weights).

The model is built abstractly (`hf_io.abstract_model`: ShapeDtypeStruct leaves), every leaf
gets the sharding the run would give it (the same logical-axis rules as the streamed import),
the optimizer state is `jax.eval_shape(tx.init)` with each moment sharded like its parameter,
and the train step of `train.setup.compile_steps` is lowered and compiled ahead of time for
those inputs. Parameters, optimizer state and gradients are exact sums over the shards one
device holds (a QLoRA base: its codes and scales, model.quantize); the rest of what the
compiled step needs (activations saved for the backward, logits chunks, optimizer
intermediates, the batch) comes from XLA's memory analysis.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxsft import config as config_lib
from jaxsft.hf_io import abstract_model
from jaxsft.models import quant
from jaxsft.models.config import ModelConfig
from jaxsft.sharding import named_sharding
from jaxsft.train import setup as setup_lib
from jaxsft.train.optim import make_optimizer

BATCH_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass
class Plan:
    """Per-device bytes of one configuration of the train step."""

    params: int  # trainable + frozen parameters (+ the bf16 reference copy of kl_to_base)
    optimizer: int  # optimizer state (AdamW moments, counts) + step counter + RNG key
    gradients: int  # one gradient per trainable parameter, in its dtype (the accumulator)
    temporaries: int | None  # everything else the compiled step needs; None: not compiled
    compiled: dict | None = None  # XLA's memory analysis (bytes), None: not compiled
    model_type: str = ""
    num_params: int = 0  # elements of every parameter (adapters included)
    num_trainable: int = 0

    @property
    def total(self) -> int | None:
        if self.temporaries is None:
            return None
        return self.params + self.optimizer + self.gradients + self.temporaries

    def per_device(self) -> dict:
        return {
            "params": self.params,
            "optimizer": self.optimizer,
            "gradients": self.gradients,
            "temporaries": self.temporaries,
            "total": self.total,
        }


def shard_bytes(x) -> int:
    """Bytes of the shard of `x` (a ShapeDtypeStruct or array with a sharding) one device
    holds (shards of the logical-axis rules are even, so every device holds the same)."""
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return math.prod(shape) * np.dtype(x.dtype).itemsize


def tree_bytes(tree) -> int:
    """Per-device bytes of every leaf of a pytree of sharded arrays or ShapeDtypeStructs."""
    return sum(shard_bytes(x) for x in jax.tree.leaves(tree))


def _with_sharding(x, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def abstract_setup(config, mesh) -> setup_lib.TrainSetup:
    """`setup.build_model_state` with ShapeDtypeStruct leaves: the same model (remat, attention,
    unroll, LoRA), split and sharded the same way, and the optimizer state of the same tx."""
    model_cfg = ModelConfig.from_hf(config.model.path)
    lora = config_lib.lora_config(config)
    model = abstract_model(
        model_cfg,
        dtype=config.model.dtype,
        param_dtype=config.model.param_dtype,
        lora=lora,
        remat=config.model.remat,
        attention_impl=config.model.attention,
        unroll=config.model.unroll_layers,
        quantize=config_lib.quantize(config),
    )
    graphdef, state = nnx.split(model)
    for _, var in nnx.to_flat_state(state):  # the sharding hf_io.load_hf places it with
        x = var.get_value()
        names = var.get_metadata().get("out_sharding")
        var.set_value(_with_sharding(x, named_sharding(mesh, names, x.shape)))
    model = nnx.merge(graphdef, state)
    graphdef, params, frozen = setup_lib.split_trainable(model, lora)
    ref = None
    if config.train.kl_to_base and not lora:  # as build_model_state: a bf16 copy of the base
        ref = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=x.sharding), params
        )
    elif config.train.kl_to_base and lora.train_router:  # zero adapters, the routers' copy
        ref = params
    tx, schedule = make_optimizer(config.train, 1)
    replicated = NamedSharding(mesh, PartitionSpec())
    key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    state = {
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        "params": params,
        "opt_state": abstract_opt_state(tx, params, replicated),
        "rng": _with_sharding(key, replicated),
    }
    return setup_lib.TrainSetup(
        mesh=mesh,
        model_cfg=model_cfg,
        lora_cfg=lora,
        graphdef=graphdef,
        state=state,
        frozen=frozen,
        ref=ref,
        tx=tx,
        schedule=schedule,
    )


def abstract_opt_state(tx, params, replicated):
    """`setup.init_opt_state` from shapes: each moment sharded like its parameter."""
    abstract, opt_sh = setup_lib.opt_state_shardings(tx, params, replicated)
    return jax.tree.map(_with_sharding, abstract, opt_sh)


def abstract_batch(config, sharding) -> dict:
    """The global batch of one optimizer step: train.batch_size rows of data.max_length."""
    shape = (int(config.train.batch_size), int(config.data.max_length))
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for k in BATCH_KEYS}


def formula_plan(setup: setup_lib.TrainSetup) -> Plan:
    """Parameters, optimizer state and gradients per device, exactly from the shardings."""
    state = setup.state
    return Plan(
        params=tree_bytes(state["params"]) + tree_bytes(setup.frozen) + tree_bytes(setup.ref),
        optimizer=tree_bytes(state["opt_state"]) + tree_bytes((state["step"], state["rng"])),
        gradients=tree_bytes(state["params"]),
        temporaries=None,
        model_type=setup.model_cfg.model_type,
        num_params=count(state["params"]) + count(setup.frozen),
        num_trainable=count(state["params"]),
    )


def count(tree) -> int:
    """Parameters of every leaf (unsharded); a quantised kernel (QLoRA) counts its weights,
    not its codes and scales."""
    if not isinstance(tree, nnx.State):
        return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
    n = 0
    for path, var in nnx.to_flat_state(tree):
        x = var.get_value()
        if not isinstance(var, quant.QuantParam):
            n += math.prod(x.shape)
        elif path[-1] == "codes":
            n += math.prod(quant.kernel_shape(quant.kind_of(x.dtype), x.shape))
    return n


# XLA:CPU spends most of a compile in LLVM, after buffer assignment: at LLVM level 0 the
# memory analysis is the same (checked on the tiny test model and Llama-3.1-8B LoRA) and the
# compile is 1.4-2.5x faster.
# The planner never runs the program it compiles.
CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def compile_train_step(setup: setup_lib.TrainSetup, config, fast: bool = True):
    """The run's jitted train step (`setup.compile_steps`: same shardings, same donation),
    lowered and compiled ahead of time for abstract inputs. `fast`: on CPU, skip LLVM's
    optimisations (the memory analysis does not change)."""
    setup = setup_lib.compile_steps(setup, config)
    batch = abstract_batch(config, setup.batch_sharding)
    with jax.set_mesh(setup.mesh):
        lowered = setup.train_step.lower(setup.state, setup.frozen, setup.ref, batch)
    if fast and jax.default_backend() == "cpu":
        return lowered.compile(compiler_options=CPU_COMPILER_OPTIONS)
    return lowered.compile()


def memory_stats(compiled) -> dict:
    """XLA's memory analysis of a compiled program, per device, in bytes."""
    m = compiled.memory_analysis()
    fields = ("argument", "output", "alias", "temp", "generated_code")
    return {f: int(getattr(m, f"{f}_size_in_bytes")) for f in fields}


def plan(config, mesh=None, *, compile: bool = True) -> Plan:
    """The per-device memory plan of `config` on `mesh` (default: the config's mesh)."""
    mesh = mesh if mesh is not None else setup_lib.config_mesh(config)
    setup = abstract_setup(config, mesh)
    result = formula_plan(setup)
    if not compile:
        return result
    stats = memory_stats(compile_train_step(setup, config))
    # Arguments live for the whole step; donated outputs reuse their buffers (alias); the
    # gradient accumulator is among XLA's temporaries and is reported on its own.
    peak = stats["argument"] + stats["output"] - stats["alias"] + stats["temp"]
    fixed = result.params + result.optimizer + result.gradients
    result.temporaries = max(peak - fixed, 0)
    result.compiled = stats
    return result
