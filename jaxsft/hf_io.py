"""HF safetensors <-> jaxsft parameters, through one table used by import and export alike.

Import streams tensor by tensor: each parameter is built with `jax.make_array_from_callback`,
whose callback reads only the slice a device needs (safetensors slices), so host memory never
holds a second full copy of the model and each host reads only its own shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open

from jaxsft.errors import UserError
from jaxsft.models import quant
from jaxsft.models.config import ModelConfig
from jaxsft.models.lora import LoraConfig, LoRAParam
from jaxsft.models.transformer import Transformer, block_norms
from jaxsft.sharding import named_sharding

# Keys some checkpoints carry that hold no parameter of the model.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


STACK_LETTERS = "ij"  # the hf_key fields of the stacked axes, outermost first


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor family: `hf_key` <-> state `path`.

    stack: the sizes of the leading axes the variable stacks HF tensors over, named {i}, {j}
    in hf_key: () one tensor; (L,) one per layer ("model.layers.{i}..."); (L, E) one per layer
    and expert ("model.layers.{i}.mlp.experts.{j}...", stacked [L, E, ...]).
    rows: this variable is rows [start, stop) (HF axis 0) of a fused HF tensor (Phi's
    qkv_proj, gate_up_proj): split on import, concatenated with the other parts on export.
    """

    hf_key: str
    path: tuple[str, ...]
    transpose: bool  # HF nn.Linear weight [out, in] vs kernel [in, out]
    stack: tuple[int, ...] = ()
    rows: tuple[int, int] | None = None

    @property
    def stacked(self) -> bool:
        return bool(self.stack)

    def indices(self) -> list[tuple[int, ...]]:
        """Every index over the stacked axes, in file order (layer-major)."""
        return list(itertools.product(*map(range, self.stack)))

    def key(self, index: tuple[int, ...]) -> str:
        return self.hf_key.format(**dict(zip(STACK_LETTERS, index, strict=False)))


def weight_table(cfg: ModelConfig) -> list[Entry]:
    """Every HF tensor of a checkpoint of this config, in file order."""
    table = [Entry("model.embed_tokens.weight", ("embed_tokens", "embedding"), False)]
    layer = "model.layers.{i}."

    def add(hf, path, transpose=False):
        table.append(Entry(layer + hf, ("layers", *path), transpose, (cfg.num_layers,)))

    for name in block_norms(cfg):
        add(f"{name}.weight", (name, "scale"))
    for proj, bias in (
        ("q_proj", cfg.qkv_bias),
        ("k_proj", cfg.qkv_bias),
        ("v_proj", cfg.qkv_bias),
        ("o_proj", cfg.o_bias),
    ):
        add(f"self_attn.{proj}.weight", ("self_attn", proj, "kernel"), True)
        if bias:
            add(f"self_attn.{proj}.bias", ("self_attn", proj, "bias"))
    if cfg.qk_norm:
        add("self_attn.q_norm.weight", ("self_attn", "q_norm", "scale"))
        add("self_attn.k_norm.weight", ("self_attn", "k_norm", "scale"))
    projections = ("gate_proj", "up_proj", "down_proj")
    if cfg.num_experts:  # router, per-expert matrices (stacked [L, E, ...]), shared expert
        add("mlp.gate.weight", ("mlp", "gate", "kernel"), True)
        for proj in projections:
            key, path = (
                f"{layer}mlp.experts.{{j}}.{proj}.weight",
                ("layers", "mlp", "experts", proj),
            )
            table.append(Entry(key, path, True, (cfg.num_layers, cfg.num_experts)))
        if cfg.shared_expert_size:
            for proj in projections:
                add(
                    f"mlp.shared_expert.{proj}.weight",
                    ("mlp", "shared_expert", proj, "kernel"),
                    True,
                )
            add("mlp.shared_expert_gate.weight", ("mlp", "shared_expert_gate", "kernel"), True)
    else:
        for proj in projections:
            add(f"mlp.{proj}.weight", ("mlp", proj, "kernel"), True)
            if cfg.mlp_bias:
                add(f"mlp.{proj}.bias", ("mlp", proj, "bias"))
    table.append(Entry("model.norm.weight", ("norm", "scale"), False))
    if not cfg.tie_word_embeddings:
        table.append(Entry("lm_head.weight", ("lm_head", "kernel"), True))
    from jaxsft.models import families

    table = families.family_of(cfg.model_type).table(cfg, table)
    return [dataclasses.replace(e, hf_key=_in_checkpoint(cfg, e.hf_key)) for e in table]


def _in_checkpoint(cfg: ModelConfig, key: str) -> str:
    """A text model's key as the checkpoint names it (under a multimodal wrapper's prefix)."""
    from jaxsft.models import families

    spec = families.wrapped(cfg)
    return key if spec is None else spec.prefixed(key)


