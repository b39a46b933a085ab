"""KV-cache generation: chat prompts in, assistant replies out.

    texts = jaxsft.generate(model, tokenizer, conversations, max_new_tokens=64)

How one batch runs (all of it inside one `jax.jit`, compiled once per batch shape):
- prompts are LEFT-padded to a bucket length P (a multiple of PROMPT_BUCKET), so every row's
  last prompt token sits in slot P-1; pads have segment id 0 (nothing attends to them) and
  each row's positions count from 0 at its first real token;
- prefill runs the prompt through `model.decode` in chunks of PROMPT_BUCKET tokens (so the
  [B, T, V] float32 logits buffer is at most [B, 64, V], not [B, P, V]);
- a `jax.lax.while_loop` then feeds one token per step into the cache of fixed shape
  [L, B, P + max_new_tokens, K, H] and stops early once every row has produced an eos.
Nothing depends on the step number at trace time, so no token triggers a recompile; a new
compile happens only for a new (batch, prompt bucket, max_new_tokens, sampling mode, model).

Sampling: temperature 0 is greedy (argmax); otherwise logits / temperature, then nucleus
(top-p) filtering when top_p < 1, then one categorical draw per row from `seed`.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft.errors import UserError
from jaxsft.models.config import eos_ids

PROMPT_BUCKET = 64  # prompt lengths are rounded up to a multiple of this (also the prefill chunk)
DEFAULT_BATCH = 8


def generate(
    model,
    tokenizer,
    conversations: Sequence[Sequence[dict]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int | None = None,
    eos_ids: Sequence[int] = (),
    tools: Sequence | None = None,
) -> list[str]:
    """The assistant reply to each conversation (a list of {"role", "content"} messages).

    Prompts are the tokenizer's chat template with add_generation_prompt=True, token for token
    as `apply_chat_template(tokenize=True, tools=...)` gives them. `tools`: one list of tool
    definitions for every conversation, or one entry (a list or None) per conversation.
    Generation stops at any eos id: the model config's `eos_token_ids`, the tokenizer's
    `eos_token_id` and the extra `eos_ids`; the eos is not part of the reply, which is decoded
    with skip_special_tokens=True.
    `batch_size` rows run together (None: 8); rows are grouped by prompt length.
    """
    per_conv = tools_per_conversation(tools, len(conversations))
    prompts = [encode_chat(tokenizer, c, t) for c, t in zip(conversations, per_conv, strict=True)]
    eos = stop_ids(model, tokenizer, eos_ids)
    out = generate_ids(
        model,
        prompts,
        max_new_tokens,
        eos,
        temperature,
        top_p,
        seed,
        batch_size=batch_size,
        pad_id=_pad_id(tokenizer),
    )
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in out]


def tools_per_conversation(tools: Sequence | None, n: int) -> list:
    """`tools` of generate -> one entry (a list of definitions or None) per conversation."""
    if (
        tools is not None
        and len(tools) == n
        and all(t is None or isinstance(t, list) for t in tools)
    ):
        return list(tools)
    return [list(tools) if tools else None] * n


def encode_chat(
    tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None = None
) -> list[int]:
    """Prompt ids: the chat template with the generation prompt and `tools` (no second BOS)."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the tokenizer has no chat_template",
            hint="generation renders prompts with the checkpoint's chat template",
        )
    out = tokenizer.apply_chat_template(
        list(messages), tools=tools or None, add_generation_prompt=True, tokenize=True
    )
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(i) for i in ids]


def stop_ids(model, tokenizer=None, extra: Sequence[int] = ()) -> list[int]:
    """Every id that ends a reply: model config eos ids, tokenizer eos, the eos ids of the
    tokenizer directory's generation_config.json (Gemma's <end_of_turn>, Phi's <|end|> are
    only there), `extra` (sorted, unique)."""
    ids = set(getattr(model.cfg, "eos_token_ids", ()) or ())
    tok_eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if tok_eos is not None:
        ids.add(int(tok_eos))
    ids.update(generation_config_eos(getattr(tokenizer, "name_or_path", None)))
    ids.update(int(i) for i in extra)
    return sorted(ids)


