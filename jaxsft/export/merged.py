"""The merged export: every HF tensor of the weight table, LoRA adapters folded into their
kernels (W + scale * A @ B), merged, cast and transposed on device and streamed one tensor at a
time to disk, with config.json, generation_config.json and the base checkpoint's tokenizer.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft.errors import UserError
from jaxsft.export.check import check_merged
from jaxsft.export.files import (
    SAFETENSORS_DTYPES,
    Planned,
    copy_tokenizer,
    host_array,
    is_writer,
    write_generation_config,
    write_safetensors,
)
from jaxsft.export.peft import adapted_linears, entry_adapter, module_at
from jaxsft.export.qlora import refuse_quantized
from jaxsft.export.targets import export_dir
from jaxsft.hf_io import (
    DTYPES,
    Entry,
    SafetensorsReader,
    carried_keys,
    hf_keys,
    hf_tensors,
    weight_table,
)
from jaxsft.models import families
from jaxsft.models.config import ModelConfig
from jaxsft.run_dir import write_json


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
    """One state leaf as hf_tensors reads it: leaf[index] is the tensor at a stacked index
    (layer, or layer and expert), np.asarray(leaf) all of it."""

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


@functools.partial(jax.jit, static_argnames=("transpose", "dtype"))
def _hf_layout(w, index, a, b, scale, *, transpose: bool, dtype):
    """On device: w[index] (+ scale * a[index] @ b[index] in float32), cast, transposed to HF.
    index: int32 [n], one entry per stacked axis (layer, expert); n = 0 for an unstacked w."""
    for k in range(index.shape[0]):
        take = functools.partial(
            jax.lax.dynamic_index_in_dim, index=index[k], axis=0, keepdims=False
        )
        w, a, b = take(w), (a if a is None else take(a)), (b if b is None else take(b))
    if a is not None:
        delta = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32), precision="highest")
        w = w.astype(jnp.float32) + scale * delta
    w = w.astype(dtype)
    return w.T if transpose else w


def _merged_fetch(model: nnx.Module, np_dtype, entry: Entry, index) -> np.ndarray:
    """Host copy of one tensor (w[index] of a stacked one: layer, or layer and expert) with its
    LoRA delta folded in.

    Merge, cast and transpose run on device; the host array is returned as a transposed view
    when hf_tensors will transpose it, so that its .T is contiguous (no host-side copy).
    """
    adapter = entry_adapter(model, entry)  # a Linear's, or the routed experts' (per expert)
    a, b = (adapter[0][...], adapter[1][...]) if adapter else (None, None)
    scale = np.float32(adapter[2] if adapter else 0.0)
    out = _hf_layout(
        module_at(model, entry.path)[...],
        np.asarray(index or (), np.int32),
        a,
        b,
        scale,
        transpose=entry.transpose,
        dtype=np_dtype,
    )
    host = host_array(out)
    return host.T if entry.transpose else host


def _planned_fetch(model: nnx.Module, np_dtype, entry: Entry, index) -> np.ndarray:
    """Shape and dtype only: a zero-strided array, no memory."""
    shape = module_at(model, entry.path).shape
    return np.broadcast_to(np.zeros((), np_dtype), shape[len(index or ()) :])


def _plan(model: nnx.Module, cfg: ModelConfig, np_dtype) -> list[Planned]:
    """Every HF tensor to write, from the table; asserts each key appears exactly once."""
    table_paths = {e.path for e in weight_table(cfg)}
    params = {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert params == table_paths, f"params outside the table: {sorted(params ^ table_paths)}"
    adapted_linears(model, cfg)  # asserts every adapter sits on a kernel of the table
    view = _state_view(model, cfg, functools.partial(_planned_fetch, model, np_dtype))
    plan = [Planned(k, a.shape, a.dtype) for k, a, _ in hf_tensors(view, cfg)]
    keys = [p.key for p in plan]
    expected = list(dict.fromkeys(k for e in weight_table(cfg) for k in hf_keys(e)))
    assert len(set(keys)) == len(keys) and sorted(keys) == sorted(expected), "key mismatch"
    assert not any("lora" in k for k in keys)
    return plan


@contextlib.contextmanager
def _carried(cfg: ModelConfig, base_dir):
    """(plan, tensors) of a multimodal checkpoint's tensors outside its language model (vision
    tower, projector), read from the base checkpoint and written back as stored, byte for
    byte. Nothing for a text model."""
    if families.wrapped(cfg) is None:
        yield [], iter(())
        return
    if base_dir is None:
        raise UserError(
            "exporting the language model of a multimodal checkpoint needs the base checkpoint "
            "(its vision tower is copied from there)",
            where="model.path",
        )
    stored = {code: name for name, code in SAFETENSORS_DTYPES.items()}
    with SafetensorsReader(os.fspath(base_dir)) as reader:
        keys = carried_keys(reader, cfg)
        plan = []
        for k in keys:
            if reader.dtype(k) not in stored:
                raise UserError(
                    f"tensor {k!r} is stored as {reader.dtype(k)}; the export writes "
                    f"{', '.join(stored)}",
                    where=reader.file_of(k),
                )
            plan.append(
                Planned(k, tuple(reader.shape(k)), np.dtype(DTYPES[stored[reader.dtype(k)]]))
            )
        yield plan, ((k, reader.tensor(k)) for k in keys)


def export_merged(
    model: nnx.Module,
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: str = "source",
    max_shard_bytes: int = 5 * 1024**3,
    check: bool = True,
    run_dir: str | os.PathLike | None = None,
    force: bool = False,
    step: int | None = None,
) -> Path:
    """Write `model` (LoRA merged) as a HF checkpoint directory, then self-check it.

    dtype: "source" (the dtype of the checkpoint the run started from), "float32", "bfloat16"
    or "float16". tokenizer_dir: the base checkpoint, whose tokenizer files, chat template and
    generation_config.json are copied. out_dir must pass the rules of targets.py (run_dir: the
    run exported, protected like the base; force: write into a directory with other files,
    replacing only the export's own; step: recorded in the marker). Only process 0 writes;
    all processes must call this.
    """
    refuse_quantized(model)
    name = export_dtype(dtype, cfg)
    np_dtype = np.dtype(DTYPES[name])
    plan = _plan(model, cfg, np_dtype)
    write = is_writer()
    with (
        export_dir(
            out_dir, "merged", tokenizer_dir, run_dir=run_dir, force=force, step=step, write=write
        ) as tmp,
        _carried(cfg, tokenizer_dir) as (carried_plan, carried),
    ):
        view = _state_view(model, cfg, functools.partial(_merged_fetch, model, np_dtype))
        tensors = itertools.chain(((k, a) for k, a, _ in hf_tensors(view, cfg)), carried)
        write_safetensors(
            tmp, plan + carried_plan, tensors, max_shard_bytes=max_shard_bytes, write=write
        )
        if write:
            write_json(tmp / "config.json", cfg.to_hf(dtype=name))
            write_generation_config(tokenizer_dir, tmp, cfg)
            if tokenizer_dir is not None:
                copy_tokenizer(tokenizer_dir, tmp)
        if check:
            check_merged(model, tmp, name)
    return Path(out_dir)
