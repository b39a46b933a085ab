"""From the config to fixed-shape host-local batches.

    data = build_datasets(config, tokenizer)         # read, validate, render once, report, check
    it = train_iterator(data, config)                # grain DatasetIterator, runs forever
    n = steps_per_epoch(data, config)                # optimizer steps in one epoch
    for batch in eval_iterator(data, config): ...    # one pass, fixed order

Every example is rendered and tokenized once (splits.py: in data.workers processes) and
written to the data cache (cache.py); later starts, other hosts and `python -m jaxsft.data
check` load the cache instead of rendering. Examples that keep no supervised token after
truncation are dropped and counted. Once the cache is written or loaded, a host holds only
the per-example lengths and mixture sources in memory; the tokens of an example are read from
the cache when a row of this host needs them.

Each epoch e is planned from (train.seed, e) and the lengths alone, identically on every host:
the mixture draw (readers.mixture_epoch, data.mix_epoch), a shuffle, best-fit-decreasing
packing of the shuffled examples (or one example per row) and a shuffle of the rows. The rows
are cut into global batches of train.batch_size rows; the last batch of an epoch is filled
with empty rows (all padding, loss_mask 0) so that every example is seen exactly once per
epoch. Host p of P builds rows [p*B/P, (p+1)*B/P) of each global batch, reading only their
examples; no communication is needed.

The iterator state {"epoch", "step", "examples"} (global batch `step` of epoch `epoch` is
next) is global: checkpoint.py saves it once, and a run resumes at the same global batch on
any number of hosts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from typing import Any

import grain
import numpy as np

from jaxsft.data import cache as cache_lib
from jaxsft.data import check, formats, packing, readers
from jaxsft.data.splits import RENDER_CHUNK, Examples, load_split, worker_count
from jaxsft.errors import UserError
from jaxsft.tokenizer import pad_id as tokenizer_pad_id

__all__ = ["RENDER_CHUNK", "Datasets", "Examples", "build_datasets", "save_cache"]


@dataclasses.dataclass
class Datasets:
    """What build_datasets returns: both splits, the data report and the batch geometry."""

    train: Examples
    eval: Examples | None
    report: dict
    max_length: int
    packing: bool
    pad_id: int
    mix_epoch: str = "sum"  # data.mix_epoch
    # The data cache of these splits (cache.DataCache), and what save_cache still has to write
    # there: (train, eval, report without packing, drop lines), None once written or loaded.
    cache: Any = None
    unsaved: tuple | None = None
    plans: dict = dataclasses.field(default_factory=dict)  # (seed, epoch, ...) -> epoch_rows


def build_datasets(config, tokenizer, *, strict: bool = True, show: int = 0) -> Datasets:
    """Read, validate, render and report data.train / data.eval, or load them from the data
    cache (data.cache_dir) when it holds this data rendered with these settings.

    strict=True runs `check.refuse_to_train` on the report (a UserError when nothing is
    supervised or an assistant turn has no supervised end-of-turn token); the data-check CLI
    passes strict=False to write the report first, and show=N to keep the token kinds
    (answer / tool call / reasoning) of the first N training examples.

    A fresh render is written to a cache outside run_dir at once; one inside run_dir (the
    default) only by `save_cache`, which the caller runs once the start succeeded (a failed
    start leaves run_dir as it was).
    """
    d = config.data
    max_length = int(d.max_length)
    if max_length < 2:
        raise UserError(f"data.max_length={max_length}", where="config", hint="use at least 2")
    if not readers.parse_sources(d.train):
        raise UserError("data.train is not set", where="config", hint="point it to a data file")
    opts = _render_options(d)
    mix_epoch = _choice(d, "mix_epoch", "sum", readers.MIX_EPOCHS)
    if int(d.get("workers", 0)) < 0:
        raise UserError(f"data.workers={d.workers}", where="config", hint="0 (cores) or more")
    cache = cache_lib.DataCache.for_config(config, tokenizer, opts)
    loaded = cache.load(show) if cache is not None else None
    if loaded is not None:
        train, evals, report = loaded.train, loaded.eval, loaded.report
        drop_lines = loaded.drop_lines
    else:
        train, evals, report, drop_lines = _render(config, tokenizer, opts, show)
    data = Datasets(
        train,
        evals,
        {},
        max_length,
        bool(d.packing),
        tokenizer_pad_id(tokenizer),
        mix_epoch,
        cache,
    )
    if loaded is None and cache is not None:
        data.unsaved = (train, evals, report, drop_lines)
        if not cache.in_run_dir:
            save_cache(data)
    batch_size = int(config.train.batch_size)
    data.report = json.loads(json.dumps(report))  # the caller adds to its own copy
    data.report["train"]["packing"] = packing_info(data, batch_size, int(config.train.seed))
    data.report["warnings"] = check.warnings_of(data.report)
    _print_drops(drop_lines)
    if strict:
        check.refuse_to_train(data.report)
    return data


def _render(config, tokenizer, opts: dict, show: int):
    """(train, eval, report without packing, drop lines) rendered from the data files."""
    d, max_length = config.data, int(config.data.max_length)
    workers = worker_count(d.get("workers", 0))
    train, train_stats = load_split(d.train, tokenizer, max_length, opts, show, workers)
    evals, eval_stats = None, None
    if readers.parse_sources(d.get("eval", "")):
        evals, eval_stats = load_split(d.eval, tokenizer, max_length, opts, 0, workers)
    report = check.build_report(train_stats, eval_stats, {}, tokenizer=tokenizer)
    del report["train"]["packing"]
    report = json.loads(json.dumps(report))  # what a cache load gives back (lists, not tuples)
    lines = [check.no_target_line("train", train_stats, max_length)]
    if eval_stats is not None:
        lines.append(check.no_target_line("eval", eval_stats, max_length))
    return train, evals, report, [line for line in lines if line]


def save_cache(data: Datasets, *, required: bool = False) -> str | None:
    """Write the data cache of a fresh render (no-op when it was loaded or is written): its
    path, or None. A failed write is a warning (the cache only saves time) unless required
    (`python -m jaxsft.data prepare`), then a UserError naming the directory."""
    if data.cache is None or data.unsaved is None:
        return data.cache.path if data.cache is not None else None
    t0 = time.perf_counter()
    try:
        path = data.cache.save(*data.unsaved)
    except OSError as e:
        msg = f"cannot write the data cache: {e.strerror or e}"
        if required:
            raise UserError(msg, where=data.cache.root, hint="check data.cache_dir") from None
        print(f"warning: {data.cache.root}: {msg}; the next start renders again", flush=True)
        return None
    data.unsaved = None
    # From now on the tokens are read from the cache, each when a row needs it: this host
    # keeps only the lengths and sources of the examples, not their tokens.
    data.train = data.cache.reopen("train", data.train)
    if data.eval is not None:
        data.eval = data.cache.reopen("eval", data.eval)
    cache_lib._say(
        f"data cache: wrote {path} (key {data.cache.key}) in {time.perf_counter() - t0:.1f}s"
    )
    return path


def _print_drops(lines: list[str]) -> None:
    """One terminal line per split that lost examples to truncation (process 0 only)."""
    if lines:
        import jax  # imported here: building data needs no jax

        if jax.process_index() == 0:
            print("\n".join(lines), flush=True)


def _render_options(d) -> dict:
    """data.on_invalid / data.on_drop / data.turns, checked."""
    return {
        "on_invalid": d.on_invalid,
        "on_drop": _choice(d, "on_drop", "auto", formats.DROP_POLICIES),
        "turns": _choice(d, "turns", "all", formats.TURN_MODES),
    }


def _choice(d, key: str, default: str, choices) -> str:
    """data.<key> (default when unset), a UserError unless it is one of choices."""
    value = d.get(key, default)
    if value not in choices:
        raise UserError(
            f"data.{key}={value!r}",
            where="config",
            hint="use one of " + ", ".join(f'"{c}"' for c in choices),
        )
    return value


# --------------------------------------------------------------------------------------------
# Epoch plans
# --------------------------------------------------------------------------------------------
def epoch_rows(data: Datasets, seed: int, epoch: int) -> list[list[int]]:
    """Rows (lists of example indices) of one training epoch, in training order; the last two
    plans are kept (the report, the step count and the iterator all ask for epoch 0)."""
    key = (int(seed), int(epoch), data.packing, data.max_length, data.mix_epoch, len(data.train))
    if key not in data.plans:
        while len(data.plans) >= 2:
            data.plans.pop(next(iter(data.plans)))
        data.plans[key] = _plan_epoch(data, int(seed), int(epoch))
    return data.plans[key]


def _plan_epoch(data: Datasets, seed: int, epoch: int) -> list[list[int]]:
    ex = data.train
    if len(ex.weights) > 1:
        idx = readers.mixture_epoch(ex.source, ex.weights, seed, epoch, data.mix_epoch)
    else:
        idx = np.arange(len(ex))
    rng = np.random.default_rng([seed, epoch, 0x5348])
    idx = rng.permutation(idx)
    if not data.packing:
        return packing.single_rows(idx)
    rows = packing.pack_bfd(ex.lengths[idx], data.max_length)
    rows = [[int(idx[j]) for j in row] for row in rows]
    return [rows[k] for k in rng.permutation(len(rows))]


def packing_info(data: Datasets, batch_size: int, seed: int) -> dict:
    """Rows, steps and packing efficiency of epoch 0 (for the report and steps_per_epoch)."""
    rows = epoch_rows(data, seed, 0)
    eff = packing.efficiency(rows, data.train.lengths, data.max_length)
    return {
        "enabled": data.packing,
        "max_length": data.max_length,
        "rows_per_epoch": len(rows),
        "examples_per_row": round(sum(map(len, rows)) / max(len(rows), 1), 3),
        "efficiency": round(eff, 4),
        "batch_size": batch_size,
        "steps_per_epoch": math.ceil(len(rows) / batch_size) if batch_size > 0 else 0,
    }


def steps_per_epoch(data: Datasets, config) -> int:
    """Optimizer steps (global batches) in one training epoch (epoch 0's count; with weighted
    mixing and packing later epochs can differ by a step or two)."""
    return packing_info(data, int(config.train.batch_size), int(config.train.seed))[
        "steps_per_epoch"
    ]


def _host_slice(batch_size: int, process_index, process_count) -> tuple[int, int]:
    """(first row within a global batch, rows) of this host."""
    if process_index is None or process_count is None:
        import jax  # imported here: building data needs no jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if batch_size <= 0 or batch_size % process_count:
        raise UserError(
            f"train.batch_size={batch_size} is not a positive multiple of the "
            f"{process_count} processes",
            where="config",
            hint="every host takes batch_size / process_count rows of each global batch",
        )
    local = batch_size // process_count
    return process_index * local, local


# --------------------------------------------------------------------------------------------
# Training iterator (grain)
# --------------------------------------------------------------------------------------------
class TrainDataset(grain.IterDataset):
    """Infinite stream of host-local training batches; iterate to get a `TrainIterator`."""

    def __init__(self, data: Datasets, batch_size: int, seed: int, process_index, process_count):
        super().__init__()
        self.data, self.batch_size, self.seed = data, int(batch_size), int(seed)
        self.offset, self.local = _host_slice(self.batch_size, process_index, process_count)
        if len(data.train) == 0:
            raise UserError("no training example left", where="data.train")

    def __iter__(self) -> TrainIterator:
        return TrainIterator(self)

    def __str__(self) -> str:
        return f"TrainDataset(examples={len(self.data.train)}, batch_size={self.batch_size})"


class TrainIterator(grain.DatasetIterator):
    """State {"epoch", "step"}: the next batch is global batch `step` of epoch `epoch`."""

    def __init__(self, ds: TrainDataset):
        super().__init__()
        self._ds = ds
        self._epoch, self._step = 0, 0
        self._plan_epoch, self._plan = -1, []

    @property
    def epoch(self) -> int:
        return self._epoch

    def _rows(self, epoch: int) -> list[list[int]]:
        if epoch != self._plan_epoch:
            ds = self._ds
            rows = epoch_rows(ds.data, ds.seed, epoch)
            steps = math.ceil(len(rows) / ds.batch_size)
            self._plan = rows + [[]] * (steps * ds.batch_size - len(rows))
            self._plan_epoch = epoch
        return self._plan

    def __next__(self) -> dict[str, np.ndarray]:
        ds = self._ds
        rows = self._rows(self._epoch)
        if self._step * ds.batch_size >= len(rows):
            self._epoch, self._step = self._epoch + 1, 0
            rows = self._rows(self._epoch)
        first = self._step * ds.batch_size + ds.offset
        local = rows[first : first + ds.local]
        self._step += 1
        ex = ds.data.train
        return packing.build_rows(
            local, ex.input_ids, ex.loss_mask, ds.data.max_length, ds.data.pad_id, ex.weighted
        )

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "step": self._step, "examples": len(self._ds.data.train)}

    def set_state(self, state: dict[str, Any]) -> None:
        if int(state.get("examples", len(self._ds.data.train))) != len(self._ds.data.train):
            warnings.warn(
                "the training data changed since this iterator state was saved "
                f"({state['examples']} -> {len(self._ds.data.train)} examples): "
                "resuming at the same epoch/step of the new data",
                stacklevel=2,
            )
        self._epoch, self._step = int(state["epoch"]), int(state["step"])

    def __str__(self) -> str:
        return f"TrainIterator(epoch={self._epoch}, step={self._step})"


def train_iterator(
    data: Datasets, config, *, process_index: int | None = None, process_count: int | None = None
) -> TrainIterator:
    """Host-local training batches of train.batch_size // process_count rows, forever.

    process_index/process_count default to jax.process_index()/jax.process_count(); tests pass
    them to simulate hosts. Save/restore the state with grain.checkpoint.CheckpointSave/Restore.
    """
    ds = TrainDataset(
        data, int(config.train.batch_size), int(config.train.seed), process_index, process_count
    )
    return iter(ds)


# --------------------------------------------------------------------------------------------
# Eval
# --------------------------------------------------------------------------------------------
def eval_rows(data: Datasets) -> list[list[int]]:
    """Rows of the eval set: file order, packed (BFD) when data.packing."""
    if data.eval is None:
        return []
    if data.packing:
        return packing.pack_bfd(data.eval.lengths, data.max_length)
    return packing.single_rows(range(len(data.eval)))


def eval_steps(data: Datasets, config) -> int:
    """Number of eval batches (the same on every host)."""
    return math.ceil(len(eval_rows(data)) / int(config.train.batch_size))


def eval_iterator(
    data: Datasets, config, *, process_index: int | None = None, process_count: int | None = None
):
    """One pass over the eval set in a fixed order, host-local batches like train_iterator;
    the last global batch is filled with empty rows (loss_mask 0). Empty when there is no eval."""
    batch_size = int(config.train.batch_size)
    offset, local = _host_slice(batch_size, process_index, process_count)
    rows = eval_rows(data)
    steps = math.ceil(len(rows) / batch_size)
    rows = rows + [[]] * (steps * batch_size - len(rows))
    for s in range(steps):
        first = s * batch_size + offset
        yield packing.build_rows(
            rows[first : first + local],
            data.eval.input_ids,
            data.eval.loss_mask,
            data.max_length,
            data.pad_id,
            data.eval.weighted,
        )
