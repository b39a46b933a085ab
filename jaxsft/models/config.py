"""ModelConfig: the architecture of one decoder as generic flags, read from and written back
to HF config.json.

The decoder reads only these flags; which flags a checkpoint sets is decided by its family
module (jaxsft/models/families/: one small file per family, registered by model_type), which
reads the family's config.json keys and writes them back. This file holds the keys every
family shares. Both config.json styles found in the wild are read: transformers 4.x (top-level
`rope_theta`, `rope_scaling`) and 5.x (`rope_parameters` with `rope_theta` inside). Anything
the decoder does not implement (MoE, an unknown rope type, activation or model_type) is
refused with a UserError that names the key.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os

from jaxsft.errors import UserError

SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn", "longrope")
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
    qk_norm: bool = False  # RMSNorm over head_dim on q and k (Qwen3, Gemma 3)
    hidden_act: str = "silu"  # MLP activation (transformers' name)
    # RMSNorm computes x_hat * (norm_offset + w); Gemma stores w - 1 (offset 1, multiplied in
    # float32 before the cast, as its RMSNorm does). 0: Llama's x_hat * w.
    norm_offset: float = 0.0
    # Gemma 2/3: a norm on the attention output and on the MLP output before each residual add,
    # and a separate pre-MLP norm (pre_feedforward_layernorm).
    post_norms: bool = False
    embed_scale: bool = False  # Gemma: embeddings x sqrt(D), rounded to the compute dtype
    query_scale: float | None = None  # softmax scale of q.k; None: head_dim ** -0.5
    attn_softcap: float | None = None  # scores -> c * tanh(scores / c) (Gemma 2)
    final_softcap: float | None = None  # logits -> c * tanh(logits / c) (Gemma 2)
    # RoPE of the windowed layers when it differs from the others' (Gemma 3: theta 10k local,
    # 1M global with its own scaling); None: every layer uses rope_theta / rope_scaling.
    local_rope_theta: float | None = None
    local_rope_scaling: dict | None = None
    # Share of head_dim that is rotated (Phi-4-mini 0.75); the rest passes through.
    partial_rotary_factor: float = 1.0
    # Mixture of experts (0: a dense MLP). Every layer's MLP is then E experts of hidden
    # moe_intermediate_size, k per token (routing: models/moe.py), plus (Qwen2-MoE) a shared
    # expert of hidden shared_expert_size behind a sigmoid gate.
    num_experts: int = 0  # E
    num_experts_per_tok: int = 0  # k
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False  # renormalise the k routing weights to sum to one
    shared_expert_size: int = 0
    router_aux_loss_coef: float = 0.0  # the checkpoint's load-balancing loss weight
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
    # A multimodal checkpoint's config.json (Gemma3ForConditionalGeneration) when this is its
    # language model: hf_config is then its text_config, the language model's tensors sit
    # under the family's prefix and every other tensor (vision tower, projector) is carried
    # through the export unchanged. None for a text-only checkpoint.
    outer_config: dict | None = dataclasses.field(default=None, compare=False, repr=False)

    def __hash__(self) -> int:  # rope_scaling is a dict; hash its JSON
        plain = dataclasses.replace(
            self, rope_scaling=None, local_rope_scaling=None, hf_config=None, outer_config=None
        )
        dicts = (self.rope_scaling, self.local_rope_scaling)
        return hash((dataclasses.astuple(plain), json.dumps(dicts, sort_keys=True)))

    @property
    def windowed_layers(self) -> tuple[bool, ...]:
        """Per layer: does it use the sliding window (and the local RoPE, if any)."""
        if self.sliding_window is None:
            return (False,) * self.num_layers
        return self.sliding_layers or (True,) * self.num_layers

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
        from jaxsft.models import families

        return families.parse(hf, where)

    @property
    def architecture(self) -> str:
        from jaxsft.models import families

        return families.family_of(self.model_type).ARCHITECTURES[self.model_type]

    @property
    def hf_model_type(self) -> str:
        """The model_type of the checkpoint's own config.json (the wrapper's, if any)."""
        return (self.outer_config or {}).get("model_type", self.model_type)

    def to_hf(self, dtype: str | None = None) -> dict:
        """The config.json dict, in the style of the checkpoint it came from; `dtype` (default:
        the source's) goes under the key that style uses (torch_dtype in 4.x, dtype in 5.x)."""
        from jaxsft.models import families

        hf = copy.deepcopy(self.hf_config) if self.hf_config else {}
        hf.update(
            architectures=[self.architecture],
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
        )
        if self.bos_token_id is not None:
            hf["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            eos = list(self.eos_token_ids)
            hf["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        write_rope(hf, self.rope_theta, self.rope_scaling, new_style=self._new_style())
        families.family_of(self.model_type).write(self, hf)
        outer = self.outer_config
        dtype_key = "torch_dtype" if "torch_dtype" in (outer or self.hf_config or {}) else "dtype"
        if outer is not None:  # the language model goes back under the wrapper's text_config
            hf.pop("architectures")
            for key in ("torch_dtype", "dtype"):
                if key not in self.hf_config:
                    hf.pop(key, None)
            hf, text = copy.deepcopy(outer), hf
            hf["text_config"] = text
        hf[dtype_key] = dtype or self.source_dtype
        return hf

    def _new_style(self) -> bool:
        """Whether config.json is written in the transformers 5.x style (rope_parameters)."""
        return not self.hf_config or "rope_parameters" in self.hf_config


def _swap_prefix(key: str, prefixes: dict) -> str:
    for old, new in prefixes.items():
        if key.startswith(old):
            return new + key[len(old) :]
    raise AssertionError(f"{key!r} is under none of {list(prefixes)}")


@dataclasses.dataclass(frozen=True)
class Wrapped:
    """A multimodal checkpoint whose language model jaxsft trains (a family's WRAPPED entry).

    text_model_type: the model_type of its text_config; text_defaults: the values of keys a
    shipped text_config leaves out (its config class's defaults); prefixes: the text model's
    key prefixes (model., lm_head.) as they appear in this checkpoint; every tensor outside
    them is carried through the export byte for byte."""

    text_model_type: str
    text_defaults: dict
    prefixes: dict
    # transformers' module names of those keys (peft names adapters by them): {checkpoint
    # prefix: module prefix}, and a regex of the carried modules peft must not adapt.
    modules: dict
    peft_exclude: str

    def prefixed(self, key: str) -> str:
        return _swap_prefix(key, self.prefixes)

    def module(self, key: str) -> str:
        return _swap_prefix(key, self.modules)

    def carried(self, key: str) -> bool:
        return not key.startswith(tuple(self.prefixes.values()))


def write_rope(hf: dict, theta: float, scaling: dict | None, *, new_style: bool) -> None:
    """RoPE keys in either style: 5.x rope_parameters, or 4.x rope_theta + rope_scaling."""
    if new_style:
        hf["rope_parameters"] = {**(scaling or {"rope_type": "default"}), "rope_theta": theta}
        hf.pop("rope_theta", None)
        hf.pop("rope_scaling", None)
    else:
        hf["rope_theta"] = theta
        hf["rope_scaling"] = scaling


def refuse_moe_keys(hf: dict, where: str) -> None:
    """A dense family's config.json with mixture-of-experts keys (an MoE variant jaxsft does
    not implement) is refused naming the key."""
    for key in MOE_KEYS:
        if hf.get(key):
            raise UserError(
                f"mixture-of-experts key {key!r} is not supported for model_type "
                f"{hf.get('model_type')!r}",
                where=where,
                hint="supported MoE model types: mixtral, qwen2_moe, qwen3_moe",
            )


def read_moe(hf: dict, where: str, *, experts: int, hidden: int, renormalize: bool) -> dict:
    """The MoE fields every MoE family shares, from its own key names' values; refuses what
    the decoder does not implement (layers that mix dense and MoE MLPs, router jitter)."""
    sparse_step = int(hf.get("decoder_sparse_step") or 1)
    if sparse_step != 1 or hf.get("mlp_only_layers"):
        raise UserError(
            "MoE layers interleaved with dense ones (decoder_sparse_step "
            f"{sparse_step}, mlp_only_layers {hf.get('mlp_only_layers')}) are not supported",
            where=where,
            hint="jaxsft runs checkpoints whose every layer is MoE (Qwen3-30B-A3B, "
            "Qwen1.5-MoE-A2.7B, Mixtral)",
        )
    if float(hf.get("router_jitter_noise") or 0.0):
        raise UserError(
            f"router_jitter_noise {hf['router_jitter_noise']} is not supported",
            where=where,
            hint="set it to 0.0 in config.json",
        )
    k = int(hf["num_experts_per_tok"])
    if not 0 < k <= experts:
        raise UserError(f"num_experts_per_tok {k} with {experts} experts", where=where)
    return dict(
        num_experts=int(experts),
        num_experts_per_tok=k,
        moe_intermediate_size=int(hidden),
        norm_topk_prob=bool(renormalize),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
    )


def write_moe(cfg, hf: dict) -> None:
    hf.update(
        num_experts_per_tok=cfg.num_experts_per_tok,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
    )


def common_fields(hf: dict, where: str) -> dict:
    """ModelConfig fields every family reads the same way (KeyError for a missing key)."""
    num_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    rope_theta, rope_scaling = read_rope(hf, where)
    return dict(
        model_type=hf["model_type"],
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
        mlp_bias=bool(hf.get("mlp_bias", False)),
        hidden_act=read_activation(hf, where),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        source_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
        hf_config=copy.deepcopy(hf),
    )


def eos_ids(value) -> tuple[int, ...]:
    """An eos_token_id entry of config.json / generation_config.json (None, an int or a
    list) as a tuple of ints."""
    if value is None:
        return ()
    return tuple(int(i) for i in value) if isinstance(value, list) else (int(value),)


def read_activation(hf: dict, where: str, key: str = "hidden_act", default="silu") -> str:
    """The MLP activation; one the decoder does not implement (models.layers.ACTIVATIONS) is
    refused naming the key."""
    from jaxsft.models.layers import ACTIVATIONS

    act = hf.get(key) or default
    if act not in ACTIVATIONS:
        raise UserError(
            f"activation {act!r} (key {key}) is not supported",
            where=where,
            hint=f"supported: {', '.join(ACTIVATIONS)}",
        )
    return act


def read_window(hf: dict, default_layers=None) -> tuple[int | None, tuple[bool, ...] | None]:
    """(sliding window, per-layer use of it: None for every layer) from `sliding_window` and
    HF's `layer_types`, else `default_layers` (a family's own rule), else every layer."""
    window = hf.get("sliding_window")
    if not window:
        return None, None
    if hf.get("layer_types"):
        layers = tuple(t == "sliding_attention" for t in hf["layer_types"])
    elif default_layers is not None:
        layers = tuple(default_layers)
    else:
        return int(window), None
    if not any(layers):
        return None, None
    return int(window), None if all(layers) else layers


def read_rope(hf: dict, where: str, params=None) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either config style (or from `params`, one
    rope_parameters dict)."""
    params = hf.get("rope_parameters") if params is None else params
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
