"""One example -> (input_ids, loss_mask), using the tokenizer's own chat template.

Formats (see formats.py): conversational `messages`, ShareGPT `conversations`, `prompt`/`completion`
(strings or message lists) and plain `text`. For conversations the supervised tokens are each
assistant turn's content plus whatever the template emits after it up to and including its
end-of-turn special token (`<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`, `<|end|>`, ...); nothing
of system/user/tool turns or of role headers.

How the mask is found:
- a template with `{% generation %}` markers: the assistant mask of `apply_chat_template`;
- any other template: the conversation is rendered once, in full (`tokenize=False`); each
  assistant message's content is searched forward, in order, in that text (also in transformed
  forms: trimmed, or with its `<think>` block rewritten/removed as Qwen3 templates do), then the
  character spans become token spans through the fast tokenizer's offset mapping. Prefix
  rendering is never used: Qwen3-style templates rewrite earlier turns.
A message that cannot be located is an error, never a silently unsupervised turn.

The ids equal `apply_chat_template(tokenize=True)["input_ids"]`: the rendered text is encoded with
`add_special_tokens=False`, so a template that writes the BOS itself gets exactly one BOS.
"""

from __future__ import annotations

import re
import weakref
from typing import Any

import numpy as np

from jaxsft.data.formats import InvalidExample, normalize
from jaxsft.errors import UserError
from jaxsft.tokenizer import no_chat_template

__all__ = ["InvalidExample", "normalize", "render", "render_many"]

_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
# Special tokens whose text looks like an end of turn / sequence (and not a header start).
_EOT_NAME = re.compile(r"end|eot|eos|eom|^</", re.IGNORECASE)
_NOT_EOT_NAME = re.compile(r"header|start|begin", re.IGNORECASE)
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


