"""Load a Hugging Face tokenizer from a local directory (never the hub, never remote code)."""

from __future__ import annotations

import json
import os

from jaxsft.errors import UserError

# Files any one of which holds a tokenizer's vocabulary (fast tokenizer.json, SentencePiece,
# WordPiece, tiktoken), and the pair a slow byte-level BPE tokenizer needs.
VOCAB_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
    "tekken.json",
)
BPE_PAIR = ("vocab.json", "merges.txt")


def has_tokenizer_files(path: str) -> bool:
    """Whether directory `path` holds a tokenizer vocabulary (see VOCAB_FILES / BPE_PAIR)."""
    names = set(os.listdir(path))
    return (
        any(n in names for n in VOCAB_FILES)
        or all(n in names for n in BPE_PAIR)
        or any(n.endswith(".tiktoken") for n in names)
    )


def load_tokenizer(path: str | os.PathLike):
    """Return the `transformers` tokenizer saved in `path` (tokenizer.json / tokenizer_config.json).

    Local files only and `trust_remote_code=False`: a tokenizer that needs custom code is refused.
    A missing directory, one without tokenizer files, or an unreadable tokenizer is a
    `UserError` naming the directory.
    """
    path = os.fspath(path)
    if not path or not os.path.isdir(path):
        raise UserError(
            "model.path: no such directory",
            where=path or "model.path",
            hint="set model.path to a local HF checkpoint directory with tokenizer files",
        )
    _check_config_json(path)
    if not has_tokenizer_files(path):
        expected = ", ".join((*VOCAB_FILES, " + ".join(BPE_PAIR)))
        raise UserError(
            f"model.path has no tokenizer files (expected one of: {expected})",
            where=path,
            hint="save the base model's tokenizer into this directory "
            "(tokenizer.save_pretrained(model.path) writes tokenizer.json and "
            "tokenizer_config.json)",
        )
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for bad dirs
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise UserError(
            f"cannot load the tokenizer: {type(e).__name__}: {first_line}",
            where=path,
            hint="the tokenizer files are damaged or of an unsupported kind: save the base "
            "model's tokenizer again (save_pretrained); JAXSFT_DEBUG=1 shows the cause",
        ) from e


def _check_config_json(path: str) -> None:
    """AutoTokenizer reads config.json too: an unreadable one is named as such, not blamed on
    the tokenizer files."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return
    try:
        with open(cfg, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(
            f"config.json is not valid JSON: {e}",
            where=cfg,
            hint="restore the checkpoint's config.json (as written by save_pretrained)",
        ) from None


def no_chat_template(tokenizer, needed_by: str, reason: str = "has no chat template") -> UserError:
    """The error for conversational data (first row: `needed_by`) and a tokenizer without a
    usable chat template: it names the tokenizer's files, not the data row."""
    directory = getattr(tokenizer, "name_or_path", "")
    files = 'chat_template.jinja (or "chat_template" in tokenizer_config.json)'
    if directory:
        files = os.path.join(directory, files)
    return UserError(
        f"the tokenizer {reason}, and conversational data needs one (first such row: {needed_by})",
        where=os.path.join(directory, "tokenizer_config.json") if directory else "model.path",
        hint=f"put the model's chat template in {files}, e.g. from its instruct release; "
        'or use {"prompt", "completion"} strings or {"text"} rows, which need none',
    )


def pad_id(tokenizer) -> int:
    """The id used on padding positions: the tokenizer's pad token, or 0 when it has none."""
    pid = getattr(tokenizer, "pad_token_id", None)
    return int(pid) if pid is not None else 0