def generation_config_eos(directory) -> list[int]:
    """eos_token_id of DIR/generation_config.json (an int or a list), [] when absent."""
    path = os.path.join(os.fspath(directory), "generation_config.json") if directory else ""
    try:
        with open(path) as f:
            return list(eos_ids(json.load(f).get("eos_token_id")))
    except (OSError, ValueError, TypeError, AttributeError):
        return []


def generate_ids(
    model,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    *,
    batch_size: int | None = None,
    pad_id: int = 0,
) -> list[list[int]]:
    """New token ids per prompt, cut before the first eos id (the eos is not included).

    Rows are sorted by length and run in batches of `batch_size` (None: 8; the last batch is
    filled with dummy rows so the batch shape, and the compiled program, stay the same).
    """
    if max_new_tokens <= 0:
        return [[] for _ in prompt_ids]
    if not prompt_ids:
        return []
    if any(len(p) == 0 for p in prompt_ids):
        raise UserError("an empty prompt cannot be continued")
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise UserError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    bs = min(batch_size or DEFAULT_BATCH, len(prompt_ids))
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    graphdef, state = nnx.split(model)
    eos = _eos_array(eos_ids)
    results: list[list[int]] = [[] for _ in prompt_ids]
    for start in range(0, len(order), bs):
        rows = order[start : start + bs]
        batch = [list(prompt_ids[i]) for i in rows]
        batch += [batch[-1]] * (bs - len(batch))  # dummy rows: fixed batch shape
        ids, pos, seg = left_pad(batch, pad_id)
        key = jax.random.fold_in(jax.random.key(seed), start)
        tokens = _generate(
            graphdef,
            state,
            ids,
            pos,
            seg,
            eos,
            key,
            jnp.float32(max(temperature, 1e-6)),
            jnp.float32(top_p),
            max_new=int(max_new_tokens),
            greedy=temperature == 0.0,
            use_top_p=top_p < 1.0,
        )
        tokens = np.asarray(jax.device_get(tokens))
        for r, i in enumerate(rows):
            results[i] = _cut(tokens[r], eos_ids)
    return results


def bucket_length(n: int, multiple: int = PROMPT_BUCKET) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = PROMPT_BUCKET):
    """[B, P] int32 ids, positions, segment ids; P = the longest prompt rounded up to `multiple`.

    Row b holds its prompt in the last len(b) slots, positions 0..len(b)-1 and segment id 1;
    the pad slots before it have id `pad_id`, position 0 and segment id 0.
    """
    P = bucket_length(max(len(p) for p in prompts), multiple)
    B = len(prompts)
    ids = np.full((B, P), pad_id, np.int32)
    pos = np.zeros((B, P), np.int32)
    seg = np.zeros((B, P), np.int32)
    for b, p in enumerate(prompts):
        n = len(p)
        ids[b, P - n :] = p
        pos[b, P - n :] = np.arange(n)
        seg[b, P - n :] = 1
    return ids, pos, seg


def _eos_array(eos_ids: Sequence[int]) -> jax.Array:
    """Eos ids padded with -1 to a power of two >= 8 (so the eos count rarely recompiles)."""
    ids = sorted({int(e) for e in eos_ids})
    n = max(8, 1 << max(len(ids) - 1, 0).bit_length())
    return jnp.asarray(ids + [-1] * (n - len(ids)), jnp.int32)


def _cut(tokens: np.ndarray, eos_ids: Sequence[int]) -> list[int]:
    out = []
    stop = set(int(e) for e in eos_ids)
    for t in tokens.tolist():
        if t < 0 or t in stop:  # -1: not generated (the loop stopped early)
            break
        out.append(t)
    return out


def _pad_id(tokenizer) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    return int(pid) if pid is not None else 0


