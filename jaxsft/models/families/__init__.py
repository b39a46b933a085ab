"""Model families: one small module per family, registered by the model_type it reads.

A family module owns everything family-specific and nothing else:
  MODEL_TYPES / ARCHITECTURES   the config.json model_type values it reads, and the HF class
                                written back into `architectures`;
  read(hf, where) -> dict       ModelConfig fields from its config.json keys (both 4.x and 5.x
                                styles), on top of config.common_fields;
  write(cfg, hf)                its keys back into a config.json dict;
  table(cfg, rows) -> rows      its changes to the generic HF weight table (hf_io.weight_table),
                                e.g. renamed, fused or extra tensors; most families change none.
The decoder never asks which family it runs: it reads the generic flags of ModelConfig.
Adding a family is one file here plus its entry in FAMILIES (docs/models.md).
"""

from __future__ import annotations

from jaxsft.errors import UserError
from jaxsft.models.families import gemma, llama, mistral, mixtral, phi, qwen, qwen_moe

FAMILIES = (llama, mistral, qwen, gemma, phi, mixtral, qwen_moe)
BY_TYPE = {t: f for f in FAMILIES for t in f.MODEL_TYPES}


def family_of(model_type: str):
    return BY_TYPE[model_type]


def parse(hf: dict, where: str):
    """ModelConfig of a config.json dict, by its family; UserError naming the key."""
    from jaxsft.models.config import ModelConfig, common_fields, refuse_moe_keys

    model_type = hf.get("model_type")
    if model_type in WRAPPERS:  # a multimodal checkpoint: its language model
        return _wrapped(hf, where, WRAPPERS[model_type])
    family = BY_TYPE.get(model_type)
    if family is None:
        hint = REFUSED.get(model_type) or f"supported: {', '.join(BY_TYPE)}"
        raise UserError(f"model_type {model_type!r} is not supported", where=where, hint=hint)
    if not getattr(family, "MOE", False):
        refuse_moe_keys(hf, where)
    try:
        fields = common_fields(hf, where)
        fields.update(family.read(hf, where))
        return ModelConfig(**fields)
    except KeyError as e:
        raise UserError(f"missing key {e.args[0]!r}", where=where) from None
    except (TypeError, ValueError) as e:
        raise UserError(f"bad value: {e}", where=where) from None


# Multimodal model_types whose language model is trained (the rest is carried unchanged): the
# family module that owns it; it defines WRAPPED = {model_type: Wrapped(...)}.
WRAPPERS = {t: f for f in FAMILIES for t in getattr(f, "WRAPPED", {})}


def _wrapped(hf: dict, where: str, family):
    import copy
    import dataclasses

    spec = family.WRAPPED[hf["model_type"]]
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise UserError(
            f"a {hf['model_type']!r} config.json without a text_config object",
            where=where,
            hint="jaxsft trains the language model of a multimodal checkpoint; a vision-only "
            "checkpoint has none",
        )
    tokens = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf}
    text = {**spec.text_defaults, **tokens, **copy.deepcopy(text)}
    text.setdefault("model_type", spec.text_model_type)
    if text["model_type"] != spec.text_model_type:
        raise UserError(
            f"text_config.model_type {text['model_type']!r}, expected {spec.text_model_type!r}",
            where=where,
        )
    cfg = parse(text, f"{where} (text_config)")
    dtype = text.get("torch_dtype") or text.get("dtype") or hf.get("torch_dtype") or hf.get("dtype")
    return dataclasses.replace(
        cfg, outer_config=copy.deepcopy(hf), source_dtype=str(dtype or "float32")
    )


def wrapped(cfg):
    """The Wrapped spec of a multimodal checkpoint's language model; None for a text model."""
    if cfg.outer_config is None:
        return None
    return WRAPPERS[cfg.hf_model_type].WRAPPED[cfg.hf_model_type]


# model_types people bring that are refused, with what to do.
REFUSED = {
    "deepseek_v2": "DeepSeek-V2/V3 (MLA attention, grouped top-k routing) is not supported",
    "deepseek_v3": "DeepSeek-V2/V3 (MLA attention, grouped top-k routing) is not supported",
}
