"""QLoRA (model.quantize = "int8" | "nf4"): quantise/dequantise error bounds, the streamed
import quantises what it reads (and shards the codes like the kernel), a QLoRA run learns the
demo task as LoRA does, the merged export equals the full-precision base + adapter (never the
dequantised base), the memory of an 8B-shaped QLoRA step against bf16 LoRA, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_utils import REPO, fake_devices_env, result_of
from safetensors import safe_open
from test_train import load_config, trainer_for

from jaxsft.models import quant

pytestmark = pytest.mark.filterwarnings("ignore")

# The largest gap between neighbouring NF4 values (between 0.7230 and 1.0): rounding to the
# nearest value is off by at most half of it, times the block's absmax.
NF4_MAX_GAP = float(np.diff(quant.NF4).max())


def weights(kind: str, shape=(512, 192), seed=0) -> np.ndarray:
    """'normal': N(0, 0.02); 'real': heavy-tailed (Student t, 3 dof) with a few outlier input
    rows, as trained LLM projections look."""
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return (0.02 * rng.normal(size=shape)).astype(np.float32)
    w = 0.01 * rng.standard_t(3, size=shape)
    w[rng.choice(shape[0], 4, replace=False)] *= 20.0  # outlier features
    return w.astype(np.float32)


@pytest.mark.parametrize("dist", ["normal", "real"])
def test_int8_error_bound(dist):
    """int8: |w - dequant| <= absmax of the output channel / 254 (half a step), everywhere."""
    w = weights(dist)
    codes, scale = quant.quantize("int8", w)
    assert codes.dtype == np.int8 and scale.shape == (1, w.shape[1])
    err = np.abs(np.asarray(quant.dequantize("int8", codes, scale)) - w)
    bound = np.abs(w).max(axis=0, keepdims=True) / 254.0
    assert (err <= bound * (1 + 1e-5) + 1e-12).all()
    rel = np.sqrt((err**2).mean() / (w**2).mean())
    assert rel < {"normal": 0.01, "real": 0.05}[dist], rel  # measured: 0.0075, 0.039


@pytest.mark.parametrize("dist", ["normal", "real"])
def test_nf4_error_bound(dist):
    """nf4: |w - dequant| <= absmax of the 64-block x max NF4 gap / 2 (0.152 absmax); the
    codes are the nearest NF4 values (brute force), packed two a byte."""
    w = weights(dist)
    codes, scale = quant.quantize("nf4", w)
    assert codes.dtype == np.uint8 and codes.shape == (w.shape[0] // 2, w.shape[1])
    assert scale.shape == (w.shape[0] // 64, w.shape[1]) and scale.dtype == np.float32
    deq = np.asarray(quant.dequantize("nf4", codes, scale))
    absmax = np.repeat(np.abs(w).reshape(-1, 64, w.shape[1]).max(axis=1), 64, axis=0)
    err = np.abs(deq - w)
    assert (err <= absmax * NF4_MAX_GAP / 2 * (1 + 1e-5)).all()
    # nearest value: brute force over the 16 values (ties aside: none in random floats)
    normed = w / absmax
    nearest = quant.NF4[np.abs(normed[..., None] - quant.NF4).argmin(-1)] * absmax
    np.testing.assert_allclose(deq, nearest, rtol=1e-6, atol=1e-9)
    rel = np.sqrt((err**2).mean() / (w**2).mean())
    assert rel < {"normal": 0.12, "real": 0.2}[dist], rel  # measured: 0.092, 0.129


def test_nf4_exact_values_and_zero_blocks():
    """NF4 values times a block's absmax come back exactly; an all-zero block stays zero."""
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, (128, 8))
    codes[::64] = 15  # every block holds 1.0 x its absmax
    absmax = rng.uniform(0.01, 1.0, (2, 8)).astype(np.float32)
    w = quant.NF4[codes] * np.repeat(absmax, 64, axis=0)
    w[64:, 3] = 0.0
    q, scale = quant.quantize("nf4", w)
    np.testing.assert_array_equal(np.asarray(quant.dequantize("nf4", q, scale)), w)
    assert scale[1, 3] == 0.0


