"""PEFT adapter export: adapter_config.json + adapter_model.safetensors, as peft saves them.

Key names are the HF weight keys of the table with PEFT's prefix and no adapter name
("base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"); `PeftModel.from_pretrained`
inserts the adapter name itself. Shapes follow torch's nn.Linear: lora_A.weight [r, in] is the
transpose of lora_a[i] [in, r], lora_B.weight [out, r] the transpose of lora_b[i] [r, out].

A fused HF module (Phi's qkv_proj, gate_up_proj) holds m parts, each with its own rank-r
adapter here; PEFT gets one adapter of rank m*r: lora_A stacks the parts' A, lora_B is block
diagonal (part p's rows x columns [p*r, (p+1)*r)), and rank_pattern / alpha_pattern keep the
scale, so B @ A * scale is exactly the parts' deltas. A part without adapters is a zero block.
The routed experts of an MoE model (PEFT target_parameters) and a trained router
(modules_to_save) are written by peft_moe.py.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from jaxsft.errors import UserError
from jaxsft.export import peft_moe
from jaxsft.export.check import (
    TOLERANCES,
    ExportCheckError,
    compare,
    float32_logits,
    on_writer,
    probe_ids,
    reload_mesh,
)
from jaxsft.export.files import Planned, host_layer, is_writer, write_safetensors
from jaxsft.export.qlora import refuse_quantized
from jaxsft.export.targets import export_dir
from jaxsft.hf_io import DTYPES, hf_keys, tensor_groups, weight_table
from jaxsft.models import families
from jaxsft.models.config import ModelConfig
from jaxsft.models.lora import LoraConfig, LoRAParam
from jaxsft.run_dir import write_json

PREFIX = "base_model.model."
ADAPTER_FILE = "adapter_model.safetensors"


def module_at(model: nnx.Module, path: tuple[str, ...]):
    return functools.reduce(getattr, path, model)


def peft_key(cfg: ModelConfig, hf_key: str, name: str) -> str:
    """model.layers.0.self_attn.q_proj.weight -> base_model.model.model.layers.0...lora_A.weight
    (peft names adapters by transformers' module tree, which a multimodal wrapper arranges
    differently from its checkpoint keys)."""
    spec = families.wrapped(cfg)
    module = hf_key.removesuffix(".weight") if spec is None else spec.module(hf_key)
    return f"{PREFIX}{module.removesuffix('.weight')}.{name}.weight"


def entry_adapter(model: nnx.Module, entry):
    """(lora_a, lora_b, scale) of the adapter on one table entry's matrix, or None: a Linear's
    kernel, or a routed experts' stack (Experts.NAME_lora_a / NAME_lora_b, per expert)."""
    owner = module_at(model, entry.path[:-1])
    name = "" if entry.path[-1] == "kernel" else entry.path[-1] + "_"
    a = getattr(owner, name + "lora_a", None)
    return None if a is None else (a, getattr(owner, name + "lora_b"), owner.lora_scale)


def adapted_linears(model: nnx.Module, cfg: ModelConfig):
    """(table entry, Linear) for every kernel of the table that carries LoRA adapters; asserts
    that every adapter of the model sits on a matrix of the table (kernels and experts)."""
    out, found = [], set()
    for entry in weight_table(cfg):
        adapter = entry_adapter(model, entry)
        if adapter is None:
            continue
        name = "" if entry.path[-1] == "kernel" else entry.path[-1] + "_"
        found |= {(*entry.path[:-1], name + ab) for ab in ("lora_a", "lora_b")}
        if entry.path[-1] == "kernel":
            assert len(entry.stack) == 1 and entry.transpose, entry  # per-layer adapters
            out.append((entry, module_at(model, entry.path[:-1])))
    held = {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model, LoRAParam))}
    assert found == held, f"LoRA adapters outside the weight table: {sorted(held - found)}"
    return out


def adapted_groups(model: nnx.Module, cfg: ModelConfig):
    """[(HF module name, [(entry, Linear or None)...])] for every HF tensor with an adapter on
    some part (a fused tensor lists all its parts; None: a part without adapters)."""
    adapted = {e.path: lin for e, lin in adapted_linears(model, cfg)}
    out = []
    for group in tensor_groups(weight_table(cfg)):
        if any(e.path in adapted for e in group):
            name = group[0].hf_key.removesuffix(".weight").rsplit(".", 1)[-1]
            out.append((name, [(e, adapted.get(e.path)) for e in group]))
    return out