def carried_keys(reader: SafetensorsReader, cfg: ModelConfig) -> list[str]:
    """The tensors of a multimodal checkpoint outside its language model (vision tower,
    projector): not loaded, written back byte for byte by the merged export."""
    from jaxsft.models import families

    spec = families.wrapped(cfg)
    return [] if spec is None else [k for k in reader.keys() if spec.carried(k)]


def hf_keys(entry: Entry) -> list[str]:
    """The HF keys of an entry, in the order of Entry.indices."""
    return [entry.key(index) for index in entry.indices()]


def abstract_model(
    cfg: ModelConfig,
    *,
    dtype="bfloat16",
    param_dtype="float32",
    lora: LoraConfig | None = None,
    **options,
):
    """The model with ShapeDtypeStruct leaves (no memory). `options`: Transformer's runtime
    options (remat, attention_impl, unroll) and quantize ("" | "int8" | "nf4")."""
    if options.get("quantize"):
        quant.check_dims(options["quantize"], cfg)
    return nnx.eval_shape(
        lambda: Transformer(
            cfg,
            dtype=jnp.dtype(dtype),
            param_dtype=jnp.dtype(param_dtype),
            lora=lora,
            rngs=nnx.Rngs(0),
            **options,
        )
    )


def model_shapes(
    hf_config, *, dtype="bfloat16", param_dtype="float32", lora: LoraConfig | None = None
) -> dict[str, jax.ShapeDtypeStruct]:
    """{state path ("layers.self_attn.q_proj.kernel", ...): ShapeDtypeStruct} of the model of a
    config.json (a dict, the file, or a checkpoint directory); nothing is allocated."""
    cfg = ModelConfig.from_hf(hf_config)
    model = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, lora=lora)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(map(str, path)): var.get_value() for path, var in flat}


def load_hf(
    path,
    dtype="float32",
    param_dtype="float32",
    *,
    mesh=None,
    lora: LoraConfig | None = None,
    seed=0,
    **options,
):
    """Load a local HF checkpoint directory -> (Transformer, ModelConfig).

    `dtype` is the compute dtype, `param_dtype` the dtype weights are held in. With a mesh,
    every parameter is placed with its logical-axis sharding; LoRA adapters (if `lora`) are
    freshly initialised (A uniform, B zero, as PEFT does). `options` go to the Transformer
    (remat="none"|"full"|"dots", unroll=1, and attention_impl: one of model.attention's
    values, "auto"|"xla"|"cudnn"|"pallas_gpu"|"splash"; quantize="int8"|"nf4": the layers'
    projections are quantised tensor by tensor as they are read, models/quant.py).
    """
    path = os.fspath(path)
    cfg = ModelConfig.from_hf(path)
    model = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, lora=lora, **options)
    graphdef, state = nnx.split(model)
    devices = mesh if mesh is not None else _single_device_mesh()
    with SafetensorsReader(path) as reader:
        _check_fused(reader, weight_table(cfg), cfg)
        for entry in weight_table(cfg):
            var = _variable(state, entry.path)
            if isinstance(var, nnx.Variable):
                var.set_value(_load_entry(reader, entry, var, devices))
            else:  # a quantised kernel (QLoRA): its codes and scales
                _load_quantized(reader, entry, var, devices)
        head = _in_checkpoint(cfg, "lm_head.weight")  # a tied config ignores a stored head
        reader.check_all_used(optional=(head, *carried_keys(reader, cfg)))
    for i, (p, var) in enumerate(sorted(nnx.to_flat_state(state.filter(LoRAParam)))):
        var.set_value(_init_adapter(np.random.default_rng([seed, i]), p, var, devices))
    return nnx.merge(graphdef, state), cfg


def _single_device_mesh():
    from jaxsft.sharding import make_mesh

    return make_mesh(1, 1, 1, devices=jax.local_devices()[:1])


def _variable(state, path):
    node = state
    for p in path:
        node = node[p]
    return node


def _sharding(var, mesh):
    names = var.get_metadata().get("out_sharding")
    return named_sharding(mesh, names, var.get_value().shape)


def _check_fused(reader, table: list[Entry], cfg: ModelConfig):
    """A fused HF tensor has exactly the rows its parts take."""
    for group in tensor_groups(table):
        if group[-1].rows is None:
            continue
        rows = group[-1].rows[1]
        for k in hf_keys(group[0]):
            got = reader.shape(k)
            if got[0] != rows:
                raise UserError(
                    f"fused tensor {k!r} has {got[0]} rows, the config implies {rows}",
                    where=reader.file_of(k),
                    hint="config.json and the weights do not match",
                )


def _load_entry(reader, entry: Entry, var, mesh):
    """The variable of one table entry, read from the checkpoint slice by slice onto `mesh`
    (each device's callback reads only the HF tensors and rows of its shard)."""
    shape = tuple(var.get_value().shape)
    region = _region_reader(reader, entry, shape, var.get_value().dtype)
    return jax.make_array_from_callback(shape, _sharding(var, mesh), region)


