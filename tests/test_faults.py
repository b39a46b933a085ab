"""Fault injection on the real CLI (subprocesses on the tiny demo model, CPU): kill -9 at
random points, SIGTERM / SIGINT, damaged checkpoints, non-finite training, a full disk, two runs
on one run_dir, and starts that must fail before touching anything.

The reference for every recovery is one uninterrupted run of the same config: per-step losses
and final parameters must equal it, and the data positions logged per step (data_epoch,
data_batch) must visit every batch of every epoch exactly once, which with the deterministic
epoch plan means every example is seen exactly once per epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from flax import nnx
from train_utils import (
    DEMO_CONFIG,
    FAST,
    ROOT,
    losses,
    main_argv,
    run_main,
    start_two_processes,
    subprocess_env,
)

pytestmark = pytest.mark.filterwarnings("ignore")

STEPS = 24  # six epochs of the small train set below
COMMON = [
    f"--config.train.max_steps={STEPS}",
    "--config.train.save_every=4",
    "--config.train.keep_checkpoints=3",
    "--config.data.eval=",
    "--config.eval.golden=",
]


@pytest.fixture(scope="module")
def assets(demo_assets, tmp_path_factory):
    """Demo assets (the session's, read-only) with a 60-example train file of this module's
    own: 30 packed rows, 4 steps an epoch at 8 rows."""
    root = demo_assets
    with open(os.path.join(root, "train.jsonl")) as f:
        lines = f.readlines()[:60]
    small = os.path.join(str(tmp_path_factory.mktemp("fault_data")), "train_small.jsonl")
    with open(small, "w") as f:
        f.writelines(lines)
    return root, small


def args_for(assets, run_dir, *extra):
    root, small = assets
    return root, run_dir, [f"--config.data.train={small}", *COMMON, *extra]


def slowed(assets) -> list[str]:
    """Free keys that make each step slower (a held-out eval after every step) without
    changing what is trained, so that a signal or a kill lands before the run ends."""
    return [
        f"--config.data.eval={os.path.join(assets[0], 'eval.jsonl')}",
        "--config.train.eval_every=1",
    ]


def start(assets, run_dir, *extra) -> subprocess.Popen:
    root, run_dir, overrides = args_for(assets, run_dir, *extra)
    return subprocess.Popen(
        main_argv(run_dir, overrides),
        env=subprocess_env(root),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run(assets, run_dir, *extra, check=True):
    root, run_dir, overrides = args_for(assets, run_dir, *extra)
    return run_main(root, run_dir, overrides, check=check)


def wait_for(predicate, proc, timeout=240.0):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.01)


def rows(run_dir) -> list[dict]:
    """metrics.jsonl as the run writes it (a torn last line is left out)."""
    from jaxsft.metrics import read_rows

    return read_rows(os.path.join(run_dir, "metrics.jsonl"))


def logged_steps(run_dir) -> int:
    return max([r["step"] for r in rows(run_dir) if "loss" in r], default=0)


def positions(run_dir) -> dict[int, tuple[int, int]]:
    return {r["step"]: (r["data_epoch"], r["data_batch"]) for r in rows(run_dir) if "loss" in r}


def final_params(run_dir):
    from jaxsft.train.setup import restore_model

    model, *_ = restore_model(run_dir)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def assert_same_run(got_dir, ref_dir, first=1, last=STEPS):
    got, ref = losses(got_dir), losses(ref_dir)
    assert sorted(got) == list(range(1, last + 1)), sorted(got)
    for s in range(first, last + 1):
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-7), (s, got[s], ref[s])
    assert positions(got_dir) == positions(ref_dir)
    for a, b in zip(final_params(got_dir), final_params(ref_dir), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def snapshot(path) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    ref = str(tmp_path_factory.mktemp("reference") / "run")
    run(assets, ref)
    pos = positions(ref)
    per_epoch = {}
    for epoch, batch in pos.values():
        per_epoch.setdefault(epoch, []).append(batch)
    steps = max(max(b) for b in per_epoch.values()) + 1
    # every batch of every epoch exactly once, in order: every example once per epoch
    assert all(b == list(range(steps)) for b in per_epoch.values()), per_epoch
    assert len(per_epoch) > 2
    return ref


def test_epoch_plan_covers_every_example_once(assets):
    """The property the position check relies on: an epoch's batches hold every example
    exactly once (the last batch padded with empty rows)."""
    from jaxsft import config as config_lib
    from jaxsft.data import pipeline
    from jaxsft.tokenizer import load_tokenizer

    root, overrides = assets[0], args_for(assets, "unused")[2]
    os.environ["JAXSFT_DEMO_ASSETS"] = root
    config = config_lib.load(DEMO_CONFIG, [*FAST, *overrides])
    data = pipeline.build_datasets(config, load_tokenizer(config.model.path))
    for epoch in range(3):
        seen = sorted(i for row in pipeline.epoch_rows(data, 0, epoch) for i in row)
        assert seen == list(range(len(data.train)))


@pytest.mark.slow
@pytest.mark.parametrize("point", ["inside_a_step", "during_async_save", "right_after_save"])
def test_kill_9_resumes_exactly(assets, reference, tmp_path, point):
    run_dir = str(tmp_path / "run")
    proc = start(assets, run_dir, *slowed(assets))
    ckpts = os.path.join(run_dir, "checkpoints")
    if point == "inside_a_step":
        wait_for(lambda: logged_steps(run_dir) >= 6, proc)
    elif point == "during_async_save":  # at the latest when checkpoint 12 is committed

        def saving():
            names = os.listdir(ckpts) if os.path.isdir(ckpts) else []
            return any("tmp" in n for n in names) or "12" in names

        wait_for(saving, proc)
    else:
        wait_for(lambda: os.path.isfile(os.path.join(ckpts, "8", "commit_success.txt")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = run(assets, run_dir)
    assert "resumed from" in done.stdout or logged_steps(run_dir) == STEPS
    assert_same_run(run_dir, reference)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_exits_75(assets, reference, tmp_path, sig):
    run_dir = str(tmp_path / "run")
    proc = start(assets, run_dir, *slowed(assets))
    wait_for(lambda: logged_steps(run_dir) >= 5, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "Traceback" not in err
    name = signal.Signals(sig).name
    assert f"stopped by {name}" in out
    stopped = logged_steps(run_dir)
    from jaxsft.checkpoint import existing_steps

    assert existing_steps(run_dir)[-1] == stopped < STEPS
    run(assets, run_dir)
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_second_ctrl_c_aborts(assets, tmp_path):
    run_dir = str(tmp_path / "run")
    proc = start(assets, run_dir, "--config.train.max_steps=100000")
    wait_for(lambda: logged_steps(run_dir) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    seen = []
    while not any("SIGINT: saving" in line for line in seen):  # the first one was handled
        seen.append(proc.stderr.readline())
        assert seen[-1], "".join(seen)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = "".join(seen) + err
    assert proc.returncode == 130, err[-2000:]
    assert "aborted" in err and "Traceback" not in err


def damage_truncate(step_dir):
    for dirpath, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            p = os.path.join(dirpath, name)
            if "/d/" in p + "/" and os.path.getsize(p) > 16:
                with open(p, "r+b") as f:
                    f.truncate(os.path.getsize(p) // 2)


def damage_metadata(step_dir):
    with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
        f.write("{ not json")


def damage_checkpoint_metadata(step_dir):
    with open(os.path.join(step_dir, "_CHECKPOINT_METADATA"), "w") as f:
        f.write("\x00garbage")


def damage_empty_state(step_dir):
    state = os.path.join(step_dir, "state")
    shutil.rmtree(state)
    os.mkdir(state)


def damage_no_commit(step_dir):
    os.unlink(os.path.join(step_dir, "commit_success.txt"))


DAMAGES = {
    "truncated_data_files": damage_truncate,
    "garbage_array_metadata": damage_metadata,
    "garbage_checkpoint_metadata": damage_checkpoint_metadata,
    "emptied_state_dir": damage_empty_state,
    "no_commit_marker": damage_no_commit,
}


@pytest.fixture(scope="module")
def stopped_at_16(assets, tmp_path_factory):
    """A run stopped after 16 steps, checkpoints 8, 12 and 16."""
    run_dir = str(tmp_path_factory.mktemp("stopped") / "run")
    run(assets, run_dir, "--config.train.stop_after=16")
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("form", sorted(DAMAGES))
def test_damaged_newest_checkpoint_falls_back(assets, reference, stopped_at_16, tmp_path, form):
    run_dir = str(tmp_path / "run")
    shutil.copytree(stopped_at_16, run_dir)
    DAMAGES[form](os.path.join(run_dir, "checkpoints", "16"))
    # export picks the newest valid checkpoint too, without moving anything
    from jaxsft.train.setup import restore_model

    assert restore_model(run_dir)[4] == 12  # the step restored, recorded in export markers
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "16"))
    proc = run(assets, run_dir)
    assert "checkpoint 16 is damaged" in proc.stderr, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout and "at step 12" in proc.stdout
    aside = os.listdir(os.path.join(run_dir, "checkpoints_set_aside"))
    assert len(aside) == 1 and aside[0].startswith("16-")
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_non_finite_training_stops_with_exit_3(assets, tmp_path):
    """lr=1e6 blows the gradients up: the steps are skipped, counted, and after
    max_bad_steps in a row the run stops (exit 3) without saving a new checkpoint."""
    run_dir = str(tmp_path / "run")
    proc = run(assets, run_dir, "--config.train.learning_rate=1e6", check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "consecutive steps had a non-finite loss" in proc.stderr
    assert "Traceback" not in proc.stderr
    skipped = [r["skipped_steps"] for r in rows(run_dir) if "loss" in r]
    assert skipped[-1] >= 1
    bad = logged_steps(run_dir) + 1  # the step that tripped the guard is not logged
    from jaxsft.checkpoint import damage, existing_steps

    steps = existing_steps(run_dir)
    assert steps and steps[-1] < bad
    for s in steps:
        assert damage(os.path.join(run_dir, "checkpoints", str(s))) is None
    assert not os.path.exists(os.path.join(run_dir, "hf"))


def test_poisoned_batch_is_skipped_inside_the_step(assets, tmp_path):
    """A batch whose loss is NaN (an id past the embedding, as a too-small embedding gives)
    leaves parameters and optimizer state bit-for-bit unchanged and reports skipped=1; the
    next good batch trains normally."""
    from jaxsft import config as config_lib
    from jaxsft.data import pipeline
    from jaxsft.tokenizer import load_tokenizer
    from jaxsft.train import setup

    root, _, overrides = args_for(assets, str(tmp_path / "r"))
    os.environ["JAXSFT_DEMO_ASSETS"] = root
    config = config_lib.load(DEMO_CONFIG, [*FAST, *overrides])
    data = pipeline.build_datasets(config, load_tokenizer(config.model.path))
    batch = next(pipeline.train_iterator(data, config, process_index=0, process_count=1))
    trainer = setup.compile_steps(setup.build_model_state(config, total_steps=5), config)
    poisoned = dict(batch)
    ids = batch["input_ids"].copy()
    ids[0, 1] = trainer.model_cfg.vocab_size + 7
    poisoned["input_ids"] = ids
    before = jax.tree.map(np.asarray, trainer.state)
    with jax.set_mesh(trainer.mesh):
        put = lambda b: jax.device_put(b, trainer.batch_sharding)  # noqa: E731
        trainer.state, m = trainer.train_step(trainer.state, trainer.frozen, None, put(poisoned))
        assert float(m["skipped"]) == 1.0, float(m["loss"])
        after = jax.tree.map(np.asarray, trainer.state)
        for key in ("params", "opt_state"):
            for a, b in zip(jax.tree.leaves(before[key]), jax.tree.leaves(after[key]), strict=True):
                np.testing.assert_array_equal(a, b)
        assert int(after["step"]) == 1
        trainer.state, m = trainer.train_step(trainer.state, trainer.frozen, None, put(batch))
        assert float(m["skipped"]) == 0.0 and np.isfinite(float(m["loss"]))


def test_guard_divergence_and_streaks():
    from jaxsft.errors import TrainingStopped
    from jaxsft.train.guard import NumericalGuard

    g = NumericalGuard(max_bad_steps=2, divergence_factor=3.0, history=[2.0, 2.1, 1.9])
    g.logged(4, 7.0)  # one high log: tolerated
    g.logged(5, 2.0)  # back to normal resets the streak
    g.logged(6, 6.5)
    with pytest.raises(TrainingStopped, match="diverged"):
        g.logged(7, 9.0)
    g = NumericalGuard(max_bad_steps=2, divergence_factor=0.0)
    for s, loss in enumerate([1.0, 1.0, 1.0, 100.0, 100.0]):
        g.logged(s, loss)  # factor 0: no divergence check
    g.step(1, {"skipped": 1.0})
    g.step(2, {"skipped": 0.0})
    g.step(3, {"skipped": 1.0})
    with pytest.raises(TrainingStopped, match="2 consecutive"):
        g.step(4, {"skipped": 1.0})
    assert g.skipped_total == 3


@pytest.mark.slow
@pytest.mark.parametrize("path", ["checked_before_save", "failed_inside_orbax"])
def test_disk_full_while_saving(assets, tmp_path, path):
    """run_dir on a 7 MiB tmpfs: the first checkpoint fits, the next does not. Either the
    free-space check refuses the save before writing, or (check off) orbax's write fails
    midway; both end with exit 4, one message and no traceback, and the earlier checkpoint
    is intact and restorable."""
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(mnt)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode()[:200]}")
    try:
        run_dir = str(mnt / "run")
        root, _, overrides = args_for(assets, run_dir)
        env = subprocess_env(root)
        if path == "failed_inside_orbax":
            env["JAXSFT_SKIP_SPACE_CHECK"] = "1"
        proc = run_main(root, run_dir, overrides, check=False, env=env)
        assert proc.returncode == 4, proc.stderr[-3000:]
        assert "the disk is full" in proc.stderr and "Traceback" not in proc.stderr
        from jaxsft.checkpoint import damage, existing_steps
        from jaxsft.train.setup import restore_model

        steps = existing_steps(run_dir)
        assert steps == [4], steps
        assert damage(os.path.join(run_dir, "checkpoints", "4")) is None
        restore_model(run_dir)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_one_run_per_run_dir(assets, tmp_path):
    """A second run on a busy run_dir exits 2 naming the holder; once the first is killed
    (-9, its lock file left behind) the stale lock does not block a resume. (The first run is
    long, so that it is still running when the second starts.)"""
    run_dir = str(tmp_path / "run")
    long = ["--config.train.max_steps=100000"]
    first = start(assets, run_dir, *long)
    wait_for(
        lambda: (
            logged_steps(run_dir) >= 8 and os.path.isdir(os.path.join(run_dir, "checkpoints", "4"))
        ),
        first,
    )
    second = run(assets, run_dir, *long, check=False)
    assert first.poll() is None, "the first run ended: the test lost its point"
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"in use by pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert os.path.exists(os.path.join(run_dir, ".jaxsft.lock"))
    third = run(assets, run_dir, *long, "--config.train.stop_after=2")
    assert "resumed from" in third.stdout and "stopped by train.stop_after" in third.stdout


@pytest.mark.slow
def test_refused_starts_leave_run_dir_byte_identical(assets, stopped_at_16, tmp_path):
    """Failures after validation (batch not divisible by the devices, a trajectory-changing
    resume, a changed data file) exit 2 and leave every file as it was; an allowed change is
    recorded in config_history.jsonl."""
    root, small = assets
    run_dir = str(tmp_path / "run")
    shutil.copytree(stopped_at_16, run_dir)
    before = snapshot(run_dir)
    # the run cached its rendered data in run_dir once its start succeeded; refused starts
    # neither add a cache for other data nor touch this one
    assert any(k.startswith("data_cache/") and k.endswith("/manifest.json") for k in before)
    cases = [
        (["--config.mesh.fsdp=3"], 3, "do not split over"),  # the mesh may change, 8 % 3 != 0
        (["--config.train.learning_rate=1e-2"], 1, "train.learning_rate: 0.003 -> 0.01"),
        (["--config.train.batch_size=16"], 1, "train.batch_size: 8 -> 16"),
    ]
    changed = str(tmp_path / "changed.jsonl")
    with open(small) as f:
        lines = f.readlines()
    with open(changed, "w") as f:
        f.writelines(lines[1:] + lines[:1])
    for overrides, devices, needle in cases:
        _, _, full = args_for(assets, run_dir, *overrides)
        proc = run_main(root, run_dir, full, devices=devices, check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert needle in proc.stderr and "Traceback" not in proc.stderr
        assert snapshot(run_dir) == before, needle
    # same path, other content: the data fingerprint
    moved = small + ".orig"
    os.replace(small, moved)
    shutil.copy(changed, small)
    try:
        proc = run(assets, run_dir, check=False)
        assert proc.returncode == 2 and "renders differently" in proc.stderr, proc.stderr[-2000:]
        assert snapshot(run_dir) == before
    finally:
        os.replace(moved, small)
    proc = run(
        assets,
        run_dir,
        "--config.train.learning_rate=1e-2",
        "--config.train.allow_config_change=true",
    )
    with open(os.path.join(run_dir, "config_history.jsonl")) as f:
        history = [json.loads(line) for line in f]
    assert history[-1]["step"] == 16
    assert history[-1]["changes"]["train.learning_rate"] == [0.003, 0.01]
    # free keys change without a record being refused
    proc = run(
        assets,
        run_dir,
        "--config.train.log_every=5",
        "--config.train.max_steps=24",
        "--config.train.learning_rate=1e-2",
        "--config.train.allow_config_change=false",
    )
    assert proc.returncode == 0


def start_two(assets, run_dir, slow=True):
    root, run_dir, overrides = args_for(assets, run_dir, *(slowed(assets) if slow else ()))
    return start_two_processes(root, run_dir, overrides)


@pytest.mark.slow
def test_sigterm_on_one_host_stops_all_hosts(assets, reference, tmp_path):
    """Two processes (gloo): SIGTERM to process 1 only. Both agree to stop at the same step,
    save one checkpoint and exit 75; two processes resume it to the end, with the losses and
    data positions of the uninterrupted single-device run."""
    run_dir = str(tmp_path / "run")
    procs = start_two(assets, run_dir)
    wait_for(lambda: logged_steps(run_dir) >= 3, procs[0])
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 75, err[-3000:]
    from jaxsft.checkpoint import damage, existing_steps

    stopped = existing_steps(run_dir)[-1]
    assert stopped == logged_steps(run_dir) < STEPS
    assert damage(os.path.join(run_dir, "checkpoints", str(stopped))) is None
    # the resume needs no slowing (no signal is sent to it): the plain command, as the
    # single-process resumes above (the slowing keys are free: nothing trained changes)
    procs = start_two(assets, run_dir, slow=False)
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    got, ref = losses(run_dir), losses(reference)
    assert sorted(got) == sorted(ref)
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=2e-5), (s, got[s], ref[s])
    assert positions(run_dir) == positions(reference)
