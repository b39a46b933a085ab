"""Export to Hugging Face: a merged checkpoint (safetensors, config, tokenizer) and a PEFT adapter.

    python -m jaxsft.export --run-dir DIR [--step N] [--format merged|peft|both] [--out DIR]

The merged weights go through the same table as the import (`hf_io.weight_table`, read by
`hf_io.hf_tensors`) with LoRA adapters folded into their kernels (W + scale * A @ B), one tensor
at a time from device to disk. Every export is written into a temporary directory next to its
target, reloaded and compared with the in-memory model (export_check), and only then renamed
into place: a failed export leaves no half directory and keeps an older export.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft.errors import UserError, run_cli
from jaxsft.export_check import ExportCheckError, check_merged
from jaxsft.export_files import (
    Planned,
    atomic_dir,
    copy_tokenizer,
    host_array,
    is_writer,
    refuse_overwrite,
    write_generation_config,
    write_json,
    write_safetensors,
)
from jaxsft.export_peft import adapted_linears, export_peft, module_at
from jaxsft.hf_io import DTYPES, Entry, hf_keys, hf_tensors, weight_table
from jaxsft.models.config import ModelConfig
from jaxsft.models.lora import LoraConfig

__all__ = ["export_merged", "export_peft", "export_run", "main", "ExportCheckError"]
FORMATS = ("merged", "peft", "both")


def export_dtype(dtype: str, cfg: ModelConfig) -> str:
    """'source' -> the checkpoint's own dtype; else one of float32 / bfloat16 / float16."""
    name = cfg.source_dtype if dtype == "source" else dtype
    name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        what = f"the source checkpoint's dtype {name!r}" if dtype == "source" else repr(dtype)
        raise UserError(
            f"cannot export in {what}",
            where="export.dtype",
            hint=f"set export.dtype to one of source, {', '.join(DTYPES)}",
        )
    return name


class _Leaf:
    """One state leaf as hf_tensors reads it: leaf[i] is layer i, np.asarray(leaf) all of it."""

    def __init__(self, get):
        self._get = get

    def __getitem__(self, i):
        return self._get(i)

    def __array__(self, dtype=None, copy=None):
        return self._get(None)


def _state_view(model: nnx.Module, cfg: ModelConfig, get) -> dict:
    """A nested dict over the table's paths whose leaves call get(entry, layer or None)."""
    view: dict = {}
    for entry in weight_table(cfg):
        node = view
        for p in entry.path[:-1]:
            node = node.setdefault(p, {})
        node[entry.path[-1]] = _Leaf(functools.partial(get, entry))
    return view


@functools.partial(jax.jit, static_argnames=("stacked", "transpose", "dtype"))
def _hf_layout(w, i, a, b, scale, *, stacked: bool, transpose: bool, dtype):
    """On device: layer i of w (+ scale * a[i] @ b[i] in float32), cast, transposed to HF."""
    take = functools.partial(jax.lax.dynamic_index_in_dim, index=i, axis=0, keepdims=False)
    if stacked:
        w, a, b = take(w), (a if a is None else take(a)), (b if b is None else take(b))
    if a is not None:
        delta = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32), precision="highest")
        w = w.astype(jnp.float32) + scale * delta
    w = w.astype(dtype)
    return w.T if transpose else w


def _merged_fetch(model: nnx.Module, np_dtype, entry: Entry, i) -> np.ndarray:
    """Host copy of one tensor (layer i of a stacked one) with its LoRA delta folded in.

    Merge, cast and transpose run on device; the host array is returned as a transposed view
    when hf_tensors will transpose it, so that its .T is contiguous (no host-side copy).
    """
    linear = module_at(model, entry.path[:-1])
    lora = entry.path[-1] == "kernel" and getattr(linear, "lora_a", None) is not None
    a, b = (linear.lora_a[...], linear.lora_b[...]) if lora else (None, None)
    scale = np.float32(linear.lora_scale if lora else 0.0)
    out = _hf_layout(
        module_at(model, entry.path)[...],
        np.int32(i or 0),
        a,
        b,
        scale,
        stacked=i is not None,
        transpose=entry.transpose,
        dtype=np_dtype,
    )
    host = host_array(out)
    return host.T if entry.transpose else host


def _planned_fetch(model: nnx.Module, np_dtype, entry: Entry, i) -> np.ndarray:
    """Shape and dtype only: a zero-strided array, no memory."""
    shape = module_at(model, entry.path).shape
    return np.broadcast_to(np.zeros((), np_dtype), shape if i is None else shape[1:])


