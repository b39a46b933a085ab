"""Packing changes nothing but speed: a packed batch gives the same loss sums as the same
examples one per row, with the real decoder, chat rendering and packing code."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from jaxsft.demo import ensure_assets

    return ensure_assets(str(tmp_path_factory.mktemp("demo_assets")))


def test_packed_loss_equals_unpacked(assets):
    import jaxsft
    from jaxsft.data import packing
    from jaxsft.tokenizer import load_tokenizer
    from jaxsft.train.step import make_loss_fn

    tok = load_tokenizer(os.path.join(assets, "model"))
    with open(os.path.join(assets, "train.jsonl")) as f:
        rows = [json.loads(line) for _, line in zip(range(12), f, strict=False)]
    rendered = [jaxsft.data.render(tok, r) for r in rows]
    ids = [np.asarray(r["input_ids"], np.int32) for r in rendered]
    mask = [np.asarray(r["loss_mask"], np.int32) for r in rendered]
    lengths = [len(x) for x in ids]
    capacity = 64
    packed_rows = packing.pack_bfd(lengths, capacity)
    assert len(packed_rows) < len(rows)  # several examples share a row
    assert max(len(r) for r in packed_rows) >= 3
    packed = packing.build_rows(packed_rows, ids, mask, capacity, pad_id=tok.pad_token_id)
    single = packing.build_rows(
        packing.single_rows(range(len(rows))), ids, mask, capacity, pad_id=tok.pad_token_id
    )

    model, _ = jaxsft.load_hf(os.path.join(assets, "model"), dtype="float32")
    graphdef, params = nnx.split(model)
    loss_fn = jax.jit(make_loss_fn(graphdef, chunk=37))
    with jax.default_matmul_precision("highest"):
        _, sp = loss_fn(params, nnx.State({}), None, packed)
        _, su = loss_fn(params, nnx.State({}), None, single)
    assert float(sp["count"]) == float(su["count"]) == sum(int(m[1:].sum()) for m in mask)
    np.testing.assert_allclose(float(sp["loss_sum"]), float(su["loss_sum"]), rtol=1e-5)
    np.testing.assert_allclose(float(sp["correct"]), float(su["correct"]))
