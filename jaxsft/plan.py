"""python -m jaxsft.plan --config RUN.py [--config.KEY=VALUE ...] [--devices N]
                       [--device-memory 80GB] [--fit] [--json] [--no-compile]

Per-device memory of a run's train step, planned from shapes alone: no weights are read and
nothing is allocated, so model.path may be a directory holding only config.json. The step is
compiled ahead of time on the local backend for the configured mesh, remat policy and
micro-batch (train.batch_size / train.grad_accum rows of data.max_length tokens); parameters,
optimizer state and gradients are exact sums over the shards one device holds, temporaries
come from the compiled step's memory analysis (docs/performance.md, "Memory planner").

--devices N plans for N devices; on a machine without N of them the plan runs in a child
process on N fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N).
--fit searches train.grad_accum x model.remat ("none", "dots", "full") for the fastest
combination that fits --device-memory (fewest accumulation steps first, then the cheapest
remat) and prints its config overrides.

Exit codes: 0 the plan fits (or no limit is known), 1 it does not fit (--fit: nothing fits),
2 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

from jaxsft.errors import UserError, run_cli

REMATS = ("none", "dots", "full")  # cheapest recompute first
UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
CHILD_ENV = "JAXSFT_PLAN_CHILD"  # set in the re-executed child: never re-execute twice
EXIT_FITS, EXIT_DOES_NOT_FIT = 0, 1


def parse_bytes(text: str) -> int:
    """'80GB' (10^9), '80GiB' (2^30), '85899345920' -> bytes; UserError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", text or "")
    unit = m.group(2).lower() if m else None
    if m is None or unit not in UNITS or float(m.group(1)) <= 0:
        raise UserError(
            f"cannot parse --device-memory {text!r}",
            hint="give bytes with a unit: 80GB (10^9 bytes), 80GiB (2^30), 16000MB, or a number",
        )
    return int(float(m.group(1)) * UNITS[unit])


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    scale, unit = next(
        (2**e, u)
        for e, u in ((30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "B"))
        if n >= 2**e or e == 0
    )
    return f"{n / scale:9.2f} {unit:<3}  ({n:,} B)"


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m jaxsft.plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="ml_collections run config file")
    parser.add_argument("--devices", type=int, default=None, help="plan for N devices")
    parser.add_argument("--device-memory", default=None, help="per-device limit, e.g. 80GB")
    parser.add_argument("--fit", action="store_true", help="search grad_accum x remat")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="formulas only: parameters, optimizer state, gradients (no temporaries)",
    )
    args, overrides = parser.parse_known_args(argv)
    if args.devices is not None and args.devices < 1:
        raise UserError(f"--devices must be >= 1, got {args.devices}")
    if args.fit and args.no_compile:
        raise UserError("--fit compiles every candidate; drop --no-compile")
    return args, overrides


def mesh_shape(mesh_cfg, n: int) -> dict:
    """{"data", "expert", "fsdp", "tensor"} of the config's mesh on n devices
    (sharding.make_mesh's arithmetic, checked before any device is touched)."""
    from jaxsft import sharding

    try:
        return sharding.mesh_shape(
            int(mesh_cfg.data),
            int(mesh_cfg.fsdp),
            int(mesh_cfg.tensor),
            n,
            int(mesh_cfg.get("expert", 1)),
        )
    except UserError as e:
        raise UserError(
            f"{e.message}",
            where="mesh",
            hint="pass a matching --devices, or override --config.mesh.* (one of them may be -1)",
        ) from None


def in_child(n: int, argv) -> int | None:
    """When this process cannot see n devices, re-run the plan in a child process on n fake
    CPU devices and return its exit code; None when the local devices already number n."""
    import jax

    have = jax.device_count()
    if have == n:
        return None
    if os.environ.get(CHILD_ENV):
        raise UserError(f"--devices {n}, but this process has {have} devices")
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env[CHILD_ENV] = "1"
    print(
        f"planning for {n} devices on {n} fake CPU devices (this machine has {have} "
        f"{jax.default_backend()} device(s)): the temporaries are XLA:CPU's",
        file=sys.stderr,
    )
    sys.stdout.flush()
    return subprocess.run([sys.executable, "-m", "jaxsft.plan", *argv], env=env).returncode


