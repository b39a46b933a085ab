"""Read and render one split into `Examples`, in this process or in worker processes.

    examples, stats = load_split(spec, tokenizer, max_length, opts, keep_kinds, workers)

Rows are read (readers.read_rows) in this process, cut into chunks of RENDER_CHUNK examples
and each chunk rendered with one batched tokenizer call (chat.render_many). With workers > 1
(and at least MIN_TASKS_PER_WORKER chunks per worker) the chunks go to a pool of processes
forked from a fork server (spawned where there is none), each holding its own copy of the
tokenizer (sent once, when the worker starts); results come back in file order and the chunk
boundaries are the same as in process, so the result is byte-identical and the first invalid
row (data.on_invalid=error) is the same UserError, naming its file:line.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from collections.abc import Sequence

import numpy as np

from jaxsft.data import check, formats, readers
from jaxsft.data.chat import render_many
from jaxsft.errors import UserError

RENDER_CHUNK = 1024  # examples encoded per batched tokenizer call (and sent per worker task)
# Chunks each worker must get before workers are started at all: starting one (a process that
# imports transformers and unpickles the tokenizer) costs seconds, ~5k examples of rendering.
MIN_TASKS_PER_WORKER = 8


@dataclasses.dataclass
class Examples:
    """Rendered examples of one split, in file order.

    The three per-example columns are sequences indexed by example: lists in memory after a
    render, or views of the data cache (cache.CachedSplit.column) that read an example from
    disk only when it is indexed, so a host touches only the examples of its own rows.
    """

    input_ids: Sequence[np.ndarray]  # int32 [n_i] each
    loss_mask: Sequence[np.ndarray]  # int32 [n_i] each (float32 when rows carry loss weights)
    where: Sequence[str]
    source: np.ndarray  # int [E]: mixture component of each example
    weights: list[float]  # mixture weights, one per component
    kinds: list[np.ndarray] = dataclasses.field(default_factory=list)  # first few (--show)
    known_lengths: np.ndarray | None = None  # int64 [E], when known without the tokens
    fingerprint: str | None = None  # run_dir.data_fingerprint, when known without the tokens

    @property
    def lengths(self) -> np.ndarray:
        if self.known_lengths is None:
            n = len(self.input_ids)
            self.known_lengths = np.fromiter((len(x) for x in self.input_ids), np.int64, n)
        return self.known_lengths

    @property
    def weighted(self) -> bool:
        """Masks are float32 loss weights (the same dtype for every example of a split)."""
        split = getattr(self.loss_mask, "split", None)  # a cache view knows without reading
        if split is not None:
            return split.float_mask
        return bool(len(self.loss_mask)) and self.loss_mask[0].dtype.kind == "f"

    def __len__(self) -> int:
        return len(self.input_ids)


def worker_count(setting) -> int:
    """data.workers: 0 means one per core this process may use, 1 renders in process."""
    n = int(setting)
    if n > 0:
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _jobs(rows: list, turns: str) -> list[tuple]:
    """(row, example, first of its row, last of its row) of every example to render."""
    out = []
    for row in rows:
        exs = formats.turn_examples(row.example, turns)
        out += [(row, ex, j == 0, j == len(exs) - 1) for j, ex in enumerate(exs)]
    return out


def load_split(spec, tokenizer, max_length: int, opts: dict, keep_kinds: int = 0, workers: int = 1):
    """Examples of a split and the per-example statistics the report needs."""
    read = readers.read_rows(spec, opts["on_invalid"])
    stats = check.SplitStats(read=read, on_drop=opts["on_drop"], turn_mode=opts["turns"])
    ids, masks, where, source, kinds = [], [], [], [], []
    jobs = _jobs(read.rows, opts["turns"])
    chunks = [jobs[lo : lo + RENDER_CHUNK] for lo in range(0, len(jobs), RENDER_CHUNK)]
    tasks = [
        (
            [ex for _, ex, _, _ in chunk],
            [row.where for row, *_ in chunk],
            max_length,
            "raise" if opts["on_invalid"] == "error" else "skip",
            opts["on_drop"],
        )
        for chunk in chunks
    ]
    for chunk, (rendered, errors) in zip(chunks, _render(tokenizer, tasks, workers), strict=True):
        for j, reason in errors:
            read.skipped.append({"where": chunk[j][0].where, "reason": reason})
        for (row, _, first, last), out in zip(chunk, rendered, strict=True):
            if out is None:
                continue
            stats.add(row, out, first=first, last=last)
            if not out["loss_mask"].any():
                continue  # no supervised token left (truncation): dropped, counted by stats
            ids.append(out["input_ids"])
            masks.append(out["loss_mask"])
            where.append(row.where)
            source.append(row.source)
            if len(kinds) < keep_kinds:
                kinds.append(out["kinds"])
    if any(m.dtype.kind == "f" for m in masks):  # loss weights: one dtype for every batch
        masks = [m.astype(np.float32) for m in masks]
    weights = [s["weight"] for s in read.sources]
    examples = Examples(ids, masks, where, np.asarray(source, np.int64), weights, kinds)
    return examples, stats


def _render(tokenizer, tasks: list[tuple], workers: int):
    """(rendered, errors) of every task, in order; a UserError of a task is raised here."""
    n = min(int(workers), len(tasks) // MIN_TASKS_PER_WORKER)
    if n <= 1:
        for task in tasks:
            yield _render_task(tokenizer, task)
        return
    # Not fork: the parent may run jax/XLA threads, which fork would copy mid-flight. A fork
    # server imports the renderer once and forks the workers from it (spawn imports per worker).
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(["jaxsft.data.splits"])
    with ctx.Pool(n, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        for result, error in pool.imap(_worker_task, tasks):
            if error is not None:
                raise UserError(*error)
            yield result


def _render_task(tokenizer, task: tuple):
    examples, wheres, max_length, on_error, on_drop = task
    return render_many(
        tokenizer,
        examples,
        max_length,
        wheres=wheres,
        on_error=on_error,
        normalized=True,
        on_drop=on_drop,
    )


_TOKENIZER = None  # a worker's copy of the tokenizer


def _init_worker(tokenizer) -> None:
    global _TOKENIZER
    # One worker per core: the tokenizer's own thread pool would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOKENIZER = tokenizer


def _worker_task(task: tuple):
    """(result, None), or (None, (message, where, hint)) of the task's UserError (sent back as
    plain values: the parent raises the same error)."""
    try:
        return _render_task(_TOKENIZER, task), None
    except UserError as e:
        return None, (e.message, e.where, e.hint)
