"""Phi-3 / Phi-3.5-mini, Phi-4 (14B) and Phi-4-mini (all model_type phi3): Llama's computation
with fused q/k/v (`self_attn.qkv_proj`) and gate/up (`mlp.gate_up_proj`) tensors, split into
the decoder's q/k/v and gate/up kernels on import and fused again on export; LongRoPE
(short/long factors, switching at original_max_position_embeddings); Phi-4-mini rotates only
partial_rotary_factor (0.75) of each head and ties its embeddings."""

import dataclasses

from jaxsft.models.config import read_window

MODEL_TYPES = ("phi3",)
ARCHITECTURES = {"phi3": "Phi3ForCausalLM"}


def read(hf: dict, where: str) -> dict:
    from jaxsft.models.config import read_rope

    theta, scaling = read_rope(hf, where)
    params = hf.get("rope_parameters") or {}
    prf = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if scaling is not None:
        scaling.pop("partial_rotary_factor", None)
        if scaling["rope_type"] == "longrope" and "original_max_position_embeddings" not in scaling:
            scaling["original_max_position_embeddings"] = int(
                hf["original_max_position_embeddings"]  # 4.x keeps it at the top level
            )
    window, layers = read_window(hf)
    return dict(
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=float(prf or 1.0),
        sliding_window=window,
        sliding_layers=layers,
    )


def write(cfg, hf: dict) -> None:
    hf.update(hidden_act=cfg.hidden_act, sliding_window=cfg.sliding_window)
    if cfg.partial_rotary_factor != 1.0:
        hf["partial_rotary_factor"] = cfg.partial_rotary_factor
        if "rope_parameters" in hf:
            hf["rope_parameters"]["partial_rotary_factor"] = cfg.partial_rotary_factor
    if cfg.rope_scaling and "original_max_position_embeddings" in cfg.rope_scaling:
        hf["original_max_position_embeddings"] = cfg.rope_scaling[
            "original_max_position_embeddings"
        ]


FUSED = {  # HF tensor -> the decoder kernels it holds, in row order
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"),
}


def table(cfg, rows):
    """q/k/v and gate/up rows become parts (row ranges) of the fused HF tensors."""
    N, K, H, F = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    sizes = {"q_proj": N * H, "k_proj": K * H, "v_proj": K * H, "gate_proj": F, "up_proj": F}
    out = []
    for entry in rows:
        fused = next((f for f, parts in FUSED.items() if entry.path[-2] in parts), None)
        if fused is None or entry.path[-1] != "kernel":
            out.append(entry)
            continue
        parts = FUSED[fused]
        start = sum(sizes[p] for p in parts[: parts.index(entry.path[-2])])
        key = "model.layers.{i}." + fused + ".weight"
        out.append(
            dataclasses.replace(entry, hf_key=key, rows=(start, start + sizes[entry.path[-2]]))
        )
    return out
