"""Best-fit-decreasing packing and fixed-shape row arrays (pure functions, numpy).

A row is a list of example indices whose lengths add up to at most T (= data.max_length).
Arrays follow docs/architecture.md: input_ids, loss_mask, segment_ids (1.. per example,
0 on padding) and positions (0.. within each segment, 0 on padding), all int32 [B, T].
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np


def pack_bfd(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing: indices into `lengths`, grouped into rows of at most `capacity`.

    Examples are placed longest first (a stable sort, so equal lengths keep their input order:
    shuffle the input to vary the rows); each goes into the open row with the least room that
    still fits it, ties to the oldest row, else into a new row. O(n log n) searches over a
    sorted list of (room, row) keys.
    """
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and (lengths.max() > capacity or lengths.min() <= 0):
        raise ValueError(
            f"lengths must be in [1, {capacity}], got {lengths.min()}..{lengths.max()}"
        )
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    keys: list[int] = []  # room * R + row id, sorted; R > any row id
    big = len(lengths) + 1
    for i in order.tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(keys, n * big)
        if k < len(keys):
            room, r = divmod(keys.pop(k), big)
            rows[r].append(i)
        else:
            room, r = capacity, len(rows)
            rows.append([i])
        if room - n > 0:
            bisect.insort(keys, (room - n) * big + r)
    return rows


def single_rows(order: Sequence[int]) -> list[list[int]]:
    """No packing: one example per row."""
    return [[int(i)] for i in order]


def efficiency(rows: list[list[int]], lengths: Sequence[int], capacity: int) -> float:
    """Non-pad tokens / (rows * capacity)."""
    if not rows:
        return 0.0
    lengths = np.asarray(lengths)
    used = sum(int(lengths[r].sum()) for r in rows if r)
    return used / (len(rows) * capacity)


def build_rows(
    rows: Sequence[Sequence[int]],
    input_ids: Sequence[np.ndarray],
    loss_mask: Sequence[np.ndarray],
    capacity: int,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """Arrays [len(rows), capacity] for the given rows; an empty row is all padding."""
    b = len(rows)
    # int32 0/1, or float32 loss weights: the dtype of the examples' masks, whatever the rows
    weighted = len(loss_mask) and np.asarray(loss_mask[0]).dtype.kind == "f"
    mask_dtype = np.float32 if weighted else np.int32
    out = {
        "input_ids": np.full((b, capacity), pad_id, np.int32),
        "loss_mask": np.zeros((b, capacity), mask_dtype),
        "segment_ids": np.zeros((b, capacity), np.int32),
        "positions": np.zeros((b, capacity), np.int32),
    }
    ramp = np.arange(capacity, dtype=np.int32)
    for r, row in enumerate(rows):
        t = 0
        for seg, i in enumerate(row, start=1):
            n = len(input_ids[i])
            if t + n > capacity:
                raise ValueError(f"row {r} overflows {capacity} tokens")
            out["input_ids"][r, t : t + n] = input_ids[i]
            out["loss_mask"][r, t : t + n] = loss_mask[i]
            out["segment_ids"][r, t : t + n] = seg
            out["positions"][r, t : t + n] = ramp[:n]
            t += n
    return out
