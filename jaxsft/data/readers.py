"""Read and validate data rows: JSONL, JSON, Parquet, directories of those, saved `datasets`.

Every row keeps where it came from ("file:LINE" for JSONL, "file:row N" otherwise, N from 0)
so that an invalid row is reported as `UserError(reason, where="file:line")` under
`data.on_invalid="error"`, or dropped and listed (where, reason) under "skip".

Weighted mixing (`data.train` as a list of {"path", "weight"}): see `mixture_epoch`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from jaxsft.data.formats import InvalidExample, normalize
from jaxsft.errors import UserError

EXTENSIONS = (".jsonl", ".json", ".parquet")
EMPTY_FILE = "empty file (no rows)"
_HINT_ROW = "fix or remove the row, or set data.on_invalid=skip to drop invalid rows"


@dataclasses.dataclass
class Row:
    """One valid example in canonical form (see chat.normalize) and its origin."""

    example: dict
    where: str
    source: int = 0


@dataclasses.dataclass
class ReadResult:
    rows: list[Row]
    skipped: list[dict]  # {"where": "file:line", "reason": "..."}
    sources: list[dict]  # {"path", "weight", "rows"} per mixture component
    n_read: int = 0  # rows seen, valid or not (malformed lines included)


def parse_sources(spec: Any) -> list[tuple[str, float]]:
    """`data.train`/`data.eval` -> [(path, weight)]: a path, or a list of {path, weight}."""
    if spec is None or (isinstance(spec, str) and not spec):
        return []
    if isinstance(spec, (str, os.PathLike)):
        return [(os.fspath(spec), 1.0)]
    if hasattr(spec, "get") and not isinstance(spec, (list, tuple)):
        spec = [spec]
    out = []
    for i, item in enumerate(spec):
        if isinstance(item, (str, os.PathLike)):
            out.append((os.fspath(item), 1.0))
            continue
        path = item.get("path") if hasattr(item, "get") else None
        weight = item.get("weight", 1.0) if hasattr(item, "get") else None
        if not isinstance(path, str) or not path:
            raise UserError(
                f"mixture entry {i} has no 'path'",
                where="data",
                hint='use {"path": ..., "weight": ...}',
            )
        if not isinstance(weight, (int, float)) or weight < 0 or weight != weight:
            raise UserError(
                f"mixture entry {i} ({path}) has weight {weight!r}",
                where="data",
                hint="weights are non-negative numbers (relative shares of each epoch)",
            )
        out.append((path, float(weight)))
    if out and sum(w for _, w in out) <= 0:
        raise UserError("all mixture weights are 0", where="data", hint="give a source weight > 0")
    return out


def read_rows(spec: Any, on_invalid: str = "error") -> ReadResult:
    """Read and validate every row of a data spec (path or mixture list)."""
    if on_invalid not in ("error", "skip"):
        raise UserError(
            f"data.on_invalid={on_invalid!r}", where="config", hint='use "error" or "skip"'
        )
    result = ReadResult(rows=[], skipped=[], sources=[])
    for k, (path, weight) in enumerate(parse_sources(spec)):
        before, skipped_before = len(result.rows), len(result.skipped)
        for raw, where in iter_raw(path, on_invalid, result.skipped):
            try:
                result.rows.append(Row(normalize(_drop_nulls(raw)), where, k))
            except InvalidExample as e:
                if on_invalid == "error":
                    raise UserError(str(e), where=where, hint=_HINT_ROW) from None
                result.skipped.append({"where": where, "reason": str(e)})
        n = len(result.rows) - before
        new_skips = result.skipped[skipped_before:]
        result.n_read += n + sum(1 for d in new_skips if d["reason"] != EMPTY_FILE)
        result.sources.append({"path": path, "weight": weight, "rows": n})
        if n == 0:
            raise UserError(
                "no valid rows", where=path, hint="every row was invalid or the source is empty"
            )
    return result


def _drop_nulls(raw: Any) -> Any:
    # Parquet / datasets rows carry the union schema: absent keys come back as None.
    return {k: v for k, v in raw.items() if v is not None} if isinstance(raw, dict) else raw


def iter_raw(path: str, on_invalid: str, skipped: list) -> Iterator[tuple[Any, str]]:
    """(raw row, where) for every row under path; malformed JSON lines are handled here."""
    if not os.path.exists(path):
        raise UserError(
            "no such file or directory", where=path, hint="check data.train / data.eval"
        )
    if os.path.isdir(path):
        yield from _iter_dir(path, on_invalid, skipped)
        return
    yield from _iter_file(path, on_invalid, skipped)


def _iter_dir(path: str, on_invalid: str, skipped: list) -> Iterator[tuple[Any, str]]:
    names = set(os.listdir(path))
    if "dataset_dict.json" in names:
        splits = sorted(n for n in names if os.path.isdir(os.path.join(path, n)))
        raise UserError(
            "a saved DatasetDict, not a single dataset",
            where=path,
            hint="point to one split's directory, e.g. "
            + os.path.join(path, splits[0] if splits else "train"),
        )
    if "state.json" in names and "dataset_info.json" in names:
        yield from _iter_saved_dataset(path)
        return
    files = sorted(
        os.path.join(root, f)
        for root, _, fs in os.walk(path)
        for f in fs
        if f.endswith(EXTENSIONS) and not f.startswith(".")
    )
    if not files:
        raise UserError(
            "directory holds no .jsonl, .json or .parquet file and is not a saved dataset",
            where=path,
            hint="point data.train to a data file or a directory of them",
        )
    for f in files:
        yield from _iter_file(f, on_invalid, skipped)


def _iter_file(path: str, on_invalid: str, skipped: list) -> Iterator[tuple[Any, str]]:
    if not path.endswith(EXTENSIONS):
        raise UserError(
            "unsupported data file type", where=path, hint="use .jsonl, .json or .parquet"
        )
    try:
        if os.path.getsize(path) == 0:
            rows = iter(())
        elif path.endswith(".parquet"):
            rows = _parquet_rows(path)
        elif path.endswith(".json"):
            rows = _json_rows(path, on_invalid, skipped)
        else:
            rows = _jsonl_rows(path, on_invalid, skipped)
        n = 0
        for row in rows:
            n += 1
            yield row
    except OSError as e:
        raise UserError(f"cannot read: {e.strerror or e}", where=path) from None
    if n == 0:
        _invalid(on_invalid, skipped, path, EMPTY_FILE)


def _invalid(on_invalid: str, skipped: list, where: str, reason: str) -> None:
    if on_invalid == "error":
        raise UserError(reason, where=where, hint=_HINT_ROW)
    skipped.append({"where": where, "reason": reason})


def _jsonl_rows(path, on_invalid, skipped, lines=None) -> Iterator[tuple[Any, str]]:
    if lines is None:
        with open(path, "rb") as f:
            yield from _jsonl_lines(path, f, on_invalid, skipped)
    else:
        yield from _jsonl_lines(path, lines, on_invalid, skipped)


def _jsonl_lines(path, lines, on_invalid, skipped) -> Iterator[tuple[Any, str]]:
    for lineno, row, error in parse_jsonl(lines):
        where = f"{path}:{lineno}"
        if error is None:
            yield row, where
        else:
            _invalid(on_invalid, skipped, where, error)


def parse_jsonl(lines: Iterable[bytes | str]) -> Iterator[tuple[int, Any, str | None]]:
    """(line number from 1, row, None) for every non-blank line of a JSONL stream, or (line
    number, None, reason) for a line that is not UTF-8 or not JSON: the caller raises or skips.

    A UTF-8 byte-order mark at the start of the stream (editors on Windows write one) is
    dropped."""
    for lineno, line in enumerate(lines, start=1):
        try:
            line = line.decode("utf-8") if isinstance(line, bytes) else line
        except UnicodeDecodeError as e:
            yield lineno, None, f"line is not UTF-8 text ({e.reason})"
            continue
        if lineno == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, None, f"malformed JSON line: {e.msg} (column {e.colno})"
            continue
        yield lineno, row, None


def read_jsonl(path: str | os.PathLike, max_rows: int = 0) -> Iterator[tuple[int, Any]]:
    """(line number, row) of every non-blank line of one JSONL file (the first max_rows when
    > 0), strictly: a missing file or a bad line is a UserError naming the file (and line).

    Used for the golden and multiple-choice eval files; training data goes through `read_rows`
    (directories, other formats, data.on_invalid).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError("file not found", where=path)
    try:
        with open(path, "rb") as f:
            for lineno, row, error in itertools.islice(parse_jsonl(f), max_rows or None):
                if error is not None:
                    raise UserError(error, where=f"{path}:{lineno}")
                yield lineno, row
    except OSError as e:
        raise UserError(f"cannot read the file: {e}", where=path) from None