def _plan(model: nnx.Module, cfg: ModelConfig, np_dtype) -> list[Planned]:
    """Every HF tensor to write, from the table; asserts each key appears exactly once."""
    table_paths = {e.path for e in weight_table(cfg)}
    params = {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert params == table_paths, f"params outside the table: {sorted(params ^ table_paths)}"
    adapted_linears(model, cfg)  # asserts every adapter sits on a kernel of the table
    view = _state_view(model, cfg, functools.partial(_planned_fetch, model, np_dtype))
    plan = [Planned(k, a.shape, a.dtype) for k, a, _ in hf_tensors(view, cfg)]
    keys = [p.key for p in plan]
    expected = [k for e in weight_table(cfg) for k in hf_keys(e, cfg.num_layers)]
    assert len(set(keys)) == len(keys) and sorted(keys) == sorted(expected), "key mismatch"
    assert not any("lora" in k for k in keys)
    return plan


def export_merged(
    model: nnx.Module,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: str = "source",
    max_shard_bytes: int = 5 * 1024**3,
    check: bool = True,
) -> Path:
    """Write `model` (LoRA merged) as a HF checkpoint directory, then self-check it.

    dtype: "source" (the dtype of the checkpoint the run started from), "float32", "bfloat16"
    or "float16". tokenizer_dir: the base checkpoint, whose tokenizer files, chat template and
    generation_config.json are copied. Only process 0 writes; all processes must call this.
    """
    name = export_dtype(dtype, cfg)
    if tokenizer_dir is not None:
        refuse_overwrite(out_dir, tokenizer_dir)
    np_dtype = np.dtype(DTYPES[name])
    plan = _plan(model, cfg, np_dtype)
    write = is_writer()
    with atomic_dir(out_dir, write=write) as tmp:
        view = _state_view(model, cfg, functools.partial(_merged_fetch, model, np_dtype))
        tensors = ((k, a) for k, a, _ in hf_tensors(view, cfg))
        write_safetensors(tmp, plan, tensors, max_shard_bytes=max_shard_bytes, write=write)
        if write:
            write_json(tmp / "config.json", cfg.to_hf(dtype=name))
            write_generation_config(tokenizer_dir, tmp, cfg)
            if tokenizer_dir is not None:
                copy_tokenizer(tokenizer_dir, tmp)
        if check:
            check_merged(model, tmp, name)
    return Path(out_dir)


def _get(config, dotted: str, default=None):
    """config['a']['b'] for 'a.b' on a ConfigDict or a plain dict; default when absent."""
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return default
    return node


def is_lora(lora_cfg: LoraConfig | None) -> bool:
    return lora_cfg is not None and lora_cfg.rank > 0


def output_dirs(run_dir: str | os.PathLike, fmt: str, out=None) -> dict[str, Path]:
    """{'merged': dir, 'peft': dir} for a format; defaults RUN_DIR/hf and RUN_DIR/adapter."""
    if fmt not in FORMATS:
        raise UserError(
            f"unknown export format {fmt!r}",
            where="export.format",
            hint=f"one of {', '.join(FORMATS)} (or none)",
        )
    if fmt == "both" or out is None:
        root = Path(out if out is not None else run_dir)
        dirs = {"merged": root / "hf", "peft": root / "adapter"}
        return dirs if fmt == "both" else {fmt: dirs[fmt]}
    return {fmt: Path(out)}


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
) -> dict[str, Path]:
    """Export a trained model as the run's config says (export.format/dtype/max_shard_bytes).

    config: the run's resolved config (ConfigDict or dict); model.path is the base checkpoint
    (tokenizer, generation config, PEFT base). Returns {'merged'|'peft': directory written}.
    """
    fmt = fmt or _get(config, "export.format", "merged")
    if fmt == "none":
        return {}
    if fmt in ("peft", "both") and not is_lora(lora_cfg):
        raise UserError(
            f"--format {fmt} needs a LoRA run; this run fine-tuned all weights",
            where=run_dir or _get(config, "run_dir"),
            hint="use --format merged",
        )
    base = _get(config, "model.path")
    dirs = output_dirs(run_dir or _get(config, "run_dir"), fmt, out)
    if "merged" in dirs:
        export_merged(
            model,
            cfg,
            dirs["merged"],
            tokenizer_dir=base or None,
            dtype=dtype or _get(config, "export.dtype", "source"),
            max_shard_bytes=int(_get(config, "export.max_shard_bytes", 5 * 1024**3)),
        )
    if "peft" in dirs:
        export_peft(model, cfg, lora_cfg, dirs["peft"], base_model_path=base)
    return dirs


def _check_run_dir(run_dir: Path, fmt: str | None) -> None:
    """Fail fast, before restoring anything: the run exists and is a LoRA run when asked for
    an adapter. (restore_model reports a missing checkpoint or step.)"""
    if not run_dir.is_dir():
        raise UserError(
            "run directory not found",
            where=run_dir,
            hint="pass the run_dir of a jaxsft training run",
        )
    config_path = run_dir / "config.json"
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
    if fmt in ("peft", "both") and not int(_get(config, "lora.rank", 0) or 0):
        raise UserError(
            f"--format {fmt} needs a LoRA run; lora.rank is 0 in this run",
            where=config_path,
            hint="use --format merged",
        )


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
    return p.parse_args(argv)


@run_cli
def main(argv=None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    _check_run_dir(run_dir, args.format)
    from jaxsft.checkpoint import restore_model

    model, cfg, lora_cfg, config = restore_model(run_dir, step=args.step)
    fmt = args.format or _get(config, "export.format", "merged")
    fmt = "merged" if fmt == "none" else fmt
    dirs = export_run(
        model, cfg, lora_cfg, config, fmt=fmt, out=args.out, dtype=args.dtype, run_dir=run_dir
    )
    for kind, path in dirs.items():
        print(f"exported {kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
