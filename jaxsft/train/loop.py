"""The run: named setup steps, then a short loop (step, log, eval, checkpoint, stop)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import jax
import numpy as np

from jaxsft import config as config_lib
from jaxsft import metrics as metrics_lib
from jaxsft.checkpoint import Checkpointer
from jaxsft.data import check, pipeline
from jaxsft.errors import UserError
from jaxsft.tokenizer import load_tokenizer
from jaxsft.train import setup as setup_lib


def run(config) -> dict:
    """Train per `config` (resuming from run_dir when it holds a checkpoint); returns a summary."""
    is_main = jax.process_index() == 0
    check_run_dir(config)
    tokenizer = load_tokenizer(config.model.path)
    data = pipeline.build_datasets(config, tokenizer)
    evals = Evals(config, data, tokenizer)
    total = total_steps(config, data)
    trainer = setup_lib.compile_steps(
        setup_lib.build_model_state(config, total_steps=total), config
    )
    if is_main:
        write_run_files(config, data.report)
    data_iter = pipeline.train_iterator(data, config)
    ckpt = Checkpointer(config.run_dir, keep=config.train.keep_checkpoints)
    start = restore(ckpt, trainer, data_iter)
    if start >= total:
        ckpt.close()
        return finish(config, trainer, evals, start, resumed_finished=True)
    log = metrics_lib.MetricsLogger(config.run_dir, total, start, enabled=is_main)
    stop = PreemptionFlag()
    end = min(total, start + config.train.stop_after) if config.train.stop_after else total
    with jax.set_mesh(trainer.mesh):
        if start == 0 and config.train.eval_at_start:
            log.log(0, evals(trainer))
        step = train_loop(config, trainer, evals, data_iter, ckpt, log, start, end, stop)
    if ckpt.latest_step() != step:
        ckpt.save(step, trainer.state, data_iter, force=True)
    ckpt.close()
    log.close()
    if step < total:
        why = "SIGTERM" if stop.requested else "train.stop_after"
        print(f"stopped by {why} at step {step}; checkpoint saved, rerun to resume")
        return {"step": step, "stopped": True}
    return finish(config, trainer, evals, step)


def train_loop(config, trainer, evals, data_iter, ckpt, log, start, end, stop) -> int:
    """Steps start+1 .. end; returns the last completed step."""
    tc = config.train
    peak = metrics_lib.peak_flops(tc.get("peak_tflops", 0.0))
    window = Window()
    step = start
    while step < end and not stop.requested:
        local = next(data_iter)
        batch = {
            k: jax.make_array_from_process_local_data(trainer.batch_sharding, v)
            for k, v in local.items()
        }
        trainer.state, metrics = trainer.train_step(
            trainer.state, trainer.frozen, trainer.ref, batch
        )
        step += 1
        window.add(metrics, metrics_lib.step_flops(trainer.model_cfg, local["segment_ids"]))
        if step % max(tc.log_every, 1) == 0 or step == end:
            log.log(step, window.flush(peak))
        if tc.eval_every and step % tc.eval_every == 0 and step < log.total:
            with window.excluded(trainer.state):
                log.log(step, evals(trainer))
        if tc.save_every and step % tc.save_every == 0:
            with window.excluded(trainer.state):
                ckpt.save(step, trainer.state, data_iter)
        log.advance(step)
    return step


class Window:
    """Metrics of the steps since the last log line, for throughput and MFU."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.items = []

    def add(self, metrics, flops):
        self.items.append((metrics, flops))

    @contextlib.contextmanager
    def excluded(self, state):
        """Time spent inside (evals, checkpoint saves) does not count as step time; the steps
        already dispatched are waited for first, so their time still counts."""
        jax.block_until_ready(state)
        t = time.perf_counter()
        yield
        self.t0 += time.perf_counter() - t

    def flush(self, peak_flops) -> dict:
        fetched = jax.device_get([m for m, _ in self.items])  # waits for the steps
        dt = time.perf_counter() - self.t0
        n = len(fetched)
        last = {k: float(v) for k, v in fetched[-1].items()}
        tokens = sum(float(m["tokens"]) for m in fetched)
        sup = sum(float(m["supervised_tokens"]) for m in fetched)
        flops = sum(f for _, f in self.items)
        row = {
            "loss": last["loss"],
            "learning_rate": last["learning_rate"],
            "grad_norm": last["grad_norm"],
            "mean_token_accuracy": last["mean_token_accuracy"],
            "tokens_per_sec": tokens / dt,
            "supervised_tokens_per_sec": sup / dt,
            "step_time_s": dt / n,
            "mfu": flops / dt / peak_flops,
        }
        if last["kl_to_base"]:
            row["kl_to_base"] = last["kl_to_base"]
        self.t0, self.items = time.perf_counter(), []
        return row


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


