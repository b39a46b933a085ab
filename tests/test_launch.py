"""python -m jaxsft.launch: the gcloud commands and the sbatch script it generates, the TPU
preemption loop with a fake runner (no cloud access), bad input, and the SLURM start of
jaxsft.main (jax.distributed.initialize monkeypatched). The two-process CPU test of
tests/test_train.py covers the runtime path itself."""

from __future__ import annotations

import shlex

import jax
import pytest

from jaxsft import distributed
from jaxsft.errors import UserError
from jaxsft.launch import slurm as slurm_lib
from jaxsft.launch import tpu_vm as tpu
from jaxsft.launch.__main__ import main as launch_main

CONFIG = """from jaxsft.configs import base

def get_config():
    c = base.get_config()
    c.run_dir = {run_dir!r}
    c.model.path = "/models/Llama-3.1-8B-Instruct"
    c.data.train = "/data/train.jsonl"
    return c
"""


@pytest.fixture
def run_py(tmp_path):
    path = tmp_path / "run.py"
    path.write_text(CONFIG.format(run_dir="/gcs/my-bucket/runs/r1"))
    return str(path)


def job(run_py, **kw) -> tpu.TpuJob:
    values = dict(
        name="r1", zone="us-east5-a", accelerator="v5p-32", config=run_py, install="jaxsft[tpu]"
    )
    return tpu.TpuJob(**{**values, **kw})


# ---------------------------------------------------------------------------------------------
# gcloud commands
# ---------------------------------------------------------------------------------------------
def test_create_command(run_py):
    argv = tpu.create_cmd(job(run_py, spot=True, project="p1"))
    assert argv == [
        "gcloud", "compute", "tpus", "queued-resources", "create", "r1",
        "--node-id=r1", "--accelerator-type=v5p-32", "--runtime-version=v2-alpha-tpuv5",
        "--zone=us-east5-a", "--project=p1", "--spot",
    ]  # fmt: skip
    assert "--spot" not in tpu.create_cmd(job(run_py))


@pytest.mark.parametrize(
    "acc, runtime",
    [
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v6e-16", "v2-alpha-tpuv6e"),
        ("v5litepod-8", "v2-alpha-tpuv5-lite"),
        ("v4-32", "tpu-ubuntu2204-base"),
    ],
)
def test_runtime_version_per_generation(run_py, acc, runtime):
    assert job(run_py, accelerator=acc).runtime == runtime
    assert job(run_py, accelerator=acc, runtime_version="custom").runtime == "custom"


def test_state_delete_ssh_scp_commands(run_py):
    j = job(run_py)
    zone = "--zone=us-east5-a"
    assert tpu.state_cmd(j) == [
        "gcloud", "compute", "tpus", "queued-resources", "describe", "r1",
        "--format=value(state.state)", zone,
    ]  # fmt: skip
    assert tpu.delete_cmd(j)[3:] == ["queued-resources", "delete", "r1", "--force", "--quiet", zone]
    assert tpu.ssh_cmd(j, "ls")[3:] == [
        "tpu-vm",
        "ssh",
        "r1",
        "--worker=all",
        "--command",
        "ls",
        zone,
    ]
    assert tpu.scp_cmd(j, "a.py", "d/a.py")[3:] == [
        "tpu-vm", "scp", "a.py", "r1:d/a.py", "--worker=all", zone,
    ]  # fmt: skip


def test_train_command_runs_main_under_the_distributed_runtime(run_py):
    j = job(run_py, overrides=("--config.train.max_steps=10",), env=("XLA_FLAGS=--x y",))
    command = tpu.run_cmd(j)[tpu.run_cmd(j).index("--command") + 1]
    assert command.startswith("cd jaxsft_run && env JAXSFT_DISTRIBUTED=1 'XLA_FLAGS=--x y' ")
    words = shlex.split(command.split("&&")[1].split("2>&1")[0])
    assert words[3:] == [
        "python3", "-m", "jaxsft.main", "--config", "run.py", "--config.train.max_steps=10",
    ]  # fmt: skip
    assert command.endswith("| tee -a train.log; exit ${PIPESTATUS[0]}")