# --------------------------------------------------------------------------------------------
# Tokenizer facts, computed once per tokenizer
# --------------------------------------------------------------------------------------------
class TokInfo:
    """What rendering needs to know about a tokenizer: special ids, EOT ids, BOS/EOS behaviour."""

    def __init__(self, tokenizer):
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special_ids = {int(i) for i, t in added.items() if getattr(t, "special", False)}
        self.special_ids |= {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
        self.added_texts = sorted({str(t.content) for t in added.values()}, key=len, reverse=True)
        self.eos_id = tokenizer.eos_token_id
        self.eot_ids = {i for i in self.special_ids if self._looks_eot(tokenizer, i)}
        if self.eos_id is not None:
            self.eot_ids.add(int(self.eos_id))
        bos = tokenizer.bos_token_id
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.bos_id = bos if bos is not None and ids and ids[0] == bos else None
        pattern = "|".join(re.escape(t) for t in self.added_texts) or r"(?!x)x"
        # After an assistant content: optional whitespace then an added (control) token.
        self.follow = re.compile(r"\s*(?:" + pattern + ")")

    @staticmethod
    def _looks_eot(tokenizer, i: int) -> bool:
        text = tokenizer.convert_ids_to_tokens(i) or ""
        return bool(_EOT_NAME.search(text)) and not _NOT_EOT_NAME.search(text)


def template_mode(tokenizer) -> str:
    """ "none" (no chat template), "generation" ({% generation %} markers) or "search"."""
    if not getattr(tokenizer, "chat_template", None):
        return "none"
    try:
        template = tokenizer.get_chat_template()
    except ValueError:  # several named templates and no default: apply_chat_template fails too
        return "none"
    return "generation" if _GENERATION_TAG.search(template) else "search"


def _no_template(tokenizer, where: str) -> UserError:
    reason = "has no chat template"
    if getattr(tokenizer, "chat_template", None):
        reason = "has several named chat templates and none named 'default'"
    return no_chat_template(tokenizer, where, reason)


_INFO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tok_info(tokenizer) -> TokInfo:
    """Cached `TokInfo` of a tokenizer."""
    try:
        return _INFO[tokenizer]
    except (KeyError, TypeError):
        info = TokInfo(tokenizer)
        try:
            _INFO[tokenizer] = info
        except TypeError:
            pass
        return info


# --------------------------------------------------------------------------------------------
# Locating assistant contents in the rendered text
# --------------------------------------------------------------------------------------------
def _reasoning(m: dict) -> tuple[str | None, str]:
    """(reasoning or None, visible answer) of an assistant message."""
    content = m["content"]
    for k in _REASONING_KEYS:
        if isinstance(m.get(k), str):
            return m[k].strip(), content
    if "</think>" in content:
        head, _, answer = content.rpartition("</think>")
        return head.split("<think>")[-1].strip(), answer
    return None, content


def _first_strict(text: str, cand: str, cursor: int, info: TokInfo) -> int:
    """First occurrence of `cand` at/after cursor that is followed by a control token, or -1."""
    pos = text.find(cand, cursor)
    while pos >= 0:
        if info.follow.match(text, pos + len(cand)):
            return pos
        pos = text.find(cand, pos + 1)
    return -1


def _locate_assistant(text: str, m: dict, cursor: int, info: TokInfo) -> tuple[int, int] | None:
    """Character span of an assistant message's (possibly transformed) content, or None."""
    reasoning, answer = _reasoning(m)
    content = m["content"]
    cands = {content: False, content.strip(): False}  # text -> is a transformed (think) form
    if reasoning is not None:
        for c in (answer, answer.strip(), answer.lstrip("\n")):
            cands.setdefault(c, True)
    cands = {c: t for c, t in cands.items() if c}
    best = None  # (pos, len, transformed)
    for c, transformed in cands.items():  # earliest strict match wins; on a tie the longer one
        pos = _first_strict(text, c, cursor, info)
        if pos >= 0 and (best is None or (pos, -len(c)) < (best[0], -best[1])):
            best = (pos, len(c), transformed)
    if best is None:  # templates that write text between the content and its end token
        for c in (content, content.strip()):
            pos = text.find(c, cursor) if c else -1
            if pos >= 0:
                best = (pos, len(c), False)
                break
    if best is None:
        return None
    start, end = best[0], best[0] + best[1]
    if best[2]:
        # The template re-wrote the think block (or dropped it): supervise it where it survives.
        think = re.compile(r"<think>\s*" + re.escape(reasoning) + r"\s*</think>\s*\Z")
        hit = think.search(text, cursor, start)
        if hit:
            start = hit.start()
    return start, end


def assistant_char_spans(text: str, messages: list, info: TokInfo) -> list[tuple[int, int, int]]:
    """[(message index, char start, char end)] of every assistant content in `text`, in order."""
    cursor, spans = 0, []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            c = m["content"]
            for cand in (c, c.strip()):
                pos = text.find(cand, cursor) if cand else -1
                if pos >= 0:
                    cursor = pos + len(cand)
                    break
            continue
        span = _locate_assistant(text, m, cursor, info)
        if span is None:
            raise InvalidExample(
                f"the content of assistant message {i} cannot be found in the chat template's "
                "rendering, so its tokens cannot be supervised"
            )
        spans.append((i, *span))
        cursor = span[1]
    return spans


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
_SKIP = "data.on_invalid=skip drops invalid rows and lists them"
_HINT = f"fix or remove the row ({_SKIP})"
# What to do when a template's own raise_exception(...) refuses a row, by what it says.
_REFUSAL_HINTS = {
    "system": "this chat template has no system role: merge the system prompt into the first "
    "user turn, or drop the system message",
    "alternate": "this chat template takes only user/assistant turns in alternation, starting "
    "with a user turn: merge consecutive turns of one role, fold tool turns into user turns",
    "": "rewrite the row into a conversation this chat template accepts, or remove it",
}


def _apply_template(tokenizer, messages: list, where: str, **kwargs):
    """apply_chat_template; a template that refuses or fails on the row is an InvalidExample
    quoting the template's own message (never a Jinja traceback)."""
    from jinja2 import TemplateError, TemplateSyntaxError

    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except TemplateSyntaxError as e:  # the tokenizer's fault, not the row's: never skipped
        raise no_chat_template(
            tokenizer, where, f"has a chat template that is not valid Jinja ({e})"
        ) from e
    except Exception as e:
        if type(e) is TemplateError:  # raise_exception(...) in the template
            hint = next(h for k, h in _REFUSAL_HINTS.items() if k in str(e).lower())
            reason = f"the chat template refuses this conversation: {e}"
            raise InvalidExample(reason, hint=f"{hint} ({_SKIP})") from e
        reason = f"the chat template failed on this conversation ({type(e).__name__}: {e})"
        raise InvalidExample(reason) from e


def _token_spans(enc, char_spans, info: TokInfo, with_eot: bool) -> list[tuple]:
    """Char spans -> [(first token, last token inclusive, eot found)] via the fast tokenizer's
    offsets (`enc` is a tokenizers.Encoding).

    A token belongs to a span when its characters overlap it. With with_eot (chat spans),
    special tokens at the span's edges are left out, and the span extends to the first special
    token after it when that token is an end-of-turn token (everything the template emits in
    between, e.g. tool calls, is the assistant's output too).
    """
    ids, out = enc.ids, []
    for s, e in char_spans:
        first, last = _char_token(enc, s, e, 1), _char_token(enc, e - 1, s - 1, -1)
        if first is not None and last is not None:
            while last + 1 < len(ids) and enc.token_to_chars(last + 1)[0] < e:
                last += 1  # several tokens for the last character (byte pieces)
            # A special token with rstrip/lstrip (Phi-3's role tags) absorbs the whitespace at
            # a content's edge: it is the header or the end-of-turn token, not content.
            while with_eot and first <= last and ids[first] in info.special_ids:
                first += 1
            while with_eot and last >= first and ids[last] in info.special_ids:
                last -= 1
        if first is None or last is None or first > last:
            out.append((-1, -1, False))
            continue
        eot = False
        if with_eot:
            for t in range(last + 1, len(ids)):
                if ids[t] in info.special_ids:
                    if ids[t] in info.eot_ids:
                        last, eot = t, True
                    break
        out.append((first, last, eot))
    return out


def _char_token(enc, pos: int, stop: int, step: int) -> int | None:
    """Token holding character pos, walking towards stop over characters no token covers."""
    for p in range(pos, stop, step):
        t = enc.char_to_token(p)
        if t is not None:
            return t
    return None


def _finish(ids, turns: list[tuple], max_length: int | None) -> dict:
    """Mask from token spans, truncation keeping the start, and per-turn accounting.

    input_ids / loss_mask come back as int32 numpy arrays (`render` makes them lists)."""
    n = len(ids)
    mask = np.zeros(n, np.int32)
    for first, last, _ in turns:
        if first >= 0:
            mask[first : last + 1] = 1
    mask[0] = 0  # position 0 is never a target
    limit = n if not max_length else min(n, int(max_length))
    return {
        "input_ids": np.asarray(ids[:limit], np.int32),
        "loss_mask": mask[:limit],
        "length": n,
        "truncated": n > limit,
        "n_assistant_turns": len(turns),
        "assistant_turns_cut": sum(1 for f, last, _ in turns if last >= limit),
        "assistant_turns_lost": sum(1 for f, _, _ in turns if f >= limit),
        "turns_without_eot": sum(1 for f, last, eot in turns if not eot and last < limit),
        "turns_empty": sum(1 for f, _, _ in turns if f < 0),
    }


def _generation_render(tokenizer, norm: dict, info: TokInfo, max_length, where: str) -> dict:
    out = _apply_template(
        tokenizer,
        norm["messages"],
        where,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    ids = np.asarray(out["input_ids"], np.int64)
    m = np.asarray(out["assistant_masks"], np.int32)
    edges = np.diff(np.concatenate([[0], m, [0]]))
    runs = list(zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0] - 1, strict=True))
    roles = [i for i, msg in enumerate(norm["messages"]) if msg["role"] == "assistant"]
    if len(runs) != len(roles):
        raise InvalidExample(
            f"the template's {{% generation %}} blocks mark {len(runs)} spans for "
            f"{len(roles)} assistant messages"
        )
    turns = [
        (int(f), int(last), int(ids[last]) in info.eot_ids)
        for (f, last), i in zip(runs, roles, strict=True)
        if i >= norm["supervise_from"]
    ]
    return _finish(ids, turns, max_length)


