"""Export to Hugging Face: a merged checkpoint (safetensors, config, tokenizer) and a PEFT adapter.

    python -m jaxsft.export --run-dir DIR [--step N] [--format merged|peft|both] [--out DIR]
                            [--force]

merged.py writes the merged weights through the same table as the import (`hf_io.weight_table`)
with LoRA adapters folded into their kernels, one tensor at a time from device to disk; peft.py
writes the adapter as peft saves it; files.py streams safetensors; check.py reloads what was
written and compares logits with the in-memory model; targets.py decides where an export may
go. Every export is written into a temporary directory next to its target, self-checked, and
only then moved into place: a failed export leaves no half directory and keeps an older
export, and an export never deletes or overwrites a file it did not write (targets.py).
"""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from jaxsft.errors import UserError
from jaxsft.export.check import ExportCheckError
from jaxsft.export.merged import export_dtype, export_merged
from jaxsft.export.peft import export_peft
from jaxsft.export.qlora import full_precision
from jaxsft.export.targets import (
    FORMATS,
    MARKER,
    check_export_targets,
    output_dirs,
    setting,
)
from jaxsft.models.config import ModelConfig
from jaxsft.models.lora import LoraConfig

__all__ = [
    "FORMATS",
    "MARKER",
    "ExportCheckError",
    "check_export_targets",
    "export_dtype",
    "export_merged",
    "export_peft",
    "export_run",
    "is_lora",
    "main",
    "output_dirs",
]


def is_lora(lora_cfg: LoraConfig | None) -> bool:
    return lora_cfg is not None and lora_cfg.rank > 0


def export_run(
    model: nnx.Module,
    cfg: ModelConfig,
    lora_cfg: LoraConfig | None,
    config,
    *,
    fmt: str | None = None,
    out=None,
    dtype: str | None = None,
    run_dir=None,
    force: bool = False,
    step: int | None = None,
) -> dict[str, Path]:
    """Export a trained model as the run's config says (export.format/dtype/max_shard_bytes).

    config: the run's resolved config (ConfigDict or dict); model.path is the base checkpoint
    (tokenizer, generation config, PEFT base). Every directory passes the rules of targets.py
    (checked for all before the first is written; force: as `--force`); step goes into the
    markers. A QLoRA model (quantised base) is exported from the full-precision base re-read
    from model.path with its adapters (export/qlora.py). Returns {'merged'|'peft': directory}.
    """
    fmt = fmt or setting(config, "export.format", "merged")
    if fmt == "none":
        return {}
    run_dir = run_dir or setting(config, "run_dir")
    if fmt in ("peft", "both") and not is_lora(lora_cfg):
        raise UserError(
            f"--format {fmt} needs a LoRA run; this run fine-tuned all weights",
            where=run_dir,
            hint="use --format merged",
        )
    base = setting(config, "model.path")
    dirs = check_export_targets(config, out, force, fmt=fmt, run_dir=run_dir)
    model = full_precision(model, lora_cfg, config)  # QLoRA: the real base, adapters copied
    where = {"run_dir": run_dir, "force": force, "step": step}
    if "merged" in dirs:
        export_merged(
            model,
            cfg,
            dirs["merged"],
            tokenizer_dir=base or None,
            dtype=dtype or setting(config, "export.dtype", "source"),
            max_shard_bytes=int(setting(config, "export.max_shard_bytes", 5 * 1024**3)),
            **where,
        )
    if "peft" in dirs:
        export_peft(model, cfg, lora_cfg, dirs["peft"], base_model_path=base, **where)
    return dirs


def __getattr__(name: str):
    """jaxsft.export.main, the CLI of __main__.py, imported on use: importing it here would make
    `python -m jaxsft.export` warn that __main__ was imported before it ran."""
    if name == "main":
        from jaxsft.export.__main__ import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
