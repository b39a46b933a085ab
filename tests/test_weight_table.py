"""The HF weight table itself: an entry stacked over two indices (layers x experts, as the MoE
checkpoints store `model.layers.{i}.mlp.experts.{j}.*`) is read into one [L, E, ...] variable,
slice by slice, and written back as the same per-expert tensors; fused parts (Phi) keep their
rows. Import and export use the one table."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxsft.errors import UserError
from jaxsft.hf_io import Entry, SafetensorsReader, _load_entry, hf_keys, table_tensors
from jaxsft.sharding import make_mesh

L, E, D_IN, D_OUT = 3, 4, 5, 6


def _var(shape, names):
    sds = jax.ShapeDtypeStruct(shape, jnp.float32)
    return SimpleNamespace(get_value=lambda: sds, get_metadata=lambda: {"out_sharding": names})


@pytest.fixture
def experts(tmp_path):
    w = np.random.default_rng(0).normal(size=(L, E, D_IN, D_OUT)).astype(np.float32)
    entry = Entry("model.layers.{i}.mlp.experts.{j}.up_proj.weight", ("up",), True, (L, E))
    tensors = {entry.key(ix): np.ascontiguousarray(w[ix].T) for ix in entry.indices()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return SimpleNamespace(w=w, entry=entry, tensors=tensors, path=str(tmp_path))


def test_two_index_stack_round_trip(experts):
    entry = experts.entry
    keys = hf_keys(entry)
    assert len(keys) == L * E and len(set(keys)) == L * E
    assert keys[:2] == [  # layer-major, as the checkpoints list them
        "model.layers.0.mlp.experts.0.up_proj.weight",
        "model.layers.0.mlp.experts.1.up_proj.weight",
    ]
    mesh = make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
    with SafetensorsReader(experts.path) as reader:
        got = _load_entry(reader, entry, _var(experts.w.shape, (None,) * 4), mesh)
        reader.check_all_used()
    np.testing.assert_array_equal(np.asarray(got), experts.w)
    back = list(table_tensors({"up": np.asarray(got)}, [entry]))
    assert [k for k, _, _ in back] == keys
    for k, a, _ in back:
        np.testing.assert_array_equal(a, experts.tensors[k])


def test_two_index_stack_reads_only_a_devices_slice(experts):
    """Each device's callback gets a slice over (layer, expert, ...): it must build exactly
    that block, reading per-expert tensors (here: experts 1..2 of layers 1..2, rows 2..4)."""
    captured = {}

    def fake_make_array(shape, sharding, callback):
        captured["block"] = callback((slice(1, 3), slice(1, 3), slice(2, 5), slice(None)))
        return None

    monkey = pytest.MonkeyPatch()
    monkey.setattr(jax, "make_array_from_callback", fake_make_array)
    try:
        mesh = make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
        with SafetensorsReader(experts.path) as reader:
            _load_entry(reader, experts.entry, _var(experts.w.shape, (None,) * 4), mesh)
    finally:
        monkey.undo()
    np.testing.assert_array_equal(captured["block"], experts.w[1:3, 1:3, 2:5])


def test_two_index_stack_wrong_shape(experts):
    """One expert tensor of the wrong shape is refused by key and file."""
    bad = dict(experts.tensors)
    key = experts.entry.key((2, 3))
    bad[key] = np.zeros((D_OUT, D_IN + 1), np.float32)
    save_file(bad, experts.path + "/model.safetensors")
    mesh = make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
    with SafetensorsReader(experts.path) as reader, pytest.raises(UserError) as e:
        _load_entry(reader, experts.entry, _var(experts.w.shape, (None,) * 4), mesh)
    assert key in str(e.value) and "model.safetensors" in str(e.value)
