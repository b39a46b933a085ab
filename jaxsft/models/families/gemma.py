"""Gemma 2 and Gemma 3 (text): offset norms x_hat * (1 + w), a norm after attention and after
the MLP plus a pre-MLP norm, embeddings x sqrt(D), the softmax scale query_pre_attn_scalar**-0.5,
gelu (tanh) MLPs, tied embeddings, sliding-window layers interleaved with global ones.
Gemma 2: attention-logit and final-logit softcaps; even layers windowed (4.x configs).
Gemma 3: q/k norms; windowed layers use RoPE theta rope_local_base_freq (10k) and the global
ones rope_theta (1M) with rope_scaling; every sliding_window_pattern-th layer is global (4.x)."""

from jaxsft.errors import UserError
from jaxsft.models.config import Wrapped, read_activation, read_rope, read_window, write_rope

MODEL_TYPES = ("gemma2", "gemma3_text")
ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}

# Gemma 3 4B and up (Gemma3ForConditionalGeneration): the language model under
# language_model.model.* / language_model.lm_head.* (the layout the Hub checkpoints have and
# transformers writes), a SigLIP vision tower and a projector carried unchanged. The shipped
# text_config lists only what differs from Gemma3TextConfig's defaults (4.5x), filled in here.
WRAPPED = {
    "gemma3": Wrapped(
        text_model_type="gemma3_text",
        text_defaults=dict(
            vocab_size=262208,
            hidden_size=2304,
            intermediate_size=9216,
            num_hidden_layers=26,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            hidden_activation="gelu_pytorch_tanh",
            max_position_embeddings=131072,
            rms_norm_eps=1e-6,
            rope_theta=1_000_000.0,
            rope_local_base_freq=10_000.0,
            query_pre_attn_scalar=256,
            sliding_window=4096,
            sliding_window_pattern=6,
            tie_word_embeddings=True,
            bos_token_id=2,
            eos_token_id=1,
            pad_token_id=0,
        ),
        prefixes={"model.": "language_model.model.", "lm_head.": "language_model.lm_head."},
        modules={"language_model.model.": "model.language_model.", "language_model.": ""},
        peft_exclude=r"model\.(vision_tower|multi_modal_projector)\..*",
    )
}


def _default_layers(hf: dict) -> list[bool]:
    """Which layers are windowed when config.json has no layer_types (transformers 4.x)."""
    n = int(hf["num_hidden_layers"])
    if hf["model_type"] == "gemma2":
        return [i % 2 == 0 for i in range(n)]
    pattern = int(hf.get("sliding_window_pattern", 6))
    return [(i + 1) % pattern != 0 for i in range(n)]


def read(hf: dict, where: str) -> dict:
    if hf.get("use_bidirectional_attention"):
        raise UserError(
            "use_bidirectional_attention=true (an embedding model) is not supported",
            where=where,
            hint="jaxsft fine-tunes causal language models",
        )
    window, layers = read_window(hf, default_layers=_default_layers(hf))
    fields = dict(
        hidden_act=read_activation(hf, where, "hidden_activation", "gelu_pytorch_tanh"),
        norm_offset=1.0,
        post_norms=True,
        embed_scale=True,
        query_scale=float(hf.get("query_pre_attn_scalar") or 256) ** -0.5,
        attn_softcap=_cap(hf.get("attn_logit_softcapping")),
        final_softcap=_cap(hf.get("final_logit_softcapping")),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        sliding_window=window,
        sliding_layers=layers,
        qkv_bias=bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)),
    )
    if hf["model_type"] == "gemma3_text":
        fields.update(qk_norm=True, **_gemma3_rope(hf, where))
    return fields


def _number(x: float):
    return int(round(x)) if abs(x - round(x)) < 1e-6 else x


def _cap(value):
    return float(value) if value else None


def _gemma3_rope(hf: dict, where: str) -> dict:
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # transformers 5.x
        theta, scaling = read_rope(hf, where, params=dict(params["full_attention"]))
        local = params.get("sliding_attention", {"rope_theta": 10000.0})
        local_theta, local_scaling = read_rope(hf, where, params=dict(local))
    else:  # 4.x: rope_theta + rope_scaling are the global layers', rope_local_base_freq local
        theta, scaling = read_rope(hf, where)
        local_theta, local_scaling = float(hf.get("rope_local_base_freq", 10000.0)), None
    return dict(
        rope_theta=theta,
        rope_scaling=scaling,
        local_rope_theta=local_theta,
        local_rope_scaling=local_scaling,
    )


def write(cfg, hf: dict) -> None:
    hf.update(
        hidden_activation=cfg.hidden_act,
        query_pre_attn_scalar=_number(cfg.query_scale**-2),
        attn_logit_softcapping=cfg.attn_softcap,
        final_logit_softcapping=cfg.final_softcap,
        sliding_window=cfg.sliding_window,
        attention_bias=cfg.qkv_bias,
    )
    hf.pop("hidden_act", None)
    if cfg.model_type != "gemma3_text":
        return
    if cfg._new_style():
        full, local = {}, {}
        write_rope(full, cfg.rope_theta, cfg.rope_scaling, new_style=True)
        write_rope(local, cfg.local_rope_theta, cfg.local_rope_scaling, new_style=True)
        hf["rope_parameters"] = {
            "full_attention": full["rope_parameters"],
            "sliding_attention": local["rope_parameters"],
        }
    else:
        hf["rope_local_base_freq"] = cfg.local_rope_theta


def table(cfg, rows):
    return rows
