"""The MoE parts of a PEFT adapter: the routed experts' adapters and a trained router.

transformers 5 holds each layer's experts as fused 3D parameters of one module,
`model.layers.{i}.mlp.experts` (the same in Mixtral, Qwen2-MoE and Qwen3-MoE, whatever the
checkpoint keys): gate_up_proj [E, 2F, D] (gate rows first) and down_proj [E, D, F]. PEFT
reaches them through `target_parameters` (its ParamWrapper LoRA): for a parameter
[E, out, in], lora_A.weight [E R, in] holds expert e's A_e [R, in] in rows e R .. (e+1) R - 1,
lora_B.weight [out, R E] its B_e [out, R] in columns j E + e (rank index j major), and the
expert's delta is scale x B_e @ A_e. With both parameters targeted the wrappers nest: PEFT
wraps gate_up_proj first (the module's parameter order), so its tensors are under
`experts.base_layer.`, down_proj's under `experts.`.

jaxsft's separate gate and up adapters (rank r each) become one rank 2r adapter of
gate_up_proj: A_e stacks the parts' A, B_e is block diagonal (gate rows x columns [0, r), up
rows x [r, 2r)), and rank_pattern / alpha_pattern keep the scale, so the delta is exactly the
parts' deltas; with one part adapted it is a rank r adapter whose B has zero rows for the
other part. A trained router (lora.train_router) is a `modules_to_save` module, `mlp.gate`:
PEFT saves its whole weight [E, D] as `...mlp.gate.weight`.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft.export.check import ExportCheckError
from jaxsft.models.lora import LoraConfig

PREFIX = "base_model.model."
LAYER = "model.layers.{i}.mlp."  # transformers 5's module tree, for every MoE family
GATE_UP, DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"  # target_parameters
ROUTER = "mlp.gate"  # modules_to_save
PARTS = {GATE_UP: ("gate_proj", "up_proj"), DOWN: ("down_proj",)}


def experts_of(model: nnx.Module):
    """The stacked Experts module of an MoE model, or None for a dense model."""
    mlp = getattr(model.layers, "mlp", None)
    return getattr(mlp, "experts", None)


def adapted_parts(experts) -> dict[str, list[str]]:
    """{target parameter: the jaxsft projections in it that carry adapters} (adapted only)."""
    if experts is None:
        return {}
    out = {}
    for target, parts in PARTS.items():
        names = [p for p in parts if getattr(experts, f"{p}_lora_a", None) is not None]
        if names:
            out[target] = names
    return out


def adapter_keys(i: int, targets) -> dict[str, str]:
    """{target parameter: PEFT key prefix of its lora_A / lora_B in layer i}."""
    module = PREFIX + LAYER.format(i=i) + "experts."
    nested = GATE_UP in targets and DOWN in targets
    return {t: module + ("base_layer." if nested and t == GATE_UP else "") for t in targets}


def trains_router(model: nnx.Module, lora: LoraConfig | None) -> bool:
    return bool(lora and lora.train_router and experts_of(model) is not None)


def tensors(model: nnx.Module, lora: LoraConfig, fetch):
    """(PEFT key, array) of the experts' adapters and (train_router) the routers, layer by
    layer; fetch(var, layer) -> host array of one layer."""
    experts = experts_of(model)
    parts = adapted_parts(experts)
    router = trains_router(model, lora)
    for i in range(model.cfg.num_layers if (parts or router) else 0):
        for target, prefix in adapter_keys(i, parts).items():
            a, b = _fused(experts, PARTS[target], fetch, i)
            E, R, d_in = a.shape
            yield prefix + "lora_A.weight", a.reshape(E * R, d_in)
            yield prefix + "lora_B.weight", b.transpose(1, 2, 0).reshape(b.shape[1], R * E)
        if router:
            yield (
                PREFIX + LAYER.format(i=i) + "gate.weight",
                fetch(model.layers.mlp.gate.kernel, i).T,
            )


def _fused(experts, parts, fetch, i):
    """(A [E, n r, in], B [E, out, n r]) of one target parameter in layer i: the n adapted
    parts' A stacked, their B at each part's rows (out = all parts' rows) and own columns."""
    blocks = [
        (
            p,
            fetch(getattr(experts, f"{name}_lora_a"), i),
            fetch(getattr(experts, f"{name}_lora_b"), i),
        )
        for p, name in enumerate(parts)
        if getattr(experts, f"{name}_lora_a", None) is not None
    ]
    E, rows, r = blocks[0][2].shape[0], blocks[0][2].shape[2], blocks[0][2].shape[1]
    a = np.concatenate([a.transpose(0, 2, 1) for _, a, _ in blocks], axis=1)
    b = np.zeros((E, rows * len(parts), r * len(blocks)), a.dtype)
    for k, (p, _, bp) in enumerate(blocks):
        b[:, p * rows : (p + 1) * rows, k * r : (k + 1) * r] = bp.transpose(0, 2, 1)
    return a, b


def config_fields(model: nnx.Module, lora: LoraConfig) -> dict:
    """adapter_config.json fields of the MoE parts: target_parameters, modules_to_save, and
    the rank / alpha of a gate_up_proj that holds two parts (rank 2r, the same scale)."""
    parts = adapted_parts(experts_of(model))
    fields = {
        "target_parameters": sorted(parts) or None,
        "modules_to_save": [ROUTER] if trains_router(model, lora) else None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    for target, names in parts.items():
        if len(names) > 1:
            r = len(names) * lora.rank
            fields["rank_pattern"][target] = r
            fields["alpha_pattern"][target] = lora.scale * (math.sqrt(r) if lora.rslora else r)
    return fields


def _pattern(patterns: dict, key: str, default):
    """PEFT's get_pattern_key: the value of the first pattern that matches the key's end."""
    for p, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({p})$", key):
            return value
    return default


def merge(model: nnx.Module, config: dict, f, unused: set, adapter_dir) -> None:
    """Fold the MoE parts of a PEFT adapter (target_parameters, modules_to_save) into a jaxsft
    model, reading them as peft does; the keys read leave `unused`."""
    from jaxsft.export.peft import add_lora  # peft imports this module

    targets = [t for t in config.get("target_parameters") or () if t in PARTS]
    experts, L = experts_of(model), model.cfg.num_layers
    for target in targets:
        keys = [adapter_keys(i, targets)[target] for i in range(L)]
        a = np.stack([_read(f, k + "lora_A.weight", unused, adapter_dir) for k in keys])
        b = np.stack([_read(f, k + "lora_B.weight", unused, adapter_dir) for k in keys])
        key = LAYER.format(i=0) + target.removeprefix("mlp.")
        r = int(_pattern(config.get("rank_pattern"), key, config["r"]))
        alpha = _pattern(config.get("alpha_pattern"), key, config["lora_alpha"])
        scale = np.float32(alpha / (math.sqrt(r) if config.get("use_rslora") else r))
        E = experts.gate_proj.shape[1]
        a = a.reshape(L, E, r, -1).transpose(0, 1, 3, 2)  # [L, E, in, R]
        b = b.reshape(L, b.shape[1], r, E).transpose(0, 3, 2, 1)  # [L, E, R, out]
        lo = 0
        for name in PARTS[target]:
            var = getattr(experts, name)
            rows = var.shape[-1]
            part = b[..., lo : lo + rows]
            lo += rows
            if a.shape[:3] != var.shape[:3] or part.shape[-1] != rows:
                raise ExportCheckError(f"{adapter_dir}: {keys[0]} does not fit {var.shape}")
            w = var[...]
            var.set_value(jax.device_put(add_lora(w, a, part, scale), w.sharding))
        if lo != b.shape[-1]:
            raise ExportCheckError(f"{adapter_dir}: {keys[0]}lora_B has {b.shape[-1]} rows")
    if ROUTER in (config.get("modules_to_save") or ()):
        kernel = model.layers.mlp.gate.kernel
        keys = [PREFIX + LAYER.format(i=i) + "gate.weight" for i in range(L)]
        value = np.stack([_read(f, k, unused, adapter_dir).T for k in keys])
        if value.shape != kernel.shape:
            raise ExportCheckError(f"{adapter_dir}: {keys[0]} does not fit {kernel.shape}")
        w = kernel[...]
        kernel.set_value(jax.device_put(jnp.asarray(value, w.dtype), w.sharding))


def _read(f, key: str, unused: set, adapter_dir) -> np.ndarray:
    if key not in unused:
        raise ExportCheckError(f"{adapter_dir}: no tensor {key!r}")
    unused.discard(key)
    return f.get_tensor(key)