def _load_quantized(reader, entry: Entry, node, mesh):
    """A quantised kernel's codes and scales (models/quant.py), quantised on the host from
    the slices each device's shard needs (_quantized_shard)."""
    kind = quant.kind_of(node["codes"].get_value().dtype)
    shape = quant.kernel_shape(kind, tuple(node["codes"].get_value().shape))
    region = _region_reader(reader, entry, shape, np.float32)
    done = {}  # region read -> (codes, scales): shards that need the same rows (the codes and
    # scales of one device; every fsdp shard of an int8 kernel's codes) read and quantise once

    def quantized(index):
        key = tuple((sl.start, sl.stop, sl.step) for sl in index)
        if key not in done:
            done[key] = quant.quantize(kind, region(index))
        return done[key]

    for name in ("codes", "scale"):
        var = node[name]
        stored = tuple(var.get_value().shape)
        shard = functools.partial(_quantized_shard, kind, name, shape[-2], stored[-2], quantized)
        var.set_value(jax.make_array_from_callback(stored, _sharding(var, mesh), shard))


def _quantized_shard(kind, name, d_in, rows, quantized, index):
    """One shard (index: slices over the stored codes or scales, `rows` rows along the input
    axis) of a kernel with d_in inputs: its output channels and, for nf4, the whole 64-input
    blocks around its rows are read and quantised (int8's per-channel scales need them all)."""
    lo, hi, _ = index[-2].indices(rows)
    per_row = 1 if kind == "int8" else 2 if name == "codes" else quant.NF4_BLOCK  # inputs
    a, b = 0, d_in  # the kernel rows (inputs) to quantise
    if kind == "nf4":
        a = lo * per_row // quant.NF4_BLOCK * quant.NF4_BLOCK
        b = -(-hi * per_row // quant.NF4_BLOCK) * quant.NF4_BLOCK
    codes, scales = quantized((*index[:-2], slice(a, b), index[-1]))
    out = scales if name == "scale" else codes
    first = a // per_row if kind == "nf4" else 0
    return out[..., lo - first : hi - first, :]


def _region_reader(reader, entry: Entry, shape, dtype):
    """After checking the HF shapes against `shape` (the variable's, stacked axes first):
    region(index) -> the host array of that index (a tuple of slices), read from the
    checkpoint tensor by tensor, in `dtype`."""
    keys = hf_keys(entry)
    n = len(entry.stack)
    want = shape[n:]
    want_hf = want[::-1] if entry.transpose else want
    for k in keys:
        got = list(reader.shape(k))
        if entry.rows is not None:  # a part of a fused tensor (rows checked by _check_fused)
            got[0] = want_hf[0]
        if tuple(got) != tuple(want_hf):
            raise UserError(
                f"tensor {k!r} has shape {list(got)}, the config implies {list(want_hf)}",
                where=reader.file_of(k),
                hint="config.json and the weights do not match",
            )

    def read(k, index):  # index: tuple of slices over the jaxsft (un-stacked) shape
        hf_index = index[::-1] if entry.transpose else index
        if entry.rows is not None:  # shift the row slice into the part's rows
            lo, hi = entry.rows
            first = range(lo, hi)[hf_index[0]]
            hf_index = (slice(first.start, first.stop), *hf_index[1:])
        arr = reader.slice(k, hf_index)
        return (arr.T if entry.transpose else arr).astype(dtype)

    def callback(index):
        if not entry.stacked:
            return read(keys[0], index)
        ranges = [range(*sl.indices(size)) for sl, size in zip(index, entry.stack, strict=False)]
        out = None
        for local in itertools.product(*(range(len(r)) for r in ranges)):
            where = tuple(r[j] for r, j in zip(ranges, local, strict=True))
            a = read(entry.key(where), index[n:])
            if out is None:
                out = np.empty((*map(len, ranges), *a.shape), dtype)
            out[local] = a
        return out

    return callback


def _init_adapter(rng: np.random.Generator, path, var, mesh):
    """lora_a ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform(a=sqrt(5))), lora_b = 0.
    Drawn on the host from a seeded generator, so every host builds the same values."""
    shape, dtype = var.get_value().shape, var.get_value().dtype
    if str(path[-1]).endswith("lora_b"):  # lora_b, or an expert's NAME_lora_b
        full = np.zeros(shape, dtype)
    else:
        bound = 1.0 / np.sqrt(shape[-2])  # fan-in of lora_a [L, in, r] or [L, E, in, r]
        full = rng.uniform(-bound, bound, shape).astype(dtype)
    return jax.make_array_from_callback(shape, _sharding(var, mesh), lambda idx: full[idx])


class SafetensorsReader(contextlib.AbstractContextManager):
    """All tensors of a checkpoint directory (single file or sharded with an index)."""

    def __init__(self, path: str):
        self.path = path
        files = self._files(path)
        index = os.path.join(path, "model.safetensors.index.json")
        # Where a missing key is reported: the index, or the single weights file.
        self.source = index if os.path.isfile(index) else files[0] if len(files) == 1 else path
        self._stack = contextlib.ExitStack()
        self._handles = {}
        self._where = {}
        for f in files:
            try:
                h = self._stack.enter_context(safe_open(f, framework="np"))
            except Exception as e:  # noqa: BLE001 - corrupt file: tell the user which one
                self._stack.close()
                raise UserError(f"cannot read safetensors file: {e}", where=f) from None
            for k in h.keys():
                if k.endswith(IGNORED_SUFFIXES):
                    continue
                self._where[k] = f
                self._handles[k] = h
        self._used: set[str] = set()

    @staticmethod
    def _files(path: str) -> list[str]:
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(path, n) for n in names]
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise UserError(
                    f"weight file {missing[0]!r} listed in the index is missing", where=index
                )
            return files
        files = sorted(
            os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors")
        )
        if not files:
            bins = [n for n in os.listdir(path) if n.endswith((".bin", ".pt", ".pth"))]
            hint = (
                "convert the pickle weights to safetensors first; jaxsft never loads pickle"
                if bins
                else "model.path must hold *.safetensors weights"
            )
            raise UserError("no *.safetensors weights", where=path, hint=hint)
        return files

    def __exit__(self, *exc):
        self._stack.close()
        return False

    def keys(self) -> list[str]:
        return list(self._where)

    def dtype(self, key: str) -> str:
        """The safetensors dtype name ("F32", "BF16", ...) of a tensor."""
        return self._get(key).get_slice(key).get_dtype()

    def tensor(self, key: str) -> np.ndarray:
        return self._get(key).get_tensor(key)

    def file_of(self, key: str) -> str:
        return self._where.get(key, self.path)

    def _get(self, key: str):
        if key not in self._handles:
            raise UserError(
                f"missing tensor {key!r}",
                where=self.source,
                hint="the checkpoint does not match its config.json",
            )
        self._used.add(key)
        return self._handles[key]

    def shape(self, key: str) -> list[int]:
        return self._get(key).get_slice(key).get_shape()

    def slice(self, key: str, index) -> np.ndarray:
        return self._get(key).get_slice(key)[tuple(index)]

    def check_all_used(self, optional=("lm_head.weight",)):
        """Every tensor of the checkpoint was read, except `optional` ones (an lm_head a
        tied config does not use, carried tensors)."""
        extra = sorted(set(self._where) - self._used - set(optional))
        if extra:
            raise UserError(
                f"unexpected tensor {extra[0]!r} ({len(extra)} unused in all)",
                where=self.file_of(extra[0]),
                hint="the checkpoint has weights this architecture does not use",
            )