def local_device_limit() -> int | None:
    """The first local accelerator's own memory limit (None on CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def candidate_overrides(config, shards: int) -> list[list[str]]:
    """--fit's search order: grad_accum ascending (only those whose micro-batch splits over the
    batch devices), then remat from the cheapest to the most recompute."""
    b = int(config.train.batch_size)
    accums = [a for a in range(1, b + 1) if b % a == 0 and (b // a) % shards == 0]
    return [
        [f"--config.train.grad_accum={a}", f"--config.model.remat={r}"]
        for a in accums
        for r in REMATS
    ]


def plan_config(config, mesh, limit: int | None, compile: bool = True) -> dict:
    """The report of one configuration: per-device bytes, fits, and what was planned."""
    import jax

    from jaxsft import config as config_lib
    from jaxsft import plan_memory
    from jaxsft.models.config import ModelConfig
    from jaxsft.train.start import check_batch_geometry, check_expert_axis

    check_batch_geometry(config, mesh)
    check_expert_axis(ModelConfig.from_hf(config.model.path), mesh)
    p = plan_memory.plan(config, mesh, compile=compile)
    fixed = p.params + p.optimizer + p.gradients
    if limit is None:
        fits = None
    elif p.total is None:  # formulas only: known not to fit, or not known
        fits = False if fixed > limit else None
    else:
        fits = p.total <= limit
    a = int(config.train.grad_accum)
    rows = int(config.train.batch_size) // a
    quantize = config_lib.quantize(config)
    return {
        "per_device": p.per_device(),
        "devices": int(mesh.size),
        "fits": fits,
        "overrides": [],
        "device_memory": limit,
        "backend": jax.default_backend(),
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "micro_batch": {
            "rows": rows,
            "tokens": rows * int(config.data.max_length),
            "grad_accum": a,
            "remat": str(config.model.remat),
        },
        "model": {
            "model_type": p.model_type,
            "parameters": p.num_params,
            "trainable": p.num_trainable,
            **({"quantize": quantize} if quantize else {}),  # QLoRA: how the base is stored
        },
        "compiled": p.compiled,
    }


def fit(args, overrides, config, mesh, limit: int) -> dict:
    """The first configuration of the search order whose compiled step fits `limit`. Per
    grad_accum, "full" is compiled first: when even it does not fit, "none" and "dots" (which
    keep more) are skipped; otherwise the cheapest remat that fits is taken."""
    from jaxsft import config as config_lib
    from jaxsft.sharding import batch_devices

    shards = batch_devices(mesh.shape)
    by_accum: dict[str, list[list[str]]] = {}
    for ov in candidate_overrides(config, shards):
        by_accum.setdefault(ov[0], []).append(ov)
    if not by_accum:
        raise UserError(
            f"train.batch_size={config.train.batch_size} rows do not split over the {shards} "
            "devices of mesh.data x mesh.expert x mesh.fsdp for any train.grad_accum",
            where="train.batch_size",
            hint=f"use a multiple of {shards}, or another mesh",
        )
    tried = []

    def attempt(ov, compile=True):
        report = plan_config(config_lib.load(args.config, [*overrides, *ov]), mesh, limit, compile)
        report["overrides"] = ov
        if compile:
            mb, total = report["micro_batch"], report["per_device"]["total"]
            tried.append(dict(grad_accum=mb["grad_accum"], remat=mb["remat"], total=total))
            tried[-1]["fits"] = report["fits"]
        return report

    report = attempt(next(iter(by_accum.values()))[0], compile=False)
    if report["fits"] is False:  # parameters + optimizer + gradients alone: no search helps
        report["overrides"] = []
        report["candidates"] = tried
        return report
    for *cheaper, full in by_accum.values():
        report = attempt(full)
        if not report["fits"]:
            continue
        for ov in cheaper:
            cheap = attempt(ov)
            if cheap["fits"]:
                report = cheap
                break
        break
    if not report["fits"]:
        report["overrides"] = []
    report["candidates"] = tried
    return report


def render(report: dict, fit_mode: bool) -> str:
    """The human-readable plan."""
    mb, m, model = report["micro_batch"], report["mesh"], report["model"]
    lines = [
        f"model: {model['model_type']}, {model['parameters']:,} parameters "
        f"({model['trainable']:,} trainable)"
        + (f", base quantised to {model['quantize']}" if model.get("quantize") else ""),
        f"mesh: data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']} on "
        f"{report['devices']} {report['backend']} device(s)",
        f"micro-batch: {mb['rows']} rows ({mb['tokens']:,} tokens) x grad_accum "
        f"{mb['grad_accum']}, remat={mb['remat']}",
        "per device:",
    ]
    names = {
        "params": "parameters",
        "optimizer": "optimizer state",
        "gradients": "gradients",
        "temporaries": "temporaries",
        "total": "total",
    }
    for key, name in names.items():
        lines.append(f"  {name:<16} {fmt_bytes(report['per_device'][key])}")
    if report["per_device"]["temporaries"] is None:
        lines.append("  (--no-compile: temporaries and total need the compiled step)")
    limit = report["device_memory"]
    if limit is not None:
        verdict = {True: "fits", False: "does not fit", None: "unknown (not compiled)"}
        lines.append(f"device memory {fmt_bytes(limit).strip()}: {verdict[report['fits']]}")
    if fit_mode:
        lines.append("searched (grad_accum, remat -> total):")
        for c in report.get("candidates", []):
            ok = "fits" if c["fits"] else "too big"
            lines.append(f"  {c['grad_accum']:>4} {c['remat']:<5} {fmt_bytes(c['total'])}  {ok}")
        if report["fits"]:
            lines.append("overrides: " + " ".join(report["overrides"]))
        else:
            lines.append("no combination of train.grad_accum and model.remat fits")
    return "\n".join(lines)


@run_cli
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parse_args(argv)
    limit = parse_bytes(args.device_memory) if args.device_memory is not None else None
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # planning allocates nothing
    from jaxsft import config as config_lib
    from jaxsft.models.config import ModelConfig

    config = config_lib.load(args.config, overrides)
    ModelConfig.from_hf(config.model.path)  # only config.json is read
    if args.devices is not None:
        mesh_shape(config.mesh, args.devices)
        code = in_child(args.devices, argv)
        if code is not None:
            return code
    from jaxsft.train.setup import config_mesh

    mesh = config_mesh(config)
    limit = limit if limit is not None else local_device_limit()
    if args.fit:
        if limit is None:
            raise UserError("--fit needs --device-memory (e.g. --device-memory 80GB)")
        report = fit(args, overrides, config, mesh, limit)
    else:
        report = plan_config(config, mesh, limit, compile=not args.no_compile)
    print(json.dumps(report) if args.json else render(report, args.fit))
    return EXIT_DOES_NOT_FIT if report["fits"] is False else EXIT_FITS


if __name__ == "__main__":
    sys.exit(main())
