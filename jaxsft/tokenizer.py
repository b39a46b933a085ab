"""Load a Hugging Face tokenizer from a local directory (never the hub, never remote code)."""

from __future__ import annotations

import os

from jaxsft.errors import UserError


def load_tokenizer(path: str | os.PathLike):
    """Return the `transformers` tokenizer saved in `path` (tokenizer.json / tokenizer_config.json).

    Local files only and `trust_remote_code=False`: a tokenizer that needs custom code is refused.
    A missing or unreadable tokenizer is a `UserError` naming the directory.
    """
    path = os.fspath(path)
    if not path or not os.path.isdir(path):
        raise UserError(
            "tokenizer directory not found",
            where=path or "model.path",
            hint="set model.path to a local HF checkpoint directory with tokenizer files",
        )
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for bad dirs
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise UserError(
            f"cannot load the tokenizer: {type(e).__name__}: {first_line}",
            where=path,
            hint="the directory needs tokenizer.json (or the slow tokenizer files) and "
            "tokenizer_config.json, as written by save_pretrained",
        ) from e


def pad_id(tokenizer) -> int:
    """The id used on padding positions: the tokenizer's pad token, or 0 when it has none."""
    pid = getattr(tokenizer, "pad_token_id", None)
    return int(pid) if pid is not None else 0
