"""Expert parallelism: with the experts split over mesh.expert and tokens sent to their experts'
devices (models/moe.exchanged_ffn, all_to_all in a shard_map), the MoE layer, its gradients,
and whole training steps equal one device.

XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before jax is imported, so the
checks run in one subprocess that reports JSON:
- the layer (moe.ffn) forward and its gradients wrt tokens, router and expert weights on four
  meshes, with routing that leaves one expert empty and sends one device's tokens all to one
  remote expert;
- three SGD steps of the qwen2_moe (shared expert) and qwen3_moe fixtures with the router
  aux loss on, on expert=4 x fsdp=2 vs one device: per-step loss and aux loss, and every
  parameter after the steps; the expert weights really are split over `expert`.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from cli_utils import run_script

from jaxsft.errors import UserError
from jaxsft.models.config import ModelConfig

LAYER_MESHES = {
    "expert4_fsdp2": dict(expert=4, fsdp=2),
    "expert8": dict(expert=8, fsdp=1),
    "expert2_fsdp2_tensor2": dict(expert=2, fsdp=2, tensor=2),
    "data2_expert2_fsdp2": dict(data=2, expert=2, fsdp=2),
}
FAMILIES = ("qwen2_moe", "qwen3_moe")

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
import jaxsft
from jaxsft.models import moe
from jaxsft.sharding import BATCH, make_mesh, named_sharding
from jaxsft.train.step import make_loss_fn, make_train_step, summarize

assert jax.device_count() == 8, jax.devices()
jax.config.update("jax_default_matmul_precision", "highest")
paths, layer_meshes = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = {}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


# ---- the layer ------------------------------------------------------------------------------
T, D, F, E, K = 64, 16, 12, 8, 2
rs = np.random.RandomState(0)
router = rs.normal(0, 0.5, (D, E)).astype(np.float32)
router[:, 5] = -50.0  # expert 5: no token
x = np.abs(rs.normal(0, 1, (T, D))).astype(np.float32)
x[:8] = 0.0
x[:8, 0] = 1.0
router[0, 6] = 40.0  # the first 8 tokens (one device's share on expert=8) all pick expert 6
w = {n: rs.normal(0, 0.3, s).astype(np.float32)
     for n, s in zip(moe.PROJS, [(E, D, F), (E, D, F), (E, F, D)])}
cot = rs.normal(0, 1, (T, D)).astype(np.float32)
names = {"gate_proj": ("expert", "embed", "mlp"), "up_proj": ("expert", "embed", "mlp"),
         "down_proj": ("expert", "mlp", "embed")}


def layer_loss(x, router, w):
    r = moe.route(x @ router, K, True)
    return jnp.sum(moe.ffn(x, r, w, jax.nn.silu) * cot)


grad = jax.jit(jax.value_and_grad(layer_loss, argnums=(0, 1, 2)))
counts = np.bincount(np.asarray(moe.route(x @ router, K, True).experts).reshape(-1), minlength=E)
out["layer_counts"] = counts.tolist()
ref = grad(x, router, w)
for name, shape in layer_meshes.items():
    mesh = make_mesh(**{"data": 1, "fsdp": 1, "tensor": 1, **shape})
    xs = jax.device_put(x, named_sharding(mesh, ("batch", None), x.shape))
    ws = {n: jax.device_put(v, named_sharding(mesh, names[n], v.shape)) for n, v in w.items()}
    with jax.set_mesh(mesh):
        got = grad(xs, router, ws)
        hlo = grad.lower(xs, router, ws).compile().as_text()
    errs = jax.tree.leaves(jax.tree.map(rel, got, ref))
    out[f"layer/{name}"] = {"max_rel_err": max(errs), "all_to_all": hlo.count("all-to-all")}

# ---- training steps -------------------------------------------------------------------------
B, S = 8, 16
rs = np.random.RandomState(1)
ids = rs.randint(3, 256, (B, S)).astype(np.int32)
seg = np.ones((B, S), np.int32)
seg[1, 11:] = 0
seg[5, 6:] = 2  # a packed row
ids[seg == 0] = 0
pos = np.where(seg == 2, np.arange(S) - 6, np.arange(S))
pos = np.where(seg > 0, pos, 0).astype(np.int32)
batch = {"input_ids": ids, "segment_ids": seg, "positions": pos,
         "loss_mask": (seg > 0).astype(np.int32)}


def train(path, mesh):
    model, _ = jaxsft.load_hf(path, dtype="float32", mesh=mesh)
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    tx = optax.sgd(0.3)  # linear in the gradients (Adam would turn the roundoff in the
    # zero gradient of k_proj.bias, which softmax ignores, into full-size steps)
    step = jax.jit(make_train_step(
        make_loss_fn(graphdef, chunk=S, router_aux=0.02), tx, lambda s: 0.3, grad_accum=1))
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": tx.init(params), "rng": jnp.zeros((2,), jnp.uint32)}
    sharding = NamedSharding(mesh, P(BATCH, None))
    b = {k: jax.device_put(v, sharding) for k, v in batch.items()}
    losses = []
    with jax.set_mesh(mesh):
        for _ in range(3):
            state, m = step(state, frozen, None, b)
            losses.append([float(m["loss"]), float(m["router_aux_loss"])])
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state["params"])}
    return losses, flat


one = make_mesh(1, 1, 1, devices=jax.devices()[:1])
eight = make_mesh(1, 2, 1, expert=4)
for fam, path in paths.items():
    l1, p1 = train(path, one)
    l8, p8 = train(path, eight)
    spec = [str(s) for s in p8["layers.mlp.experts.gate_proj"].sharding.spec]
    out[f"train/{fam}"] = {
        "losses_1": l1, "losses_8": l8,
        "param_max_rel_err": max(rel(p8[k], p1[k]) for k in p1),
        "worst": sorted((rel(p8[k], p1[k]), k) for k in p1)[-3:],
        "expert_spec": spec,
    }
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def results(hf_checkpoints):
    paths = {f: str(hf_checkpoints[f]) for f in FAMILIES}
    return run_script(SCRIPT, json.dumps(paths), json.dumps(LAYER_MESHES), timeout=900)


@pytest.mark.slow  # the 8-device subprocess behind `results` takes ~80 s
def test_layer_routing_is_uneven(results):
    """The layer's routing exercises the hard cases: an expert with no token, and one that
    gets many (a whole device's tokens), so send and receive counts differ per device."""
    counts = results["layer_counts"]
    assert counts[5] == 0 and counts[6] >= 8 and sum(counts) == 64 * 2, counts


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", list(LAYER_MESHES))
def test_layer_and_gradients_equal_one_device(results, mesh_name):
    r = results[f"layer/{mesh_name}"]
    assert r["all_to_all"] >= 2, "the experts' tokens were not exchanged"
    assert r["max_rel_err"] <= 1e-5, r


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_training_on_expert4_fsdp2_equals_one_device(results, family):
    r = results[f"train/{family}"]
    assert "expert" in r["expert_spec"][1] and "fsdp" in r["expert_spec"][2], r["expert_spec"]
    for step, ((l1, a1), (l8, a8)) in enumerate(zip(r["losses_1"], r["losses_8"], strict=True)):
        assert l8 == pytest.approx(l1, rel=1e-5), (step, l1, l8)
        assert a8 == pytest.approx(a1, rel=1e-5), (step, a1, a8)
    assert r["losses_1"][-1][0] < r["losses_1"][0][0]  # the steps did train
    assert r["param_max_rel_err"] <= 1e-4, r["worst"]


def _mesh(expert):
    return SimpleNamespace(shape={"data": 1, "expert": expert, "fsdp": 1, "tensor": 1})


def test_expert_axis_must_fit_the_model(hf_checkpoints):
    from jaxsft.train.start import check_expert_axis

    moe_cfg = ModelConfig.from_hf(hf_checkpoints["qwen3_moe"])
    check_expert_axis(moe_cfg, _mesh(4))  # 8 experts over 4 devices
    with pytest.raises(UserError, match="does not divide the model's 8 experts"):
        check_expert_axis(moe_cfg, _mesh(3))
    with pytest.raises(UserError, match="not a mixture-of-experts model"):
        check_expert_axis(ModelConfig.from_hf(hf_checkpoints["llama"]), _mesh(2))
