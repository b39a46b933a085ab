"""A tiny random Llama checkpoint WITH a tokenizer and chat template in the same directory,
as `python -m jaxsft.evaluate --model DIR` expects (nothing downloaded).

The tokenizer is one of tokenizers_fixture.KINDS (byte-level BPE, ~604 ids); the model's vocab
(640) covers it and its config names the tokenizer's eos / bos ids.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

VOCAB = 640


@functools.cache
def build_chat_checkpoint(root: str, kind: str = "llama3", seed: int = 0) -> str:
    """Build (once per process) root/{kind}_{seed}: weights, config.json, tokenizer files."""
    import torch
    import transformers as tf
    from tokenizers_fixture import build_tokenizer

    out = Path(root) / f"{kind}_{seed}"
    tok = build_tokenizer(kind)
    assert len(tok) <= VOCAB, len(tok)
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return os.fspath(out)
