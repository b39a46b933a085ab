"""LoRA on mixture-of-experts models: one adapter per routed expert, stacked [L, E, ...], and
the router trained in full with lora.train_router.

- the MoE layer with expert adapters equals a dense reference (every token through every
  expert, with W_e + scale A_e B_e) in float32;
- a few train steps move exactly the trainable partition (adapters, and the router with
  train_router), which survives a checkpoint round trip with its optimizer state;
- the merged export reloads in transformers with the trained model's logits, and the PEFT
  adapter (target_parameters on the fused experts, modules_to_save for the router) loads with
  PeftModel and equals the merged export; the export's self-check catches a wrong expert order.
"""

from __future__ import annotations

import dataclasses
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from test_export import BAD_LOAD, hf_causal_lm, load_quietly, rel_err, torch_logits  # noqa: E402

import jaxsft  # noqa: E402
from jaxsft import export  # noqa: E402
from jaxsft.checkpoint import Checkpointer, restore_params  # noqa: E402
from jaxsft.export import peft as peft_export  # noqa: E402
from jaxsft.export.check import ExportCheckError, float32_logits  # noqa: E402
from jaxsft.models import moe  # noqa: E402
from jaxsft.models.config import ModelConfig  # noqa: E402
from jaxsft.models.layers import ACTIVATIONS  # noqa: E402
from jaxsft.models.lora import LoraConfig, LoRAParam  # noqa: E402
from jaxsft.models.transformer import SparseMoE  # noqa: E402
from jaxsft.train import setup as setup_lib  # noqa: E402
from jaxsft.train.step import make_eval_step, make_loss_fn, make_train_step  # noqa: E402

FP32_TOL = 1e-4
# Per family: the targets (Mixtral by its checkpoint names w1/w3/w2; Qwen2-MoE's gate_proj and
# down_proj adapt the shared expert and the routed experts, gate without up: a rank-r
# gate_up_proj adapter; Qwen3-MoE experts only, rsLoRA: rank 2r with alpha_pattern).
LORAS = {
    "mixtral": LoraConfig(
        rank=2, alpha=4.0, targets=("q_proj", "w1", "w2", "w3"), train_router=True
    ),
    "qwen2_moe": LoraConfig(rank=2, alpha=8.0, targets=("q_proj", "gate_proj", "down_proj")),
    "qwen3_moe": LoraConfig(
        rank=2,
        alpha=4.0,
        rslora=True,
        targets=("gate_proj", "up_proj", "down_proj"),
        train_router=True,
    ),
}


def flat(state) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])  # Mixtral's: the export tests
def test_expert_adapters_equal_dense_reference(hf_checkpoints, family):
    """SparseMoE with random per-expert adapters = every token through every expert with
    W_e + scale A_e B_e, weighted by its routing weights (plus the same shared expert)."""
    cfg = ModelConfig.from_hf(hf_checkpoints[family])
    lora = LORAS[family]
    layer = SparseMoE(cfg, lora, jnp.float32, jnp.float32, nnx.Rngs(0))
    rs = np.random.RandomState(1)
    for _, var in nnx.to_flat_state(nnx.state(layer, LoRAParam)):
        var.set_value(jnp.asarray(rs.standard_normal(var.shape) * 0.1, jnp.float32))
    e = layer.experts
    assert e.gate_proj_lora_a.shape == (cfg.num_experts, cfg.hidden_size, lora.rank)
    assert e.down_proj_lora_b.shape == (cfg.num_experts, lora.rank, cfg.hidden_size)
    x = jnp.asarray(rs.standard_normal((2, 9, cfg.hidden_size)), jnp.float32)
    graphdef, state = nnx.split(layer)
    with jax.default_matmul_precision("highest"):
        y, _ = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
        flat_x = x.reshape(-1, cfg.hidden_size)
        routing = moe.route(layer.gate(flat_x), layer.k, layer.renormalize)
        w = {}
        for name in moe.PROJS:
            delta = 0.0
            if getattr(e, f"{name}_lora_a") is not None:
                a, b = getattr(e, f"{name}_lora_a")[...], getattr(e, f"{name}_lora_b")[...]
                delta = lora.scale * jnp.einsum("eir,ero->eio", a, b)
            w[name] = getattr(e, name)[...] + delta
        want = moe.dense_ffn(flat_x, routing, w, ACTIVATIONS[cfg.hidden_act]).reshape(x.shape)
        if layer.shared_expert is not None:
            want = want + jax.nn.sigmoid(layer.shared_expert_gate(x)) * layer.shared_expert(x)
        base = {n: getattr(e, n)[...] for n in moe.PROJS}
        base_ffn = moe.dense_ffn(flat_x, routing, base, ACTIVATIONS[cfg.hidden_act])
        lora_ffn = moe.dense_ffn(flat_x, routing, w, ACTIVATIONS[cfg.hidden_act])
    err = rel_err(np.asarray(y), np.asarray(want))[2]
    assert err < 1e-5, err
    assert rel_err(np.asarray(base_ffn), np.asarray(lora_ffn))[2] > 1e-2  # the adapters matter


