"""Named setup steps of a run: the model split into trainable and frozen parts, the optimizer,
the sharded train state and the jitted steps."""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxsft import config as config_lib
from jaxsft import run_dir as rd
from jaxsft.checkpoint import attempt, checkpoint_dir, existing_steps, restore_params
from jaxsft.errors import UserError
from jaxsft.hf_io import load_hf
from jaxsft.models.config import ModelConfig
from jaxsft.models.lora import LoraConfig, LoRAParam, trainable
from jaxsft.sharding import BATCH, make_mesh
from jaxsft.train import step as step_lib
from jaxsft.train.optim import make_optimizer


@dataclasses.dataclass
class TrainSetup:
    mesh: jax.sharding.Mesh
    model_cfg: ModelConfig
    lora_cfg: LoraConfig | None
    graphdef: nnx.GraphDef
    state: dict  # {"step", "params", "opt_state", "rng"}
    frozen: nnx.State
    ref: nnx.State | None
    tx: object
    schedule: object
    train_step: object = None
    eval_step: object = None
    batch_sharding: NamedSharding = None

    def model(self):
        """The current model (trainable and frozen parts merged)."""
        return nnx.merge(self.graphdef, self.state["params"], self.frozen)


def config_mesh(config):
    m = config.mesh
    return make_mesh(m.data, m.fsdp, m.tensor, expert=m.expert)


def split_trainable(model, lora: LoraConfig | None):
    """(graphdef, trainable, frozen): the adapters of a LoRA run (and its MoE routers with
    lora.train_router), else every parameter."""
    return nnx.split(model, trainable(lora), ...)


def kl_reference(config, lora: LoraConfig | None, params):
    """The base values of the trainable partition for the KL-to-base term, or None: a bf16
    copy for full fine-tuning; None for a LoRA run (the base is its adapters at zero), except
    with trained routers: zero adapters and a copy of the routers as loaded."""
    if not config.train.kl_to_base or (lora and not lora.train_router):
        return None
    if not lora:
        return jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)

    def base(v):  # new buffers (the params are donated), placed like the parameter
        x = v[...]
        value = jnp.zeros_like(x) if isinstance(v, LoRAParam) else jnp.array(x, copy=True)
        return v.replace(jax.device_put(value, x.sharding))

    return jax.tree.map(base, params, is_leaf=lambda v: isinstance(v, nnx.Variable))


def load_model(config, mesh):
    """The run's model from model.path, sharded on `mesh` (adapters freshly initialised; the
    base quantised as it is read with model.quantize)."""
    return load_hf(
        config.model.path,
        dtype=config.model.dtype,
        param_dtype=config.model.param_dtype,
        mesh=mesh,
        lora=config_lib.lora_config(config),
        remat=config.model.remat,
        attention_impl=config.model.attention,
        unroll=config.model.unroll_layers,
        quantize=config_lib.quantize(config),
        seed=config.train.seed,
    )


