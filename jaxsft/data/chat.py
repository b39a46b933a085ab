"""One example -> (input_ids, loss_mask), using the tokenizer's own chat template.

Formats (see formats.py): conversational `messages`, ShareGPT `conversations`, `prompt`/`completion`
(strings or message lists) and plain `text`, with tool calls, tool definitions (`tools`, passed
to the template), reasoning and per-message weights. For conversations the supervised tokens
are everything the template writes for each assistant turn after its role header: the rendered
reasoning (`<think>...</think>`), the content, the tool-call syntax, and whatever follows up to
and including the turn's end-of-turn special token (`<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`,
`<|end|>`, ...); nothing of system/user/tool turns, of the tool definitions or of role headers.

How the mask is found:
- a template with `{% generation %}` markers: the assistant mask of `apply_chat_template`;
- any other template: the conversation is rendered once, in full (`tokenize=False`); each
  assistant turn is located in that text (spans.py: by its content, or, for a turn with tool
  calls, by a second rendering with that turn replaced by a marker), then the character spans
  become token spans through the fast tokenizer's offset mapping. Prefix rendering is never
  used: Qwen3-style templates rewrite earlier turns.
A turn that cannot be located is an error, never a silently unsupervised turn. What the
template silently leaves out of a supervised turn (the example's tools, a tool call, the
content beside calls, the reasoning) is counted per reason in `drops` and handled by `on_drop`
(formats.drop_policy).

The ids equal `apply_chat_template(tokenize=True, tools=tools)["input_ids"]`: the rendered text
is encoded with `add_special_tokens=False`, so a template that writes the BOS itself gets
exactly one BOS.
"""

from __future__ import annotations

import re
import weakref
from typing import Any

import numpy as np

from jaxsft.data import spans as sp
from jaxsft.data.formats import InvalidExample, drop_policy, normalize, supervised_turns
from jaxsft.errors import UserError
from jaxsft.tokenizer import no_chat_template

__all__ = ["InvalidExample", "normalize", "render", "render_many"]

# Kinds of supervised tokens (render's "kinds"; 0: not supervised).
KIND_ANSWER, KIND_TOOL, KIND_REASONING = 1, 2, 3
_KIND_CODES = {"tool": KIND_TOOL, "reasoning": KIND_REASONING}
_PROBE_TOOL = {
    "type": "function",
    "function": {"name": "jaxsft_probe_tool", "description": "probe", "parameters": {}},
}
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
        self.renders_tools: bool | None = None  # probed on first use (renders_tools)

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
# data.on_drop="error": why the row is refused, per dropped thing.
_DROP_REASONS = {
    "tools": "the chat template does not render the example's tools: the model would learn to "
    "call tools it was never shown",
    "tool_call": "the chat template does not render {n} tool call(s) of the supervised turns: "
    "those turns would be trained without their calls",
    "content": "the chat template drops the content of {n} supervised assistant turn(s) that "
    "also call tools",
    "reasoning": "the chat template does not render the reasoning of {n} supervised assistant "
    "turn(s) (a template that keeps only the last turn's reasoning needs data.turns=expand)",
}
_DROP_HINT = (
    "use a chat template that renders it, or set data.on_drop=warn (train anyway, counted in "
    f"data_report.json) or data.on_drop=allow ({_SKIP})"
)


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


def renders_tools(tokenizer, info: TokInfo) -> bool:
    """Whether the chat template writes the `tools=` it is given (probed once per tokenizer)."""
    if info.renders_tools is None:
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}],
                tools=[_PROBE_TOOL],
                tokenize=False,
                add_generation_prompt=True,
            )
            info.renders_tools = tool_probe_name() in text
        except Exception:
            info.renders_tools = False
    return info.renders_tools


def tool_probe_name() -> str:
    return _PROBE_TOOL["function"]["name"]


