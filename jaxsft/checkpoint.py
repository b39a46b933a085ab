"""orbax checkpoints of a run: train state (trainable params, optimizer, step, RNG) and the
grain iterator position, async, keep-N, restored into the current mesh's shardings.

The frozen base of a LoRA run is not saved: it is the unchanged checkpoint at model.path.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxsft.errors import UserError
from jaxsft.sharding import make_mesh


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), "checkpoints")


class Checkpointer:
    def __init__(self, run_dir: str, keep: int = 2, use_async: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=use_async
        )
        self.manager = ocp.CheckpointManager(checkpoint_dir(run_dir), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter=None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, target_state, data_iter=None):
        """Restore into the shardings of `target_state` (concrete or ShapeDtypeStruct tree);
        the data iterator is moved to the saved position in place."""
        abstract = jax.tree.map(_abstract, target_state)
        items = {"state": ocp.args.StandardRestore(abstract)}
        if data_iter is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def _abstract(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def existing_steps(run_dir: str) -> list[int]:
    """Complete checkpoint steps in run_dir (no orbax manager, no side effects)."""
    path = checkpoint_dir(run_dir)
    if not os.path.isdir(path):
        return []
    return sorted(ocp.utils.checkpoint_steps(path))


def restore_model(run_dir: str, step: int | None = None):
    """(model, model_cfg, lora_cfg, config) from a run directory's checkpoint `step` (newest
    when None). Raises UserError when the run or the step does not exist."""
    from jaxsft import config as config_lib
    from jaxsft.train import setup

    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise UserError("not a jaxsft run directory (no config.json)", where=run_dir)
    steps = existing_steps(run_dir)
    if not steps:
        raise UserError(
            "the run has no complete checkpoint",
            where=checkpoint_dir(run_dir),
            hint="train first, or pass the run_dir of a run that saved one",
        )
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise UserError(
            f"no checkpoint for step {step} (have {steps})", where=checkpoint_dir(run_dir)
        )
    config = config_lib.from_json(cfg_path)
    # Onto whatever devices this process has (the run may have used another mesh); only the
    # trainable parameters are read, not the optimizer state.
    model, model_cfg = setup.load_model(config, make_mesh(1, -1, 1))
    lora = setup.lora_config(config)
    graphdef, params, frozen = setup.split_trainable(model, lora)
    params = restore_params(os.path.join(checkpoint_dir(run_dir), str(step), "state"), params)
    return nnx.merge(graphdef, params, frozen), model_cfg, lora, config


def restore_params(state_dir: str, params):
    """The "params" subtree of a saved train state, into the shardings of `params`."""
    abstract = {"params": jax.tree.map(_abstract, params)}
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    args = ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)
    with ocp.PyTreeCheckpointer() as ckpt:
        return ckpt.restore(state_dir, args=args)["params"]
