"""Export a training run's checkpoint to Hugging Face (merged checkpoint and/or PEFT adapter).

    python -m jaxsft.export --run-dir DIR [--step N] [--format merged|peft|both] [--out DIR]
                            [--force]

The target directories are checked (targets.py) before the checkpoint is restored: a directory
with files the export did not write, the run directory or one above it, the base checkpoint or
a file is refused (exit 2, one message) and nothing is written. --force writes into a directory
holding other files, replacing only the files the export writes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxsft import run_dir as rd
from jaxsft.config import lora_config
from jaxsft.errors import UserError, run_cli
from jaxsft.export import FORMATS, check_export_targets, export_run
from jaxsft.export.targets import setting
from jaxsft.hf_io import DTYPES


def _check_run_dir(run_dir: Path, fmt: str | None) -> dict:
    """Fail fast, before restoring anything: the run exists and is a LoRA run when asked for
    an adapter (restore_model reports a missing checkpoint or step). Returns its config."""
    if not run_dir.is_dir():
        raise UserError(
            "run directory not found",
            where=run_dir,
            hint="pass the run_dir of a jaxsft training run",
        )
    config_path = run_dir / rd.CONFIG
    if not config_path.is_file():
        raise UserError(
            "not a jaxsft run directory (no config.json)",
            where=run_dir,
            hint="pass the run_dir of a jaxsft training run",
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the run's config: {e}", where=config_path) from None
    if fmt in ("peft", "both") and lora_config(config) is None:
        raise UserError(
            f"--format {fmt} needs a LoRA run; lora.rank is 0 in this run",
            where=config_path,
            hint="use --format merged",
        )
    return config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jaxsft.export", description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True, help="the training run's run_dir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="merged HF checkpoint, PEFT adapter, or both (default: export.format)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output dir (default RUN_DIR/hf, RUN_DIR/adapter; with both: OUT/hf, OUT/adapter)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=("source", *DTYPES),
        help="merged weights dtype (default: export.dtype)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a directory holding other files (or the run directory, or one above "
        "it): only the files the export writes are replaced, every other file stays",
    )
    return p.parse_args(argv)


@run_cli
def main(argv=None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    saved = _check_run_dir(run_dir, args.format)
    fmt = args.format or setting(saved, "export.format", "merged")
    fmt = "merged" if fmt == "none" else fmt
    # Refuse a target before the (slow) restore; export_run applies the rules again.
    check_export_targets(saved, args.out, args.force, fmt=fmt, run_dir=run_dir)
    from jaxsft.train.setup import restore_model

    # step: the checkpoint actually restored (a damaged newest one is skipped)
    model, cfg, lora_cfg, config, step = restore_model(run_dir, step=args.step)
    dirs = export_run(
        model,
        cfg,
        lora_cfg,
        config,
        fmt=fmt,
        out=args.out,
        dtype=args.dtype,
        run_dir=run_dir,
        force=args.force,
        step=step,
    )
    for kind, path in dirs.items():
        print(f"exported {kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
