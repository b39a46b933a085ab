"""What a rendered split depends on, hashed into the key of its data cache.

    parts = components(config, tokenizer, opts)     # None when a data path does not exist
    key = key_of(parts)                             # 20 hex digits
    why = differences(old_parts, parts)             # ["max_length 64 -> 128", ...]

The key covers: the cache format version; the source of the modules that read, render and
report (an edited renderer never reuses an old cache); the tokenizer (its serialized
tokenizer.json, chat template, special and added tokens, init options); data.max_length; the
data.* keys that change rendering (on_invalid, on_drop, turns); and data.train / data.eval as
written (paths and mixture weights) with the size and sha256 of every file they name. Data
files are keyed by content, not mtime: a copy of the data to another host (or a bucket
download) gets a new mtime, and content is what a cache prepared on one machine must match.
The paths are in the key too, because the cached examples name them (file:line).
"""

from __future__ import annotations

import hashlib
import json
import os
import re

CACHE_VERSION = 1
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# Modules whose code decides the rendered examples and the report: their source is hashed.
CODE_MODULES = (
    "agentic_report",
    "cache",
    "cache_key",
    "chat",
    "check",
    "formats",
    "listing",
    "readers",
    "splits",
    "spans",
)
# tokenizer init options that name files or directories (they differ between hosts), or hold
# an in-memory object (its repr names an address); its serialization is hashed instead.
_PATH_OPTIONS = {
    "tokenizer_object",
    "name_or_path",
    "tokenizer_file",
    "vocab_file",
    "merges_file",
    "special_tokens_map_file",
}


def components(config, tokenizer, opts: dict, skip: str = "") -> dict | None:
    """Everything the key hashes, JSON-able; None when a data path does not exist (reading it
    then fails with the usual error). skip: a directory whose files are not data (the cache)."""
    from jaxsft.data import readers

    d = config.data
    parts = {
        "version": CACHE_VERSION,
        "code": code_digest(),
        "tokenizer": tokenizer_digest(tokenizer),
        "max_length": int(d.max_length),
        "options": {k: opts[k] for k in sorted(opts)},
    }
    for split in ("train", "eval"):
        sources = []
        for path, weight in readers.parse_sources(d.get(split, "")):
            files = data_files(path, skip)
            if files is None:
                return None
            sources.append({"path": path, "weight": weight, "files": files})
        parts[split] = sources
    return parts


def key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def data_files(path: str, skip: str = "") -> list | None:
    """[[name, size, sha256]] of the file `path`, or of every file under the directory `path`
    (names relative to it; hidden files and `skip` left out); None when it does not exist."""
    if os.path.isfile(path):
        return [[os.path.basename(path), os.path.getsize(path), file_digest(path)]]
    if not os.path.isdir(path):
        return None
    skip = os.path.realpath(skip) if skip else ""
    out = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(
            x
            for x in dirs
            if not x.startswith(".") and os.path.realpath(os.path.join(root, x)) != skip
        )
        for name in sorted(n for n in names if not n.startswith(".")):
            full = os.path.join(root, name)
            out.append([os.path.relpath(full, path), os.path.getsize(full), file_digest(full)])
    return out


def code_digest() -> str:
    h = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in CODE_MODULES:
        with open(os.path.join(here, name + ".py"), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what encoding and the chat template depend on (not where the files lie)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary
        h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    h.update(json.dumps({int(i): str(t) for i, t in added.items()}, sort_keys=True).encode())
    h.update(json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True).encode())
    init = {
        k: v
        for k, v in (getattr(tokenizer, "init_kwargs", {}) or {}).items()
        if k not in _PATH_OPTIONS and not _ADDRESS.search(str(v))
    }
    h.update(json.dumps(init, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def differences(old: dict, new: dict) -> list[str]:
    """What changed between the components of two keys, in words."""
    out = []
    names = {
        "version": "cache format version",
        "code": "jaxsft's data code",
        "tokenizer": "tokenizer or chat template",
    }
    for k, what in names.items():
        if old.get(k) != new.get(k):
            out.append(f"{what} changed")
    if old.get("max_length") != new.get("max_length"):
        out.append(f"data.max_length {old.get('max_length')} -> {new.get('max_length')}")
    a, b = old.get("options", {}), new.get("options", {})
    out += [f"data.{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(b) if a.get(k) != b.get(k)]
    for split in ("train", "eval"):
        out += _split_differences(split, old.get(split, []), new.get(split, []))
    return out


def _split_differences(split: str, old: list, new: list) -> list[str]:
    spec = lambda s: [(x["path"], x["weight"]) for x in s]
    if spec(old) != spec(new):
        return [f"data.{split} changed"]
    out = []
    for a, b in zip(old, new, strict=True):
        files_a = {f[0]: f[1:] for f in a["files"]}
        for name, size, digest in b["files"]:
            if name not in files_a:
                out.append(f"{os.path.join(a['path'], name)} is new")
            elif files_a[name] != [size, digest]:
                file = a["path"] if len(b["files"]) == 1 else os.path.join(a["path"], name)
                out.append(f"{file} changed")
        gone = set(files_a) - {f[0] for f in b["files"]}
        out += [f"{os.path.join(a['path'], n)} is gone" for n in sorted(gone)]
    return out
