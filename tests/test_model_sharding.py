"""The forward on a mesh of 8 fake CPU devices equals the single-device forward.

XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before jax is imported, so the
check runs in a subprocess: it loads each checkpoint once without a mesh and once per mesh
(`jaxsft.load_hf(path, dtype="float32", mesh=mesh)`), runs the same jitted forward (under
`jax.set_mesh`, so the model's activation constraints apply too) and reports JSON.
"""

from __future__ import annotations

import json

import pytest
from cli_utils import run_script

# GQA + untied, bias + tied, head_dim + q/k norm, bf16 shards read slice by slice
FAMILIES = ("llama", "qwen2", "qwen3", "llama_sharded_bf16")
MESHES = {"fsdp4_tensor2": (1, 4, 2), "data2_fsdp2_tensor2": (2, 2, 2)}
TOL = 1e-5  # relative to max |logit|; same math, only the reduction order may differ

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
import jaxsft
from jaxsft.sharding import make_mesh

assert jax.device_count() == 8, jax.devices()
jax.config.update("jax_default_matmul_precision", "highest")
paths, meshes = json.loads(sys.argv[1]), json.loads(sys.argv[2])
B, T = 4, 16
rs = np.random.RandomState(0)
ids = rs.randint(3, 256, (B, T)).astype(np.int32)
seg = np.ones((B, T), np.int32)
seg[1, 10:] = 0  # one padded row
seg[2, 7:] = 2  # one packed row
pos = np.where(seg[2] == 2, np.arange(T) - 7, np.arange(T))[None].repeat(B, 0).astype(np.int32)
pos[1, 10:] = 0
ids[seg == 0] = 0

@nnx.jit
def forward(model, ids, pos, seg):
    return model(ids, positions=pos, segment_ids=seg)

out = {}
for fam, path in paths.items():
    model, _ = jaxsft.load_hf(path, dtype="float32")
    ref = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg)))
    for mesh_name, (d, f, t) in meshes.items():
        mesh = make_mesh(data=d, fsdp=f, tensor=t)
        model, _ = jaxsft.load_hf(path, dtype="float32", mesh=mesh)
        specs = {}
        for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            x = var.get_value()
            specs[".".join(map(str, p))] = [str(s) for s in x.sharding.spec]
            assert len(x.sharding.device_set) == 8, (p, x.sharding)
        batch = NamedSharding(mesh, P(("data", "fsdp"), None))
        args = [jax.device_put(a, batch) for a in (ids, pos, seg)]
        with jax.set_mesh(mesh):
            got = np.asarray(forward(model, *args))
        mask = seg > 0
        out[f"{fam}/{mesh_name}"] = {
            "max_abs_err": float(np.abs(got[mask] - ref[mask]).max()),
            "logit_scale": float(np.abs(ref[mask]).max()),
            "specs": specs,
        }
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def sharded_results(hf_checkpoints):
    paths = {f: str(hf_checkpoints[f]) for f in FAMILIES}
    return run_script(SCRIPT, json.dumps(paths), json.dumps(MESHES), timeout=600)


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_forward_matches(sharded_results, parity_record, family, mesh_name):
    r = sharded_results[f"{family}/{mesh_name}"]
    err, scale = r["max_abs_err"], r["logit_scale"]
    parity_record[f"{family}/float32/{mesh_name}_vs_1dev"] = {
        "max_abs_err": err,
        "logit_scale": scale,
        "rel_err": err / scale,
        "tol": TOL,
    }
    assert err <= TOL * scale, (
        f"{family} on {mesh_name}: max|mesh - 1 device| = {err:.3e} > {TOL:g} * max|logit| "
        f"= {TOL * scale:.3e}"
    )


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_params_are_sharded(sharded_results, mesh_name):
    """Kernels are really split: over fsdp (embed) and over tensor (heads / mlp / vocab)."""
    specs = sharded_results[f"llama/{mesh_name}"]["specs"]
    q = specs["layers.self_attn.q_proj.kernel"]  # [L, D, N*H]: (None, fsdp, tensor)
    assert "fsdp" in q[1] and "tensor" in q[2], q
    down = specs["layers.mlp.down_proj.kernel"]  # [L, F, D]: (None, tensor, fsdp)
    assert "tensor" in down[1] and "fsdp" in down[2], down
    assert "tensor" in specs["embed_tokens.embedding"][0], specs["embed_tokens.embedding"]
    assert all(s == "None" for s in specs["norm.scale"]), specs["norm.scale"]
    assert not any("data" in " ".join(s) for s in specs.values()), "weights split over data"
