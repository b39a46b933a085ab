"""Mixtral: Mistral's attention and a sparse MoE MLP on every layer (num_local_experts experts
of intermediate_size, num_experts_per_tok per token, the k weights always renormalised). Its
checkpoints name the MoE `block_sparse_moe` and the expert matrices w1 (gate), w3 (up) and
w2 (down); this module renames the generic MoE rows of the weight table to those."""

import dataclasses

from jaxsft.models.config import read_moe, read_window, write_moe

MODEL_TYPES = ("mixtral",)
ARCHITECTURES = {"mixtral": "MixtralForCausalLM"}
MOE = True
RENAMES = {
    "mlp.gate.": "block_sparse_moe.gate.",
    "mlp.experts.{j}.gate_proj.": "block_sparse_moe.experts.{j}.w1.",
    "mlp.experts.{j}.up_proj.": "block_sparse_moe.experts.{j}.w3.",
    "mlp.experts.{j}.down_proj.": "block_sparse_moe.experts.{j}.w2.",
}


def read(hf: dict, where: str) -> dict:
    window, layers = read_window(hf)
    moe = read_moe(
        hf,
        where,
        experts=int(hf["num_local_experts"]),
        hidden=int(hf["intermediate_size"]),
        renormalize=True,
    )
    return dict(sliding_window=window, sliding_layers=layers, **moe)


def write(cfg, hf: dict) -> None:
    write_moe(cfg, hf)
    hf.update(
        num_local_experts=cfg.num_experts,
        intermediate_size=cfg.moe_intermediate_size,
        sliding_window=cfg.sliding_window,
        hidden_act=cfg.hidden_act,
    )


def table(cfg, rows):
    return [dataclasses.replace(e, hf_key=_rename(e.hf_key)) for e in rows]


def _rename(key: str) -> str:
    for generic, own in RENAMES.items():
        key = key.replace("." + generic, "." + own)
    return key
