"""Resume on another number of hosts: the data position is one global quantity in the
checkpoint (checkpoint.py), so a run saved by 2 processes resumes in 1, and one saved by 1
resumes in 2, at the same global batch; per-step losses equal one uninterrupted run."""

from __future__ import annotations

import json
import os

import pytest
from train_utils import losses, run_main, start_two_processes

STOP_AT_3 = [
    "--config.train.max_steps=6",
    "--config.train.save_every=3",
    "--config.train.stop_after=3",
]


@pytest.fixture(scope="module")
def reference(demo_assets, tmp_path_factory) -> dict[int, float]:
    """Per-step losses of one uninterrupted 6-step run in one process on one device."""
    run_dir = str(tmp_path_factory.mktemp("hosts") / "full")
    run_main(demo_assets, run_dir, ["--config.train.max_steps=6"])
    return losses(run_dir)


def two_processes(assets: str, run_dir: str, overrides) -> list[str]:
    procs = start_two_processes(assets, run_dir, overrides)
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outs]


def assert_resumed(run_dir: str, reference: dict[int, float], out: str):
    assert "resumed from" in out and "at step 3" in out, out[-2000:]
    got = losses(run_dir)
    assert sorted(got) == sorted(reference) == list(range(1, 7))
    for s in reference:
        assert got[s] == pytest.approx(reference[s], rel=2e-5), (s, reference[s], got[s])


@pytest.mark.slow  # 40 s of subprocesses; CI runs it
def test_two_processes_resume_in_one(demo_assets, reference, tmp_path):
    run_dir = str(tmp_path / "run")
    two_processes(demo_assets, run_dir, STOP_AT_3)
    position = os.path.join(run_dir, "checkpoints", "3", "data", "metadata")
    assert json.load(open(position))["step"] == 3  # one file, not one per process
    assert not [n for n in os.listdir(os.path.dirname(position)) if n.startswith("process_")]
    proc = run_main(demo_assets, run_dir, STOP_AT_3[:2])
    assert_resumed(run_dir, reference, proc.stdout)


@pytest.mark.slow  # 45 s of subprocesses; CI runs it
def test_one_process_resumes_in_two(demo_assets, reference, tmp_path):
    run_dir = str(tmp_path / "run")
    run_main(demo_assets, run_dir, STOP_AT_3)
    outs = two_processes(demo_assets, run_dir, STOP_AT_3[:2])
    assert_resumed(run_dir, reference, outs[0])


def test_a_key_added_since_the_run_started_is_no_change():
    """A run saved by an earlier version lacks the keys added since; at their defaults they
    keep the old behaviour, so resuming is not refused, and a non-default value still is."""
    import ml_collections
    from jaxsft.configs import base

    from jaxsft import run_dir as rd

    new = base.get_config()
    old = ml_collections.ConfigDict(new.to_dict())
    del old.data["mix_epoch"]
    assert rd.config_changes(old, new) == {"data.mix_epoch": (None, "sum")}
    assert rd.config_changes(old, new, base.get_config()) == {}
    new.data.mix_epoch = "first"
    assert rd.config_changes(old, new, base.get_config()) == {"data.mix_epoch": ("sum", "first")}
