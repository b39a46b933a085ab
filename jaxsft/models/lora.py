"""LoRA settings and the variable type that marks adapter weights.

Adapters are their own nnx.Variable type, so `nnx.state(model, LoRAParam)` is exactly the
trainable partition of a LoRA run and `nnx.Param` is the frozen base.
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
TARGET_NAMES = (*ALL_TARGETS, *FUSED_TARGETS)


class LoRAParam(nnx.Variable):
    """A LoRA adapter matrix (lora_a [in, r] or lora_b [r, out], stacked over layers)."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_TARGETS
    rslora: bool = False

    @property
    def scale(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def modules(self) -> frozenset[str]:
        """The decoder modules that get adapters (a fused target name stands for its parts)."""
        return frozenset(p for t in self.targets for p in FUSED_TARGETS.get(t, (t,)))

    def applies_to(self, name: str) -> bool:
        return self.rank > 0 and name in self.modules