def _chat_text(
    tokenizer,
    norm: dict,
    where: str,
    on_drop: str,
    info: TokInfo,
    tkw: dict,
    located: bool = True,
):
    """(rendered text, [(char start, char end, weight)] of the supervised turns, [(start, end,
    kind)] char parts, drops {reason: n}) of a chat example. tkw: extra template keywords.
    located=False ({% generation %} templates, whose markers give the mask): a turn that
    cannot be located only goes unchecked for drops and parts."""
    msgs, tools = norm["messages"], norm.get("tools")
    text = _apply_template(tokenizer, msgs, where, tokenize=False, tools=tools, **tkw)

    def rendered(messages: list, **kw) -> str | None:
        try:
            return _apply_template(
                tokenizer, messages, where, tokenize=False, tools=tools, **tkw, **kw
            )
        except InvalidExample:
            return None

    def variant(i: int) -> str | None:
        return rendered([*msgs[:i], sp.variant_message(msgs[i]), *msgs[i + 1 :]])

    variant.cut = lambda i: rendered([*msgs[:i], sp.variant_message(msgs[i])])
    variant.kept = lambda i: rendered(msgs[: i + 1])
    kept = set(supervised_turns(norm))
    try:
        found = sp.assistant_turns(text, msgs, info.follow, variant)
    except InvalidExample:
        if located:
            raise
        found = []
    turns = [t for t in found if t.index in kept]
    if norm.get("generation_prompt") and len(turns) == 1 and located:
        before = msgs[: turns[0].index]
        prompt = rendered(before, add_generation_prompt=True)
        if prompt is not None and not text.startswith(prompt):
            text = _as_generated(text, turns[0], prompt, rendered(before))
    drops: dict[str, int] = {}
    if tools and not renders_tools(tokenizer, info):
        drops["tools"] = 1
    for t in turns:
        for reason in t.drops:
            drops[reason] = drops.get(reason, 0) + 1
    for reason, n in drops.items():
        if drop_policy(on_drop, reason) == "error":
            raise InvalidExample(_DROP_REASONS[reason].format(n=n), hint=_DROP_HINT)
    weights = norm.get("weights") or [1.0] * len(msgs)
    scale = norm.get("weight", 1.0)
    char_spans = [(t.start, t.end, weights[t.index] * scale) for t in turns if t.end > t.start]
    parts = [p for t in turns for p in sp.char_parts(text, t)]
    return text, char_spans, parts, drops


def _as_generated(text: str, turn: sp.Turn, prompt: str, bare: str | None) -> str:
    """The rendering of a data.turns=expand example whose supervised `turn` is its last, when
    the turns before it, rendered with add_generation_prompt (`prompt`, what the model is given
    at inference), are not a prefix of it: `prompt`, then the turn from the end of its role
    header on (`turn` is moved with it). Mistral v0.3 writes the system prompt only into a
    user turn that is the last message; Hermes' tool_use template ends a last tool result
    `</tool_response><|im_end|>`, one a turn follows `</tool_response>\n<|im_end|>`. The role
    header is what add_generation_prompt adds to `bare` (the same turns without it); `text` is
    kept when that header is not found right before the turn (R1 distills: the generation
    prompt opens a think block the training rendering never has)."""
    if bare is None or not prompt.startswith(bare):
        return text
    header = prompt[len(bare) :]
    lo = sp.common_prefix(text, prompt)
    pos = text.rfind(header, lo, turn.start)
    if pos < 0:
        return text
    cut = pos + len(header)
    shift = len(prompt) - cut
    turn.start, turn.end = turn.start + shift, turn.end + shift
    if turn.tool:
        turn.tool = (turn.tool[0] + shift, turn.tool[1] + shift)
    return prompt + text[cut:]


def _token_range(enc, s: int, e: int) -> tuple[int, int] | None:
    """(first, last inclusive) token overlapping chars [s, e), or None."""
    first, last = _char_token(enc, s, e, 1), _char_token(enc, e - 1, s - 1, -1)
    if first is None or last is None:
        return None
    while last + 1 < len(enc.ids) and enc.token_to_chars(last + 1)[0] < e:
        last += 1  # several tokens for the last character (byte pieces)
    return first, last


def _token_spans(enc, char_spans, info: TokInfo, with_eot: bool) -> list[tuple]:
    """Char spans (start, end, weight) -> [(first token, last token inclusive, eot found,
    weight)] via the fast tokenizer's offsets (`enc` is a tokenizers.Encoding).

    A token belongs to a span when its characters overlap it. With with_eot (chat spans), a
    special token at a span's edge that reaches outside the span is left out (Phi-3's role
    tags have rstrip and absorb the whitespace at a content's edge: they are the header or the
    end-of-turn token, not content), and the span extends to the first special token after it
    when that token is an end-of-turn token (everything the template emits in between is the
    assistant's output too).
    """
    ids, out = enc.ids, []
    for s, e, w in char_spans:
        rng = _token_range(enc, s, e)
        first, last = rng if rng else (0, -1)
        while with_eot and first <= last and ids[first] in info.special_ids:
            if enc.token_to_chars(first)[0] >= s:
                break
            first += 1
        while with_eot and last >= first and ids[last] in info.special_ids:
            if enc.token_to_chars(last)[1] <= e and enc.token_to_chars(last)[0] > s:
                break
            last -= 1
        if first > last:
            out.append((-1, -1, False, w))
            continue
        eot = False
        if with_eot:
            for t in range(last + 1, len(ids)):
                if ids[t] in info.special_ids:
                    if ids[t] in info.eot_ids:
                        last, eot = t, True
                    break
        out.append((first, last, eot, w))
    return out


