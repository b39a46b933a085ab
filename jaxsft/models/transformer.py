"""The one decoder for every supported family (Llama 3.x, Qwen2/2.5/3, Mistral, Gemma 2/3).

Families differ only by generic ModelConfig flags (q/k/v bias, q/k norm, head_dim, rope
scaling, tied embeddings, per-layer sliding window and RoPE, norm offset and post-norms,
activation, embedding and query scales, softcaps); the decoder never asks which family it runs.
Layers are created stacked (leading axis L) and run under jax.lax.scan, so compile time does
not grow with depth; per-layer differences (window, RoPE table) ride in the scan as data.
State paths mirror HF module names: `layers.self_attn.q_proj.kernel` is the stacked transpose of
`model.layers.{i}.self_attn.q_proj.weight`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft.models import attention, moe, ops
from jaxsft.models.config import ModelConfig
from jaxsft.models.layers import ACTIVATIONS, Embed, Linear, QuantKernel, RMSNorm, param
from jaxsft.models.lora import LoraConfig, LoRAParam
from jaxsft.models.rope import apply_rope, inv_frequencies, long_frequencies, rope_tables
from jaxsft.sharding import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora, dtype, param_dtype, rngs, quantize=""):
        D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, quantize=quantize, rngs=rngs)

        def lora_for(name):
            return lora if lora and lora.applies_to(name) else None

        self.q_proj = Linear(
            D, N * H, ("embed", "q_heads"), bias=cfg.qkv_bias, lora=lora_for("q_proj"), **kw
        )
        self.k_proj = Linear(
            D, K * H, ("embed", "kv_heads"), bias=cfg.qkv_bias, lora=lora_for("k_proj"), **kw
        )
        self.v_proj = Linear(
            D, K * H, ("embed", "kv_heads"), bias=cfg.qkv_bias, lora=lora_for("v_proj"), **kw
        )
        self.o_proj = Linear(
            N * H, D, ("q_heads", "embed"), bias=cfg.o_bias, lora=lora_for("o_proj"), **kw
        )
        if cfg.qk_norm:
            norm = dict(offset=cfg.norm_offset, param_dtype=param_dtype, rngs=rngs)
            self.q_norm = RMSNorm(H, cfg.rms_norm_eps, ("head_dim",), **norm)
            self.k_norm = RMSNorm(H, cfg.rms_norm_eps, ("head_dim",), **norm)
        else:
            self.q_norm = self.k_norm = None
        self.shape = (N, K, H)
        self.scale = cfg.query_scale or H**-0.5
        self.softcap = cfg.attn_softcap

    def qkv(self, x, cos, sin):
        """x [B, T, D] -> q [B, T, N, H], k, v [B, T, K, H] with RoPE applied."""
        B, T, _ = x.shape
        N, K, H = self.shape
        q = self.q_proj(x).reshape(B, T, N, H)
        k = self.k_proj(x).reshape(B, T, K, H)
        v = self.v_proj(x).reshape(B, T, K, H)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora, dtype, param_dtype, rngs, hidden=None, quantize=""):
        D, F = cfg.hidden_size, hidden or cfg.intermediate_size
        kw = dict(bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kw["quantize"] = quantize

        def lora_for(name):
            return lora if lora and lora.applies_to(name) else None

        self.gate_proj = Linear(D, F, ("embed", "mlp"), lora=lora_for("gate_proj"), **kw)
        self.up_proj = Linear(D, F, ("embed", "mlp"), lora=lora_for("up_proj"), **kw)
        self.down_proj = Linear(F, D, ("mlp", "embed"), lora=lora_for("down_proj"), **kw)
        self.act = cfg.hidden_act

    def __call__(self, x):
        h = ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(constrain(h, "batch", None, "mlp"))


class Experts(nnx.Module):
    """The E experts' MLP matrices, stacked: gate_proj, up_proj [E, D, F], down_proj [E, F, D]
    (HF: mlp.experts.{j}.gate_proj.weight [F, D], ..., transposed and stacked on import).

    With LoRA on a projection NAME (lora.applies_to), one adapter per expert, stacked:
    NAME_lora_a [E, in, r] (uniform, PEFT's init) and NAME_lora_b [E, r, out] (zero)."""

    def __init__(
        self, cfg: ModelConfig, param_dtype, rngs, lora: LoraConfig | None = None, quantize=""
    ):
        E, D, F = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        shapes = {"gate_proj": ("embed", "mlp"), "up_proj": ("embed", "mlp")}
        shapes |= {"down_proj": ("mlp", "embed")}  # (in, out) axes of each projection
        size = {"embed": D, "mlp": F}
        self.lora_scale = lora.scale if lora else 0.0
        for name, (d_in, d_out) in shapes.items():
            shape, names = (E, size[d_in], size[d_out]), ("expert", d_in, d_out)
            if quantize:  # QLoRA: the stack [E, in, out] quantised as E kernels
                setattr(self, name, QuantKernel(quantize, shape, names))
            else:
                setattr(self, name, param(rngs, shape, names, param_dtype))
            a = b = None
            if lora and lora.applies_to(name):
                r, n_in, n_out = lora.rank, size[d_in], size[d_out]
                a_names, b_names = ("expert", d_in, "lora_rank"), ("expert", "lora_rank", d_out)
                a = param(rngs, (E, n_in, r), a_names, param_dtype, "uniform_fan_in", LoRAParam)
                b = param(rngs, (E, r, n_out), b_names, param_dtype, "zeros", LoRAParam)
            setattr(self, f"{name}_lora_a", a)
            setattr(self, f"{name}_lora_b", b)

    def weights(self) -> dict:
        """The arrays of moe.expert_mlp's `w` (with the adapters of the adapted projections)."""
        w = {name: _weight(getattr(self, name)) for name in moe.PROJS}
        for name in moe.PROJS:
            for ab in ("lora_a", "lora_b"):
                var = getattr(self, f"{name}_{ab}")
                if var is not None:
                    w[f"{name}_{ab}"] = var[...]
        return w


def _weight(kernel):
    """An expert stack's array, or its codes and scales (quant.Quantized) when quantised."""
    return kernel.stored() if isinstance(kernel, QuantKernel) else kernel[...]


class SparseMoE(nnx.Module):
    """A mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): a float32 router (`gate`,
    HF mlp.gate), k of E experts per token through the dropless grouped FFN of models/moe.py,
    and (Qwen2-MoE) a shared expert scaled by sigmoid(shared_expert_gate x). LoRA targets
    gate_proj/up_proj/down_proj adapt the routed experts (one adapter per expert) and the
    shared expert's projections of those names; the router never gets an adapter (it trains
    in full with lora.train_router, a filter of the trainable partition: lora.trainable)."""

    def __init__(self, cfg: ModelConfig, lora, dtype, param_dtype, rngs, quantize=""):
        D, E = cfg.hidden_size, cfg.num_experts
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.gate = Linear(D, E, ("embed", None), dtype=jnp.float32, **kw)
        self.experts = Experts(cfg, param_dtype, rngs, lora, quantize)
        if cfg.shared_expert_size:
            shared = cfg.shared_expert_size
            self.shared_expert = MLP(cfg, lora, dtype, param_dtype, rngs, shared, quantize)
            self.shared_expert_gate = Linear(D, 1, ("embed", None), dtype=dtype, **kw)
        else:
            self.shared_expert = self.shared_expert_gate = None
        self.k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.act = cfg.hidden_act

    def __call__(self, x, valid=None):
        """x [B, T, D] -> (y [B, T, D], moe.LoadStats of this layer); valid [B, T]: the real
        tokens (the load statistics leave padding out)."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        routing = moe.route(self.gate(flat), self.k, self.renormalize)
        e = self.experts
        y = moe.ffn(flat, routing, e.weights(), ACTIVATIONS[self.act], lora_scale=e.lora_scale)
        y = y.reshape(B, T, D)
        if self.shared_expert is not None:  # on [B, T, D], where its sharding names apply
            y = y + jax.nn.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        stats = moe.load_stats(routing, None if valid is None else valid.reshape(-1))
        return y, stats


def block_norms(cfg: ModelConfig) -> tuple[str, ...]:
    """The RMSNorms of a layer, by HF name. Pre-norm layers: input_layernorm before attention,
    post_attention_layernorm before the MLP. With post_norms (Gemma): post_attention_layernorm
    on the attention output, pre_/post_feedforward_layernorm around the MLP."""
    if cfg.post_norms:
        return (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        )
    return ("input_layernorm", "post_attention_layernorm")


class Block(nnx.Module):
    """One decoder layer: pre-norm residual attention and MLP (optionally post-normed).
    quantize ("" | "int8" | "nf4"): how the attention, MLP and expert kernels are stored."""

    def __init__(self, cfg: ModelConfig, lora, dtype, param_dtype, rngs, quantize=""):
        norm = dict(offset=cfg.norm_offset, param_dtype=param_dtype, rngs=rngs)
        for name in block_norms(cfg):
            setattr(self, name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm))
        self.post_norms = cfg.post_norms
        self.self_attn = Attention(cfg, lora, dtype, param_dtype, rngs, quantize)
        self.moe = bool(cfg.num_experts)
        mlp = SparseMoE if self.moe else MLP
        self.mlp = mlp(cfg, lora, dtype, param_dtype, rngs, quantize=quantize)

    def __call__(self, x, cos, sin, mask, impl, kv_cache=None, layer=None, index=None, valid=None):
        """x [B, T, D] -> ([B, T, D], kv_cache, moe.LoadStats or None for a dense MLP).

        kv_cache: None, or the stacked (k, v) [L, B, S, K, H] of every layer; this layer
        (number `layer`) writes its T new tokens at slot `index`, in place, and attends to its
        slice of the result.
        """
        attn = self.self_attn
        q, k, v = attn.qkv(self.input_layernorm(x), cos, sin)
        if kv_cache is not None:
            kv_cache = tuple(
                jax.lax.dynamic_update_slice(c, new[None].astype(c.dtype), (layer, 0, index, 0, 0))
                for c, new in zip(kv_cache, (k, v), strict=True)
            )
            k, v = (
                jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False).astype(q.dtype)
                for c in kv_cache
            )
        o = attention.attend(q, k, v, mask, impl, scale=attn.scale, softcap=attn.softcap)
        B, T = x.shape[:2]
        h = attn.o_proj(o.reshape(B, T, -1))
        if self.post_norms:
            x = x + self.post_attention_layernorm(h)
            y, stats = self._mlp(self.pre_feedforward_layernorm(x), valid)
            x = x + self.post_feedforward_layernorm(y)
        else:
            x = x + h
            y, stats = self._mlp(self.post_attention_layernorm(x), valid)
            x = x + y
        return constrain(x, "batch", None, None), kv_cache, stats

    def _mlp(self, x, valid):
        return self.mlp(x, valid) if self.moe else (self.mlp(x), None)


class Transformer(nnx.Module):
    """Decoder-only LM. Call: logits [B, T, V] float32 from input_ids [B, T].

    quantize ("int8" | "nf4", QLoRA): the layers' attention, MLP and expert kernels (routed
    and shared) are stored quantised (layers.QuantKernel); embeddings, the LM head, norms and
    MoE routers stay in param_dtype."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype=jnp.bfloat16,
        param_dtype=jnp.float32,
        lora: LoraConfig | None = None,
        remat: str = "none",
        attention_impl="auto",
        unroll: int = 1,
        quantize: str = "",
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.unroll = max(1, min(int(unroll), cfg.num_layers))  # layers per scan iteration
        self.attention_impl = (
            attention.default_impl() if attention_impl == "auto" else (attention_impl)
        )
        self.embed_tokens = Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            scale=cfg.embed_scale,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return Block(cfg, lora, dtype, param_dtype, rngs, quantize)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(
            cfg.hidden_size,
            cfg.rms_norm_eps,
            offset=cfg.norm_offset,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(
                cfg.hidden_size,
                cfg.vocab_size,
                ("embed", "vocab"),
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        self.rope = _rope(cfg, cfg.rope_theta, cfg.rope_scaling)
        self.local_rope = None  # the windowed layers' RoPE when it differs (Gemma 3)
        if cfg.local_rope_theta is not None and any(cfg.windowed_layers):
            self.local_rope = _rope(cfg, cfg.local_rope_theta, cfg.local_rope_scaling)

    def __call__(self, input_ids, positions=None, segment_ids=None):
        return self.logits(self.hidden(input_ids, positions, segment_ids))

    def hidden(self, input_ids, positions=None, segment_ids=None):
        """Final-norm hidden states [B, T, D] (compute dtype)."""
        B, T = input_ids.shape
        idx = jnp.arange(T, dtype=jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(idx, (B, T))
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        return self.hidden_and_router_stats(input_ids, positions, segment_ids)[0]

    def hidden_and_router_stats(self, input_ids, positions=None, segment_ids=None):
        """(final-norm hidden states [B, T, D], moe.LoadStats summed over the layers, or None
        for a dense model)."""
        B, T = input_ids.shape
        idx = jnp.arange(T, dtype=jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(idx, (B, T))
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        spec = attention.takes_spec(self.attention_impl)
        mask = self._masks(segment_ids, segment_ids, idx, idx, spec)
        x, _, stats = self._run_layers(input_ids, positions, segment_ids, mask)
        return self.norm(x), stats

    def logits(self, h):
        """[B, T, D] -> float32 logits [B, T, V] (the LM head: ops.head_logits)."""
        return ops.head_logits(h, self.unembed_kernel(), h.dtype, self.cfg.final_softcap)

    def unembed_kernel(self):
        """[D, V]: lm_head, or the transposed embedding when tied."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        """Empty KV cache: k/v [L, B, S, K, H], segment ids of the slots [B, S], write index."""
        c = self.cfg
        shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
        dtype = dtype or self.dtype
        return {
            "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            "seg": jnp.zeros((batch, max_len), jnp.int32),
            "index": jnp.zeros((), jnp.int32),
        }

    def decode(self, input_ids, positions, segment_ids, cache, lengths=None):
        """Run T new tokens against the cache; returns (logits [B, T, V], updated cache).

        Tokens are written at slots [index, index + T); segment id 0 marks padding (left
        padding of batched prompts), which no token attends to. lengths [B]: each row's whole
        sequence length for LongRoPE's short/long choice (default: from these tokens alone).
        """
        T = input_ids.shape[1]
        index = cache["index"]
        seg = jax.lax.dynamic_update_slice_in_dim(cache["seg"], segment_ids, index, axis=1)
        q_idx = index + jnp.arange(T, dtype=jnp.int32)
        k_idx = jnp.arange(seg.shape[1], dtype=jnp.int32)
        valid = (seg != 0)[:, None, :]
        mask = tuple(m & valid for m in self._masks(segment_ids, seg, q_idx, k_idx))
        kv = (cache["k"], cache["v"])
        x, kv, _ = self._run_layers(input_ids, positions, segment_ids, mask, kv, index, lengths)
        cache = {"k": kv[0], "v": kv[1], "seg": seg, "index": index + T}
        return self.logits(self.norm(x)), cache

    def _masks(self, q_seg, k_seg, q_idx, k_idx, spec=False):
        """(full mask,) or (full mask, windowed mask) with per-layer windows; with `spec`, an
        attention.MaskSpec instead (the Pallas kernels; no [B, T, S] mask is built)."""
        c = self.cfg
        if spec:
            per_layer = None if c.sliding_layers else True  # None: set per layer in the scan
            return attention.MaskSpec(q_seg, k_seg, q_idx, k_idx, c.sliding_window, per_layer)
        full = attention.attention_mask(
            q_seg, k_seg, q_idx, k_idx, None if c.sliding_layers else c.sliding_window
        )
        if not c.sliding_layers:
            return (full,)
        return full, attention.attention_mask(q_seg, k_seg, q_idx, k_idx, c.sliding_window)

    def _run_layers(
        self, input_ids, positions, segment_ids, masks, kv=None, index=None, lengths=None
    ):
        """-> (x [B, T, D], kv, moe.LoadStats summed over layers or None). masks: (mask,) for
        every layer, (full, windowed) per layer, or an attention.MaskSpec.

        kv (decode only): the stacked cache (k, v) [L, B, S, K, H]. It rides whole in the scan
        carry, so each layer updates its slice in place; passed through xs/ys instead, XLA
        copies the whole cache several times per step.
        """
        x = constrain(self.embed_tokens(input_ids), "batch", None, None)
        tables = _tables(positions, segment_ids, self.rope, lengths)
        if self.local_rope is not None:
            local = _tables(positions, segment_ids, self.local_rope, lengths)
        graphdef, state = nnx.split(self.layers)
        impl = self.attention_impl
        windowed = jnp.asarray(self.cfg.windowed_layers)
        layer_ids = None if kv is None else jnp.arange(self.cfg.num_layers, dtype=jnp.int32)

        def body(carry, xs):
            x, kv, stats = carry
            layer_state, use_window, layer = xs
            mask = attention.layer_mask(masks, use_window)
            cos, sin = tables
            if self.local_rope is not None:
                pairs = zip(local, tables, strict=True)
                cos, sin = (jnp.where(use_window, lt, gt) for lt, gt in pairs)
            block = nnx.merge(graphdef, layer_state)
            x, kv, layer_stats = block(x, cos, sin, mask, impl, kv, layer, index, valid)
            return (x, kv, stats if stats is None else moe.add_stats(stats, layer_stats)), None

        if self.remat != "none" and kv is None:  # remat only matters for gradients
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        xs = (state, windowed, layer_ids)
        valid = segment_ids != 0
        stats = None
        if self.cfg.num_experts:  # summed over layers in the carry
            E = self.cfg.num_experts
            stats = moe.LoadStats(jnp.zeros(E), jnp.zeros(E), jnp.zeros(()))
        return jax.lax.scan(body, (x, kv, stats), xs, unroll=self.unroll)[0]


def _rope(cfg: ModelConfig, theta: float, scaling: dict | None):
    """(inverse frequencies, attention factor, LongRoPE's (long frequencies, switch) or None),
    as plain floats: static, hashable. The rotary dim is head_dim x partial_rotary_factor."""
    dim = int(cfg.head_dim * cfg.partial_rotary_factor)
    inv_freq, factor = inv_frequencies(dim, theta, scaling, cfg.max_position_embeddings)
    long = long_frequencies(dim, theta, scaling, cfg.max_position_embeddings)
    long = None if long is None else (tuple(long[0].tolist()), long[1])
    return tuple(inv_freq.tolist()), factor, long


def _tables(positions, segment_ids, rope, lengths=None):
    inv, factor, long = rope
    long = None if long is None else (np.asarray(long[0]), long[1])
    return rope_tables(positions, np.asarray(inv), factor, long, segment_ids, lengths)
