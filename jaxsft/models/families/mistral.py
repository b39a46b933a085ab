"""Mistral: Llama's layout with a sliding window on every layer (or per layer_types)."""

from jaxsft.models.config import read_window

MODEL_TYPES = ("mistral",)
ARCHITECTURES = {"mistral": "MistralForCausalLM"}


def read(hf: dict, where: str) -> dict:
    window, layers = read_window(hf)
    return dict(sliding_window=window, sliding_layers=layers)


def write(cfg, hf: dict) -> None:
    hf.update(sliding_window=cfg.sliding_window, hidden_act=cfg.hidden_act)


def table(cfg, rows):
    return rows