def test_the_wheel_of_a_source_tree_is_named_by_that_tree_s_version(run_py, tmp_path):
    tree = tmp_path / "checkout"
    tree.mkdir()
    (tree / "pyproject.toml").write_text('[project]\nname = "jaxsft"\nversion = "2.3.4"\n')
    local, remote = tpu.provision_cmds(job(run_py, install=str(tree)), "0.1.0")
    assert remote[1][3:6] == ["tpu-vm", "scp", f"{tpu.DIST_DIR}/jaxsft-2.3.4-py3-none-any.whl"]


def test_provision_from_a_source_tree_builds_and_copies_the_wheel(run_py, tmp_path):
    local, remote = tpu.provision_cmds(
        job(run_py, install=str(tmp_path), setup=("echo hi",)), "9.9"
    )
    wheel = f"{tpu.DIST_DIR}/jaxsft-9.9-py3-none-any.whl"
    assert local[0][1:] == ["-m", "pip", "wheel", "--no-deps", "-w", tpu.DIST_DIR, str(tmp_path)]
    commands = [" ".join(c[3:6]) for c in remote]
    assert (
        commands
        == ["tpu-vm ssh r1"]
        + ["tpu-vm scp " + wheel, "tpu-vm scp " + run_py]
        + ["tpu-vm ssh r1"] * 2
    )
    install = remote[3][remote[3].index("--command") + 1]
    assert (
        install == "python3 -m pip install --upgrade 'jaxsft_run/jaxsft-9.9-py3-none-any.whl[tpu]'"
    )
    assert remote[4][remote[4].index("--command") + 1] == "echo hi"


def test_provision_from_a_requirement(run_py):
    _, remote = tpu.provision_cmds(job(run_py, install="jaxsft==0.1.0"), "0.1.0")
    assert remote[-1][remote[-1].index("--command") + 1].endswith("'jaxsft==0.1.0[tpu]'")


def test_dry_run_prints_every_step(run_py, capsys):
    argv = ["tpu-vm", "--name", "r1", "--zone", "z-a", "--accelerator", "v6e-8"]
    argv += ["--config", run_py, "--spot", "--dry-run", "--install", "jaxsft[tpu]"]
    assert launch_main([*argv, "--config.train.max_steps=5"]) == 0
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if not x.startswith("#")]
    assert lines[0].startswith("gcloud compute tpus queued-resources create r1 ")
    assert "--runtime-version=v2-alpha-tpuv6e" in lines[0] and "--spot" in lines[0]
    assert any("jaxsft.main --config run.py --config.train.max_steps=5" in x for x in lines)
    assert lines[-1].startswith("gcloud compute tpus queued-resources delete r1 --force")


# ---------------------------------------------------------------------------------------------
# The preemption loop, with a fake runner
# ---------------------------------------------------------------------------------------------
class FakeCloud:
    """Answers `describe` from a list of states (the last repeats) and `ssh ... jaxsft.main`
    with the next exit code; records every command."""

    def __init__(self, states, run_codes):
        self.states, self.codes, self.calls = list(states), list(run_codes), []

    def __call__(self, argv, capture):
        self.calls.append(argv)
        if "describe" in argv:
            state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
            return (1, "") if state is None else (0, state + "\n")
        if "--command" in argv and "jaxsft.main" in argv[argv.index("--command") + 1]:
            return self.codes.pop(0), ""
        return 0, ""

    def kinds(self):
        out = []
        for argv in self.calls:
            if "queued-resources" in argv:
                out.append(argv[4])
            elif "--command" in argv and "jaxsft.main" in argv[argv.index("--command") + 1]:
                out.append("run")
            elif "pip install" in " ".join(argv):
                out.append("install")
        return out


def loop(run_py, cloud, **kw):
    return tpu.Loop(job(run_py), cloud, lambda s: None, "0.1.0", log=lambda t: None, **kw)


def test_loop_creates_waits_provisions_runs(run_py):
    cloud = FakeCloud([None, "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"], [0])
    assert loop(run_py, cloud)() == 0
    assert cloud.kinds() == ["describe", "create", "describe", "describe", "describe"] + [
        "install",
        "run",
    ]


def test_loop_reuses_an_active_queued_resource(run_py):
    cloud = FakeCloud(["ACTIVE"], [0])
    assert loop(run_py, cloud)() == 0
    assert "create" not in cloud.kinds() and cloud.kinds()[-1] == "run"


