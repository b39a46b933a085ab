"""KV-cache generation (jaxsft.evals.sample): parity with transformers' greedy generate on every
family, cache decoding == full recompute with left-padded batches, sampling reproducibility,
eos handling, chat prompts, and no recompilation per token."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from chat_checkpoint import build_chat_checkpoint
from flax import nnx
from hf_fixtures import VOCAB, hf_model

import jaxsft
from jaxsft.evals.sample import encode_chat, generate_ids, left_pad, stop_ids, top_p_filter
from jaxsft.tokenizer import load_tokenizer

PROMPT_LENGTHS = (5, 11, 3)  # batches of 2: [3, 5] and [11 + a dummy row]
NEW = 20
BATCH = 2  # most tests share one compiled program: batch 2, prompt bucket 64, 20 new tokens
EOS = 2  # the fixtures' eos id


def prompts(lengths=PROMPT_LENGTHS, seed=0):
    rs = np.random.RandomState(seed)
    return [rs.randint(3, VOCAB, n).tolist() for n in lengths]


def cut_at(ids, eos):
    return ids[: ids.index(eos)] if eos in ids else ids


@pytest.fixture(scope="module")
def models(hf_checkpoints):
    return {name: jaxsft.load_hf(hf_checkpoints[name])[0] for name in GENERATE_FAMILIES}


GENERATE_FAMILIES = (
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "gemma2",
    "gemma3",
    "phi3",
    "phi4mini",
    "mixtral",
    "qwen3_moe",
)


@pytest.mark.parametrize("family", GENERATE_FAMILIES)
def test_greedy_matches_transformers(family, models, hf_checkpoints):
    """Batched (left-padded) jaxsft greedy == transformers generate(do_sample=False) per row."""
    ps = prompts()
    ours = generate_ids(models[family], ps, NEW, eos_ids=[EOS], batch_size=BATCH)
    hf = hf_model(hf_checkpoints[family])
    for p, got in zip(ps, ours, strict=True):
        ids = torch.tensor([p])
        with torch.no_grad():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=NEW,
                eos_token_id=EOS,
                pad_token_id=0,
            )
        want = cut_at(out[0, len(p) :].tolist(), EOS)
        assert got == want, (family, p)
    assert max(len(o) for o in ours) == NEW, "eos ended every row early: the test lost its teeth"


def full_recompute_greedy(model, ps, new):
    """Greedy by a full forward of the whole sequence at every step (no cache): each row
    right-padded in a [B, max_len + new] buffer, logits read at its last real token."""
    B, S = len(ps), max(map(len, ps)) + new
    ids = np.zeros((B, S), np.int32)
    lens = np.array([len(p) for p in ps])
    for b, p in enumerate(ps):
        ids[b, : len(p)] = p
    forward = nnx.jit(lambda m, ids, seg: m(ids, segment_ids=seg))
    out = [[] for _ in ps]
    for _ in range(new):
        seg = (np.arange(S)[None] < lens[:, None]).astype(np.int32)
        logits = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(seg)))
        nxt = logits[np.arange(B), lens - 1].argmax(-1)
        for b in range(B):
            ids[b, lens[b]] = nxt[b]
            out[b].append(int(nxt[b]))
        lens += 1
    return out


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_cache_matches_full_recompute(family, models):
    """Mistral's window (8) is shorter than prompt + reply: the cache honours it too."""
    ps = prompts((3, 9, 14), seed=1)
    got = generate_ids(models[family], ps, NEW, eos_ids=(), batch_size=BATCH)
    assert got == full_recompute_greedy(models[family], ps, NEW)


def test_left_pad_layout():
    ids, pos, seg = left_pad([[5, 6, 7], [8]], pad_id=0, multiple=4)
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8]])
    np.testing.assert_array_equal(pos, [[0, 0, 1, 2], [0, 0, 0, 0]])
    np.testing.assert_array_equal(seg, [[0, 1, 1, 1], [0, 0, 0, 1]])


def test_eos_stops_and_is_not_returned(models):
    """Any of several eos ids ends a row; the reply is the prefix before it."""
    model = models["qwen3"]
    ps = prompts((6, 9), seed=3)
    free = generate_ids(model, ps, NEW, eos_ids=(), batch_size=BATCH)
    stop_a, stop_b = free[0][4], free[1][7]
    got = generate_ids(model, ps, NEW, eos_ids=[stop_a, stop_b], batch_size=BATCH)
    for row, full in zip(got, free, strict=True):
        first = min(full.index(s) for s in (stop_a, stop_b) if s in full)
        assert row == full[:first]


