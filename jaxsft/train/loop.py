"""The run: lock the run_dir, the named start steps (train/start.py: every check before the
first write), then a short loop (step, guard, log, eval, checkpoint, stop) and the finish."""

from __future__ import annotations

import contextlib
import json
import os
import time

import jax

from jaxsft import config as config_lib
from jaxsft import metrics as metrics_lib
from jaxsft import run_dir as rd
from jaxsft.data import check, pipeline
from jaxsft.errors import TrainingStopped, UserError, background_errors_to
from jaxsft.evals import report
from jaxsft.train.guard import NumericalGuard, StopRequest
from jaxsft.train.start import Start, prepare


def run(config) -> dict:
    """Train per `config` (resuming from run_dir when it holds a checkpoint); returns a summary
    ({"step", "stopped": "signal" | "stop_after"} for a run stopped before its end)."""
    stop = StopRequest()
    lock = acquire_lock(config.run_dir)
    try:
        try:
            start = prepare(config)
        except BaseException:
            lock.discard()
            raise
        write_run_files(config, start)
        with background_errors_to(rd.path(config.run_dir, rd.BACKGROUND_ERRORS)):
            return train(config, start, stop)
    finally:
        lock.release()
        stop.close()


def acquire_lock(run_dir) -> rd.RunLock:
    """Process 0 locks run_dir; every process learns whether it did (all exit 2 if not)."""
    lock = rd.RunLock(run_dir)
    error = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every process
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = multihost_utils.broadcast_one_to_all(error is not None)
        if failed and error is None:
            raise UserError("process 0 could not lock run_dir", where=run_dir)
    if error is not None:
        raise error
    return lock


def write_run_files(config, start: Start):
    """config.json, data_report.json and the config history (process 0, each atomically);
    the data cache when it lies in run_dir (every process: run_dir may be a host's own)."""
    pipeline.save_cache(start.data)
    if jax.process_index() != 0:
        return
    rd.atomic_write(rd.path(config.run_dir, rd.CONFIG), config_lib.to_json(config))
    if start.changes:
        row = {"step": start.step, "time": rd.now(), "changes": start.changes}
        rd.append_line(rd.path(config.run_dir, rd.CONFIG_HISTORY), json.loads(json.dumps(row)))
    check.write_report(config.run_dir, start.data.report)


def train(config, s: Start, stop: StopRequest) -> dict:
    is_main = jax.process_index() == 0
    trainer, ckpt = s.trainer, s.ckpt
    if s.step >= s.total:
        ckpt.close()
        return finish(config, trainer, s.evals, s.step, resumed_finished=True)
    log = metrics_lib.MetricsLogger(config.run_dir, s.total, s.step, enabled=is_main)
    tc = config.train
    guard = NumericalGuard(
        tc.max_bad_steps, tc.divergence_factor, metrics_lib.logged_losses(config.run_dir)
    )
    end = min(s.total, s.step + tc.stop_after) if tc.stop_after else s.total
    try:
        with jax.set_mesh(trainer.mesh):
            if s.step == 0 and tc.eval_at_start:
                details = eval_details()
                log.log(0, s.evals(trainer, details))
                write_eval_rows(config, details, report.before_file)
            try:
                step = train_loop(config, s, log, guard, end, stop)
            except TrainingStopped:
                ckpt.close()  # finishes an async save of good parameters, saves nothing new
                raise
        if ckpt.latest_step() != step:
            ckpt.save(step, trainer.state, s.data_iter, force=True)
        ckpt.close()
    except BaseException:
        # End the progress bar line before the error message; on a full disk the loss plot
        # cannot be written either, and that must not replace the error that stops the run.
        with contextlib.suppress(Exception):
            log.close()
        raise
    log.close()
    if step < s.total:
        why = "signal" if stop.signal_name else "stop_after"
        what = stop.signal_name or "train.stop_after"
        print(f"stopped by {what} at step {step}; checkpoint saved, rerun to resume")
        return {"step": step, "stopped": why}
    return finish(config, trainer, s.evals, step)