def test_preemption_deletes_recreates_reinstalls_and_reruns(run_py):
    # ACTIVE, the run dies (ssh 255), the resource is SUSPENDED: delete, create, wait, again
    cloud = FakeCloud(["ACTIVE", "SUSPENDED", "SUSPENDED", "PROVISIONING", "ACTIVE"], [255, 0])
    assert loop(run_py, cloud)() == 0
    assert cloud.kinds() == [
        "describe", "install", "run", "describe",  # the run, then the poll that sees SUSPENDED
        "describe", "delete", "create", "describe", "describe", "install", "run",
    ]  # fmt: skip
    runs = [c for c in cloud.calls if "jaxsft.main" in " ".join(c)]
    assert runs[0] == runs[1]  # the same command: jaxsft resumes from run_dir by itself


def test_preempted_while_installing_recreates(run_py):
    cloud = FakeCloud(["ACTIVE", "PREEMPTED", "PREEMPTED", "ACTIVE"], [0])
    failing = {"n": 0}

    def runner(argv, capture):
        if "pip install" in " ".join(argv) and failing["n"] == 0:
            failing["n"] += 1
            cloud.calls.append(argv)
            return 255, ""
        return cloud(argv, capture)

    assert tpu.Loop(job(run_py), runner, lambda s: None, "0", log=lambda t: None)() == 0
    assert cloud.kinds() == [
        "describe", "install", "describe",  # the install fails; the slice is PREEMPTED
        "describe", "delete", "create", "describe", "install", "run",
    ]  # fmt: skip


def test_a_failing_setup_command_on_an_active_slice_stops(run_py):
    def runner(argv, capture):
        if "pip install" in " ".join(argv):
            return 1, ""
        return (0, "ACTIVE") if capture else (0, "")

    loop = tpu.Loop(job(run_py), runner, lambda s: None, "0", log=lambda t: None, settle_polls=1)
    with pytest.raises(UserError, match="command failed with exit code 1"):
        loop()


def test_a_training_error_is_not_retried(run_py):
    cloud = FakeCloud(["ACTIVE"], [2])
    assert loop(run_py, cloud, settle_polls=2)() == 2
    assert cloud.kinds().count("run") == 1 and "delete" not in cloud.kinds()


def test_sigterm_exit_on_an_active_slice_reruns_without_reprovisioning(run_py):
    cloud = FakeCloud(["ACTIVE"], [75, 0])
    assert loop(run_py, cloud, settle_polls=2)() == 0
    assert cloud.kinds() == ["describe", "install", "run", "describe", "describe", "describe"] + [
        "run"
    ]


def test_restarts_are_bounded(run_py):
    cloud = FakeCloud(["ACTIVE"], [255] * 5)
    assert loop(run_py, cloud, settle_polls=1, max_restarts=2)() == 255
    assert cloud.kinds().count("run") == 3


