"""LoRA settings and the variable type that marks adapter weights.

Adapters are their own nnx.Variable type, so `nnx.state(model, LoRAParam)` is exactly the
trainable partition of a LoRA run and `nnx.Param` is the frozen base.
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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

    def applies_to(self, name: str) -> bool:
        return self.rank > 0 and name in self.targets
