"""What stops a run early: the numerical guard and stop signals.

NumericalGuard reads the per-step `skipped` flag of the train step (a non-finite loss or
gradient, already skipped inside the jitted step) and the logged losses: after
train.max_bad_steps skipped steps in a row, or that many logged losses in a row above
train.divergence_factor x the running median of the earlier ones, it raises TrainingStopped
(exit 3); the loop then stops without saving, so the newest checkpoint is the last good one.

StopRequest turns SIGTERM and SIGINT into "save and stop at the next step boundary" (a second
Ctrl-C aborts at once); with several processes the stop is agreed on all of them at the same
step, so that every host saves the same checkpoint.
"""

from __future__ import annotations

import math
import os
import signal
import sys

import jax
import numpy as np

from jaxsft.errors import EXIT_ABORTED, TrainingStopped

HISTORY = 50  # logged losses the running median is taken over
MULTIHOST_EVERY = 5  # steps between the hosts' agreement on a stop request
MIN_HISTORY = 3  # logged losses needed before divergence is judged


class NumericalGuard:
    def __init__(self, max_bad_steps: int, divergence_factor: float, history=()):
        self.max_bad = max(int(max_bad_steps), 1)
        self.factor = float(divergence_factor)
        self.skipped_total = 0
        self.skipped_run = 0
        self.high_run = 0
        self.history = [x for x in history if math.isfinite(x)][-HISTORY:]

    def step(self, step: int, metrics: dict) -> None:
        """After each step, with its fetched scalar metrics."""
        if not metrics.get("skipped"):
            self.skipped_run = 0
            return
        self.skipped_total += 1
        self.skipped_run += 1
        print(
            f"warning: step {step} skipped: loss or gradients not finite "
            f"(loss={metrics.get('loss')}, grad_norm={metrics.get('grad_norm')}); "
            "parameters unchanged",
            file=sys.stderr,
        )
        if self.skipped_run >= self.max_bad:
            raise TrainingStopped(
                f"{self.skipped_run} consecutive steps had a non-finite loss or gradients "
                f"(up to step {step}); stopped without saving, the newest checkpoint is the "
                "last good one",
                hint="lower train.learning_rate or raise train.warmup_ratio, set "
                "train.max_grad_norm, use model.dtype=float32, and check the data of these "
                "steps (python -m jaxsft.data check); then rerun to resume",
            )

    def logged(self, step: int, loss: float) -> None:
        """After each logged training loss: the divergence check."""
        if not math.isfinite(loss):
            return
        if self.factor and len(self.history) >= MIN_HISTORY:
            median = float(np.median(self.history))
            if loss > self.factor * median:
                self.high_run += 1
                if self.high_run >= self.max_bad:
                    raise TrainingStopped(
                        f"the loss diverged: {loss:.4g} at step {step} is above "
                        f"{self.factor:g} x the running median {median:.4g} for "
                        f"{self.high_run} logged steps in a row; stopped without saving, the "
                        "newest checkpoint is the last good one",
                        hint="lower train.learning_rate (or raise train.warmup_ratio), then "
                        "rerun to resume from that checkpoint; train.divergence_factor=0 "
                        "turns this check off",
                    )
                return
        self.high_run = 0
        self.history = [*self.history, loss][-HISTORY:]


class StopRequest:
    """SIGTERM / SIGINT -> `signal_name` set; the loop saves and stops at the next boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            print(
                "\naborted by a second Ctrl-C; nothing saved since the last checkpoint",
                file=sys.stderr,
                flush=True,
            )
            os._exit(EXIT_ABORTED)
        self.signal_name = signal.Signals(signum).name
        print(
            f"\n{self.signal_name}: saving a checkpoint and stopping after this step "
            "(Ctrl-C again aborts at once)",
            file=sys.stderr,
            flush=True,
        )

    def requested(self, step: int = 0) -> bool:
        """Whether to stop now; on several processes the same answer on all of them (a stop
        asked on any host), so call it at the same step on every host. The hosts agree every
        MULTIHOST_EVERY steps (an all-gather waits for the step in flight, so not every step)."""
        local = self.signal_name is not None
        if jax.process_count() == 1:
            return local
        if step % MULTIHOST_EVERY:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(local))
        if flags.any() and self.signal_name is None:
            self.signal_name = "a signal on another host"
        return bool(flags.any())

    def close(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
