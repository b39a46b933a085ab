"""ModelConfig: the architecture of one decoder, read from and written back to HF config.json.

Reads both config.json styles found in the wild: transformers 4.x (top-level `rope_theta`,
`rope_scaling`) and 5.x (`rope_parameters` with `rope_theta` inside). Anything the decoder does
not implement (MoE, an unknown rope type, an unknown model_type) is refused with a UserError
that names the key.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

from jaxsft.errors import UserError

SUPPORTED_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn")
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of the one decoder. Dimension letters: V D F L N K H."""

    model_type: str
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or a dict with "rope_type" and its parameters (factor, low_freq_factor, ...).
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # q/k/v projections have a bias (Qwen2, Llama attention_bias)
    o_bias: bool = False  # o_proj has a bias (Llama attention_bias)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k (Qwen3)
    sliding_window: int | None = None  # Mistral; None means full causal attention
    # Which layers use the window (Qwen: layers >= max_window_layers, or HF `layer_types`);
    # None: every layer, when sliding_window is set.
    sliding_layers: tuple[bool, ...] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    source_dtype: str = "float32"  # the dtype the checkpoint was stored in
    # The config.json dict this was read from (kept to write the same style back).
    hf_config: dict | None = dataclasses.field(default=None, compare=False, repr=False)

    def __hash__(self) -> int:  # rope_scaling is a dict; hash its JSON
        fields = dataclasses.astuple(dataclasses.replace(self, rope_scaling=None, hf_config=None))
        return hash((fields, json.dumps(self.rope_scaling, sort_keys=True)))

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict) -> ModelConfig:
        """Read a HF config.json (a checkpoint directory, the file itself, or its dict)."""
        where = "config.json"
        if isinstance(source, dict):
            hf = source
        else:
            path = os.fspath(source)
            if not os.path.exists(path):
                raise UserError(
                    "no such file or directory",
                    where=path,
                    hint="model.path must be a local HF checkpoint directory",
                )
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            where = path
            if not os.path.isfile(path):
                raise UserError(
                    "no config.json",
                    where=path,
                    hint="model.path must be a HF checkpoint directory with config.json",
                )
            try:
                with open(path) as f:
                    hf = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise UserError(f"cannot read config.json: {e}", where=path) from None
        return _parse(hf, where)

    def to_hf(self, dtype: str | None = None) -> dict:
        """The config.json dict, in the style of the checkpoint it came from; `dtype` (default:
        the source's) goes under the key that style uses (torch_dtype in 4.x, dtype in 5.x)."""
        hf = copy.deepcopy(self.hf_config) if self.hf_config else {}
        hf.update(
            architectures=[SUPPORTED_TYPES[self.model_type]],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
        )
        if self.model_type == "llama":
            hf.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.model_type in ("mistral", "qwen2", "qwen3") or self.sliding_window:
            hf["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3") and self.sliding_window:
            hf["use_sliding_window"] = True
        if self.bos_token_id is not None:
            hf["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            eos = list(self.eos_token_ids)
            hf["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        rope = dict(self.rope_scaling or {"rope_type": "default"})
        if "rope_parameters" in hf or not self.hf_config:  # transformers 5.x style
            hf["rope_parameters"] = {**rope, "rope_theta": self.rope_theta}
            hf.pop("rope_theta", None)
            hf.pop("rope_scaling", None)
        else:  # transformers 4.x style
            hf["rope_theta"] = self.rope_theta
            hf["rope_scaling"] = self.rope_scaling
        dtype_key = "torch_dtype" if "torch_dtype" in (self.hf_config or {}) else "dtype"
        hf[dtype_key] = dtype or self.source_dtype
        return hf


def _parse(hf: dict, where: str) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_TYPES:
        raise UserError(
            f"model_type {model_type!r} is not supported",
            where=where,
            hint=f"supported: {', '.join(SUPPORTED_TYPES)}",
        )
    for key in MOE_KEYS:
        if hf.get(key):
            raise UserError(f"mixture-of-experts key {key!r} is not supported", where=where)
    try:
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        rope_theta, rope_scaling = _read_rope(hf, where)
        sliding, sliding_layers = _read_window(hf, model_type)
        eos = hf.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        attention_bias = bool(hf.get("attention_bias", False))
        return ModelConfig(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type == "llama" and attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=int(sliding) if sliding else None,
            sliding_layers=sliding_layers,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
            pad_token_id=hf.get("pad_token_id"),
            source_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
            hf_config=copy.deepcopy(hf),
        )
    except KeyError as e:
        raise UserError(f"missing key {e.args[0]!r}", where=where) from None
    except (TypeError, ValueError) as e:
        raise UserError(f"bad value: {e}", where=where) from None


def _read_window(hf: dict, model_type: str) -> tuple[int | None, tuple[bool, ...] | None]:
    """(sliding window, per-layer use of it) as transformers resolves them."""
    window = hf.get("sliding_window")
    n = int(hf["num_hidden_layers"])
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        return None, None
    if not window:
        return None, None
    if hf.get("layer_types"):
        layers = tuple(t == "sliding_attention" for t in hf["layer_types"])
    elif model_type in ("qwen2", "qwen3"):
        first = int(hf.get("max_window_layers", 28))
        layers = tuple(i >= first for i in range(n))
    else:
        return int(window), None
    if not any(layers):
        return None, None
    return int(window), None if all(layers) else layers


def _read_rope(hf: dict, where: str) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either config style."""
    params = hf.get("rope_parameters")
    if params is not None:  # transformers 5.x
        params = dict(params)
        theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling = params
    else:  # transformers 4.x
        theta = float(hf.get("rope_theta", 10000.0))
        scaling = dict(hf["rope_scaling"]) if hf.get("rope_scaling") else {}
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type not in SUPPORTED_ROPE:
        raise UserError(
            f"rope type {rope_type!r} (key rope_scaling/rope_parameters.rope_type) "
            "is not supported",
            where=where,
            hint=f"supported: {', '.join(SUPPORTED_ROPE)}",
        )
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **scaling}
