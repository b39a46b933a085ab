"""The evals of a training run: held-out loss, golden set and multiple choice, read and
validated at start and run before, during and after training."""

from __future__ import annotations

import jax

from jaxsft.data import pipeline


class Evals:
    """What is evaluated on eval steps: held-out loss (data.eval), the golden set (eval.golden,
    greedy generation) and the multiple-choice regression file (eval.mc). Files are read and
    validated at start, before anything is written."""

    def __init__(self, config, data, tokenizer):
        from jaxsft.golden import load_golden
        from jaxsft.mc import load_mc

        self.config, self.data, self.tokenizer = config, data, tokenizer
        e = config.eval
        self.golden = load_golden(e.golden, max_rows=e.max_rows) if e.golden else None
        self.mc = load_mc(e.mc, max_rows=e.max_rows) if e.mc else None
        # Generation runs host-local; multi-host runs log the held-out loss only.
        if jax.process_count() > 1:
            self.golden = self.mc = None

    def __call__(self, trainer, details: dict | None = None) -> dict:
        out = held_out_loss(trainer, self.data, self.config)
        if self.golden or self.mc:
            from jaxsft.golden import golden_eval
            from jaxsft.mc import mc_eval

            model = trainer.model()
            if self.golden:
                g = golden_eval(model, self.tokenizer, self.golden, self.config.eval.max_new_tokens)
                out["golden_score"] = g["score"]
                if details is not None:
                    details["golden"] = g
            if self.mc:
                m = mc_eval(model, self.tokenizer, self.mc)
                out["mc_accuracy"] = m["accuracy"]
                if details is not None:
                    details["mc"] = {k: v for k, v in m.items() if k != "rows"}
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
