"""LoRA settings and the variable type that marks adapter weights.

Adapters are their own nnx.Variable type, so `nnx.state(model, LoRAParam)` is the adapter
partition and `nnx.Param` the base; `trainable(lora)` is the filter of what a run trains (the
adapters, plus the MoE routers with lora.train_router).
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# HF module names of fused tensors (Phi): an adapter target that stands for its parts.
FUSED_TARGETS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
# Mixtral's checkpoint names of its experts' gate, down and up projections.
ALIASES = {"w1": ("gate_proj",), "w2": ("down_proj",), "w3": ("up_proj",)}
TARGET_NAMES = (*ALL_TARGETS, *FUSED_TARGETS, *ALIASES)
ROUTER_PATH = ("mlp", "gate", "kernel")  # the MoE router's kernel [.., D, E] (HF mlp.gate)


class LoRAParam(nnx.Variable):
    """A LoRA adapter matrix (lora_a [in, r] or lora_b [r, out], stacked over layers; the
    routed experts' NAME_lora_a [E, in, r] / NAME_lora_b [E, r, out], one per expert)."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_TARGETS
    rslora: bool = False
    train_router: bool = False  # MoE: the routers (mlp.gate) train in full as well

    @property
    def scale(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def modules(self) -> frozenset[str]:
        """The decoder modules that get adapters (a fused or alias name stands for its parts)."""
        names = {**FUSED_TARGETS, **ALIASES}
        return frozenset(p for t in self.targets for p in names.get(t, (t,)))

    def applies_to(self, name: str) -> bool:
        return self.rank > 0 and name in self.modules


def is_router(path, value) -> bool:
    """nnx filter: the MoE router kernels (state path ...mlp.gate.kernel)."""
    return isinstance(value, nnx.Param) and tuple(path[-3:]) == ROUTER_PATH


def trainable(lora: LoraConfig | None):
    """The nnx filter of the trainable partition: every parameter for full fine-tuning; the
    adapters of a LoRA run, and with lora.train_router the MoE routers (full weights)."""
    if lora is None:
        return nnx.Param
    return nnx.Any(LoRAParam, is_router) if lora.train_router else LoRAParam