def train_loop(config, s: Start, log, guard, end, stop) -> int:
    """Steps s.step+1 .. end; returns the last completed step."""
    tc, trainer, ckpt, data_iter = config.train, s.trainer, s.ckpt, s.data_iter
    peak = metrics_lib.peak_flops(tc.get("peak_tflops", 0.0))
    window = Window(guard)
    step = s.step
    while step < end and not stop.requested(step):
        t = time.perf_counter()
        local = next(data_iter)
        window.data_s += time.perf_counter() - t
        batch = {
            k: jax.make_array_from_process_local_data(trainer.batch_sharding, v)
            for k, v in local.items()
        }
        trainer.state, metrics = trainer.train_step(
            trainer.state, trainer.frozen, trainer.ref, batch
        )
        step += 1
        flops = metrics_lib.step_flops(trainer.model_cfg, local["segment_ids"])
        window.add(step, metrics, flops, data_iter.get_state())
        if step % max(tc.log_every, 1) == 0 or step == end:
            row = window.flush(peak)
            log.log(step, row)
            guard.logged(step, row["loss"])
        if tc.eval_every and step % tc.eval_every == 0 and step < log.total:
            with window.excluded(trainer.state):
                log.log(step, s.evals(trainer))
        if tc.save_every and step % tc.save_every == 0:
            with window.excluded(trainer.state):
                if guard.high_run:
                    log.message(f"step {step}: not saved, the loss is above its running median")
                else:
                    ckpt.save(step, trainer.state, data_iter)
        log.advance(step)
    window.check_all()
    return step


GUARD_KEYS = ("skipped", "loss", "grad_norm")


class Window:
    """Metrics of the steps since the last log line, for throughput and MFU."""

    def __init__(self, guard: NumericalGuard):
        self.guard = guard
        self.t0 = time.perf_counter()
        self.items = []  # (step, device metrics, flops)
        self.checked = 0  # items the guard has seen
        self.position = None
        self.data_s = 0.0  # seconds the loop spent getting batches from the data iterator

    def add(self, step, metrics, flops, position):
        """A dispatched step. The guard sees each step one step late (its metrics are ready by
        then), so checking never stalls the dispatch of the next step."""
        self.items.append((step, metrics, flops))
        self.position = position
        self.check(upto=len(self.items) - 1)

    def check(self, upto: int):
        for step, metrics, _ in self.items[self.checked : upto]:
            self.guard.step(step, jax.device_get({k: metrics[k] for k in GUARD_KEYS}))
        self.checked = max(self.checked, upto)

    def check_all(self):
        self.check(upto=len(self.items))

    @contextlib.contextmanager
    def excluded(self, state):
        """Time spent inside (evals, checkpoint saves) does not count as step time; the steps
        already dispatched are waited for first, so their time still counts."""
        jax.block_until_ready(state)
        t = time.perf_counter()
        yield
        self.t0 += time.perf_counter() - t

    def flush(self, peak_flops) -> dict:
        self.check_all()
        fetched = jax.device_get([m for _, m, _ in self.items])  # waits for the steps
        dt = time.perf_counter() - self.t0
        n = len(fetched)
        last = {k: float(v) for k, v in fetched[-1].items()}
        tokens = sum(float(m["tokens"]) for m in fetched)
        sup = sum(float(m["supervised_tokens"]) for m in fetched)
        flops = sum(f for _, _, f in self.items)
        row = {
            "loss": last["loss"],
            "learning_rate": last["learning_rate"],
            "grad_norm": last["grad_norm"],
            "mean_token_accuracy": last["mean_token_accuracy"],
            "tokens_per_sec": tokens / dt,
            "supervised_tokens_per_sec": sup / dt,
            "step_time_s": dt / n,
            "mfu": flops / dt / peak_flops,
            # host time per step in the data iterator; the previous step runs meanwhile
            # (dispatch is asynchronous), so it stalls the device only when it exceeds a step
            "data_wait_s": self.data_s / n,
        }
        if last["kl_to_base"]:
            row["kl_to_base"] = last["kl_to_base"]
        row["skipped_steps"] = self.guard.skipped_total
        if self.position is not None:  # the last batch consumed: global batch i of epoch e
            row["data_epoch"] = int(self.position["epoch"])
            row["data_batch"] = int(self.position["step"]) - 1
        self.t0, self.items, self.checked = time.perf_counter(), [], 0
        self.data_s = 0.0
        return row


