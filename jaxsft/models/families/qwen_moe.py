"""Qwen2-MoE (Qwen1.5-MoE-A2.7B: q/k/v bias, a shared expert behind a sigmoid gate,
norm_topk_prob off) and Qwen3-MoE (Qwen3-30B-A3B: q/k RMSNorm, norm_topk_prob on): Qwen's
attention (families/qwen.py) and a sparse MoE MLP on every layer, num_experts experts of
moe_intermediate_size. The generic MoE rows of the weight table are already Qwen's names."""

from jaxsft.models.config import read_moe, write_moe
from jaxsft.models.families import qwen

MODEL_TYPES = ("qwen2_moe", "qwen3_moe")
ARCHITECTURES = {"qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
MOE = True


def read(hf: dict, where: str) -> dict:
    experts = hf.get("num_experts") or hf.get("num_local_experts")  # 5.x writes the latter
    moe = read_moe(
        hf,
        where,
        experts=int(experts),
        hidden=int(hf["moe_intermediate_size"]),
        renormalize=bool(hf.get("norm_topk_prob", False)),
    )
    shared = int(hf.get("shared_expert_intermediate_size") or 0)
    return dict(**qwen.read(hf, where), **moe, shared_expert_size=shared)


def write(cfg, hf: dict) -> None:
    qwen.write(cfg, hf)
    write_moe(cfg, hf)
    hf.update(
        num_experts=cfg.num_experts,
        moe_intermediate_size=cfg.moe_intermediate_size,
        norm_topk_prob=cfg.norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    hf.pop("num_local_experts", None)
    if cfg.shared_expert_size:
        hf["shared_expert_intermediate_size"] = cfg.shared_expert_size


def table(cfg, rows):
    return rows