def adapter_tensors(model, cfg: ModelConfig, fetch, rank: int):
    """(PEFT key, [r', in] or [out, r'] array) for every adapter; fetch(var, layer) -> host
    array. A fused module gets the block form of the module docstring (r' = parts x rank)."""
    for _, parts in adapted_groups(model, cfg):
        first = parts[0][0]
        for i, key in enumerate(hf_keys(first)):
            if len(parts) == 1:
                linear = parts[0][1]
                yield peft_key(cfg, key, "lora_A"), fetch(linear.lora_a, i).T
                yield peft_key(cfg, key, "lora_B"), fetch(linear.lora_b, i).T
                continue
            yield peft_key(cfg, key, "lora_A"), _stacked_a(parts, fetch, i, rank)
            yield peft_key(cfg, key, "lora_B"), _block_b(parts, fetch, i, rank)


def _stacked_a(parts, fetch, i, r):
    """[parts * r, in]: each part's A (transposed), zeros for a part without adapters."""
    d_in = next(lin for _, lin in parts if lin is not None).kernel.shape[-2]
    blocks = [None if lin is None else fetch(lin.lora_a, i).T for _, lin in parts]
    dtype = next(x for x in blocks if x is not None).dtype
    return np.concatenate([np.zeros((r, d_in), dtype) if x is None else x for x in blocks])


def _block_b(parts, fetch, i, r):
    """[out, parts * r]: part p's B (transposed) at its rows x columns [p r, (p + 1) r)."""
    blocks = [None if lin is None else fetch(lin.lora_b, i).T for _, lin in parts]
    dtype = next(x for x in blocks if x is not None).dtype
    b = np.zeros((parts[-1][0].rows[1], len(parts) * r), dtype)
    for p, ((entry, _), block) in enumerate(zip(parts, blocks, strict=True)):
        if block is not None:
            b[entry.rows[0] : entry.rows[1], p * r : (p + 1) * r] = block
    return b


def _fused_alpha(lora: LoraConfig, parts: int) -> float:
    """lora_alpha of a rank parts*r module that keeps the scale alpha / r (or / sqrt(r))."""
    r = parts * lora.rank
    return lora.scale * (math.sqrt(r) if lora.rslora else r)


def adapter_config(
    cfg: ModelConfig, lora: LoraConfig, base_model_path: str, groups, moe: dict | None = None
) -> dict:
    """adapter_config.json in peft's LoraConfig fields (peft fills the rest with defaults);
    groups: adapted_groups (fused modules get rank_pattern / alpha_pattern entries); moe:
    peft_moe.config_fields (target_parameters, modules_to_save and their patterns)."""
    fused = [(name, parts) for name, parts in groups if len(parts) > 1]
    spec = families.wrapped(cfg)
    moe = moe or {}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_path),
        "r": lora.rank,
        "lora_alpha": int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha,
        "use_rslora": lora.rslora,
        "target_modules": sorted(name for name, _ in groups),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": False,
        "target_parameters": moe.get("target_parameters"),
        "modules_to_save": moe.get("modules_to_save"),
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {name: len(parts) * lora.rank for name, parts in fused}
        | moe.get("rank_pattern", {}),
        "alpha_pattern": {name: _fused_alpha(lora, len(parts)) for name, parts in fused}
        | moe.get("alpha_pattern", {}),
        "revision": None,
        # a multimodal wrapper: its vision tower has modules of the same names (q_proj, ...)
        "exclude_modules": None if spec is None else spec.peft_exclude,
    }


def export_peft(
    model: nnx.Module,
    cfg: ModelConfig,
    lora_cfg: LoraConfig | None,
    out_dir: str | os.PathLike,
    *,
    base_model_path: str | os.PathLike,
    dtype: str = "float32",
    check: bool = True,
    run_dir: str | os.PathLike | None = None,
    force: bool = False,
    step: int | None = None,
) -> Path:
    """Write the LoRA adapters of `model` as a PEFT adapter directory, then self-check it.

    The check loads `base_model_path` with jaxsft, folds in the written adapter (as peft would
    read it) and compares logits with `model` (ExportCheckError on a mismatch; nothing is moved
    into place). dtype: the adapter tensors' dtype (PEFT keeps adapters in float32).
    run_dir, force, step: as for export_merged (the rules of targets.py).
    """
    refuse_quantized(model)
    experts = peft_moe.adapted_parts(peft_moe.experts_of(model))
    if lora_cfg is None or lora_cfg.rank <= 0 or not (adapted_linears(model, cfg) or experts):
        raise UserError(
            "a PEFT adapter needs a LoRA run (lora.rank > 0)",
            hint="use --format merged for a full fine-tuning run",
        )
    adapted = {e.path[-2] for e, _ in adapted_linears(model, cfg)}
    adapted |= {name for names in experts.values() for name in names}
    assert adapted == set(lora_cfg.modules), (adapted, lora_cfg.targets)
    np_dtype = np.dtype(DTYPES[dtype])

    def plan_fetch(var, i):
        return np.broadcast_to(np.zeros((), np_dtype), var.shape[1:])

    def fetch(var, i):
        return host_layer(var[...], i).astype(np_dtype)

    def tensors(fetch):
        linears = adapter_tensors(model, cfg, fetch, lora_cfg.rank)
        return itertools.chain(linears, peft_moe.tensors(model, lora_cfg, fetch))

    plan = [Planned(k, a.shape, a.dtype) for k, a in tensors(plan_fetch)]
    write = is_writer()
    with export_dir(
        out_dir, "peft", base_model_path, run_dir=run_dir, force=force, step=step, write=write
    ) as tmp:
        write_safetensors(
            tmp,
            plan,
            tensors(fetch),
            stem="adapter_model",
            max_shard_bytes=2**62,
            write=write,
        )
        if write:
            write_json(
                tmp / "adapter_config.json",
                adapter_config(
                    cfg,
                    lora_cfg,
                    os.fspath(base_model_path),
                    adapted_groups(model, cfg),
                    peft_moe.config_fields(model, lora_cfg),
                ),
            )
        if check:
            check_adapter(model, cfg, tmp, base_model_path, dtype)
    return Path(out_dir)


