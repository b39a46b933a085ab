"""The evals of a training run: held-out loss and the configured evals of jaxsft.evals (golden,
mc, ifeval, safety), read and validated at start and run before, during and after training."""

from __future__ import annotations

import jax

from jaxsft.data import pipeline


class Evals:
    """What is evaluated on eval steps: held-out loss (data.eval) and every eval the `eval`
    group configures. Files are read and validated at start, before anything is written."""

    def __init__(self, config, data, tokenizer):
        from jaxsft import evals as evals_lib

        self.config, self.data, self.tokenizer = config, data, tokenizer
        self.opts = evals_lib.options_from_config(config.eval)
        self.suites = evals_lib.from_config(config.eval, self.opts)
        # Generation runs host-local; multi-host runs log the held-out loss only.
        if jax.process_count() > 1:
            self.suites = []

    def __call__(self, trainer, details: dict | None = None) -> dict:
        """Flat metrics ({eval_loss, golden_score, mc_accuracy, ...}); with `details`, each
        eval's full result ({**metrics, "rows"}) is stored there under its name."""
        out = held_out_loss(trainer, self.data, self.config)
        if self.suites:
            model = trainer.model()
            for ev in self.suites:
                metrics, rows = ev.run(model, self.tokenizer, self.opts)
                out.update(ev.headline(metrics))
                if details is not None:
                    details[ev.name] = {**metrics, "rows": rows}
        return out


def held_out_loss(trainer, data, config) -> dict:
    """Held-out loss over data.eval (empty dict when there is no eval set)."""
    if data.eval is None:
        return {}
    totals = {}
    for local in pipeline.eval_iterator(data, config):
        batch = {
            k: jax.make_array_from_process_local_data(trainer.batch_sharding, v)
            for k, v in local.items()
        }
        sums = jax.device_get(
            trainer.eval_step(trainer.state["params"], trainer.frozen, trainer.ref, batch)
        )
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = max(totals.get("count", 0.0), 1.0)
    return {
        "eval_loss": totals["loss_sum"] / count,
        "eval_token_accuracy": totals["correct"] / count,
    }
