"""File-level pieces of the export: a streaming safetensors writer, host gathers, and the
tokenizer / generation-config files copied next to the weights (targets.py decides where they
go and moves them into place).

The writer knows every tensor's key, shape and dtype before it reads any value (a plan), so it
can write each file's header first and then stream the tensors one at a time: host memory holds
one tensor, never a whole shard or model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import numpy as np

from jaxsft.errors import UserError

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
INDEX_NAME = "model.safetensors.index.json"
# Tokenizer files a HF checkpoint may carry; copied when present (chat template included:
# transformers 5 keeps it in chat_template.jinja, 4.x inside tokenizer_config.json).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
TOKENIZER_DIRS = ("additional_chat_templates",)


@dataclasses.dataclass(frozen=True)
class Planned:
    """One tensor to write: key, HF shape, numpy dtype."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@jax.jit
def _layer(x: jax.Array, i) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(x, i, axis=0, keepdims=False)


def host_layer(x: jax.Array, i: int | None) -> np.ndarray:
    """x[i] (or all of x for i=None) on this host; one compile per shape, not per layer."""
    return host_array(x if i is None else _layer(x, np.int32(i)))


def host_array(x) -> np.ndarray:
    """A jax array (possibly spread over hosts) as one numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def is_writer() -> bool:
    """Only process 0 writes files; every process takes part in the gathers."""
    return jax.process_index() == 0


def shard_names(n: int, stem: str = "model") -> list[str]:
    """HF's naming: model.safetensors, or model-00001-of-00003.safetensors, ..."""
    if n == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def split_shards(plan: list[Planned], max_shard_bytes: int) -> list[list[Planned]]:
    """Consecutive groups of at most max_shard_bytes (a bigger tensor gets a shard alone)."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for p in plan:
        if shards[-1] and size + p.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def _header(group: list[Planned]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for p in group:
        dtype = SAFETENSORS_DTYPES[p.dtype.name]
        header[p.key] = {
            "dtype": dtype,
            "shape": list(p.shape),
            "data_offsets": [offset, offset + p.nbytes],
        }
        offset += p.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(
    out_dir: Path,
    plan: list[Planned],
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    max_shard_bytes: int,
    stem: str = "model",
    write: bool = True,
) -> dict[str, str]:
    """Stream `tensors` (in plan order) into safetensors files; return {key: file name}.

    Above max_shard_bytes the files are shards with HF's names plus model.safetensors.index.json.
    Every planned key must arrive exactly once, in order, with its planned shape and dtype.
    With write=False (processes other than 0) the tensors are consumed but nothing is written.
    """
    keys = [p.key for p in plan]
    assert len(set(keys)) == len(keys), "duplicate keys in the export plan"
    shards = split_shards(plan, max_shard_bytes)
    names = shard_names(len(shards), stem)
    it: Iterator = iter(tensors)
    weight_map = {}
    for name, group in zip(names, shards, strict=True):
        with contextlib.ExitStack() as stack:
            f = stack.enter_context(open(out_dir / name, "wb")) if write else None
            if f:
                f.write(_header(group))
            for p in group:
                key, arr = next(it)
                assert key == p.key, f"export order: got {key!r}, planned {p.key!r}"
                assert arr.shape == p.shape and arr.dtype == p.dtype, (key, arr.shape, arr.dtype)
                if f:
                    f.write(np.ascontiguousarray(arr).view(np.uint8).data)
                weight_map[key] = name
    assert next(it, None) is None, "export produced more tensors than planned"
    if write and len(shards) > 1:
        total = sum(p.nbytes for p in plan)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def copy_tokenizer(src: str | os.PathLike, out_dir: Path) -> list[str]:
    """Copy the tokenizer files (and chat template) of a checkpoint dir; return their names."""
    src = Path(src)
    if not src.is_dir():
        raise UserError(
            "tokenizer directory not found",
            where=src,
            hint="model.path must be the base checkpoint with its tokenizer files",
        )
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out_dir / name)
            copied.append(name)
    for name in TOKENIZER_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, out_dir / name)
            copied.append(name + "/")
    return copied


def write_generation_config(src: str | os.PathLike | None, out_dir: Path, cfg) -> None:
    """generation_config.json: the source checkpoint's, else one built from bos/eos/pad ids."""
    source = Path(src) / "generation_config.json" if src else None
    if source is not None and source.is_file():
        shutil.copy2(source, out_dir / "generation_config.json")
        return
    gen: dict = {"_from_model_config": True}
    if cfg.bos_token_id is not None:
        gen["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_ids:
        eos = list(cfg.eos_token_ids)
        gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if cfg.pad_token_id is not None:
        gen["pad_token_id"] = cfg.pad_token_id
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