def render_many(
    tokenizer,
    examples: list,
    max_length: int | None = None,
    wheres: list[str] | None = None,
    on_error: str = "raise",
    normalized: bool = False,
) -> tuple[list[dict | None], list[tuple[int, str]]]:
    """Render many examples, encoding the texts in one batch call of the fast tokenizer.

    Returns (rendered, errors): rendered[i] is None for a failed example and errors lists
    (index, reason). With on_error="raise" the first failure is a `UserError` naming
    wheres[i] (or "example i"). normalized=True: the examples come from `normalize` already.
    """
    info, mode = tok_info(tokenizer), template_mode(tokenizer)
    texts, plans, errors, hints = [], [], [], {}
    results: list[dict | None] = [None] * len(examples)
    for i, ex in enumerate(examples):
        where = wheres[i] if wheres else f"example {i}"
        try:
            norm = ex if normalized else normalize(ex)
            if norm["format"] == "chat":
                if mode == "none":  # the tokenizer's fault, not the row's: never skipped
                    raise _no_template(tokenizer, where)
                if mode == "generation":
                    results[i] = _generation_render(tokenizer, norm, info, max_length, where)
                    continue
                text = _apply_template(tokenizer, norm["messages"], where, tokenize=False)
                spans = assistant_char_spans(text, norm["messages"], info)
                spans = [(s, e) for j, s, e in spans if j >= norm["supervise_from"]]
            elif norm["format"] == "prompt_completion":
                text = norm["prompt"] + norm["completion"]
                spans = [(len(norm["prompt"]), len(text))]
            else:
                text, spans = norm["text"], [(0, len(norm["text"]))]
            if norm["format"] != "chat" and info.eos_id is None:
                raise InvalidExample("the tokenizer has no EOS token to end a text example")
            texts.append(text)
            plans.append((i, norm["format"], spans))
        except InvalidExample as e:
            errors.append((i, str(e)))
            hints[i] = e.hint
    if texts:
        for (i, fmt, spans), enc in zip(plans, _encode(tokenizer, texts), strict=True):
            results[i] = _encode_one(enc, fmt, spans, info, max_length)
    errors.sort()
    if errors and on_error == "raise":
        i, reason = errors[0]
        where = wheres[i] if wheres else f"example {i}"
        raise UserError(reason, where=where, hint=hints[i] or _HINT)
    return results, errors


