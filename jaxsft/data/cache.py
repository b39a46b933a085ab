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
`.tmp-<key>-...` beside its final name and renamed when complete: a killed render leaves only
a temp dir, which is never read; two hosts writing the same key race on the rename and the
loser discards its copy. A cache whose files do not match the manifest is moved aside
(`<key>.corrupt-<time>`) with a warning and rendered again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import sys
import time
import uuid

import numpy as np

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
    dict; `lengths` and `source` are the small per-example index arrays."""

    def __init__(self, directory: str, split: str):
        self.path = os.path.join(directory, f"{split}.array_record")
        self.lengths = np.load(os.path.join(directory, f"{split}.lengths.npy"))
        self.source = np.load(os.path.join(directory, f"{split}.source.npy"))
        self._source = None

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict:
        if self._source is None:
            import grain

            self._source = grain.sources.ArrayRecordDataSource([self.path])
        return decode_example(self._source[int(i)])

    def read_all(self) -> list[bytes]:
        """Every record, in order (one sequential read)."""
        from array_record.python import array_record_module as arm

        reader = arm.ArrayRecordReader(self.path)
        try:
            return reader.read_all()
        finally:
            reader.close()


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
        except (OSError, ValueError, KeyError, struct.error, RuntimeError) as e:
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
            cached = CachedSplit(self.path, split)
            rows = [decode_example(r) for r in cached.read_all()]
            if len(rows) != info["examples"] or len(cached) != len(rows):
                raise ValueError(f"{split}: {len(rows)} records for {info['examples']} examples")
            masks = [r["loss_mask"] for r in rows]
            if info["mask_dtype"] == "float32":
                masks = [m.astype(np.float32) for m in masks]
            splits[split] = Examples(
                [r["input_ids"] for r in rows],
                masks,
                [r["where"] for r in rows],
                cached.source.astype(np.int64),
                info["weights"],
                [r["kinds"] for r in rows[:keep_kinds]] if split == "train" else [],
            )
        return Loaded(splits["train"], splits.get("eval"), report, meta["drop_lines"])

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
        tmp = os.path.join(self.root, f".tmp-{self.key}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
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
