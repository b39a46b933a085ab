"""Broken checkpoints are UserErrors naming the file and the key, never tracebacks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxsft
from jaxsft.errors import UserError

WEIGHTS = "model.safetensors"
MISSING_KEY = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture
def ckpt(hf_checkpoints, tmp_path):
    """A writable copy of the tiny llama checkpoint."""
    return shutil.copytree(hf_checkpoints["llama"], tmp_path / "llama")


def _edit_config(path, **changes):
    cfg_path = path / "config.json"
    c = json.loads(cfg_path.read_text())
    for k, v in changes.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    cfg_path.write_text(json.dumps(c))


def _edit_weights(path, edit):
    tensors = load_file(path / WEIGHTS)
    edit(tensors)
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})


def _load_error(path) -> str:
    with pytest.raises(UserError) as info:
        jaxsft.load_hf(path, dtype="float32")
    return str(info.value)


def test_no_config(ckpt):
    (ckpt / "config.json").unlink()
    msg = _load_error(ckpt)
    assert "config.json" in msg and str(ckpt) in msg, msg


def test_missing_directory(tmp_path):
    msg = _load_error(tmp_path / "nope")
    assert str(tmp_path / "nope") in msg, msg


def test_no_weights(ckpt):
    (ckpt / WEIGHTS).unlink()
    msg = _load_error(ckpt)
    assert str(ckpt) in msg and "safetensors" in msg, msg


def test_missing_tensor(ckpt):
    _edit_weights(ckpt, lambda t: t.pop(MISSING_KEY))
    msg = _load_error(ckpt)
    assert MISSING_KEY in msg and str(ckpt) in msg, msg


def test_wrong_shape(ckpt):
    key = "model.layers.0.self_attn.k_proj.weight"

    def edit(t):
        t[key] = np.zeros((t[key].shape[0] + 16, t[key].shape[1]), np.float32)

    _edit_weights(ckpt, edit)
    msg = _load_error(ckpt)
    assert key in msg and str(ckpt / WEIGHTS) in msg, msg
    assert "48" in msg and "32" in msg, f"shapes (got 48, config implies 32) not named: {msg}"


def test_unexpected_tensor(ckpt):
    key = "model.layers.0.mlp.extra_proj.weight"

    def edit(t):
        t[key] = np.zeros((4, 4), np.float32)

    _edit_weights(ckpt, edit)
    msg = _load_error(ckpt)
    assert key in msg and str(ckpt / WEIGHTS) in msg, msg


def test_rotary_inv_freq_is_ignored(ckpt):
    """Old checkpoints carry rotary_emb.inv_freq buffers: not weights, not an error."""

    def edit(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)

    _edit_weights(ckpt, edit)
    jaxsft.load_hf(ckpt, dtype="float32")


def test_missing_shard(hf_checkpoints, tmp_path):
    path = shutil.copytree(hf_checkpoints["llama_sharded_bf16"], tmp_path / "sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (path / shard).unlink()
    msg = _load_error(path)
    assert shard in msg and "model.safetensors.index.json" in msg, msg


def test_unknown_rope_type(ckpt):
    _edit_config(ckpt, rope_parameters={"rope_type": "bogus_rope", "rope_theta": 10000.0})
    msg = _load_error(ckpt)
    assert "config.json" in msg and "bogus_rope" in msg and "rope_type" in msg, msg


def test_unknown_rope_type_4x_style(ckpt):
    _edit_config(ckpt, rope_parameters=None, rope_theta=10000.0, rope_scaling={"type": "bogus"})
    msg = _load_error(ckpt)
    assert "config.json" in msg and "bogus" in msg, msg


@pytest.mark.parametrize("key", ["num_local_experts", "num_experts"])
def test_moe_config(ckpt, key):
    _edit_config(ckpt, **{key: 8, "num_experts_per_tok": 2})
    msg = _load_error(ckpt)
    assert "config.json" in msg and key in msg, msg


@pytest.mark.parametrize(
    "family,changes,needle",
    [
        ("qwen2_moe", {"mlp_only_layers": [0]}, "mlp_only_layers"),
        ("qwen2_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step"),
        ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
        ("mixtral", {"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ("qwen3_moe", {"model_type": "deepseek_v3"}, "deepseek_v3"),
    ],
)
def test_moe_variants_refused(hf_checkpoints, tmp_path, family, changes, needle):
    """MoE variants the decoder does not implement: interleaved dense layers, router jitter,
    more experts per token than experts, DeepSeek's MLA + grouped routing; exit 2 naming the
    key, before any weight is read."""
    path = shutil.copytree(hf_checkpoints[family], tmp_path / family)
    _edit_config(path, **changes)
    msg = _load_error(path)
    assert "config.json" in msg and needle in msg, msg


def test_unknown_model_type(ckpt):
    _edit_config(ckpt, model_type="falcon")
    msg = _load_error(ckpt)
    assert "config.json" in msg and "falcon" in msg and "model_type" in msg, msg


def test_missing_config_key(ckpt):
    _edit_config(ckpt, hidden_size=None)
    msg = _load_error(ckpt)
    assert "config.json" in msg and "hidden_size" in msg, msg


def test_bad_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    msg = _load_error(ckpt)
    assert "config.json" in msg, msg


def test_cli_exit_code(tmp_path):
    """Through run_cli: exit 2, one 'error: ...' message naming the file, no traceback."""
    empty = tmp_path / "empty_model"
    empty.mkdir()
    code = (
        "import sys, jaxsft; from jaxsft.errors import run_cli; "
        "run_cli(lambda: jaxsft.load_hf(sys.argv[1]))()"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAXSFT_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(empty)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and "config.json" in proc.stderr, proc.stderr


def test_unknown_activation(ckpt):
    """hidden_act is read: a checkpoint with an activation the decoder lacks is refused."""
    _edit_config(ckpt, hidden_act="relu2")
    msg = _load_error(ckpt)
    assert "config.json" in msg and "relu2" in msg and "hidden_act" in msg, msg


def test_gemma_refusals(hf_checkpoints, tmp_path):
    """An unknown hidden_activation, an embedding model, a multimodal Gemma 3 config without a
    text_config and a vision-only checkpoint are refused naming the file and the key, before
    any weight is read."""
    cases = [
        ({"hidden_activation": "quick_gelu"}, "hidden_activation"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({"model_type": "gemma3"}, "text_config"),
        ({"model_type": "siglip_vision_model"}, "siglip_vision_model"),
    ]
    for i, (changes, needle) in enumerate(cases):
        path = shutil.copytree(hf_checkpoints["gemma3"], tmp_path / f"g{i}")
        _edit_config(path, **changes)
        msg = _load_error(path)
        assert "config.json" in msg and needle in msg, msg
