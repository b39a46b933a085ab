"""Qwen2/2.5 (q/k/v bias) and Qwen3 (q/k RMSNorm, explicit head_dim). The sliding window is
off unless use_sliding_window, and then only on layers >= max_window_layers (or per
layer_types), as transformers resolves it."""

from jaxsft.models.config import read_window

MODEL_TYPES = ("qwen2", "qwen3")
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def read(hf: dict, where: str) -> dict:
    window, layers = None, None
    if hf.get("use_sliding_window", False):
        first = int(hf.get("max_window_layers", 28))
        rule = [i >= first for i in range(int(hf["num_hidden_layers"]))]
        window, layers = read_window(hf, default_layers=rule)
    qwen3 = hf["model_type"].startswith("qwen3")  # qwen3, qwen3_moe
    bias = bool(hf.get("attention_bias", False))
    return dict(
        qkv_bias=not qwen3 or bias,
        sliding_window=window,
        sliding_layers=layers,
        qk_norm=qwen3,
    )


def write(cfg, hf: dict) -> None:
    hf["hidden_act"] = cfg.hidden_act
    hf["sliding_window"] = cfg.sliding_window
    if cfg.sliding_window:
        hf["use_sliding_window"] = True


def table(cfg, rows):
    return rows