def total_steps(config, data) -> int:
    if config.train.max_steps:
        return int(config.train.max_steps)
    per_epoch = pipeline.steps_per_epoch(data, config)
    return max(1, int(np.ceil(per_epoch * config.train.num_epochs)))


def restore(ckpt, trainer, data_iter) -> int:
    step = ckpt.latest_step()
    if step is None:
        return 0
    trainer.state = ckpt.restore(step, trainer.state, data_iter)
    print(f"resumed from {ckpt.manager.directory} at step {step}")
    return int(step)


def check_run_dir(config):
    """Refuse to resume a run_dir that holds a different model's checkpoints."""
    path = os.path.join(config.run_dir, "config.json")
    if not os.path.exists(path):
        return
    old = config_lib.from_json(path)
    for key in ("model.path", "lora.rank"):
        a, b = old, config
        for part in key.split("."):
            a, b = a[part], b[part]
        if a != b:
            raise UserError(
                f"run_dir holds a run with {key}={a!r}, this config has {b!r}",
                where=path,
                hint="use a new run_dir, or the same settings to resume",
            )


def write_run_files(config, report: dict):
    try:
        os.makedirs(config.run_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create run_dir: {e.strerror}", where=config.run_dir) from None
    with open(os.path.join(config.run_dir, "config.json"), "w") as f:
        f.write(config_lib.to_json(config))
    check.write_report(config.run_dir, report)


def finish(config, trainer, evals, step, resumed_finished=False) -> dict:
    """Final evals (logged at the last step), export per export.format, and a before/after
    summary; an already finished run only reports."""
    summary_path = os.path.join(config.run_dir, "summary.json")
    if resumed_finished and os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        print(f"run already finished at step {step}")
        print(format_summary(summary))
        return summary
    details = {}
    with jax.set_mesh(trainer.mesh):
        after = evals(trainer, details)
    summary = {"step": step, "before": logged_at(config.run_dir, 0), "after": after}
    if jax.process_index() == 0:
        metrics_lib.append_row(config.run_dir, {"step": step, **after})
        metrics_lib.plot_loss(
            os.path.join(config.run_dir, "metrics.jsonl"), os.path.join(config.run_dir, "loss.png")
        )
    from jaxsft.train import hooks

    summary["exported"] = hooks.after_training(config, trainer)
    if jax.process_index() == 0:
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)
        if "golden" in details:
            with open(os.path.join(config.run_dir, "golden_after.json"), "w") as f:
                json.dump(details["golden"], f, indent=2)
        print(format_summary(summary))
    return summary


def logged_at(run_dir: str, step: int) -> dict:
    """The eval metrics metrics.jsonl holds for `step` (e.g. the before-training evals)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if row.get("step") == step and "loss" not in row:
                    out.update({k: v for k, v in row.items() if k != "step"})
    return out


def format_summary(summary: dict) -> str:
    """A before/after table of the evals."""
    before, after = summary.get("before", {}), summary.get("after", {})
    keys = [
        k
        for k in ("eval_loss", "eval_token_accuracy", "golden_score", "mc_accuracy")
        if k in before or k in after
    ]
    lines = [
        f"step {summary.get('step')}: evaluation before -> after training",
        f"{'metric':<22}{'before':>10}{'after':>10}",
    ]
    for k in keys:
        b, a = before.get(k), after.get(k)
        lines.append(f"{k:<22}{_fmt(b):>10}{_fmt(a):>10}")
    for kind, path in (summary.get("exported") or {}).items():
        lines.append(f"exported {kind}: {path}")
    return "\n".join(lines)


def _fmt(v):
    return "-" if v is None else f"{v:.4f}"


class PreemptionFlag:
    """SIGTERM (TPU preemption, job schedulers) asks the loop to save and stop cleanly."""

    def __init__(self):
        self.requested = False
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside some test runners)
            pass

    def _handle(self, signum, frame):
        self.requested = True