def batch_of(vocab: int, seed: int = 0) -> dict:
    rs = np.random.RandomState(seed)
    return {
        "input_ids": rs.randint(0, vocab, (2, 16)).astype(np.int32),
        "loss_mask": np.ones((2, 16), np.int32),
        "segment_ids": np.ones((2, 16), np.int32),
        "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)),
    }


def train(graphdef, params, frozen, batch, steps: int):
    """A few jaxsft train steps (Adam, lr 1e-2) on one batch -> train state."""
    tx = optax.adam(1e-2)
    loss_fn = make_loss_fn(graphdef, chunk=16, lora=True)
    step = jax.jit(make_train_step(loss_fn, tx, lambda s: 1e-2, 1))
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": jnp.zeros((2,), jnp.uint32),
    }
    for _ in range(steps):
        state, _ = step(state, frozen, None, batch)
    return state


@pytest.mark.slow  # ~30 s of compiles
def test_train_moves_adapters_and_router_only(hf_checkpoints, tmp_path):
    targets = ("q_proj", "gate_proj", "up_proj", "down_proj")
    lora = LoraConfig(rank=2, alpha=4.0, targets=targets, train_router=True)
    model, _ = jaxsft.load_hf(hf_checkpoints["qwen2_moe"], dtype="float32", lora=lora)
    frozen_router = flat(
        setup_lib.split_trainable(model, dataclasses.replace(lora, train_router=False))[1]
    )
    assert "layers.mlp.gate.kernel" not in frozen_router  # the default: the router is frozen
    _, before, _ = setup_lib.split_trainable(model, lora)
    before = flat(before)
    assert before.keys() - frozen_router.keys() == {"layers.mlp.gate.kernel"}
    expected = {"layers.self_attn.q_proj"} | {
        f"layers.mlp.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")
    }
    names = {k.rsplit(".", 1)[0] for k in before if k.endswith(".lora_a")}
    experts = {k for k in before if k.startswith("layers.mlp.experts.")}
    assert names == expected
    assert experts == {f"layers.mlp.experts.{p}_lora_{ab}" for p in moe.PROJS for ab in "ab"}
    assert len(before) == 2 * len(expected) + len(experts) + 1
    graphdef, params, frozen = setup_lib.split_trainable(model, lora)
    batch = batch_of(model.cfg.vocab_size)
    # KL to the base: its reference is zero adapters and the router as loaded, so the model
    # before any update has KL 0 to it (zeros for the router would not)
    config = ml_collections.ConfigDict({"train": {"kl_to_base": 0.5}})
    ref = setup_lib.kl_reference(config, lora, params)
    assert flat(ref)["layers.mlp.gate.kernel"].any()
    kl_eval = jax.jit(make_eval_step(make_loss_fn(graphdef, chunk=16, kl_beta=0.5, lora=True)))
    assert abs(float(kl_eval(params, frozen, ref, batch)["kl_sum"])) < 1e-6
    state = train(graphdef, params, frozen, batch, steps=2)
    after = flat(state["params"])
    assert after.keys() == before.keys()
    for k in before:
        assert not np.allclose(after[k], before[k]), k  # every trainable leaf moved
    assert float(kl_eval(state["params"], frozen, ref, batch)["kl_sum"]) > 0
    # the optimizer state holds moments for the router too; a checkpoint keeps all of it
    moments = flat(state["opt_state"][0].mu)
    assert moments.keys() == before.keys()
    (tmp_path / "checkpoints").mkdir()
    ckpt = Checkpointer(str(tmp_path), use_async=False)
    ckpt.save(3, state, force=True)
    ckpt.close()
    zero = jax.tree.map(jnp.zeros_like, state)
    restored = Checkpointer(str(tmp_path), use_async=False).restore(3, zero)
    assert flat(restored["params"]).keys() == after.keys()
    assert all(np.array_equal(flat(restored["params"])[k], after[k]) for k in after)
    mu = flat(restored["opt_state"][0].mu)
    assert all(np.array_equal(mu[k], moments[k]) for k in moments)
    step_dir = tmp_path / "checkpoints" / "3" / "state"
    params = flat(restore_params(str(step_dir), zero["params"]))  # what the export reads
    assert all(np.array_equal(params[k], after[k]) for k in after)


