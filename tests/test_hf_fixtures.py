"""The tiny HF checkpoints load in transformers and really carry the quirk each one is for,
strongly enough that a model ignoring the quirk fails the 1e-4 parity tolerance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hf_fixtures import FAMILIES, MISTRAL_WINDOW, VOCAB, hf_logits, hf_model
from safetensors import safe_open

T = 24
# A quirk must move the logits by more than this share of their scale: far above the fp32
# (1e-4) and bf16 (3e-2) parity tolerances, so a model ignoring it fails either test.
QUIRK_EFFECT = 0.1


def _ids(seed=0, length=T):
    return np.random.RandomState(seed).randint(3, VOCAB, (1, length))


def _config(path) -> dict:
    return json.loads((path / "config.json").read_text())


def _keys(path) -> set[str]:
    keys = set()
    for f in path.glob("*.safetensors"):
        with safe_open(f, "np") as sf:
            keys |= set(sf.keys())
    return keys


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_with_random_norms(hf_checkpoints, family):
    path = hf_checkpoints[family]
    model = hf_model(path)
    logits = hf_logits(path, _ids())
    assert logits.shape == (1, T, VOCAB) and np.isfinite(logits).all()
    norms = {n: p for n, p in model.named_parameters() if n.endswith("norm.weight")}
    assert len(norms) >= 2 * model.config.num_hidden_layers + 1
    for name, p in norms.items():
        assert not torch.allclose(p, torch.ones_like(p)), f"{family}: {name} is all ones"
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert p.abs().min() > 0, f"{family}: {name} has zeros"


def test_llama_quirks(hf_checkpoints):
    c = _config(hf_checkpoints["llama"])
    assert c["num_key_value_heads"] < c["num_attention_heads"]  # GQA
    assert c["rope_parameters"]["rope_type"] == "llama3"
    assert "lm_head.weight" in _keys(hf_checkpoints["llama"])
    assert "lm_head.weight" not in _keys(hf_checkpoints["llama_tied"])
    assert _config(hf_checkpoints["llama_tied"])["tie_word_embeddings"] is True


def test_llama3_scaling_matters(hf_checkpoints):
    """The llama3 frequencies differ from unscaled ones and change the logits at T=24."""
    path = hf_checkpoints["llama"]
    model = hf_model(path)
    rotary = model.model.rotary_emb
    scaled = rotary.inv_freq.clone()
    default = rotary.compute_default_rope_parameters(model.config)[0]
    assert (scaled < default * 0.9).sum() >= 3  # several frequencies are really scaled
    ids = _ids()
    ref = hf_logits(path, ids)
    try:
        rotary.inv_freq.copy_(default)
        unscaled = hf_logits(path, ids)
    finally:
        rotary.inv_freq.copy_(scaled)
    assert _rel(unscaled, ref) > QUIRK_EFFECT  # measured 0.34


def test_qwen2_quirks(hf_checkpoints):
    path = hf_checkpoints["qwen2"]
    c = _config(path)
    assert c["tie_word_embeddings"] is True and "lm_head.weight" not in _keys(path)
    # The published Qwen2.5 style: a window is given but use_sliding_window is false.
    assert c["sliding_window"] == MISTRAL_WINDOW and c["use_sliding_window"] is False
    model = hf_model(path)
    assert model.config.sliding_window is None
    assert all(t == "full_attention" for t in model.config.layer_types)
    assert model.model.layers[0].self_attn.q_proj.bias is not None


def test_qwen3_quirks(hf_checkpoints):
    path = hf_checkpoints["qwen3"]
    c = _config(path)
    assert c["head_dim"] * c["num_attention_heads"] != c["hidden_size"]
    keys = _keys(path)
    assert "model.layers.0.self_attn.q_norm.weight" in keys
    assert "model.layers.0.self_attn.q_proj.bias" not in keys


def test_mistral_window_matters(hf_checkpoints):
    path = hf_checkpoints["mistral"]
    model = hf_model(path)
    assert model.config.sliding_window == MISTRAL_WINDOW < T
    ids = _ids()
    ref = hf_logits(path, ids)
    try:
        model.config.sliding_window = None
        full = hf_logits(path, ids)
    finally:
        model.config.sliding_window = MISTRAL_WINDOW
    np.testing.assert_array_equal(full[:, :MISTRAL_WINDOW], ref[:, :MISTRAL_WINDOW])
    assert _rel(full, ref) > QUIRK_EFFECT  # measured 1.16


def test_sharded_bf16(hf_checkpoints):
    path = hf_checkpoints["llama_sharded_bf16"]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 3 and all((path / f).exists() for f in files)
    assert not (path / "model.safetensors").exists()
    for f in files:
        with safe_open(path / f, "pt") as sf:
            for k in sf.keys():
                assert sf.get_tensor(k).dtype == torch.bfloat16


def test_4x_config(hf_checkpoints):
    c = _config(hf_checkpoints["llama_4x_config"])
    assert "rope_parameters" not in c and "head_dim" not in c
    assert c["rope_theta"] == 500000.0 and c["rope_scaling"]["rope_type"] == "llama3"
    model = hf_model(hf_checkpoints["llama_4x_config"])
    assert model.config.rope_parameters["rope_type"] == "llama3"
    assert model.config.rope_parameters["rope_theta"] == 500000.0