@pytest.mark.parametrize("kind", quant.KINDS)
def test_qmatmul_value_and_gradient(kind):
    """qmatmul = x @ dequant(W); d/dx = g @ dequant(W)^T; no gradient reaches the codes."""
    w = weights("normal", (128, 48))
    codes, scale = quant.quantize(kind, w)
    deq = np.asarray(quant.dequantize(kind, codes, scale))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 128)), jnp.float32)
    y = jax.jit(quant.qmatmul, static_argnums=(0, 4))(kind, x, codes, scale, jnp.float32)
    np.testing.assert_allclose(y, x @ deq, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda x: (quant.qmatmul(kind, x, codes, scale, jnp.float32) ** 2).sum())(x)
    np.testing.assert_allclose(g, 2 * (x @ deq) @ deq.T, rtol=1e-4, atol=1e-4)
    gs = jax.grad(lambda s: quant.qmatmul(kind, x, codes, s, jnp.float32).sum())(scale)
    assert not np.asarray(gs).any()  # frozen: a zero cotangent
    yb = quant.qmatmul(kind, x.astype(jnp.bfloat16), codes, scale, jnp.bfloat16)
    assert yb.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- import


SHARDED_SCRIPT = r"""
import json, sys
import jax, numpy as np
from jaxsft.hf_io import load_hf
from jaxsft.models import quant
from jaxsft.models.lora import LoraConfig
from jaxsft.sharding import make_mesh
assert jax.device_count() == 8
path = sys.argv[1]
mesh = make_mesh(1, 4, 2)
full, _ = load_hf(path, "float32", mesh=mesh)
out = {}
for kind in quant.KINDS:
    model, _ = load_hf(path, "float32", mesh=mesh, lora=LoraConfig(rank=4), quantize=kind)
    res = {}
    for proj in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        a, b = proj.split(".")
        qk = getattr(getattr(model.layers, a), b).kernel
        w = np.asarray(getattr(getattr(full.layers, a), b).kernel[...])
        codes, scale = quant.quantize(kind, w)
        res[proj] = {
            "codes_equal": bool(np.array_equal(np.asarray(qk.codes[...]), codes)),
            "scale_equal": bool(np.allclose(np.asarray(qk.scale[...]), scale, rtol=1e-6, atol=0)),
            "codes_spec": str(qk.codes[...].sharding.spec),
            "kernel_spec": str(getattr(getattr(full.layers, a), b).kernel[...].sharding.spec),
        }
    ids = np.arange(16, dtype=np.int32)[None]
    res["logits_finite"] = bool(np.isfinite(np.asarray(model(ids))).all())
    out[kind] = res
# MoE with the experts split over mesh.expert (shard_map, tokens exchanged): the same logits
# and adapter gradients as on one device.
from flax import nnx
from jaxsft.models.lora import LoRAParam
def run(model, mesh):
    graphdef, params, frozen = nnx.split(model, LoRAParam, ...)
    params = jax.tree.map(lambda x: x + 0.01, params)
    def loss(p):
        return nnx.merge(graphdef, p, frozen)(ids).std()
    with jax.set_mesh(mesh):
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), [np.asarray(g) for g in jax.tree.leaves(grads)]
ids = np.random.default_rng(0).integers(0, 128, (8, 12)).astype(np.int32)
moe = sys.argv[2]
one = make_mesh(1, 1, 1, devices=jax.devices()[:1])
ep = make_mesh(1, 2, 2, expert=2)
a = run(load_hf(moe, "float32", mesh=one, lora=LoraConfig(4), quantize="nf4")[0], one)
b = run(load_hf(moe, "float32", mesh=ep, lora=LoraConfig(4), quantize="nf4")[0], ep)
out["moe_expert_parallel"] = {
    "loss": abs(a[0] - b[0]) / abs(a[0]),
    "grads": max(float(np.abs(x - y).max() / np.abs(x).max()) for x, y in zip(a[1], b[1])),
}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_import_quantizes_each_shard(demo_assets, moe_dir):
    """On 8 fake devices (fsdp 4 x tensor 2): the streamed import's codes and scales equal the
    quantisation of the whole tensor, and the codes shard over the kernel's logical axes; an
    nf4 MoE with its experts split over mesh.expert = 2 gives the one-device loss and adapter
    gradients (slow: a subprocess, ~40 s)."""
    path = os.path.join(demo_assets, "model")
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT, path, moe_dir],
        env=fake_devices_env(8),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = result_of(proc.stdout)
    moe = result.pop("moe_expert_parallel")
    assert moe["loss"] < 1e-5 and moe["grads"] < 1e-4, moe
    for kind, res in result.items():
        assert res.pop("logits_finite"), kind
        for proj, r in res.items():
            assert r["codes_equal"] and r["scale_equal"], (kind, proj, r)
            # the kernel's layout (layers, fsdp over embed, tensor over heads/mlp)
            assert r["codes_spec"] == r["kernel_spec"], (kind, proj, r)
            assert "fsdp" in r["codes_spec"] and "tensor" in r["codes_spec"], r


# A tiny Qwen3-MoE whose every quantised input size is a multiple of 64 (nf4 blocks).
TINY_MOE = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "hidden_act": "silu",
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """TINY_MOE with random weights (written from the weight table: no torch)."""
    from safetensors.numpy import save_file

    from jaxsft.hf_io import hf_keys, model_shapes, weight_table
    from jaxsft.models.config import ModelConfig

    d = tmp_path_factory.mktemp("tiny_moe")
    (d / "config.json").write_text(json.dumps(TINY_MOE))
    cfg, shapes = ModelConfig.from_hf(str(d)), model_shapes(str(d))
    rng = np.random.default_rng(0)
    tensors = {}
    for e in weight_table(cfg):
        shape = shapes[".".join(e.path)].shape[len(e.stack) :]
        for k in hf_keys(e):
            hf_shape = shape[::-1] if e.transpose else shape
            w = np.ones(hf_shape) if "norm" in k else 0.05 * rng.normal(size=hf_shape)
            tensors[k] = w.astype(np.float32)
    save_file(tensors, str(d / "model.safetensors"))
    return str(d)


def test_grouped_qmatmul_gradient():
    """The experts' grouped matmul on quantised stacks: the value and d/dx of the grouped
    matmul over the dequantised stack; no gradient to codes or scales."""
    from jaxsft.models import moe

    rng = np.random.default_rng(3)
    w = (0.05 * rng.normal(size=(4, 64, 32))).astype(np.float32)
    x = jnp.asarray(rng.normal(size=(10, 64)), jnp.float32)
    sizes = jnp.asarray([3, 0, 5, 2], jnp.int32)

    @jax.jit
    def value_and_grad(x, w):
        return jax.value_and_grad(lambda x: (moe._matmul(x, w, sizes) ** 2).sum())(x)

    for kind in quant.KINDS:
        q = quant.Quantized(*quant.quantize(kind, w), kind)
        deq = quant.dequantize(kind, q.codes, q.scale)
        (v, g), (v_want, g_want) = value_and_grad(x, q), value_and_grad(x, deq)
        np.testing.assert_allclose(v, v_want, rtol=1e-6)
        np.testing.assert_allclose(g, g_want, rtol=1e-5, atol=1e-6)
        frozen = jax.jit(
            jax.grad(lambda s, q=q: moe._matmul(x, q.__class__(q.codes, s, q.kind), sizes).sum())
        )
        assert not np.asarray(frozen(q.scale)).any()


def logits(model, ids):
    """model(ids), jitted (the MoE layers' tiled matmuls are slow op by op)."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s)(ids))(state))


def dequantized_twin(full, model):
    """`full` with each kernel that `model` stores quantised replaced by its dequantised value."""
    from flax import nnx

    for path, codes in nnx.to_flat_state(nnx.state(model, quant.QuantParam)):
        if path[-1] != "codes":
            continue
        owner_q, owner_f = model, full
        for p in path[:-2]:
            owner_q, owner_f = getattr(owner_q, p), getattr(owner_f, p)
        k = getattr(owner_q, path[-2])
        deq = quant.dequantize(k.kind, codes[...], k.scale[...], jnp.float32)
        getattr(owner_f, path[-2]).set_value(deq)
    return full


@pytest.mark.parametrize("kind", ["int8", pytest.param("nf4", marks=pytest.mark.slow)])
def test_moe_experts_quantized(moe_dir, kind):
    """Routed expert stacks [L, E, in, out] and the attention kernels of an MoE model are
    quantised as read (per expert and channel/block); the model computes exactly what the
    full-precision model with the dequantised kernels does, and (nf4, slow: ~25 s of
    compiles) every adapter, the experts' included, gets a gradient through them."""
    from flax import nnx

    from jaxsft.hf_io import load_hf
    from jaxsft.models.lora import LoraConfig, LoRAParam

    lora = LoraConfig(rank=4)
    full, _ = load_hf(moe_dir, "float32", lora=lora)
    model, _ = load_hf(moe_dir, "float32", lora=lora, quantize=kind)
    experts = model.layers.mlp.experts.down_proj
    codes, scale = quant.quantize(kind, np.asarray(full.layers.mlp.experts.down_proj[...]))
    np.testing.assert_array_equal(np.asarray(experts.codes[...]), codes)
    np.testing.assert_allclose(np.asarray(experts.scale[...]), scale, rtol=1e-6)
    ids = np.random.default_rng(0).integers(0, 128, (2, 12)).astype(np.int32)
    want = logits(dequantized_twin(full, model), ids)
    np.testing.assert_allclose(logits(model, ids), want, rtol=1e-4, atol=1e-5)
    if kind == "int8":  # the gradient path is the same for both (and unit-tested above)
        return
    graphdef, params, frozen = nnx.split(model, LoRAParam, ...)
    for _, var in nnx.to_flat_state(params):  # B != 0, so every adapter gets a gradient
        var.set_value(jnp.full_like(var[...], 0.01))
    grads = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p, frozen)(ids).std()))(params)
    for path, g in nnx.to_flat_state(grads):
        assert np.abs(np.asarray(g[...])).max() > 0, path