@jax.jit
def add_lora(w, a, b, scale):
    """w [..., in, out] + scale * a [..., in, r] @ b [..., r, out], in float32 (the leading
    axes: layers, or layers and experts)."""
    delta = jnp.einsum(
        "...ir,...ro->...io",
        a.astype(jnp.float32),
        b.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def merge_adapter(model: nnx.Module, cfg: ModelConfig, adapter_dir) -> None:
    """Fold a PEFT adapter directory into a jaxsft model's kernels, reading only what peft
    reads: adapter_config.json (r, lora_alpha, use_rslora, target_modules, rank_pattern,
    alpha_pattern; target_parameters and modules_to_save of an MoE model, peft_moe.merge) and
    the tensors; a fused module's delta is split into its parts' rows."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    targets = set(config["target_modules"])
    with safe_open(os.path.join(adapter_dir, ADAPTER_FILE), framework="np") as f:
        unused = set(f.keys())
        for group in tensor_groups(weight_table(cfg)):
            first = group[0]
            name = first.hf_key.removesuffix(".weight").rsplit(".", 1)[-1]
            if not (first.stacked and first.path[-1] == "kernel" and name in targets):
                continue
            r = int((config.get("rank_pattern") or {}).get(name, config["r"]))
            alpha = (config.get("alpha_pattern") or {}).get(name, config["lora_alpha"])
            scale = np.float32(alpha / (math.sqrt(r) if config.get("use_rslora") else r))
            keys = {n: [peft_key(cfg, k, n) for k in hf_keys(first)] for n in ("lora_A", "lora_B")}
            missing = sorted(set(keys["lora_A"] + keys["lora_B"]) - unused)
            if missing:
                raise ExportCheckError(f"{adapter_dir}: no tensor {missing[0]!r}")
            unused -= set(keys["lora_A"] + keys["lora_B"])
            a = np.stack([f.get_tensor(k).T for k in keys["lora_A"]])  # [L, in, r]
            b = np.stack([f.get_tensor(k).T for k in keys["lora_B"]])  # [L, r, out]
            for entry in group:
                var = module_at(model, entry.path)
                L, d_in, d_out = var.shape
                lo, hi = entry.rows or (0, d_out)
                part = b[:, :, lo:hi]
                if a.shape != (L, d_in, r) or part.shape != (L, r, d_out):
                    raise ExportCheckError(
                        f"{adapter_dir}: {keys['lora_A'][0]} and lora_B give "
                        f"{a.shape} x {b.shape}, the kernel is {var.shape}"
                    )
                w = var[...]
                var.set_value(jax.device_put(add_lora(w, a, part, scale), w.sharding))
        peft_moe.merge(model, config, f, unused, adapter_dir)
    if unused:
        raise ExportCheckError(f"{adapter_dir}: unexpected adapter tensors {sorted(unused)[:3]}")


def check_adapter(
    model, cfg: ModelConfig, adapter_dir, base_model_path, dtype: str = "float32"
) -> float | None:
    """Base checkpoint + written adapter (folded in by jaxsft) must give `model`'s logits."""
    from jaxsft.hf_io import load_hf

    ids = probe_ids(cfg.vocab_size)
    want = float32_logits(model, ids)
    # The base is reloaded in the dtype the run holds it in; the adapters went through `dtype`.
    base_dtype = np.dtype(module_at(model, weight_table(cfg)[0].path).dtype).name
    tol = max(TOLERANCES[base_dtype], TOLERANCES[dtype])

    def check():
        base, _ = load_hf(
            base_model_path, dtype="float32", param_dtype=base_dtype, mesh=reload_mesh(model)
        )
        merge_adapter(base, cfg, adapter_dir)
        got = float32_logits(base, ids)
        return compare(got, want, tol, f"PEFT adapter {adapter_dir} on {base_model_path}")

    return on_writer(check)