def _json_rows(path, on_invalid, skipped) -> Iterator[tuple[Any, str]]:
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: drops a byte-order mark
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 text: {e.reason}", where=path) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):  # JSONL named .json
            yield from _jsonl_rows(path, on_invalid, skipped, lines=text.splitlines(True))
            return
        raise UserError(
            f"malformed JSON: {e.msg} (column {e.colno})",
            where=f"{path}:{e.lineno}",
            hint='a .json file holds a list of rows or {"data": [...]}',
        ) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UserError(
            f"a JSON {type(data).__name__} is not a list of rows",
            where=path,
            hint='a .json file holds a list of rows or {"data": [...]}; '
            "use .jsonl for one row a line",
        )
    for i, row in enumerate(data):
        yield row, f"{path}:row {i}"


def _parquet_rows(path) -> Iterator[tuple[Any, str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow.ArrowInvalid and friends
        raise UserError(f"cannot read Parquet: {e}", where=path) from None
    i = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield row, f"{path}:row {i}"
            i += 1


def _iter_saved_dataset(path) -> Iterator[tuple[Any, str]]:
    try:
        import datasets

        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise UserError(f"cannot load the saved dataset: {e}", where=path) from None
    if not isinstance(ds, datasets.Dataset):
        raise UserError("not a single saved Dataset", where=path, hint="point to one split")
    for i, row in enumerate(ds):
        yield row, f"{path}:row {i}"


# --------------------------------------------------------------------------------------------
# Weighted mixing
# --------------------------------------------------------------------------------------------
MIX_EPOCHS = ("sum", "first")


def mixture_counts(sizes: list[int], weights: list[float], mix_epoch: str = "sum") -> list[int]:
    """Examples each source contributes to one epoch.

    data.mix_epoch "sum": an epoch has as many examples as all sources together (N = sum of
    sizes). "first": the epoch ends when the first source is used up at its share, N =
    min_i n_i * sum(w) / w_i over the weighted sources, so no source repeats an example. Source
    i contributes round(N * w_i / sum(w)) (largest-remainder rounding, so the counts add up to
    N). A single source, or weights proportional to the sizes, is a plain epoch either way.
    """
    if mix_epoch not in MIX_EPOCHS:
        raise ValueError(f"mix_epoch={mix_epoch!r}: use one of {MIX_EPOCHS}")
    sizes = np.asarray(sizes, np.int64)
    w = np.asarray(weights, np.float64)
    total = int(sizes.sum())
    if mix_epoch == "first":
        live = (w > 0) & (sizes > 0)
        if not live.any():
            return [0] * len(sizes)
        # the smallest total at which a source is used up; a float a hair above an integer
        # (3 / 0.3 = 10.000000000000002) is that integer
        total = int(np.floor(np.min(sizes[live] * w.sum() / w[live]) + 1e-9))
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    rest = total - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:rest]] += 1
    counts[sizes == 0] = 0
    return counts.tolist()


def mixture_epoch(
    source_of: np.ndarray, weights: list[float], seed: int, epoch: int, mix_epoch: str = "sum"
) -> np.ndarray:
    """Example indices of one epoch of the mixture (unshuffled; the pipeline shuffles them).

    source_of[j] is the source of example j. Source i contributes k_i examples
    (`mixture_counts`): when k_i >= its size n_i, every example floor(k_i / n_i) times plus a
    sample without replacement of k_i mod n_i more (upsampling); otherwise a sample without
    replacement of k_i (downsampling). Samples are drawn from (seed, epoch, i), so they are
    deterministic and differ from epoch to epoch: over epochs a down-weighted source is covered.
    """
    source_of = np.asarray(source_of)
    n_src = len(weights)
    members = [np.nonzero(source_of == i)[0] for i in range(n_src)]
    counts = mixture_counts([len(m) for m in members], weights, mix_epoch)
    parts = []
    for i, (idx, k) in enumerate(zip(members, counts, strict=True)):
        if k == 0 or len(idx) == 0:
            continue
        reps, rem = divmod(k, len(idx))
        rng = np.random.default_rng([seed, epoch, i, 0x6D6978])
        parts += [idx] * reps + [np.sort(rng.choice(idx, size=rem, replace=False))]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)