# ----------------------------------------------------------------------------- training

STEPS = 20
TRAIN = [
    "--config.lora.rank=8",
    "--config.lora.alpha=16",
    "--config.train.learning_rate=1e-2",
    "--config.train.warmup_ratio=0",
    f"--config.train.max_steps={STEPS}",
]


def train(assets, run_dir, quantize: str):
    """STEPS steps over the demo's training stream; (trainer, losses, config)."""
    from jaxsft.data import pipeline
    from jaxsft.tokenizer import load_tokenizer

    config = load_config(
        assets, f"--config.run_dir={run_dir}", f"--config.model.quantize={quantize}", *TRAIN
    )
    data = pipeline.build_datasets(config, load_tokenizer(config.model.path))
    batches = pipeline.train_iterator(data, config, process_index=0, process_count=1)
    trainer = trainer_for(config, STEPS)
    losses = []
    with jax.set_mesh(trainer.mesh):
        for _ in range(STEPS):
            batch = jax.device_put(next(batches), trainer.batch_sharding)
            trainer.state, m = trainer.train_step(trainer.state, trainer.frozen, trainer.ref, batch)
            losses.append(float(m["loss"]))
    return trainer, losses, config


@pytest.fixture(scope="module")
def qlora_run(demo_assets, tmp_path_factory):
    return train(demo_assets, tmp_path_factory.mktemp("qlora") / "run", "nf4")


