"""The device mesh ('data', 'expert', 'fsdp', 'tensor') and the logical-axis rules that map onto
it.

Model code names logical axes only (vocab, embed, q_heads, ...); this table decides which mesh
axis each one is split over. FSDP, tensor and data parallelism are mesh shapes, not code paths.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxsft.errors import UserError

MESH_AXES = ("data", "expert", "fsdp", "tensor")
# Rows of a batch are split over data, expert and fsdp: outside the MoE layers the expert axis
# is one more data-parallel axis; in them, tokens travel to their experts' devices (models/moe).
BATCH = ("data", "expert", "fsdp")

# logical axis -> mesh axis (or None: replicated)
RULES = {
    "batch": BATCH,
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    "head_dim": None,
    "lora_rank": None,
    "expert": "expert",  # MoE experts: split over mesh.expert (and FSDP over embed)
}


def mesh_shape(data: int = 1, fsdp: int = -1, tensor: int = 1, n: int = 1, expert: int = 1):
    """{axis: size} of MESH_AXES for n devices; one entry may be -1 for 'the rest'."""
    shape = [data, expert, fsdp, tensor]
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise UserError(
            f"mesh data x expert x fsdp x tensor = {shape}: each must be >= 1, and at most "
            "one may be -1",
            where="mesh",
        )
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n % known:
            raise UserError(
                f"mesh data x expert x fsdp x tensor = {shape} does not match {n} devices "
                f"({known} does not divide {n})",
                where="mesh",
                hint="set the other mesh.* so that their product divides the device count",
            )
        shape[shape.index(-1)] = n // known
    if math.prod(shape) != n:
        raise UserError(
            f"mesh data x expert x fsdp x tensor = {shape} needs {math.prod(shape)} devices: "
            f"it does not match {n} devices",
            where="mesh",
            hint="set one of mesh.* to -1",
        )
    return dict(zip(MESH_AXES, shape, strict=True))


def batch_devices(shape) -> int:
    """Devices a batch's rows are split over (mesh.data x mesh.expert x mesh.fsdp)."""
    return math.prod(int(shape[a]) for a in BATCH)


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None, expert: int = 1
) -> Mesh:
    """A mesh over all devices (of all hosts); one entry may be -1 for 'the rest'."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(mesh_shape(data, fsdp, tensor, len(devices), expert).values())
    try:  # topology-aware device order on TPU/GPU pods
        mesh_devices = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 - CPU and odd shapes: plain order is fine
        mesh_devices = np.asarray(devices).reshape(shape)
    return Mesh(mesh_devices, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_spec(names, shape=None, mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec for logical axis names; axes that do not divide evenly are replicated."""
    spec = []
    used = set()
    for i, name in enumerate(names or ()):
        axes = RULES.get(name) if name is not None else None
        if axes is not None:
            axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
            if mesh is not None:
                axes_t = tuple(a for a in axes_t if mesh.shape[a] > 1 and a not in used)
                size = math.prod(mesh.shape[a] for a in axes_t)
                if shape is not None and shape[i] % max(size, 1):
                    axes_t = ()
            used.update(axes_t)
            axes = axes_t[0] if len(axes_t) == 1 else (axes_t or None)
        spec.append(axes)
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, names, shape) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(names, shape, mesh))


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """with_sharding_constraint by logical names, a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(names, x.shape, mesh))