def select_token(logits, key, temperature, top_p, *, greedy: bool, use_top_p: bool):
    """logits [B, V] float32 -> next token [B] int32: argmax, or a temperature/top-p draw."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if use_top_p:
        logits = top_p_filter(logits, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def top_p_filter(logits, top_p):
    """Keep the smallest set of top tokens whose probability reaches top_p (at least one)."""
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each one
    keep = before < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new", "greedy", "use_top_p"))
def _generate(
    graphdef, state, ids, pos, seg, eos, key, temperature, top_p, *, max_new, greedy, use_top_p
):
    """[B, P] left-padded prompts -> [B, max_new] new tokens (eos included, -1 after it)."""
    model = nnx.merge(graphdef, state)
    B, P = ids.shape
    pick = functools.partial(
        select_token, temperature=temperature, top_p=top_p, greedy=greedy, use_top_p=use_top_p
    )
    switch = longrope_switch(model)
    S = P + max_new if switch is None else bucket_length(P + max_new, min(PROMPT_BUCKET, P))
    cache = model.init_cache(B, S)
    lengths = seg.sum(axis=1) if switch is not None else None  # the prompts, whole
    last_logits, cache = _prefill(model, ids, pos, seg, cache, lengths)
    first = pick(last_logits, jax.random.fold_in(key, 0))
    out = jnp.full((B, max_new), -1, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos)
    next_pos = pos[:, -1] + 1  # the last slot is every row's last prompt token
    ones = jnp.ones((B, 1), jnp.int32)

    def cond(carry):
        step, _, done, _, _, _ = carry
        return (step < max_new) & ~jnp.all(done)

    def body(carry):
        step, out, done, token, p, cache = carry
        lengths = None
        if switch is not None:  # LongRoPE: re-encode a row's past when it crosses the switch
            lengths = p + 1
            cache = jax.lax.cond(
                jnp.any(p == switch),
                lambda c: _reencode(model, ids, pos, seg, out, step, S, lengths),
                lambda c: c,
                cache,
            )
        logits, cache = model.decode(token[:, None], p[:, None], ones, cache, lengths)
        new = pick(logits[:, -1], jax.random.fold_in(key, step))
        new = jnp.where(done, -1, new)
        out = jax.lax.dynamic_update_slice_in_dim(out, new[:, None], step, axis=1)
        done = done | jnp.isin(new, eos)
        return step + 1, out, done, jnp.maximum(new, 0), p + 1, cache

    carry = (jnp.int32(1), out, done, first, next_pos, cache)
    return jax.lax.while_loop(cond, body, carry)[1]


def longrope_switch(model) -> int | None:
    """The sequence length past which a LongRoPE model uses its long factors (None: no
    LongRoPE). transformers' Phi-3 generate then re-encodes the whole sequence with them once
    (prepare_inputs_for_generation drops the cache at the switch); so does _generate."""
    long = model.rope[2]
    return None if long is None else int(long[1])


def _reencode(model, ids, pos, seg, out, step, S, lengths):
    """A fresh cache of the prompts and the tokens generated before `step`'s input token
    (slots up to P + step - 1), encoded with each row's current length `lengths`."""
    B, P = ids.shape
    new = out.shape[1]
    j = jnp.arange(new, dtype=jnp.int32)[None]
    gen_seg = ((j < step - 1) & (out >= 0)).astype(jnp.int32)
    pad = S - P - new
    buf = [
        jnp.concatenate([x, y, jnp.zeros((B, pad), jnp.int32)], axis=1)
        for x, y in ((ids, jnp.maximum(out, 0)), (pos, pos[:, -1:] + 1 + j), (seg, gen_seg))
    ]
    _, cache = _prefill(model, *buf, model.init_cache(B, S), lengths)
    return {**cache, "index": jnp.int32(P) + step - 1}


def _prefill(model, ids, pos, seg, cache, lengths=None):
    """Prompt through the cache in chunks of PROMPT_BUCKET tokens -> (last logits [B, V], cache)."""
    B, P = ids.shape
    C = min(PROMPT_BUCKET, P)
    chunks = [x.reshape(B, P // C, C).swapaxes(0, 1) for x in (ids, pos, seg)]

    def body(cache, xs):
        logits, cache = model.decode(*xs, cache, lengths)
        return cache, logits[:, -1]

    cache, last = jax.lax.scan(body, cache, tuple(chunks))
    return last[-1], cache