@pytest.fixture(scope="module", params=list(LORAS))
def exported(request, hf_checkpoints, tmp_path_factory):
    """One family with its trainable partition (expert adapters, router) perturbed as
    training would move it (test_train_moves_adapters_and_router_only runs real steps),
    exported both ways."""
    family, lora = request.param, LORAS[request.param]
    root = tmp_path_factory.mktemp(f"moe_lora_{family}")
    source = hf_checkpoints[family]
    model, cfg = jaxsft.load_hf(source, dtype="float32", lora=lora)
    _, params, _ = setup_lib.split_trainable(model, lora)
    rs = np.random.RandomState(len(family))
    nnx.update(model, jax.tree.map(lambda x: x + 0.05 * rs.standard_normal(x.shape), params))
    ids = np.random.RandomState(7).randint(3, cfg.vocab_size, (2, 20)).astype(np.int32)
    merged = export.export_merged(model, cfg, root / "hf", tokenizer_dir=None)
    adapter = export.export_peft(model, cfg, lora, root / "adapter", base_model_path=source)
    return dict(
        family=family,
        lora=lora,
        model=model,
        cfg=cfg,
        source=source,
        merged=merged,
        adapter=adapter,
        ids=ids,
        logits=float32_logits(model, ids),
    )


def test_merged_export_reloads_in_transformers(exported, parity_record):
    (hf, info), msgs = load_quietly(
        lambda: hf_causal_lm(exported["merged"], output_loading_info=True)
    )
    assert all(not v for v in info.values()), info
    assert not [m for m in msgs if BAD_LOAD.search(m)], msgs
    got = torch_logits(hf.eval(), exported["ids"])
    err, scale, rel = rel_err(got, exported["logits"])
    key = f"moe_lora/{exported['family']}/merged"
    parity_record[key] = {"max_abs_err": err, "logit_scale": scale, "rel_err": rel, "tol": FP32_TOL}
    assert rel < FP32_TOL
    base = torch_logits(hf_causal_lm(exported["source"]).eval(), exported["ids"])
    assert rel_err(base, exported["logits"])[2] > 100 * FP32_TOL  # training moved the logits


def test_peft_adapter_loads_and_equals_merged(exported, parity_record):
    from peft import PeftModel

    lora, cfg = exported["lora"], exported["cfg"]
    config = json.loads((exported["adapter"] / "adapter_config.json").read_text())
    parts = {"gate_proj", "up_proj"} & lora.modules
    want_params = (["mlp.experts.down_proj"] if "down_proj" in lora.modules else []) + (
        ["mlp.experts.gate_up_proj"] if parts else []
    )
    assert config["target_parameters"] == want_params
    assert config["modules_to_save"] == (["mlp.gate"] if lora.train_router else None)
    if len(parts) == 2:
        assert config["rank_pattern"] == {"mlp.experts.gate_up_proj": 2 * lora.rank}
    keys = load_file(exported["adapter"] / "adapter_model.safetensors")
    a = keys["base_model.model.model.layers.0.mlp.experts.lora_A.weight"]
    assert a.shape == (cfg.num_experts * lora.rank, cfg.moe_intermediate_size)  # down: in = F

    base = hf_causal_lm(exported["source"])
    peft_model, msgs = load_quietly(lambda: PeftModel.from_pretrained(base, exported["adapter"]))
    assert not [m for m in msgs if BAD_LOAD.search(m)], msgs
    got = torch_logits(peft_model.eval(), exported["ids"])
    merged = torch_logits(hf_causal_lm(exported["merged"]).eval(), exported["ids"])
    err, scale, rel = rel_err(got, exported["logits"])
    key = f"moe_lora/{exported['family']}/peft"
    parity_record[key] = {"max_abs_err": err, "logit_scale": scale, "rel_err": rel, "tol": FP32_TOL}
    assert rel < FP32_TOL
    assert rel_err(got, merged)[2] < FP32_TOL


def test_self_check_catches_wrong_expert_order(exported, tmp_path):
    """An adapter whose experts' rows are rotated (a layout bug) fails the export self-check."""
    if exported["family"] != "qwen3_moe":
        pytest.skip("one family is enough")
    src = exported["adapter"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    E = exported["cfg"].num_experts
    for k, v in tensors.items():
        if ".experts." in k and "lora_A" in k:
            tensors[k] = np.roll(v.reshape(E, -1, v.shape[-1]), 1, axis=0).reshape(v.shape)
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(ExportCheckError):
        peft_export.check_adapter(exported["model"], exported["cfg"], bad, exported["source"])
