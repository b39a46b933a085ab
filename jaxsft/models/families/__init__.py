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
from jaxsft.models.families import gemma, llama, mistral, phi, qwen

FAMILIES = (llama, mistral, qwen, gemma, phi)
BY_TYPE = {t: f for f in FAMILIES for t in f.MODEL_TYPES}


def family_of(model_type: str):
    return BY_TYPE[model_type]


def parse(hf: dict, where: str):
    """ModelConfig of a config.json dict, by its family; UserError naming the key."""
    from jaxsft.models.config import ModelConfig, common_fields

    model_type = hf.get("model_type")
    family = BY_TYPE.get(model_type)
    if family is None:
        hint = REFUSED.get(model_type) or f"supported: {', '.join(BY_TYPE)}"
        raise UserError(f"model_type {model_type!r} is not supported", where=where, hint=hint)
    try:
        fields = common_fields(hf, where)
        fields.update(family.read(hf, where))
        return ModelConfig(**fields)
    except KeyError as e:
        raise UserError(f"missing key {e.args[0]!r}", where=where) from None
    except (TypeError, ValueError) as e:
        raise UserError(f"bad value: {e}", where=where) from None


# model_types people bring that are refused, with what to do.
REFUSED = {
    "mixtral": "mixture-of-experts models are not supported yet",
    "qwen2_moe": "mixture-of-experts models are not supported yet",
    "qwen3_moe": "mixture-of-experts models are not supported yet",
    "gemma3": "a multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration) is not "
    "supported yet; the text-only Gemma 3 1B (model_type gemma3_text) is",
}
