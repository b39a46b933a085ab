"""The run directory: its file names, atomic writes, the one-run lock and the resume guard.

Every file jaxsft writes into run_dir is written whole into a temporary file next to it and
renamed into place (`atomic_write`), so a crash never leaves half a config.json or report.
One process per run_dir: `RunLock` holds an advisory fcntl lock on run_dir/.jaxsft.lock (the OS
releases it when the process dies, so a stale lock from a killed run never blocks). On resume,
`resume_changes` compares the saved config with the new one: keys that change the training
trajectory are refused unless train.allow_config_change, and every change is recorded in
config_history.jsonl with the step it took effect.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import json
import os
import socket
import tempfile

import numpy as np

from jaxsft.errors import UserError, WriteFailed

CONFIG = "config.json"
CONFIG_HISTORY = "config_history.jsonl"
DATA_REPORT = "data_report.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
SET_ASIDE = "checkpoints_set_aside"  # damaged checkpoints are moved here, never deleted
SUMMARY = "summary.json"
LOCK = ".jaxsft.lock"
TENSORBOARD = "tensorboard"
LOSS_PNG = "loss.png"
HF = "hf"  # the merged export of the run (export.format merged / both)
ADAPTER = "adapter"  # the PEFT adapter of a LoRA run
BACKGROUND_ERRORS = "background_errors.log"  # what failing background threads printed

# Keys that may change between invocations of one run without changing what is trained:
# logging, eval and save intervals, evals, export, kernels/layout and the mesh (a run resumes
# on another device count). A group name ("export") covers all its keys. Every other key is a
# trajectory key: changing it on resume is refused unless train.allow_config_change.
FREE_KEYS = (
    "run_dir",
    "data.eval",
    "data.show",
    "data.cache_dir",
    "data.workers",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.stop_after",
    "train.keep_checkpoints",
    "train.eval_at_start",
    "train.peak_tflops",
    "train.loss_chunk",
    "train.max_bad_steps",
    "train.divergence_factor",
    "train.allow_config_change",
    "model.remat",
    "model.attention",
    "model.unroll_layers",
    "mesh",
    "eval",
    "export",
)


def path(run_dir: str | os.PathLike, name: str) -> str:
    return os.path.join(os.fspath(run_dir), name)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def atomic_write(target: str | os.PathLike, text: str) -> None:
    """Write `text` to `target` via a temp file in the same directory and one rename; a failed
    write (disk full, permissions) leaves the old file as it was and raises WriteFailed."""
    target = os.fspath(target)
    directory = os.path.dirname(os.path.abspath(target))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", dir=directory)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise write_failed(e, target) from None


def write_json(target: str | os.PathLike, obj) -> None:
    atomic_write(target, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_line(target: str | os.PathLike, obj: dict) -> None:
    """Append one JSON line (appends never rewrite what is there)."""
    try:
        with open(target, "a") as f:
            f.write(json.dumps(obj) + "\n")
    except OSError as e:
        raise write_failed(e, target) from None


def write_failed(e: OSError, where) -> WriteFailed:
    what = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        what = "the disk is full" + (f" ({what})" if what != os.strerror(errno.ENOSPC) else "")
    return WriteFailed(
        f"cannot write: {what}",
        where=where,
        hint="free space (or fix permissions) and rerun the same command: the run resumes "
        "from its newest complete checkpoint, which is intact",
    )


# --------------------------------------------------------------------------------------------
# One run per run_dir
# --------------------------------------------------------------------------------------------
class RunLock:
    """An exclusive advisory lock on run_dir/.jaxsft.lock, holding the owner's pid and host.

    acquire() creates run_dir when missing (remembered, so that a failed fresh start can remove
    what it made with `discard`). A second process gets a UserError naming the holder.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = os.fspath(run_dir)
        self.file = None
        self.created = False
        self.lock_created = False
        self.previous = ""

    def acquire(self) -> RunLock:
        if os.path.exists(self.run_dir) and not os.path.isdir(self.run_dir):
            raise UserError("run_dir exists and is not a directory", where=self.run_dir)
        lock_path = path(self.run_dir, LOCK)
        try:
            self.created = not os.path.exists(self.run_dir)
            os.makedirs(self.run_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create run_dir: {e.strerror}", where=self.run_dir) from None
        while True:
            try:
                self.lock_created = not os.path.exists(lock_path)
                self.file = open(lock_path, "a+")  # noqa: SIM115 - held for the whole run
            except OSError as e:
                raise UserError(f"cannot lock run_dir: {e.strerror}", where=self.run_dir) from None
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.file.seek(0)
                holder = self.file.read().strip() or "another process"
                self.file.close()
                self.file = None
                raise UserError(
                    f"run_dir is in use by {holder}",
                    where=self.run_dir,
                    hint="wait for that run to end (or stop it), or use another run_dir",
                ) from None
            if _same_file(self.file, lock_path):
                break
            self.file.close()  # the file was removed by a failed start meanwhile: retry
        self.file.seek(0)
        self.previous = self.file.read()
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on host {socket.gethostname()} since {now()}\n")
        self.file.flush()
        return self

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None

    def discard(self) -> None:
        """After a failed start: remove the lock file if this start created it (and run_dir,
        if this start created it too and it is empty), so run_dir is as it was."""
        if self.file is not None and self.lock_created:
            os.unlink(path(self.run_dir, LOCK))
        elif self.file is not None:  # an earlier run's lock file: its old content back
            self.file.seek(0)
            self.file.truncate()
            self.file.write(self.previous)
            self.file.flush()
        self.release()
        if self.created and os.path.isdir(self.run_dir) and not os.listdir(self.run_dir):
            os.rmdir(self.run_dir)


def _same_file(f, name: str) -> bool:
    try:
        return os.fstat(f.fileno()).st_ino == os.stat(name).st_ino
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------------------------
# Resume guard
# --------------------------------------------------------------------------------------------
def flatten(cfg, prefix: str = "") -> dict:
    """{"train.learning_rate": 2e-5, ...} of a ConfigDict or nested dict, values as JSON would
    hold them (tuples as lists), so a saved config.json and a live config compare equal."""
    items = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
    items = json.loads(json.dumps(items, default=list))
    out = {}
    for k, v in items.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def is_free(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in FREE_KEYS)


def config_changes(old, new, defaults=None) -> dict[str, tuple]:
    """{key: (old value, new value)} for every key that differs (absent keys: None). A key the
    old config lacks (it was written by an earlier version) counts as its value in `defaults`:
    a new key's default keeps the behaviour of the versions before it."""
    a, b = flatten(old), flatten(new)
    if defaults is not None:
        a = {**{k: v for k, v in flatten(defaults).items() if k in b}, **a}
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def resume_changes(
    old, new, *, step: int, allow: bool, where: str, defaults=None
) -> dict[str, tuple]:
    """The changes of a resumed run's config; UserError listing the trajectory-changing ones
    unless `allow`."""
    changes = config_changes(old, new, defaults)
    refused = {k: v for k, v in changes.items() if not is_free(k)}
    if refused and not allow:
        lines = "\n".join(f"    {k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise UserError(
            f"resuming at step {step} with a config that changes what is trained:\n{lines}",
            where=where,
            hint="rerun with the run's own settings, use a new run_dir, or pass "
            "--config.train.allow_config_change=true to continue with the change (it is "
            "recorded in config_history.jsonl)",
        )
    return changes


def data_fingerprint(examples) -> str:
    """sha256 over the rendered training examples (ids, masks, mixture), in file order: the same
    files, tokenizer, template and data.* keys give the same fingerprint. It is kept in
    `examples.fingerprint` (computed once: the start reports it and the data cache stores it;
    examples loaded from the cache carry the one computed when it was written)."""
    if getattr(examples, "fingerprint", None):
        return examples.fingerprint
    h = hashlib.sha256()
    for ids, mask in zip(examples.input_ids, examples.loss_mask, strict=True):
        h.update(len(ids).to_bytes(8, "little"))
        h.update(ids.astype("<i4").tobytes())
        if np.array_equal(mask, np.round(mask)):  # 0/1 masks: the bytes earlier runs hashed
            h.update(mask.astype("<i1").tobytes())
        else:  # per-message loss weights: their values count
            h.update(b"w" + mask.astype("<f4").tobytes())
    h.update(json.dumps([float(w) for w in examples.weights]).encode())
    digest = h.hexdigest()[:32]
    if hasattr(examples, "fingerprint"):
        examples.fingerprint = digest
    return digest


def saved_fingerprint(run_dir) -> str | None:
    """The training-data fingerprint the run's data_report.json recorded (None if none)."""
    try:
        with open(path(run_dir, DATA_REPORT)) as f:
            return json.load(f)["train"].get("fingerprint")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