def test_a_resource_that_keeps_failing_is_reported(run_py):
    cloud = FakeCloud([None, "FAILED"], [])
    with pytest.raises(UserError, match="went FAILED 3 times"):
        loop(run_py, cloud)()


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one message
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--zone", "z", "--accelerator", "v5e-8"], "unknown TPU accelerator type 'v5e-8'"),
        (["--zone", "z", "--accelerator", "tpu-32"], "unknown TPU accelerator type"),
        (["--accelerator", "v5p-8"], "--zone is required"),
        (["--zone", "z", "--accelerator", "v5p-8", "--bogus"], "unknown argument(s): --bogus"),
    ],
)
def test_bad_tpu_input_exits_2(run_py, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        launch_main(["tpu-vm", "--name", "r1", "--config", run_py, "--dry-run", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_missing_config_and_url_run_dir_exit_2(tmp_path, capsys):
    base = ["tpu-vm", "--name", "r1", "--zone", "z", "--accelerator", "v5p-8", "--dry-run"]
    with pytest.raises(SystemExit) as e:
        launch_main([*base, "--config", str(tmp_path / "nope.py")])
    assert e.value.code == 2 and "nope.py: config file not found" in capsys.readouterr().err
    url = tmp_path / "url.py"
    url.write_text(CONFIG.format(run_dir="gs://b/runs/r1"))
    with pytest.raises(SystemExit) as e:
        launch_main([*base, "--config", str(url)])
    assert e.value.code == 2 and "is a URL" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        launch_main(["slurm", "--config", str(url), "--config.train.nope=1"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------
# SLURM
# ---------------------------------------------------------------------------------------------
def test_slurm_out_never_replaces_a_file_it_did_not_write(run_py, tmp_path, capsys):
    mine = tmp_path / "notes.sh"
    mine.write_text("#!/bin/bash\necho my own script\n")
    for target in (str(mine), run_py):  # also the run config itself
        before = open(target).read()
        with pytest.raises(SystemExit) as e:
            launch_main(["slurm", "--config", run_py, "--out", target])
        assert e.value.code == 2 and "did not write" in capsys.readouterr().err
        assert open(target).read() == before
    out = tmp_path / "train.sbatch"
    assert launch_main(["slurm", "--config", run_py, "--out", str(out)]) == 0
    first = out.read_text()
    assert launch_main(["slurm", "--config", run_py, "--nodes", "2", "--out", str(out)]) == 0
    assert out.read_text() != first and "--nodes=2" in out.read_text()  # its own: rewritten


def test_sbatch_script_one_process_per_gpu(run_py):
    s = slurm_lib.sbatch_script(
        slurm_lib.SlurmJob(
            config=run_py, nodes=4, overrides=("--config.train.max_steps=9",), time="1-00:00:00"
        )
    )
    assert s.startswith("#!/bin/bash\n")
    for d in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--requeue"):
        assert f"#SBATCH {d}\n" in s
    assert "#SBATCH --signal=TERM@300\n" in s and "#SBATCH --time=1-00:00:00\n" in s
    assert "export JAXSFT_DISTRIBUTED=1\n" in s and "JAX_LOCAL_DEVICE_IDS" not in s
    assert f"srun --kill-on-bad-exit=1 python -m jaxsft.main --config {run_py} " in s
    assert "--config.train.max_steps=9\nrc=$?\n" in s
    assert 'if [ "$rc" -eq 75 ]; then scontrol requeue "$SLURM_JOB_ID"; fi\nexit "$rc"\n' in s


def test_sbatch_script_one_process_per_node_sees_every_gpu(run_py, tmp_path, capsys):
    out = tmp_path / "job.sbatch"
    argv = ["slurm", "--config", run_py, "--nodes", "2", "--gpus-per-node", "4", "--per", "node"]
    assert launch_main([*argv, "--venv", "/opt/v", "--out", str(out)]) == 0
    s = out.read_text()
    assert "#SBATCH --ntasks-per-node=1\n" in s and "export JAX_LOCAL_DEVICE_IDS=0,1,2,3\n" in s
    assert "source /opt/v/bin/activate\n" in s
    with pytest.raises(SystemExit) as e:
        launch_main(["slurm", "--config", run_py, "--per", "rack"])
    assert e.value.code == 2 and "--per must be one of" in capsys.readouterr().err


SRUN_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_NODELIST": "gpu[007-008]",
    "SLURM_NTASKS": "16",
    "SLURM_PROCID": "11",
    "SLURM_LOCALID": "3",
}


def test_under_srun_jaxsft_main_initializes_from_the_slurm_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for k in ("JAXSFT_COORDINATOR", "JAXSFT_DISTRIBUTED"):
        monkeypatch.delenv(k, raising=False)
    for k, v in SRUN_ENV.items():
        monkeypatch.setenv(k, v)
    distributed.maybe_initialize()
    assert calls == [{}]  # JAX's SlurmCluster fills in the rest, as checked below
    from jax._src.clusters import ClusterEnv

    coordinator, n, pid, local = ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, None
    )
    assert (coordinator, n, pid, local) == (f"gpu007:{4242 % 4096 + 61440}", 16, 11, [3])
    monkeypatch.setenv("JAXSFT_DISTRIBUTED", "0")  # opt out
    distributed.maybe_initialize()
    assert len(calls) == 1


def test_single_task_and_plain_runs_do_not_initialize():
    assert distributed.initialize_args({**SRUN_ENV, "SLURM_NTASKS": "1"}) is None
    assert distributed.initialize_args({}) is None
    assert distributed.initialize_args({"JAXSFT_DISTRIBUTED": "1"}) == {}
    explicit = {"JAXSFT_COORDINATOR": "h:1", "JAXSFT_NUM_PROCESSES": "2", "JAXSFT_PROCESS_ID": "1"}
    assert distributed.initialize_args(explicit) == {
        "coordinator_address": "h:1",
        "num_processes": 2,
        "process_id": 1,
    }
