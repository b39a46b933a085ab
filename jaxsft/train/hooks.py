"""What happens after the last step: export per export.format (as the export CLI does)."""

from __future__ import annotations


def after_training(config, trainer) -> dict:
    """Export the trained model per export.*; returns {"merged"|"peft": directory}."""
    from jaxsft import export

    dirs = export.export_run(trainer.model(), trainer.model_cfg, trainer.lora_cfg, config)
    return {kind: str(path) for kind, path in dirs.items()}
