"""orbax checkpoints of a run: train state (trainable params, optimizer, step, RNG) and the
data position, async, keep-N, restored into the current mesh's shardings.

The data position is the training iterator's state ({"epoch", "step", "examples"}: global
batch `step` of epoch `epoch` is next), a global quantity saved once as a JSON item, so a run
saved by N hosts resumes on any number of hosts at the same global batch (each host then
takes its own rows of it). Checkpoints of earlier versions hold grain's per-process files
instead; they are read too.

The frozen base of a LoRA run is not saved: it is the unchanged checkpoint at model.path.
At resume each candidate is validated, newest first (orbax's commit markers, readable
metadata, then the restore itself); a damaged one is reported in one line and moved to
run_dir/checkpoints_set_aside/ (never deleted), and the previous complete one is used.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxsft import run_dir as rd

ITEMS = ("state", "data")


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), rd.CHECKPOINTS)


def damage(step_dir: str, items=ITEMS) -> str | None:
    """Why the checkpoint directory of one step cannot be trusted, or None when it looks
    complete: orbax's commit markers and the metadata files must exist and parse."""
    for rel in ("commit_success.txt", "_CHECKPOINT_METADATA"):
        if not os.path.isfile(os.path.join(step_dir, rel)):
            return f"{rel} is missing (an interrupted or damaged save)"
    for item in items:
        item_dir = os.path.join(step_dir, item)
        if not os.path.isdir(item_dir) or not os.listdir(item_dir):
            return f"{item}/ is missing or empty"
        if not os.path.isfile(os.path.join(item_dir, "commit_success.txt")):
            return f"{item}/commit_success.txt is missing"
    metadata = [os.path.join(step_dir, "_CHECKPOINT_METADATA")]
    if "state" in items:
        metadata.append(os.path.join(step_dir, "state", "_METADATA"))
    for path in metadata:
        try:
            with open(path) as f:
                json.load(f)
        except (OSError, ValueError) as e:
            return f"{os.path.relpath(path, step_dir)} is unreadable ({type(e).__name__})"
    return None


def short_reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def attempt(step_dir: str, restore, items=ITEMS):
    """(restore(), None) when the checkpoint in step_dir validates and restores, else
    (None, why): the one test of "is this checkpoint usable" for resume and export."""
    why = damage(step_dir, items)
    if why is not None:
        return None, why
    try:
        return restore(), None
    except Exception as e:  # noqa: BLE001 - any failure means "not usable"
        return None, f"restore failed ({short_reason(e)})"


