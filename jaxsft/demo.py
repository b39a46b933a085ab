"""Assets of the README demo, made locally (nothing is downloaded): a byte-level BPE tokenizer
with a ChatML template, a tiny random Llama checkpoint in HF format, and a synthetic chat task
with exactly one right answer per prompt (parity of a number, its last digit).

A random model answers almost none of the held-out prompts; after a few minutes of SFT on a
CPU it answers nearly all of them.
"""

from __future__ import annotations

import json
import os
import random

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MODEL = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def example(rng: random.Random) -> dict:
    n = rng.randint(0, 10 ** rng.randint(1, 6))
    if rng.random() < 0.5:
        q, a = (
            rng.choice(["Is {} even or odd?", "Tell me if {} is odd or even."]),
            ("even" if n % 2 == 0 else "odd"),
        )
    else:
        q, a = rng.choice(["What is the last digit of {}?", "Last digit of {}?"]), str(n % 10)
    return {
        "messages": [{"role": "user", "content": q.format(n)}, {"role": "assistant", "content": a}]
    }


def make_data(out: str, seed: int = 0, n_train: int = 3000, n_eval: int = 200, n_golden: int = 100):
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n_train + n_eval + n_golden:
        ex = example(rng)
        key = ex["messages"][0]["content"]
        if key not in seen:
            seen.add(key)
            rows.append(ex)
    splits = {"train.jsonl": rows[:n_train], "eval.jsonl": rows[n_train : n_train + n_eval]}
    golden = [
        {"messages": r["messages"][:1], "expected": r["messages"][1]["content"], "metric": "exact"}
        for r in rows[n_train + n_eval :]
    ]
    splits["golden.jsonl"] = golden
    for name, items in splits.items():
        with open(os.path.join(out, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in items)


def make_tokenizer(
    out_dir: str,
    corpus: list[str],
    chat_template: str = CHATML,
    added: tuple[str, ...] = (),
    vocab_size: int = MODEL["vocab_size"],
    split_words: bool = True,
):
    """A byte-level BPE tokenizer trained on `corpus` with the ChatML control tokens, `added`
    as non-special added tokens (Qwen's <tool_call>), saved to out_dir. split_words=False lets
    merges cross word boundaries (text repeated in every row, e.g. tool definitions, becomes a
    few tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_words),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=chat_template,
    )
    fast.save_pretrained(out_dir)
    return fast


def make_model(out_dir: str, tokenizer, seed: int = 0, shape: dict = MODEL):
    """A random Llama of `shape` (MODEL: the demo's) with the tokenizer's vocab, saved to out_dir
    as an HF checkpoint (config.json + model.safetensors)."""
    import jax.numpy as jnp
    from flax import nnx
    from safetensors.numpy import save_file

    from jaxsft.hf_io import hf_tensors
    from jaxsft.models.config import ModelConfig
    from jaxsft.models.transformer import Transformer

    hf = dict(
        shape,
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    cfg = ModelConfig.from_hf(hf)
    model = Transformer(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    tensors = {k: a for k, a, _ in hf_tensors(nnx.state(model), cfg)}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f, indent=2)


def ensure_assets(root: str, seed: int = 0) -> str:
    """Make the demo assets under root once (about 10 s); returns root."""
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    model_dir = os.path.join(root, "model")
    os.makedirs(model_dir, exist_ok=True)
    make_data(root, seed)
    with open(os.path.join(root, "train.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    corpus = [m["content"] for r in rows for m in r["messages"]] + ["user", "assistant", "system"]
    tokenizer = make_tokenizer(model_dir, corpus)
    make_model(model_dir, tokenizer, seed)
    open(done, "w").close()
    return root