def test_qlora_learns_demo(qlora_run):
    """An nf4 QLoRA run (rank 8, 20 steps over the demo's stream) lowers the loss by more than
    a quarter (measured 5.77 -> ~3.9). Only the adapters train: the codes sit in the frozen
    partition."""
    from flax import nnx

    from jaxsft.models.lora import LoRAParam

    trainer, losses, _ = qlora_run
    assert any(x.dtype == jnp.uint8 for x in jax.tree.leaves(trainer.frozen))
    params = nnx.to_flat_state(trainer.state["params"])
    assert params and all(isinstance(v, LoRAParam) for _, v in params)
    assert np.mean(losses[-5:]) < 0.75 * losses[0], losses


@pytest.mark.slow
def test_qlora_tracks_lora(demo_assets, qlora_run, tmp_path):
    """The same run on the unquantised base (LoRA): the QLoRA loss of the last 5 steps is
    within 3% of LoRA's (measured: within 1%)."""
    _, q_losses, _ = qlora_run
    _, l_losses, _ = train(demo_assets, tmp_path / "lora", "")
    assert abs(np.mean(q_losses[-5:]) / np.mean(l_losses[-5:]) - 1) < 0.03, (q_losses, l_losses)


def test_merged_export_is_full_precision_base_plus_adapter(qlora_run, tmp_path):
    """The merged export of the QLoRA run = the float32 base of model.path + scale * A @ B of
    the trained adapters (max |diff| <= 1e-6, float32 rounding of the merge), not the
    dequantised base; the PEFT export checks against the same full-precision model."""
    from jaxsft.export import export_run
    from jaxsft.hf_io import hf_keys, weight_table

    trainer, _, config = qlora_run
    model = trainer.model()
    out = tmp_path / "export"
    dirs = export_run(
        model, trainer.model_cfg, trainer.lora_cfg, config, fmt="both", out=out, dtype="float32"
    )
    assert set(dirs) == {"merged", "peft"}
    scale = trainer.lora_cfg.scale
    base_dir = config.model.path
    with (
        safe_open(os.path.join(base_dir, "model.safetensors"), "np") as base,
        safe_open(str(dirs["merged"] / "model.safetensors"), "np") as merged,
    ):
        for entry in weight_table(trainer.model_cfg):
            owner = model
            for p in entry.path[:-1]:
                owner = getattr(owner, p)
            for i, key in enumerate(hf_keys(entry)):
                w = base.get_tensor(key).astype(np.float64)
                got = merged.get_tensor(key)
                if getattr(owner, "lora_a", None) is None:
                    np.testing.assert_array_equal(got, w.astype(np.float32), err_msg=key)
                    continue
                a = np.asarray(owner.lora_a[...][i], np.float64)
                b = np.asarray(owner.lora_b[...][i], np.float64)
                want = w + scale * (a @ b).T
                assert np.abs(got - want).max() <= 1e-6, key
                k = owner.kernel
                deq = np.asarray(quant.dequantize(k.kind, k.codes[...][i], k.scale[...][i])).T
                assert np.abs(got - (deq + scale * (a @ b).T)).max() > 1e-4, key  # not deq.
    cfg = json.loads((dirs["peft"] / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == base_dir


@pytest.mark.slow
def test_cli_run_and_reexport(demo_assets, tmp_path):
    """python -m jaxsft.main with model.quantize=nf4 trains, saves and exports both formats at
    the end (each self-checked against the full-precision base + adapters); then
    python -m jaxsft.export restores the checkpoint (the base quantised again on load) and
    writes the same merged weights."""
    from train_utils import run_main

    run_dir = tmp_path / "run"
    overrides = [
        "--config.model.quantize=nf4",
        "--config.lora.rank=4",
        "--config.train.max_steps=3",
        "--config.train.save_every=3",
        "--config.export.format=both",
        "--config.export.dtype=float32",
    ]
    run_main(demo_assets, str(run_dir), overrides)
    assert (run_dir / "hf" / "model.safetensors").is_file()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    out = tmp_path / "again"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxsft.export", "--run-dir", str(run_dir), "--out", str(out)],
        env={**fake_devices_env(1), "JAXSFT_DEMO_ASSETS": demo_assets},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (
        safe_open(str(run_dir / "hf" / "model.safetensors"), "np") as a,
        safe_open(str(out / "hf" / "model.safetensors"), "np") as b,
    ):
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            np.testing.assert_array_equal(a.get_tensor(k), b.get_tensor(k), err_msg=k)


# ----------------------------------------------------------------------------- memory

# Llama-3.1-8B's config.json (shapes only: no weights are read for a plan).
LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}
# The 7 projections of a layer: 4096 x (4096 + 1024 + 1024 + 4096) + 3 x 4096 x 14336.
PROJ_PARAMS = 32 * (4096 * 10240 + 3 * 4096 * 14336)


@pytest.fixture(scope="module")
def run_8b(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama8b_config_only")
    (d / "config.json").write_text(json.dumps(LLAMA_8B))
    run = d / "run.py"
    run.write_text(
        "from jaxsft.configs import base\n"
        "def get_config():\n"
        "    c = base.get_config()\n"
        f"    c.model.path = {str(d)!r}\n"
        "    c.data.train = 'never_read.jsonl'\n"
        "    c.data.max_length = 64\n"
        "    c.train.batch_size = 1\n"
        "    c.train.loss_chunk = 64\n"
        "    c.lora.rank = 16\n"
        "    c.model.param_dtype = 'bfloat16'\n"
        "    c.export.format = 'none'\n"
        "    return c\n"
    )
    return str(run)


def setup_8b(run_py, quantize):
    from jaxsft import config as config_lib
    from jaxsft.plan_memory import abstract_setup
    from jaxsft.sharding import make_mesh

    config = config_lib.load(run_py, [f"--config.model.quantize={quantize}"])
    return abstract_setup(config, make_mesh(1, 1, 1, devices=jax.devices()[:1])), config


def test_8b_qlora_base_bytes(run_8b):
    """Abstract train state of Llama-3.1-8B (nothing allocated): nf4 holds the projections in
    4.5 bits a weight (0.28 of bf16: 4-bit codes + a float32 scale per 64), int8 in 8.03;
    with the bf16 embeddings and LM head the whole base is 0.375 (nf4) / 0.566 (int8)."""
    from jaxsft.models.quant import QuantParam
    from jaxsft.plan_memory import tree_bytes

    frozen = {q: setup_8b(run_8b, q)[0].frozen for q in ("", "int8", "nf4")}
    total = {q: tree_bytes(f) for q, f in frozen.items()}
    projs = {q: tree_bytes(f.filter(QuantParam)) for q, f in frozen.items() if q}
    assert projs["nf4"] == PROJ_PARAMS // 2 + PROJ_PARAMS // 64 * 4  # codes + float32 scales
    assert projs["nf4"] / (2 * PROJ_PARAMS) == pytest.approx(4.5 / 16)
    assert projs["int8"] / (2 * PROJ_PARAMS) == pytest.approx(0.5, abs=0.005)
    assert total["nf4"] / total[""] == pytest.approx(0.375, abs=0.005)
    assert total["int8"] / total[""] == pytest.approx(0.566, abs=0.005)


@pytest.mark.slow
def test_8b_qlora_compiled_step_arguments(run_8b):
    """The compiled train step (AOT, no weights) of 8B nf4 QLoRA vs bf16 LoRA: argument bytes
    5.85 GiB vs 15.19 GiB (0.385), and no dequantised copy of the base among the temporaries
    (qmatmul's backward recomputes the kernel). ~10 s a compile on 2 CPU cores."""
    from jaxsft.plan_memory import compile_train_step, memory_stats

    stats = {}
    for q in ("", "nf4"):
        setup, config = setup_8b(run_8b, q)
        stats[q] = memory_stats(compile_train_step(setup, config))
    ratio = stats["nf4"]["argument"] / stats[""]["argument"]
    assert 0.36 < ratio < 0.41, (ratio, stats)
    assert stats["nf4"]["temp"] < 0.5 * stats["nf4"]["argument"], stats


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.model.quantize=nf4"], "lora.rank is 0"),
        (["--config.model.quantize=fp4", "--config.lora.rank=4"], "model.quantize must be one of"),
    ],
)
def test_bad_quantize_config(demo_assets, tmp_path, overrides, message):
    from jaxsft.errors import UserError

    with pytest.raises(UserError, match=message) as e:
        load_config(demo_assets, f"--config.run_dir={tmp_path}", *overrides)
    assert e.value.exit_code == 2


def test_nf4_needs_whole_blocks():
    from jaxsft.errors import UserError
    from jaxsft.hf_io import abstract_model
    from jaxsft.models.config import ModelConfig

    cfg = ModelConfig.from_hf({**LLAMA_8B, "hidden_size": 96, "intermediate_size": 128})
    with pytest.raises(UserError, match="hidden_size = 96"):
        abstract_model(cfg, quantize="nf4")
    abstract_model(cfg, quantize="int8")  # per-channel scales: any shape


def test_cli_refuses_quantize_without_lora(demo_assets, tmp_path):
    """python -m jaxsft.main exits 2 with one message, nothing written."""
    from train_utils import run_main

    run_dir = tmp_path / "run"
    proc = run_main(demo_assets, str(run_dir), ["--config.model.quantize=int8"], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "lora.rank" in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists()
