"""What happens after the last step: export per export.format and the golden-set eval."""

from __future__ import annotations

import os

import jax


def after_training(config, trainer, tokenizer) -> dict:
    out = {}
    fmt = config.export.format
    if fmt == "none":
        return out
    from jaxsft import export

    model = trainer.model()
    if fmt in ("merged", "both"):
        path = os.path.join(config.run_dir, "hf")
        export.export_merged(model, trainer.model_cfg, path, tokenizer_dir=config.model.path,
                             dtype=config.export.dtype,
                             max_shard_bytes=int(config.export.max_shard_bytes))
        out["hf"] = path
    if fmt in ("peft", "both") and trainer.lora_cfg is not None:
        path = os.path.join(config.run_dir, "adapter")
        export.export_peft(model, trainer.model_cfg, trainer.lora_cfg, path,
                           base_model_path=config.model.path)
        out["adapter"] = path
    jax.effects_barrier()
    return out