def test_top_p_filter_by_hand():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(top_p_filter(logits, 0.7)))
    np.testing.assert_array_equal(kept, [[True, True, False, False]])  # 0.5 < 0.7 <= 0.8
    kept = np.isfinite(np.asarray(top_p_filter(logits, 0.5)))
    np.testing.assert_array_equal(kept, [[True, False, False, False]])
    kept = np.isfinite(np.asarray(top_p_filter(logits, 1.0)))
    assert kept.all()


def test_sampling_is_seeded(models):
    model = models["llama"]
    ps = prompts((5, 8), seed=4)
    kw = dict(eos_ids=(), batch_size=BATCH)
    a = generate_ids(model, ps, NEW, temperature=1.5, top_p=0.95, seed=7, **kw)
    b = generate_ids(model, ps, NEW, temperature=1.5, top_p=0.95, seed=7, **kw)
    c = generate_ids(model, ps, NEW, temperature=1.5, top_p=0.95, seed=8, **kw)
    assert a == b
    assert a != c
    # a nucleus this small keeps only the top token: sampling becomes greedy
    tiny = generate_ids(model, ps, NEW, temperature=1.0, top_p=1e-6, seed=3, **kw)
    assert tiny == generate_ids(model, ps, NEW, **kw)


class CompileCounter:
    """Counts XLA backend compiles while active (jax.monitoring event)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.active, self.count = False, 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, **kwargs):
        if self.active and event == self.EVENT:
            self.count += 1

    def __enter__(self):
        self.count, self.active = 0, True
        return self

    def __exit__(self, *exc):
        self.active = False


def test_no_recompile_per_token(models):
    model = models["qwen2"]
    counter = CompileCounter()
    with counter:  # may compile the program for this shape (a few programs at most)
        out = generate_ids(model, prompts((5, 9), seed=5), 40, eos_ids=())
    assert len(out[0]) == 40
    assert counter.count <= 3, f"{counter.count} compiles for one call of 40 tokens"
    with counter:  # new prompts, same batch / bucket / length: nothing compiles at all
        generate_ids(model, prompts((7, 2), seed=6), 40, eos_ids=())
        generate_ids(model, prompts((3, 11), seed=7), 40, eos_ids=(), temperature=0.0)
    assert counter.count == 0


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return build_chat_checkpoint(str(tmp_path_factory.mktemp("chat_ckpt")), "llama3", 0)


def test_generate_chat(chat_dir):
    """Prompt ids are the template's (one BOS); replies stop at the tokenizer eos."""
    tok = load_tokenizer(chat_dir)
    model, _ = jaxsft.load_hf(chat_dir)
    convs = [
        [{"role": "user", "content": "hello world"}],
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "what is the weather in paris"},
        ],
    ]
    ids = encode_chat(tok, convs[0])
    assert (
        ids
        == tok.apply_chat_template(convs[0], add_generation_prompt=True, tokenize=True)["input_ids"]
    )
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    eos = stop_ids(model, tok)
    assert tok.eos_token_id in eos
    texts = jaxsft.generate(model, tok, convs, max_new_tokens=NEW)
    raw = generate_ids(model, [encode_chat(tok, c) for c in convs], NEW, eos)
    assert texts == [tok.decode(r, skip_special_tokens=True) for r in raw]
    assert all(isinstance(t, str) for t in texts)


def test_stop_ids_read_generation_config(models, tmp_path):
    """Gemma's <end_of_turn> and Phi's <|end|> are eos ids only in generation_config.json: a
    reply stops there too."""
    import json
    import types

    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 106]}))
    tok = types.SimpleNamespace(eos_token_id=5, name_or_path=str(tmp_path))
    assert stop_ids(models["llama"], tok) == sorted({*models["llama"].cfg.eos_token_ids, 1, 5, 106})
    tok.name_or_path = str(tmp_path / "missing")
    assert stop_ids(models["llama"], tok) == sorted({*models["llama"].cfg.eos_token_ids, 5})
