"""The tokenized data cache: rendered splits on disk, read back instead of rendering again.

    cache = DataCache.for_config(config, tokenizer, opts)  # None: no key (a data path is missing)
    hit = cache.load(keep_kinds)                            # Loaded, or None (says why)
    cache.save(train, evals, report, drop_lines)            # rename-if-absent; path or None

Layout of `<data.cache_dir>/<key>/` (data.cache_dir "" means `<run_dir>/data_cache`):

    meta.json              the key's components (cache_key.py), per-split counts, weights
    report.json            the data report without its packing section (that depends on
                           train.batch_size / train.seed and is recomputed on load)
    train.array_record     one record per example, in file order (see encode_example)
    train.lengths.npy      int32 [E] tokens of each example (packing plans need only these)
    train.source.npy       int32 [E] mixture component of each example
    eval.*                 the same for data.eval, when set
    manifest.json          sha256 of every file above, written last

ArrayRecord (grain.sources.ArrayRecordDataSource reads it) gives random access by example
index, so a host can later read only the examples of its shard. A cache is written into
`.tmp-<key>-<host>-<pid>-...` beside its final name and renamed when complete: a killed render
leaves only a temp dir, which is never read and which a later save on that host removes once
its process is gone and it is an hour old; two hosts writing the same key race on the rename and the
loser discards its copy. A cache whose files do not match the manifest is moved aside
(`<key>.corrupt-<time>`) with a warning and rendered again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import struct
import sys
import time
import uuid
from collections.abc import Sequence

import numpy as np

from jaxsft import run_dir as rd
from jaxsft.data import cache_key
from jaxsft.data.splits import Examples

DEFAULT_DIR = "data_cache"  # under run_dir
SPLITS = ("train", "eval")
WRITER_OPTIONS = "group_size:1,zstd:1"  # one record per chunk: random access by index
_HEADER = struct.Struct("<IIIB")  # tokens, source, bytes of `where`, mask code
_MASK_INT8, _MASK_INT32, _MASK_FLOAT32 = 0, 1, 2


def encode_example(ids: np.ndarray, mask: np.ndarray, kinds, where: str, source: int) -> bytes:
    """One record: header, input_ids int32 [n], loss_mask [n] (int8 for 0/1 masks, else
    int32 or float32), kinds int8 [n], where (utf-8)."""
    if mask.dtype == np.float32:
        code, m = _MASK_FLOAT32, mask
    elif mask.dtype == np.int32 and mask.size and (mask.min() < 0 or mask.max() > 1):
        code, m = _MASK_INT32, mask
    else:
        code, m = _MASK_INT8, mask.astype(np.int8)
    w = where.encode("utf-8", "surrogatepass")
    k = np.zeros(len(ids), np.int8) if kinds is None else np.asarray(kinds, np.int8)
    head = _HEADER.pack(len(ids), int(source), len(w), code)
    return b"".join((head, ids.astype("<i4").tobytes(), m.tobytes(), k.tobytes(), w))


def decode_example(record: bytes) -> dict:
    """{"input_ids", "loss_mask", "kinds", "where", "source"} of one record."""
    n, source, n_where, code = _HEADER.unpack_from(record)
    at = _HEADER.size
    ids = np.frombuffer(record, "<i4", n, at).astype(np.int32)
    at += 4 * n
    if code == _MASK_INT8:
        mask = np.frombuffer(record, np.int8, n, at).astype(np.int32)
        at += n
    else:
        mask = np.frombuffer(record, np.float32 if code == _MASK_FLOAT32 else "<i4", n, at)
        mask, at = mask.copy(), at + 4 * n
    kinds = np.frombuffer(record, np.int8, n, at).copy()
    where = record[at + n : at + n + n_where].decode("utf-8", "surrogatepass")
    return {"input_ids": ids, "loss_mask": mask, "kinds": kinds, "where": where, "source": source}


class CachedSplit:
    """Random access to the examples of one cached split: `split[i]` is decode_example's
    dict; `lengths` and `source` are the small per-example index arrays, the only ones held
    in memory. `column(name)` is a sequence view of one field (what `Examples` holds)."""

    def __init__(self, directory: str, split: str, float_mask: bool = False):
        self.path = os.path.join(directory, f"{split}.array_record")
        self.lengths = np.load(os.path.join(directory, f"{split}.lengths.npy"))
        self.source = np.load(os.path.join(directory, f"{split}.source.npy"))
        self.float_mask = float_mask  # loss weights: every mask as float32
        self.reads = 0  # records decoded (tests check that a host reads only its shard)
        self._source = None
        self._last = (-1, None)  # the last decoded record: ids and mask of one row read once

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        i %= len(self)
        last = self._last
        if last[0] == i:
            return last[1]
        ex = decode_example(self.reader().read(i, i + 1)[0])
        if self.float_mask:
            ex["loss_mask"] = ex["loss_mask"].astype(np.float32)
        self.reads += 1
        self._last = (i, ex)
        return ex

    def reader(self):
        """The file's ArrayRecord reader, opened once: a run keeps reading the file it opened
        even if the cache directory is moved meanwhile.

        Records are read as the range [i, i+1). grain's ArrayRecordDataSource reads
        `reader.read([i])`, whose cost grows with the number of records: 3.9 ms a record at
        1M examples against 12 us for the range (one machine, same file), so it would make the
        input pipeline the bottleneck of a large data set. The file stays one grain reads."""
        if self._source is None:
            from array_record.python import array_record_module as arm

            self._source = arm.ArrayRecordReader(
                self.path, options="readahead_buffer_size:0", file_reader_buffer_size=32768
            )
        return self._source

    def column(self, name: str) -> Column:
        return Column(self, name)

    def __getstate__(self):  # the reader is reopened after pickling (worker processes)
        return {**self.__dict__, "_source": None, "_last": (-1, None)}


class Column(Sequence):
    """One field ("input_ids", "loss_mask", "where") of every example of a cached split, read
    from disk when indexed."""

    def __init__(self, split: CachedSplit, name: str):
        self.split, self.name = split, name

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.split[i][self.name]


@dataclasses.dataclass
class Loaded:
    train: Examples
    eval: Examples | None
    report: dict  # without train.packing
    drop_lines: list[str]


@dataclasses.dataclass
class DataCache:
    root: str  # data.cache_dir
    key: str
    parts: dict  # cache_key.components
    in_run_dir: bool  # written only once the start succeeded (run_dir is the user's)

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.key)

    @classmethod
    def for_config(cls, config, tokenizer, opts: dict) -> DataCache | None:
        root = resolve_dir(config)
        parts = cache_key.components(config, tokenizer, opts, skip=root)
        if parts is None:
            return None
        run_dir = os.path.realpath(config.run_dir)
        inside = os.path.commonpath([os.path.realpath(root), run_dir]) == run_dir
        return cls(root, cache_key.key_of(parts), parts, inside)

    # ----------------------------------------------------------------------------------------
    def load(self, keep_kinds: int = 0) -> Loaded | None:
        """The cached splits, or None after one line saying why not (no cache, what changed
        since the newest other cache, or a corrupt cache moved aside)."""
        t0 = time.perf_counter()
        if not os.path.exists(os.path.join(self.path, "manifest.json")):
            if os.path.isdir(self.path):  # no manifest: not written by save(); never trusted
                self._set_aside("it has no manifest.json")
            else:
                _say(f"data cache: rendering, key {self.key} ({self._why_miss()})")
            return None
        try:
            bad = self._verify()
            loaded = None if bad else self._read(keep_kinds)
        except OSError as e:  # a failed read (a network filesystem): the cache may be fine
            print(
                f"warning: cannot read data cache {self.path} ({e.strerror or e}); rendering",
                file=sys.stderr,
                flush=True,
            )
            return None
        except (ValueError, KeyError, struct.error, RuntimeError) as e:
            bad = f"unreadable: {e}"
        if bad:
            self._set_aside(bad)
            return None
        n = len(loaded.train) + (len(loaded.eval) if loaded.eval is not None else 0)
        _say(
            f"data cache: loaded {n} examples from {self.path} (key {self.key}) in "
            f"{time.perf_counter() - t0:.1f}s"
        )
        return loaded

    def _verify(self) -> str | None:
        """What is wrong with the cache on disk, or None."""
        with open(os.path.join(self.path, "manifest.json")) as f:
            manifest = json.load(f)
        for name, digest in manifest["files"].items():
            file = os.path.join(self.path, name)
            if not os.path.isfile(file):
                return f"{name} is missing"
            if cache_key.file_digest(file) != digest:
                return f"{name} does not match its checksum"
        with open(os.path.join(self.path, "meta.json")) as f:
            if json.load(f)["components"] != json.loads(json.dumps(self.parts)):
                return "meta.json is for another key"
        return None

    def _read(self, keep_kinds: int) -> Loaded:
        with open(os.path.join(self.path, "meta.json")) as f:
            meta = json.load(f)
        with open(os.path.join(self.path, "report.json")) as f:
            report = json.load(f)
        splits = {}
        for split, info in meta["splits"].items():
            splits[split] = open_split(
                self.path, split, info, keep_kinds if split == "train" else 0
            )
        return Loaded(splits["train"], splits.get("eval"), report, meta["drop_lines"])

    def reopen(self, split: str, examples: Examples) -> Examples:
        """The examples of a split just written, as views of the cache (the rendered copy in
        memory can go); the kinds kept for --show stay."""
        with open(os.path.join(self.path, "meta.json")) as f:
            info = json.load(f)["splits"][split]
        out = open_split(self.path, split, info, 0)
        out.kinds = examples.kinds
        return out

    def _why_miss(self) -> str:
        newest, when = None, -1.0
        try:
            names = os.listdir(self.root)
        except OSError:
            names = []
        for name in names:
            manifest = os.path.join(self.root, name, "manifest.json")
            if name.startswith(".") or ".corrupt-" in name or not os.path.isfile(manifest):
                continue
            if os.path.getmtime(manifest) > when:
                newest, when = name, os.path.getmtime(manifest)
        if newest is None:
            return f"no cache in {self.root}"
        try:
            with open(os.path.join(self.root, newest, "meta.json")) as f:
                old = json.load(f)["components"]
        except (OSError, ValueError, KeyError):
            return f"no cache for this key in {self.root}"
        why = cache_key.differences(old, json.loads(json.dumps(self.parts)))
        return f"cache {newest} differs: {'; '.join(why) or 'unknown input'}"

    def _set_aside(self, why: str) -> None:
        aside = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        try:
            os.rename(self.path, aside)
            where = f"moved to {aside}"
        except OSError as e:  # another host moved it first, or a read-only cache_dir
            where = f"could not move it aside: {e.strerror or e}"
        print(
            f"warning: data cache {self.path} is corrupt ({why}); {where}; rendering again",
            file=sys.stderr,
            flush=True,
        )

    # ----------------------------------------------------------------------------------------
    def save(self, train: Examples, evals, report: dict, drop_lines: list[str]) -> str | None:
        """Write the cache (temp dir + rename-if-absent) and return its path; None when another
        writer got there first is not a failure (its copy is returned). OSError propagates."""
        os.makedirs(self.root, exist_ok=True)
        remove_dead_temps(self.root)
        name = f".tmp-{self.key}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = os.path.join(self.root, name)
        os.mkdir(tmp)
        try:
            self._write(tmp, train, evals, report, drop_lines)
            try:
                os.rename(tmp, self.path)
            except OSError:
                if not os.path.exists(os.path.join(self.path, "manifest.json")):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another host wrote the same key
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.path

    def _write(self, tmp: str, train: Examples, evals, report: dict, drop_lines) -> None:
        from array_record.python import array_record_module as arm

        splits = {"train": train, **({"eval": evals} if evals is not None else {})}
        info = {}
        for split, ex in splits.items():
            writer = arm.ArrayRecordWriter(
                os.path.join(tmp, f"{split}.array_record"), WRITER_OPTIONS
            )
            for i in range(len(ex)):
                kinds = ex.kinds[i] if i < len(ex.kinds) else None
                writer.write(
                    encode_example(
                        ex.input_ids[i], ex.loss_mask[i], kinds, ex.where[i], ex.source[i]
                    )
                )
            writer.close()
            np.save(os.path.join(tmp, f"{split}.lengths.npy"), ex.lengths.astype(np.int32))
            np.save(os.path.join(tmp, f"{split}.source.npy"), np.asarray(ex.source, np.int32))
            float_mask = any(m.dtype == np.float32 for m in ex.loss_mask)
            info[split] = {
                "fingerprint": rd.data_fingerprint(ex),
                "examples": len(ex),
                "tokens": int(ex.lengths.sum()),
                "mask_dtype": "float32" if float_mask else "int32",
                "weights": list(ex.weights),
            }
        meta = {"key": self.key, "components": self.parts, "splits": info}
        meta["drop_lines"] = list(drop_lines)
        _write_json(os.path.join(tmp, "meta.json"), meta)
        _write_json(os.path.join(tmp, "report.json"), report)
        files = sorted(os.listdir(tmp))
        digests = {n: cache_key.file_digest(os.path.join(tmp, n)) for n in files}
        _write_json(os.path.join(tmp, "manifest.json"), {"key": self.key, "files": digests})


TEMP_NAME = re.compile(r"\.tmp-[0-9a-f]{20}-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")
STALE_TEMP_S = 3600  # a render writes its temp dir in seconds to minutes


def remove_dead_temps(root: str) -> list[str]:
    """Remove the temp dirs (`.tmp-<key>-<host>-<pid>-<id>`) that renders on this host left
    when they were killed: named for this host, their process gone and untouched for an hour
    (containers may share a host name but not their process ids). Another host's, or a live
    process's, are left alone (a render there may still be writing). Returns the names
    removed."""
    host, removed, now = socket.gethostname(), [], time.time()
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        m = TEMP_NAME.fullmatch(name)
        if m is None or m["host"] != host or _alive(int(m["pid"])):
            continue
        path = os.path.join(root, name)
        try:
            if now - os.path.getmtime(path) < STALE_TEMP_S:
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def open_split(directory: str, split: str, info: dict, keep_kinds: int) -> Examples:
    """Examples of a cached split whose token columns stay on disk: only the lengths and
    sources are read now (and the kinds of the first keep_kinds examples, for --show)."""
    cached = CachedSplit(directory, split, float_mask=info["mask_dtype"] == "float32")
    records = cached.reader().num_records()  # opens the file now (see CachedSplit.reader)
    if not records == len(cached) == info["examples"] == len(cached.source):
        raise ValueError(f"{split}: {records} records for {info['examples']} examples")
    return Examples(
        cached.column("input_ids"),
        cached.column("loss_mask"),
        cached.column("where"),
        cached.source.astype(np.int64),
        info["weights"],
        [cached[i]["kinds"] for i in range(min(keep_kinds, len(cached)))],
        known_lengths=cached.lengths.astype(np.int64),
        fingerprint=info.get("fingerprint"),
    )


def resolve_dir(config) -> str:
    """data.cache_dir, or <run_dir>/data_cache when it is ""."""
    d = str(config.data.get("cache_dir", "") or "")
    return os.path.abspath(d or os.path.join(os.fspath(config.run_dir), DEFAULT_DIR))


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _say(line: str) -> None:
    """A status line, printed by process 0 only (without jax loaded there is one process: the
    data CLI does not pay for importing it)."""
    jax = sys.modules.get("jax")
    if jax is None or jax.process_index() == 0:
        print(line, flush=True)