def _char_token(enc, pos: int, stop: int, step: int) -> int | None:
    """Token holding character pos, walking towards stop over characters no token covers."""
    for p in range(pos, stop, step):
        t = enc.char_to_token(p)
        if t is not None:
            return t
    return None


def _finish(ids, turns: list[tuple], max_length: int | None, parts=()) -> dict:
    """Mask from token spans, truncation keeping the start, and per-turn accounting.

    turns: [(first, last, eot, weight)]; parts: [(first, last, kind code)] inside them.
    input_ids / loss_mask / kinds come back as numpy arrays (`render` makes them lists);
    loss_mask is int32 0/1, or float32 when a weight is not 1."""
    n = len(ids)
    weighted = any(w != 1 for *_, w in turns)
    mask = np.zeros(n, np.float32 if weighted else np.int32)
    kinds = np.zeros(n, np.int8)
    for first, last, _, w in turns:
        if first >= 0:
            mask[first : last + 1] = w
            kinds[first : last + 1] = KIND_ANSWER
    for first, last, code in parts:
        kinds[first : last + 1] = code
    mask[0] = 0  # position 0 is never a target
    kinds[mask == 0] = 0
    limit = n if not max_length else min(n, int(max_length))
    return {
        "input_ids": np.asarray(ids[:limit], np.int32),
        "loss_mask": mask[:limit],
        "kinds": kinds[:limit],
        "length": n,
        "truncated": n > limit,
        "n_assistant_turns": len(turns),
        "assistant_turns_cut": sum(1 for f, last, *_ in turns if last >= limit),
        "assistant_turns_lost": sum(1 for f, *_ in turns if f >= limit),
        "turns_without_eot": sum(1 for f, last, eot, _ in turns if not eot and last < limit),
        "turns_empty": sum(1 for f, *_ in turns if f < 0),
        "drops": {},
    }


