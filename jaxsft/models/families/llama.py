"""Llama 3.x (and Llama 2): the reference layout; attention_bias puts a bias on q/k/v/o."""

MODEL_TYPES = ("llama",)
ARCHITECTURES = {"llama": "LlamaForCausalLM"}


def read(hf: dict, where: str) -> dict:
    bias = bool(hf.get("attention_bias", False))
    return dict(qkv_bias=bias, o_bias=bias)


def write(cfg, hf: dict) -> None:
    hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, hidden_act=cfg.hidden_act)


def table(cfg, rows):
    return rows
