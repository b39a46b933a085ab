"""What happens after the last step: export per export.format (as the export CLI does)."""

from __future__ import annotations


def after_training(config, trainer, step: int | None = None) -> dict:
    """Export the trained model per export.*; returns {"merged"|"peft": directory}.

    The export directories follow jaxsft.export.check_export_targets (which the run checks at
    start); step, when given, is recorded in each directory's .jaxsft_export.json.
    """
    from jaxsft import export

    model = trainer.model()
    dirs = export.export_run(model, trainer.model_cfg, trainer.lora_cfg, config, step=step)
    return {kind: str(path) for kind, path in dirs.items()}