def _generation_render(
    tokenizer, norm: dict, info: TokInfo, max_length, where: str, on_drop: str, tkw: dict
) -> dict:
    """The mask of a {% generation %} template: exactly its marked spans. The drops and the
    reasoning / tool-call parts come from locating the turns in the rendered text as for any
    other template (SmolLM3 marks its turns but reads neither tools= nor tool_calls nor
    reasoning_content: without this a call would be trained as an empty turn, silently)."""
    out = _apply_template(
        tokenizer,
        norm["messages"],
        where,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        tools=norm.get("tools"),
        **tkw,
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
    kept = set(supervised_turns(norm))
    weights = norm.get("weights") or [1.0] * len(norm["messages"])
    scale = norm.get("weight", 1.0)
    turns = [
        (int(f), int(last), _ends_in_eot(tokenizer, ids, f, last, info), weights[i] * scale)
        for (f, last), i in zip(runs, roles, strict=True)
        if i in kept
    ]
    text, _, parts, drops = _chat_text(tokenizer, norm, where, on_drop, info, tkw, located=False)
    (enc,) = _encode(tokenizer, [text])
    token_parts = _token_parts(enc, parts) if enc.ids == ids.tolist() else []
    res = _finish(ids, turns, max_length, token_parts)
    res["drops"] = drops
    return res


def _ends_in_eot(tokenizer, ids, first: int, last: int, info: TokInfo) -> bool:
    """Whether a marked span ends with an end-of-turn token, whitespace after it allowed
    (SmolLM3's blocks end `<|im_end|>\n`)."""
    t = int(last)
    while t > first and ids[t] not in info.special_ids:
        if tokenizer.decode([int(ids[t])]).strip():
            break
        t -= 1
    return int(ids[t]) in info.eot_ids


def _token_parts(enc, parts) -> list[tuple[int, int, int]]:
    """Char parts (start, end, kind) -> [(first token, last token, kind code)]."""
    return [(*rng, _KIND_CODES[kind]) for s, e, kind in parts if (rng := _token_range(enc, s, e))]


def render_many(
    tokenizer,
    examples: list,
    max_length: int | None = None,
    wheres: list[str] | None = None,
    on_error: str = "raise",
    normalized: bool = False,
    on_drop: str = "auto",
    template_kwargs: dict | None = None,
) -> tuple[list[dict | None], list[tuple[int, str]]]:
    """Render many examples, encoding the texts in one batch call of the fast tokenizer.

    Returns (rendered, errors): rendered[i] is None for a failed example and errors lists
    (index, reason). With on_error="raise" the first failure is a `UserError` naming
    wheres[i] (or "example i"). normalized=True: the examples come from `normalize` already.
    on_drop (data.on_drop): what a template that silently leaves something out makes of the
    example (formats.drop_policy); rendered[i]["drops"] counts what was left out.
    template_kwargs: extra variables for every apply_chat_template call (Llama 3.1's
    builtin_tools, a template's enable_thinking).
    """
    tkw = _template_kwargs(template_kwargs)
    info, mode = tok_info(tokenizer), template_mode(tokenizer)
    texts, plans, errors, hints = [], [], [], {}
    results: list[dict | None] = [None] * len(examples)
    for i, ex in enumerate(examples):
        where = wheres[i] if wheres else f"example {i}"
        try:
            norm = ex if normalized else normalize(ex)
            drops, parts, w = {}, [], norm.get("weight", 1.0)
            if norm["format"] == "chat":
                if mode == "none":  # the tokenizer's fault, not the row's: never skipped
                    raise _no_template(tokenizer, where)
                if mode == "generation":
                    results[i] = _generation_render(
                        tokenizer, norm, info, max_length, where, on_drop, tkw
                    )
                    continue
                text, spans, parts, drops = _chat_text(tokenizer, norm, where, on_drop, info, tkw)
            elif norm["format"] == "prompt_completion":
                text = norm["prompt"] + norm["completion"]
                spans = [(len(norm["prompt"]), len(text), w)]
            else:
                text, spans = norm["text"], [(0, len(norm["text"]), w)]
            if norm["format"] != "chat" and info.eos_id is None:
                raise InvalidExample("the tokenizer has no EOS token to end a text example")
            texts.append(text)
            plans.append((i, norm["format"], spans, parts, drops))
        except InvalidExample as e:
            errors.append((i, str(e)))
            hints[i] = e.hint
    if texts:
        for (i, fmt, spans, parts, drops), enc in zip(
            plans, _encode(tokenizer, texts), strict=True
        ):
            results[i] = _encode_one(enc, fmt, spans, parts, info, max_length)
            results[i]["drops"] = drops
    errors.sort()
    if errors and on_error == "raise":
        i, reason = errors[0]
        where = wheres[i] if wheres else f"example {i}"
        raise UserError(reason, where=where, hint=hints[i] or _HINT)
    return results, errors


# apply_chat_template arguments that rendering sets itself
_RESERVED_KWARGS = (
    "conversation",
    "tools",
    "documents",
    "chat_template",
    "add_generation_prompt",
    "continue_final_message",
    "tokenize",
    "return_dict",
    "return_assistant_tokens_mask",
)


def _template_kwargs(kwargs: dict | None) -> dict:
    kwargs = dict(kwargs or {})
    taken = sorted(k for k in kwargs if k in _RESERVED_KWARGS)
    if taken:
        raise UserError(
            f"template keyword(s) {', '.join(taken)} are set by the renderer itself",
            where="template_kwargs",
            hint="pass only the template's own variables (builtin_tools, enable_thinking, ...)",
        )
    return kwargs


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


def _encode_one(enc, fmt: str, spans, parts, info: TokInfo, max_length) -> dict:
    ids = enc.ids
    if fmt == "chat":
        token_parts = _token_parts(enc, parts)
        return _finish(ids, _token_spans(enc, spans, info, True), max_length, token_parts)
    ((first, _, _, w),) = _token_spans(enc, spans, info, False)
    first = first if first >= 0 else len(ids)
    ids = ids + [int(info.eos_id)]
    turns = [(first, len(ids) - 1, True, w)]  # the appended EOS is supervised
    if info.bos_id is not None:
        ids = [int(info.bos_id)] + ids
        turns = [(first + 1, len(ids) - 1, True, w)]
    return _finish(ids, turns, max_length)


def render(
    tokenizer,
    example: Any,
    max_length: int | None = None,
    on_drop: str = "auto",
    template_kwargs: dict | None = None,
) -> dict:
    """Render one example: {"input_ids", "loss_mask", "kinds", "truncated", "drops", ...}.

    `loss_mask[t]` > 0 means `input_ids[t]` is a supervised target (predicted from t-1), with
    that loss weight (1 unless the row sets weights); position 0 is never one. `kinds[t]`:
    KIND_ANSWER / KIND_TOOL / KIND_REASONING for supervised tokens, 0 otherwise. Longer than
    max_length: truncated keeping the start. Raises `UserError` for an invalid example.
    """
    (out,), _ = render_many(
        tokenizer, [example], max_length, on_drop=on_drop, template_kwargs=template_kwargs
    )
    lists = ("input_ids", "loss_mask", "kinds")
    return {**out, **{k: out[k].tolist() for k in lists}}
