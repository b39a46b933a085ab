"""Best-fit-decreasing packing and fixed-shape row arrays (pure functions, numpy).

A row is a list of example indices whose lengths add up to at most T (= data.max_length).
Arrays follow docs/architecture.md: input_ids, loss_mask, segment_ids (1.. per example,
0 on padding) and positions (0.. within each segment, 0 on padding), all int32 [B, T].
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np


def pack_bfd(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing: indices into `lengths`, grouped into rows of at most `capacity`.

    Examples are placed longest first (a stable sort, so equal lengths keep their input order:
    shuffle the input to vary the rows); each goes into the open row with the least room that
    still fits it, ties to the oldest row, else into a new row. The open rows are kept in one
    min-heap of row ids per room and `Rooms`, a set of the rooms that have any, so placing n
    examples is O(n log n) whatever the number of rows or the capacity. The sorted list of
    (room, row) keys this replaced moved O(open rows) keys per insert; measured on one machine,
    1M examples at capacity 1024: 1.4 s against 1.8 s, 200k at 131072: 0.42 s against 1.0 s.
    """
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and (lengths.max() > capacity or lengths.min() <= 0):
        raise ValueError(
            f"lengths must be in [1, {capacity}], got {lengths.min()}..{lengths.max()}"
        )
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    by_room: dict[int, list[int]] = {}  # room -> heap of the row ids with that room
    rooms = Rooms()
    for i, n in zip(order.tolist(), lengths[order].tolist(), strict=True):
        room = rooms.least_at_least(n)
        if room is not None:
            heap = by_room[room]
            r = heapq.heappop(heap)
            if not heap:
                rooms.discard(room)
            rows[r].append(i)
        else:
            room, r = capacity, len(rows)
            rows.append([i])
        left = room - n
        if left > 0:
            heap = by_room.setdefault(left, [])
            if not heap:
                rooms.add(left)
            heapq.heappush(heap, r)
    return rows


class Rooms:
    """A set of non-negative ints with "the least member >= n": bit sets (Python ints) of
    BLOCK values each, and one bit set of the non-empty blocks, so every operation shifts
    ints of at most BLOCK bits whatever the range of the members."""

    BLOCK = 4096

    def __init__(self):
        self.blocks = 0  # bit b set: self.bits[b] is not 0
        self.bits: dict[int, int] = {}

    def add(self, x: int) -> None:
        b, o = divmod(x, self.BLOCK)
        word = self.bits.get(b, 0)
        if not word:
            self.blocks |= 1 << b
        self.bits[b] = word | (1 << o)

    def discard(self, x: int) -> None:
        b, o = divmod(x, self.BLOCK)
        word = self.bits.get(b, 0) & ~(1 << o)
        self.bits[b] = word
        if not word:
            self.blocks &= ~(1 << b)

    def least_at_least(self, n: int) -> int | None:
        b, o = divmod(n, self.BLOCK)
        word = self.bits.get(b, 0) >> o
        if word:
            return n + _lowest_bit(word)
        later = self.blocks >> (b + 1)
        if not later:
            return None
        b += 1 + _lowest_bit(later)
        return b * self.BLOCK + _lowest_bit(self.bits[b])


def _lowest_bit(x: int) -> int:
    return (x & -x).bit_length() - 1


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
    weighted: bool | None = None,
) -> dict[str, np.ndarray]:
    """Arrays [len(rows), capacity] for the given rows; an empty row is all padding.

    loss_mask is int32 0/1, or float32 loss weights (`weighted`, by default the dtype of the
    first example's mask): one dtype for every batch of a split, whatever its rows hold."""
    b = len(rows)
    if weighted is None:
        weighted = bool(len(loss_mask)) and np.asarray(loss_mask[0]).dtype.kind == "f"
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
