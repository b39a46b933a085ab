"""python -m jaxsft.launch tpu-vm --name N --zone Z --accelerator v5p-32 --config RUN.py
                              [--spot] [--dry-run] [--project P] [--runtime-version V]
                              [--install WHEEL|DIR|REQUIREMENT] [--setup CMD ...] [--env K=V ...]
                              [--poll 60] [--max-restarts 20] [--config.KEY=VALUE ...]
python -m jaxsft.launch slurm --config RUN.py [--nodes 2] [--gpus-per-node 8] [--per gpu|node]
                              [--partition P] [--account A] [--time HH:MM:SS] [--venv DIR]
                              [--env K=V ...] [--out FILE] [--config.KEY=VALUE ...]

tpu-vm prints (--dry-run) or runs the gcloud steps of a run on a TPU VM slice: create or reuse
the queued resource, install jaxsft's `tpu` extra and copy the config to every worker, run
`python -m jaxsft.main` on --worker=all, and on preemption delete, re-create and rerun (the run
resumes from run_dir). slurm prints an sbatch script. Exit codes: the run's (tpu-vm), 2 bad
input. docs/tpu.md, docs/gpu.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from jaxsft.errors import UserError, run_cli


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m jaxsft.launch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="target", required=True)
    tpu = sub.add_parser("tpu-vm", help="a Cloud TPU VM slice (gcloud)")
    tpu.add_argument("--name", required=True, help="queued resource and TPU VM name")
    tpu.add_argument("--zone", default=None, help="e.g. us-east5-a")
    tpu.add_argument("--accelerator", required=True, help="e.g. v5p-32, v6e-8, v5litepod-16")
    tpu.add_argument("--config", required=True, help="the run config file")
    tpu.add_argument("--spot", action="store_true", help="Spot TPUs (preemptible)")
    tpu.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    tpu.add_argument("--project", default=None)
    tpu.add_argument("--runtime-version", default=None, help="default: per TPU generation")
    tpu.add_argument("--install", default=None, help="wheel, source tree or pip requirement")
    tpu.add_argument("--setup", action="append", default=[], help="shell command on all workers")
    tpu.add_argument("--env", action="append", default=[], help="KEY=VALUE for the run")
    tpu.add_argument("--poll", type=float, default=60.0, help="seconds between state polls")
    tpu.add_argument("--max-restarts", type=int, default=20)
    slurm = sub.add_parser("slurm", help="an sbatch script for multi-node GPUs")
    slurm.add_argument("--config", required=True, help="the run config file")
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--gpus-per-node", type=int, default=8)
    slurm.add_argument("--per", default="gpu", help="one process per 'gpu' or per 'node'")
    slurm.add_argument("--job-name", default="jaxsft")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--time", default=None, help="HH:MM:SS or D-HH:MM:SS")
    slurm.add_argument("--cpus-per-task", type=int, default=None)
    slurm.add_argument("--venv", default=None, help="virtualenv to activate on the nodes")
    slurm.add_argument("--env", action="append", default=[], help="KEY=VALUE for the run")
    slurm.add_argument("--out", default=None, help="write the script here instead of stdout")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not a.startswith("--config.")]
    if bad:
        raise UserError(
            f"unknown argument(s): {' '.join(bad)}",
            hint="run config overrides look like --config.train.learning_rate=1e-4",
        )
    return args, tuple(rest)


def check_config(path: str, overrides) -> None:
    """The run config loads here as it will on the workers (keys, types, values); a run_dir
    given as a gs:// URL is refused: jaxsft's run_dir is a file system path (docs/tpu.md)."""
    from jaxsft import config as config_lib

    config = config_lib.load(path, list(overrides))
    if "://" in str(config.run_dir):
        raise UserError(
            f"run_dir {config.run_dir!r} is a URL; jaxsft writes run_dir through the file system",
            where=path,
            hint="mount the bucket on every worker (gcsfuse, see docs/tpu.md) and set run_dir "
            "to a path under the mount, e.g. /gcs/BUCKET/runs/NAME",
        )


def default_install() -> str:
    """The source tree jaxsft runs from (its wheel is built and copied), else the package."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isfile(os.path.join(root, "pyproject.toml")):
        return root
    return "jaxsft[tpu]"


def tpu_vm(args, overrides) -> int:
    import jaxsft
    from jaxsft.launch import tpu_vm as tpu

    job = tpu.TpuJob(
        name=args.name,
        zone=args.zone or "",
        accelerator=args.accelerator,
        config=args.config,
        overrides=overrides,
        spot=args.spot,
        project=args.project,
        runtime_version=args.runtime_version,
        install=args.install or default_install(),
        setup=tuple(args.setup),
        env=tuple(args.env),
    )
    tpu.check_job(job)
    check_config(job.config, overrides)
    if args.dry_run:
        sys.stdout.write(tpu.dry_run_script(job, jaxsft.__version__))
        return 0
    loop = tpu.Loop(
        job,
        tpu.subprocess_runner,
        time.sleep,
        jaxsft.__version__,
        poll_s=args.poll,
        max_restarts=args.max_restarts,
    )
    return loop()


def check_out(path: str) -> None:
    """--out may replace only a script this command wrote (its "# jaxsft:" summary line
    follows the #SBATCH lines); any other existing file is the user's and is refused."""
    if not os.path.lexists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
    except (OSError, UnicodeDecodeError):
        head = ""
    if not (head.startswith("#!/bin/bash\n#SBATCH ") and "\n# jaxsft: " in head):
        raise UserError(
            "--out names an existing file that this command did not write",
            where=path,
            hint="choose a new file name for the sbatch script (it is never written over "
            "another file), or print it to stdout without --out",
        )


def slurm(args, overrides) -> int:
    from jaxsft.launch import slurm as slurm_lib

    job = slurm_lib.SlurmJob(
        config=args.config,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        per=args.per,
        overrides=overrides,
        job_name=args.job_name,
        partition=args.partition,
        account=args.account,
        time=args.time,
        cpus_per_task=args.cpus_per_task,
        venv=args.venv,
        env=tuple(args.env),
    )
    slurm_lib.check_job(job)
    check_config(job.config, overrides)
    script = slurm_lib.sbatch_script(job)
    if args.out:
        from jaxsft import run_dir as rd

        check_out(args.out)
        rd.atomic_write(args.out, script)
        print(f"wrote {args.out}: submit it with `sbatch {args.out}`", file=sys.stderr)
    else:
        sys.stdout.write(script)
    return 0


@run_cli
def main(argv=None) -> int:
    args, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
    return tpu_vm(args, overrides) if args.target == "tpu-vm" else slurm(args, overrides)


if __name__ == "__main__":
    sys.exit(main())