def hf_tensors(state, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray, Entry]]:
    """(HF key, host array in HF layout, entry) for every tensor of the table, one at a time;
    the parts of a fused tensor are concatenated (entry: its first part)."""
    return table_tensors(state, weight_table(cfg))


def table_tensors(state, table: list[Entry]) -> Iterator[tuple[str, np.ndarray, Entry]]:
    """hf_tensors over any table (state: nested dicts or an nnx State over its paths)."""
    for group in tensor_groups(table):
        values = [_variable(state, e.path) for e in group]
        values = [v.get_value() if isinstance(v, nnx.Variable) else v for v in values]
        first = group[0]
        if first.stacked:
            for index in first.indices():
                yield first.key(index), _hf_layout([v[index] for v in values], group), first
        else:
            yield first.hf_key, _hf_layout(values, group), first


def tensor_groups(table: list[Entry]) -> list[list[Entry]]:
    """The table's entries grouped by HF tensor: one entry, or the parts of a fused tensor."""
    groups: list[list[Entry]] = []
    for entry in table:
        if groups and entry.rows is not None and groups[-1][0].hf_key == entry.hf_key:
            groups[-1].append(entry)
        else:
            groups.append([entry])
    return groups


def _hf_layout(values, group: list[Entry]) -> np.ndarray:
    arrays = [np.asarray(jax.device_get(v)) for v in values]
    arrays = [a.T if e.transpose else a for a, e in zip(arrays, group, strict=True)]
    if len(arrays) == 1:
        return arrays[0]
    shape = (sum(a.shape[0] for a in arrays), *arrays[0].shape[1:])
    if all(a.size == 0 or not any(a.strides) for a in arrays):  # planning: shapes only
        return np.broadcast_to(np.zeros((), arrays[0].dtype), shape)
    return np.concatenate(arrays, axis=0)