def finish(config, trainer, evals, step, resumed_finished=False) -> dict:
    """Final evals (logged at the last step), export per export.format, and a before/after
    summary; an already finished run only reports."""
    summary_path = rd.path(config.run_dir, rd.SUMMARY)
    if resumed_finished and os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        print(f"run already finished at step {step}")
        print(format_summary(summary))
        return summary
    details = eval_details()
    with jax.set_mesh(trainer.mesh):
        after = evals(trainer, details)
    summary = {"step": step, "before": logged_at(config.run_dir, 0), "after": after}
    max_drop = float(config.eval.max_regression)
    summary["regressions"] = report.regressions(summary["before"], after, max_drop)
    summary["verdict"] = report.verdict(summary["regressions"], max_drop)
    if jax.process_index() == 0:
        metrics_lib.append_row(config.run_dir, {"step": step, **after})
        metrics_lib.plot_loss(
            rd.path(config.run_dir, rd.METRICS), rd.path(config.run_dir, rd.LOSS_PNG)
        )
    from jaxsft.train import hooks

    summary["exported"] = hooks.after_training(config, trainer, step=step)
    if jax.process_index() == 0:
        rd.write_json(summary_path, summary)
        write_eval_rows(config, details, report.after_file)
        write_report(config.run_dir, summary, details)
        print(format_summary(summary))
    return summary


def eval_details() -> dict | None:
    """Where the evals leave their per-row results: a dict on process 0, which writes them;
    None elsewhere, so the other processes keep only the metrics (not every eval's rows
    through the export that follows)."""
    return {} if jax.process_index() == 0 else None


def write_eval_rows(config, details: dict | None, file_of) -> None:
    """Each eval's metrics and rows (process 0): golden_before.json, golden_after.json, ..."""
    if jax.process_index() == 0:
        for name, result in details.items():
            rd.write_json(rd.path(config.run_dir, file_of(name)), result)


def write_report(run_dir: str, summary: dict, details: dict) -> None:
    """report.md and evals.png of the before/after evals."""
    before_path = rd.path(run_dir, report.before_file("golden"))
    golden_before = None
    if os.path.exists(before_path):
        with open(before_path) as f:
            golden_before = json.load(f).get("rows")
    golden_after = (details.get("golden") or {}).get("rows")
    text = report.markdown(summary, golden_before, golden_after)
    rd.atomic_write(rd.path(run_dir, report.REPORT_MD), text)
    rows = metrics_lib.read_rows(rd.path(run_dir, rd.METRICS))
    report.plot(summary, rows, rd.path(run_dir, report.EVALS_PNG))


def logged_at(run_dir: str, step: int) -> dict:
    """The eval metrics metrics.jsonl holds for `step` (e.g. the before-training evals)."""
    out = {}
    for row in metrics_lib.read_rows(rd.path(run_dir, rd.METRICS)):
        if row.get("step") == step and "loss" not in row:
            out.update({k: v for k, v in row.items() if k != "step"})
    return out


def format_summary(summary: dict) -> str:
    """A before/after table of the evals."""
    before, after = summary.get("before", {}), summary.get("after", {})
    keys = list(dict.fromkeys([*after, *before]))  # every eval's metrics, in run order
    width = max([22, *(len(k) + 2 for k in keys)])
    lines = [summary["verdict"]] if summary.get("regressions") else []
    lines += [
        f"step {summary.get('step')}: evaluation before -> after training",
        f"{'metric':<{width}}{'before':>10}{'after':>10}",
    ]
    for k in keys:
        b, a = before.get(k), after.get(k)
        lines.append(f"{k:<{width}}{_fmt(b):>10}{_fmt(a):>10}")
    for kind, path in (summary.get("exported") or {}).items():
        lines.append(f"exported {kind}: {path}")
    return "\n".join(lines)


def _fmt(v):
    return "-" if v is None else f"{v:.4f}"
