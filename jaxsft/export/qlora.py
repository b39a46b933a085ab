"""The export of a QLoRA run starts from the full-precision base, never from the dequantised one.

A model whose base is quantised (model.quantize, models/quant.py) is swapped for the base
re-read from model.path in the checkpoint's own dtype (lossless; float32 when the config does
not say) with the run's trained partition (adapters, and trained MoE routers) copied in. The
merged export then folds the adapters into the real weights, and both exports self-check
against that model, not against the quantised one.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from jaxsft.errors import UserError
from jaxsft.export.check import model_mesh
from jaxsft.export.targets import setting
from jaxsft.hf_io import DTYPES, load_hf
from jaxsft.models.lora import LoraConfig, trainable
from jaxsft.models.quant import QuantParam


def is_quantized(model: nnx.Module) -> bool:
    """Whether any kernel of `model` is stored quantised."""
    return bool(nnx.to_flat_state(nnx.state(model, QuantParam)))


def refuse_quantized(model: nnx.Module) -> None:
    """The exports take a full-precision model: a quantised one must go through
    full_precision first (export_run does)."""
    if is_quantized(model):
        raise ValueError(
            "this model's base is quantised (model.quantize): export "
            "full_precision(model, lora, config) instead (jaxsft.export.export_run does)"
        )


def full_precision(model: nnx.Module, lora: LoraConfig | None, config) -> nnx.Module:
    """`model` itself when nothing in it is quantised; else the base from model.path in full
    precision (on the mesh of `model`'s embedding), with `model`'s trained partition."""
    if not is_quantized(model):
        return model
    base = setting(config, "model.path")
    if not base:
        raise UserError("the merged export of a QLoRA run re-reads model.path", where="model.path")
    cfg = model.cfg
    name = str(cfg.source_dtype).removeprefix("torch.")
    full, _ = load_hf(
        base,
        dtype=np.dtype(model.dtype).name,
        param_dtype=name if name in DTYPES else "float32",
        mesh=model_mesh(model),
        lora=lora,
        remat=model.remat,
        attention_impl=model.attention_impl,
        unroll=model.unroll,
    )
    nnx.update(full, nnx.state(model, trainable(lora)))
    return full