def _encode(tokenizer, texts: list[str]) -> list:
    """tokenizers.Encoding of each text with add_special_tokens=False, as apply_chat_template
    encodes. The Rust backend is called directly (less overhead) unless the tokenizer has
    truncation/padding set or splits special tokens, where transformers' own call is used."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch"):
        raise UserError(
            "loss masks need a fast tokenizer (tokenizer.json) for character offsets",
            where=getattr(tokenizer, "name_or_path", None) or "tokenizer",
        )
    if (
        backend.truncation is None
        and backend.padding is None
        and not getattr(tokenizer, "split_special_tokens", False)
    ):
        encs = backend.encode_batch(texts, add_special_tokens=False)
        # Insurance against a tokenizer class that post-processes in Python: the first text
        # must encode exactly as transformers encodes it.
        if encs[0].ids == tokenizer(texts[0], add_special_tokens=False)["input_ids"]:
            return encs
    return tokenizer(texts, add_special_tokens=False).encodings


def _encode_one(enc, fmt: str, spans, info: TokInfo, max_length) -> dict:
    ids = enc.ids
    if fmt == "chat":
        return _finish(ids, _token_spans(enc, spans, info, True), max_length)
    ((first, _, _),) = _token_spans(enc, spans, info, False)
    first = first if first >= 0 else len(ids)
    ids = ids + [int(info.eos_id)]
    turns = [(first, len(ids) - 1, True)]  # the appended EOS is supervised
    if info.bos_id is not None:
        ids = [int(info.bos_id)] + ids
        turns = [(first + 1, len(ids) - 1, True)]
    return _finish(ids, turns, max_length)


def render(tokenizer, example: Any, max_length: int | None = None) -> dict:
    """Render one example: {"input_ids", "loss_mask", "truncated", "n_assistant_turns", ...}.

    `loss_mask[t] == 1` means `input_ids[t]` is a supervised target (predicted from t-1);
    position 0 is never one. Longer than max_length: truncated keeping the start.
    Raises `UserError` for an invalid example.
    """
    (out,), _ = render_many(tokenizer, [example], max_length)
    return {**out, "input_ids": out["input_ids"].tolist(), "loss_mask": out["loss_mask"].tolist()}