class Checkpointer:
    def __init__(self, run_dir: str, keep: int = 2, use_async: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=False, enable_async_checkpointing=use_async
        )
        self.manager = ocp.CheckpointManager(checkpoint_dir(run_dir), options=options)

        self.run_dir = run_dir

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iter=None, force: bool = False) -> bool:
        """Start an (async) save of `step`; a failed write (this one or the previous async
        one) raises WriteFailed (exit 4) and leaves the earlier checkpoints as they were."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:  # one JSON file, written by the primary host
            items["data"] = ocp.args.JsonSave(data_iter.get_state())
        with self._writes():
            self.check_space(step, state)
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def _writes(self):
        return _write_failures(checkpoint_dir(self.run_dir))

    def check_space(self, step: int, state) -> None:
        """WriteFailed before writing anything when the disk cannot hold checkpoint `step`
        (this host's shards of the state, +5%); agreed on all hosts."""
        need = sum(
            s.data.nbytes
            for x in jax.tree.leaves(state)
            for s in x.addressable_shards
            if s.replica_id == 0
        )
        path = checkpoint_dir(self.run_dir)
        try:
            free = shutil.disk_usage(path if os.path.isdir(path) else self.run_dir).free
        except OSError:  # not a local file system (a bucket): orbax reports failures itself
            free = None
        if os.environ.get("JAXSFT_SKIP_SPACE_CHECK") == "1":  # tests of orbax's own failure
            free = None
        short = free is not None and free < need * 1.05 + 2**20
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            short = bool(multihost_utils.process_allgather(np.int32(short)).any())
        if short:
            mib = 2**20
            where = f"{free / mib:.1f} MiB free" if free is not None else "another host"
            raise rd.write_failed(
                OSError(
                    errno.ENOSPC,
                    f"checkpoint {step} needs about {need / mib:.1f} MiB and the disk has {where}",
                ),
                path,
            )

    def restore_newest_valid(self, target_state, data_iter=None, set_aside: bool = True):
        """(step, state) of the newest checkpoint that validates and restores, or (None, None).
        Damaged ones are reported and, with set_aside, moved out of checkpoints/."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            step_dir = os.path.join(checkpoint_dir(self.run_dir), str(step))
            state, why = attempt(step_dir, lambda s=step: self.restore(s, target_state, data_iter))
            if why is None:
                return step, state
            moved = self.set_aside(step) if set_aside else None
            where = f"; moved to {moved}" if moved else ""
            print(f"warning: checkpoint {step} is damaged: {why}{where}", file=sys.stderr)
        return None, None

    def set_aside(self, step: int) -> str | None:
        """Move a damaged checkpoint to run_dir/checkpoints_set_aside/STEP-TIME (process 0)."""
        moved = None
        if jax.process_index() == 0:
            dest = rd.path(self.run_dir, rd.SET_ASIDE)
            os.makedirs(dest, exist_ok=True)
            moved = os.path.join(dest, f"{step}-{rd.now().replace(':', '')}")
            shutil.move(os.path.join(checkpoint_dir(self.run_dir), str(step)), moved)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxsft_set_aside_{step}")
        self.manager.reload()
        return moved

    def restore(self, step: int, target_state, data_iter=None):
        """Restore into the shardings of `target_state` (concrete or ShapeDtypeStruct tree);
        the data iterator is moved to the saved position in place."""
        abstract = jax.tree.map(_abstract, target_state)
        items = {"state": ocp.args.StandardRestore(abstract)}
        data_dir = epath.Path(checkpoint_dir(self.run_dir)) / str(step) / "data"
        legacy = _grain_files(data_dir) if data_iter is not None else []
        if data_iter is not None and not legacy:
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if data_iter is not None:
            # grain's per-process files of earlier versions hold the same global position
            # on every host, so any one of them serves any number of hosts
            data_iter.set_state(json.loads(legacy[0].read_text()) if legacy else restored["data"])
        return restored["state"]

    def wait(self):
        with self._writes():
            self.manager.wait_until_finished()

    def close(self):
        self.wait()
        self.manager.close()


@contextlib.contextmanager
def _write_failures(where):
    """OSError (also wrapped by orbax, or only named in its message) while saving ->
    WriteFailed naming the checkpoints directory."""
    try:
        yield
    except rd.WriteFailed:
        raise
    except Exception as e:
        cause = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None and "No space left" not in str(e):
            raise
        raise rd.write_failed(cause or OSError(errno.ENOSPC, "No space left"), where) from None


def _grain_files(data_dir) -> list:
    """grain's per-process position files (process_I-of-N.json) of a checkpoint written before
    the data position was one JSON item; [] for a checkpoint of this version."""
    return sorted(data_dir.glob("process_*-of-*.json"))


def _abstract(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def existing_steps(run_dir: str) -> list[int]:
    """Finalized checkpoint steps in run_dir (no orbax manager, no side effects); they may
    still be damaged (see `damage`)."""
    path = checkpoint_dir(run_dir)
    if not os.path.isdir(path):
        return []
    return sorted(ocp.utils.checkpoint_steps(path))


def restore_params(state_dir: str, params):
    """The "params" subtree of a saved train state, into the shardings of `params`."""
    abstract = {"params": jax.tree.map(_abstract, params)}
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    args = ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)
    with ocp.PyTreeCheckpointer() as ckpt:
        return ckpt.restore(state_dir, args=args)["params"]