def build_model_state(config, mesh=None, total_steps: int = 1) -> TrainSetup:
    """Load the HF checkpoint sharded on the mesh, split it, and create the optimizer state."""
    mesh = mesh if mesh is not None else config_mesh(config)
    lora = config_lib.lora_config(config)
    model, model_cfg = load_model(config, mesh)
    graphdef, params, frozen = split_trainable(model, lora)
    ref = kl_reference(config, lora, params)
    tx, schedule = make_optimizer(config.train, total_steps)
    state = initial_state(tx, params, mesh, config.train.seed)
    return TrainSetup(
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


def initial_state(tx, params, mesh, seed: int) -> dict:
    """The train state at step 0: params, fresh optimizer state sharded like them, the RNG."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return {
        "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
        "params": params,
        "opt_state": init_opt_state(tx, params, replicated),
        "rng": jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated),
    }


def opt_state_shardings(tx, params, replicated):
    """(abstract optimizer state, its shardings): each moment sharded like its parameter,
    counts replicated. params may be arrays or ShapeDtypeStructs with shardings."""
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    abstract = jax.eval_shape(tx.init, params)
    opt_sh = optax.tree_map_params(
        tx, lambda _, sh: sh, abstract, param_sh, transform_non_params=lambda _: replicated
    )
    return abstract, opt_sh


def init_opt_state(tx, params, replicated):
    """Optimizer state with each moment sharded like its parameter (counts replicated)."""
    _, opt_sh = opt_state_shardings(tx, params, replicated)
    return jax.jit(tx.init, out_shardings=opt_sh)(params)


def router_aux_coef(config, model_cfg) -> float:
    """train.router_aux_loss_coef, or (when < 0, the default) the checkpoint's own
    router_aux_loss_coef; 0 for a dense model."""
    if not model_cfg.num_experts:
        return 0.0
    coef = float(config.train.get("router_aux_loss_coef", -1.0))
    return model_cfg.router_aux_loss_coef if coef < 0 else coef


def compile_steps(setup: TrainSetup, config) -> TrainSetup:
    """Jit the train and eval steps with explicit shardings; the state is donated."""
    router_aux = router_aux_coef(config, setup.model_cfg)
    loss_fn = step_lib.make_loss_fn(
        setup.graphdef,
        chunk=config.train.loss_chunk,
        kl_beta=float(config.train.kl_to_base),
        lora=setup.lora_cfg is not None,
        router_aux=router_aux,
    )
    exact = router_aux and bool(config.train.get("router_aux_global_batch", True))
    router_load = step_lib.make_router_load_fn(setup.graphdef) if exact else None
    shard = _shardings
    state_sh, frozen_sh, ref_sh = shard(setup.state), shard(setup.frozen), shard(setup.ref)
    setup.batch_sharding = NamedSharding(setup.mesh, PartitionSpec(BATCH, None))
    train = step_lib.make_train_step(
        loss_fn, setup.tx, setup.schedule, config.train.grad_accum, router_load
    )
    setup.train_step = jax.jit(
        train,
        in_shardings=(state_sh, frozen_sh, ref_sh, setup.batch_sharding),
        out_shardings=(state_sh, None),
        donate_argnums=(0,),
    )
    setup.eval_step = jax.jit(
        step_lib.make_eval_step(loss_fn),
        in_shardings=(state_sh["params"], frozen_sh, ref_sh, setup.batch_sharding),
    )
    return setup


def _shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def restore_model(run_dir: str, step: int | None = None):
    """(model, model_cfg, lora_cfg, config, step) from a run directory's checkpoint `step`, or
    the newest one that validates and restores when None (damaged ones are reported and
    skipped, never moved: a training run may own the directory); the step returned is the one
    used. UserError when the run or the step does not exist or no checkpoint is usable."""
    cfg_path = rd.path(run_dir, rd.CONFIG)
    if not os.path.isfile(cfg_path):
        raise UserError("not a jaxsft run directory (no config.json)", where=run_dir)
    steps = existing_steps(run_dir)
    if not steps:
        raise UserError(
            "the run has no complete checkpoint",
            where=checkpoint_dir(run_dir),
            hint="train first, or pass the run_dir of a run that saved one",
        )
    if step is not None and step not in steps:
        raise UserError(
            f"no checkpoint for step {step} (have {steps})", where=checkpoint_dir(run_dir)
        )
    config = config_lib.from_json(cfg_path)
    # Onto whatever devices this process has (the run may have used another mesh); only the
    # trainable parameters are read, not the optimizer state.
    model, model_cfg = load_model(config, make_mesh(1, -1, 1))
    lora = config_lib.lora_config(config)
    graphdef, params, frozen = split_trainable(model, lora)
    for candidate in [step] if step is not None else steps[::-1]:
        step_dir = os.path.join(checkpoint_dir(run_dir), str(candidate))
        state_dir = os.path.join(step_dir, "state")
        restored, why = attempt(step_dir, lambda d=state_dir: restore_params(d, params), ("state",))
        if why is None:
            return nnx.merge(graphdef, restored, frozen), model_cfg, lora, config, candidate
        if step is not None:
            raise UserError(f"checkpoint {step} is damaged: {why}", where=step_dir)
        print(f"warning: skipping damaged checkpoint {candidate}: {why}", file=sys.stderr)
    raise UserError("no usable checkpoint: every one is damaged", where=checkpoint_dir(run_dir))
