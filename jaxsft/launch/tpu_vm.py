"""A run on a Cloud TPU VM slice: the `gcloud compute tpus` steps, and the preemption loop.

Every command is an argv list built by a pure function (tested without cloud access); only
`launch` runs them, through an injected `runner(argv, capture) -> (returncode, stdout)` and
`sleep(seconds)`, so the loop is tested with fakes. Steps: create (or reuse) a queued
resource, wait until it is ACTIVE, copy the package and the run config to every worker,
install the `tpu` extra, run the optional setup commands (mount a bucket, fetch the model),
then `python -m jaxsft.main` on --worker=all, streaming its output. When the run ends with a
failure and the queued resource is gone, PREEMPTED, SUSPENDED or FAILED, it is deleted and
re-created and the same command runs again: jaxsft resumes from the newest complete
checkpoint in run_dir by itself (the run_dir must outlive the VMs: a mounted bucket or a
shared disk, docs/tpu.md).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
import tempfile
from collections.abc import Callable

from jaxsft.errors import UserError
from jaxsft.launch import check_env

# TPU software versions per generation (cloud.google.com/tpu/docs/runtimes).
RUNTIMES = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
ACCELERATOR = re.compile(r"(v2|v3|v4|v5litepod|v5p|v6e)-([1-9][0-9]*)")
ACTIVE = "ACTIVE"
WAITING = ("WAITING_FOR_RESOURCES", "PROVISIONING", "CREATING", "ACCEPTED")
# A queued resource in one of these states will not run the job again: delete, re-create.
LOST = ("PREEMPTED", "SUSPENDING", "SUSPENDED", "FAILED", "DELETING")
# Run exit codes that may mean "the machine went away" rather than "the run failed": jaxsft's
# save-on-SIGTERM (75), killed (137, 143), ssh lost its connection (255).
MAYBE_PREEMPTED = (75, 137, 143, 255)
REMOTE_DIR = "jaxsft_run"  # under the home directory of every worker
DIST_DIR = os.path.join(tempfile.gettempdir(), "jaxsft-wheels")  # where a source tree's wheel goes

Runner = Callable[[list, bool], tuple]


class CommandFailed(UserError):
    """A gcloud command of the launch (not the run itself) failed."""


@dataclasses.dataclass(frozen=True)
class TpuJob:
    name: str
    zone: str
    accelerator: str
    config: str  # the local run config file
    overrides: tuple[str, ...] = ()
    spot: bool = False
    project: str | None = None
    runtime_version: str | None = None
    install: str = ""  # a local wheel, a local source tree, or a pip requirement
    setup: tuple[str, ...] = ()  # shell commands run on every worker before the run
    env: tuple[str, ...] = ()  # KEY=VALUE for the run

    @property
    def runtime(self) -> str:
        return self.runtime_version or RUNTIMES[parse_accelerator(self.accelerator)[0]]

    @property
    def remote_config(self) -> str:
        return f"{REMOTE_DIR}/{os.path.basename(self.config)}"


def parse_accelerator(text: str) -> tuple[str, int]:
    """'v5p-32' -> ('v5p', 32); UserError for anything gcloud would not accept."""
    m = ACCELERATOR.fullmatch(text or "")
    if m is None:
        hint = "e.g. v4-8, v5p-32, v5litepod-16 (v5e), v6e-8"
        if re.fullmatch(r"v5e-[0-9]+", text or ""):
            named = text.replace("v5e", "v5litepod")
            hint = f"v5e slices are called v5litepod-N: --accelerator {named}"
        raise UserError(f"unknown TPU accelerator type {text!r}", where="--accelerator", hint=hint)
    return m.group(1), int(m.group(2))


def check_job(job: TpuJob) -> None:
    """Bad input before any command runs: UserError (exit 2)."""
    if not job.zone:
        raise UserError("--zone is required", hint="e.g. --zone us-east5-a (where the quota is)")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", job.name or ""):
        raise UserError(
            f"bad TPU name {job.name!r}",
            where="--name",
            hint="lowercase letters, digits and hyphens, starting with a letter",
        )
    parse_accelerator(job.accelerator)
    check_env(job.env)


# ---------------------------------------------------------------------------------------------
# Commands (pure)
# ---------------------------------------------------------------------------------------------
def gcloud(job: TpuJob, *args: str) -> list[str]:
    project = [f"--project={job.project}"] if job.project else []
    return ["gcloud", "compute", "tpus", *args, f"--zone={job.zone}", *project]


def create_cmd(job: TpuJob) -> list[str]:
    argv = gcloud(
        job,
        "queued-resources",
        "create",
        job.name,
        f"--node-id={job.name}",
        f"--accelerator-type={job.accelerator}",
        f"--runtime-version={job.runtime}",
    )
    return argv + (["--spot"] if job.spot else [])


def state_cmd(job: TpuJob) -> list[str]:
    return gcloud(job, "queued-resources", "describe", job.name, "--format=value(state.state)")


def delete_cmd(job: TpuJob) -> list[str]:
    # --force deletes the TPU VM of the queued resource with it
    return gcloud(job, "queued-resources", "delete", job.name, "--force", "--quiet")


def ssh_cmd(job: TpuJob, command: str) -> list[str]:
    return gcloud(job, "tpu-vm", "ssh", job.name, "--worker=all", "--command", command)


def scp_cmd(job: TpuJob, local: str, remote: str) -> list[str]:
    return gcloud(job, "tpu-vm", "scp", local, f"{job.name}:{remote}", "--worker=all")


def wheel_name(version: str) -> str:
    return f"jaxsft-{version}-py3-none-any.whl"


def package_steps(job: TpuJob, version: str) -> tuple[list[list[str]], str]:
    """(local commands that make the package to copy, the pip requirement on the workers)."""
    spec = job.install
    if os.path.isdir(spec):  # a source tree: build its wheel here, copy it
        wheel = os.path.join(DIST_DIR, wheel_name(tree_version(spec) or version))
        build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w"]
        return [[*build, os.path.dirname(wheel), spec]], wheel
    return [], spec


def tree_version(directory: str) -> str | None:
    """[project].version of the source tree's pyproject.toml (the wheel it builds is named by
    it, not by the jaxsft running the launcher), or None when it has none."""
    import tomllib

    try:
        with open(os.path.join(directory, "pyproject.toml"), "rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, ValueError):
        return None


def provision_cmds(job: TpuJob, version: str) -> tuple[list[list[str]], list[list[str]]]:
    """(local build commands, the commands that prepare every worker of a fresh slice)."""
    local, spec = package_steps(job, version)
    cmds = [ssh_cmd(job, f"mkdir -p {REMOTE_DIR}")]
    if spec.endswith(".whl"):
        cmds.append(scp_cmd(job, spec, f"{REMOTE_DIR}/"))
        spec = f"{REMOTE_DIR}/{os.path.basename(spec)}"
    cmds.append(scp_cmd(job, job.config, job.remote_config))
    requirement = spec if "[" in spec else f"{spec}[tpu]"
    cmds.append(ssh_cmd(job, f"python3 -m pip install --upgrade {shlex.quote(requirement)}"))
    cmds += [ssh_cmd(job, command) for command in job.setup]
    return local, cmds


def train_command(job: TpuJob) -> str:
    """The shell command every worker runs: jaxsft.main under JAX's own distributed runtime,
    its output also appended to jaxsft_run/train.log on the worker."""
    env = " ".join(shlex.quote(e) for e in ("JAXSFT_DISTRIBUTED=1", *job.env))
    main = ["python3", "-m", "jaxsft.main", "--config", os.path.basename(job.config)]
    main += list(job.overrides)
    return (
        f"cd {REMOTE_DIR} && env {env} {shlex.join(main)} 2>&1 | tee -a train.log; "
        "exit ${PIPESTATUS[0]}"
    )


def run_cmd(job: TpuJob) -> list[str]:
    return ssh_cmd(job, train_command(job))


def dry_run_script(job: TpuJob, version: str) -> str:
    """The commands of a first attempt, as shell lines, and what the loop does after."""
    local, provision = provision_cmds(job, version)
    lines = [
        f"# jaxsft on TPU VM slice {job.name} ({job.accelerator}, {job.zone}, {job.runtime}"
        + (", spot" if job.spot else "")
        + ")",
        "# 1. create the queued resource (reused when it exists and is ACTIVE or waiting):",
        shlex.join(create_cmd(job)),
        "# 2. wait until it is ACTIVE:",
        shlex.join(state_cmd(job)),
        "# 3. the package and the run config on every worker:",
        *(shlex.join(c) for c in local + provision),
        "# 4. the run, on every worker, its output streamed here:",
        shlex.join(run_cmd(job)),
        "# 5. a failed run whose queued resource is then gone, PREEMPTED, SUSPENDED or FAILED:",
        shlex.join(delete_cmd(job)),
        "#    then 1-4 again; jaxsft resumes from the newest checkpoint in run_dir.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Loop:
    job: TpuJob
    runner: Runner
    sleep: Callable[[float], None]
    version: str
    poll_s: float = 60.0
    max_restarts: int = 20
    settle_polls: int = 5  # polls for a preemption to show after a run died (rc 75/255/...)
    log: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True)

    def run(self, argv, capture=False) -> tuple[int, str]:
        if not capture:
            self.log("+ " + shlex.join(argv))
        return self.runner(argv, capture)

    def check(self, argv) -> str:
        rc, out = self.run(argv)
        if rc != 0:
            raise CommandFailed(f"command failed with exit code {rc}: {shlex.join(argv)}")
        return out

    def state(self) -> str | None:
        """The queued resource's state, None when it does not exist."""
        rc, out = self.run(state_cmd(self.job), capture=True)
        if rc != 0:
            return None
        return (out or "").strip().upper() or None

    def ensure_active(self) -> bool:
        """An ACTIVE queued resource; True when it was (re-)created, so the workers are new."""
        state, pending, creates = self.state(), False, 0
        while state != ACTIVE:
            if state in LOST:
                if creates >= 3:
                    raise UserError(
                        f"queued resource {self.job.name} went {state} {creates} times in a row",
                        hint="check the quota, zone and accelerator type "
                        f"(gcloud compute tpus queued-resources describe {self.job.name})",
                    )
                self.log(f"queued resource {self.job.name} is {state}: deleting it")
                self.check(delete_cmd(self.job))
                state, pending = None, False
            if state is None and not pending:  # just created: maybe not listed yet, wait
                self.check(create_cmd(self.job))
                pending, creates = True, creates + 1
            self.sleep(self.poll_s)
            state = self.state()
        return creates > 0

    def provision(self) -> None:
        local, remote = provision_cmds(self.job, self.version)
        for argv in local + remote:
            self.check(argv)

    def lost(self) -> bool:
        """After a failed run: does the slice show a preemption within settle_polls polls?"""
        for i in range(self.settle_polls):
            state = self.state()
            if state != ACTIVE:
                self.log(f"queued resource {self.job.name}: {state or 'gone'}")
                return True
            if i + 1 < self.settle_polls:
                self.sleep(self.poll_s)
        return False

    def __call__(self) -> int:
        """Run to the end; the exit code of the run (0 finished), or of the last attempt."""
        restarts, provisioned = 0, False
        while True:
            if self.ensure_active() or not provisioned:
                try:
                    self.provision()
                except CommandFailed:
                    if not self.lost():  # a real failure (a setup command, the install)
                        raise
                    provisioned, restarts = False, restarts + 1  # preempted while setting up
                    if restarts > self.max_restarts:
                        raise
                    continue
                provisioned = True
            rc, _ = self.run(run_cmd(self.job))
            if rc == 0:
                return 0
            preempted = self.lost()
            if not preempted and rc not in MAYBE_PREEMPTED:
                self.log(f"the run failed with exit code {rc} (not a preemption): stopping")
                return rc
            restarts += 1
            if restarts > self.max_restarts:
                self.log(f"giving up after {self.max_restarts} restarts")
                return rc
            why = "preempted" if preempted else f"exit code {rc} on an ACTIVE slice"
            self.log(f"restart {restarts}/{self.max_restarts} ({why}): resuming from run_dir")


def subprocess_runner(argv, capture: bool) -> tuple[int, str]:
    """Run one command; captured (for state polls) or streamed to this terminal."""
    import subprocess

    try:
        if capture:
            p = subprocess.run(argv, capture_output=True, text=True)
            return p.returncode, p.stdout
        return subprocess.run(argv).returncode, ""
    except FileNotFoundError:
        raise UserError(
            f"{argv[0]} not found",
            hint="install the Google Cloud CLI (cloud.google.com/sdk) or use --dry-run",
        ) from None
