"""Tool calls in generated text, parsed with each template family's syntax, and scored.

    calls = parse_calls(reply)                  # [{"name", "arguments"}], in order
    matches(reply, expected_calls, tools)       # right names, JSON-equal arguments

The syntaxes, as the models write them (FORMATS):
- "hermes": Qwen2.5, Qwen3, Hermes, SmolLM3: `<tool_call>\\n{"name": ..., "arguments": {...}}
  \\n</tool_call>`, one block per call;
- "llama3": Llama 3.1/3.2/3.3: a bare JSON object `{"name": ..., "parameters": {...}}` as the
  whole reply (several separated by `;`), optionally after `<|python_tag|>`, or a built-in tool
  as `<|python_tag|>name.call(key="value", ...)`;
- "mistral": `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`;
- "qwen3_coder": Qwen3-Coder's XML, `<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE
  \\n</parameter>\\n</function>\\n</tool_call>`; a VALUE is typed by the tool's JSON schema
  (strings stay strings), or read as JSON when the schema does not say.
"auto" picks the syntax by its markers. Replies are decoded with special tokens skipped, so
`[TOOL_CALLS]` and `<|python_tag|>` (special tokens in those tokenizers) may be gone: a reply
that is a JSON list of calls is read as Mistral's, a bare `name.call(...)` as Llama's.
A `<think>` block is removed first (a call inside the reasoning is not a call). A call that
does not parse counts as a call that matches nothing.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence

from jaxsft.evals.base import strip_think

FORMATS = ("auto", "hermes", "llama3", "mistral", "qwen3_coder")
BAD = {"name": None, "arguments": None}  # a call that did not parse

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.DOTALL)
_XML_FUNCTION = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|\Z)", re.DOTALL)
_XML_PARAM = re.compile(
    r"<parameter=([^>\s]+)>\n?(.*?)\n?(?:</parameter>|(?=<parameter=)|\Z)", re.DOTALL
)
_PYTHON_CALL = re.compile(r"^\s*([\w.]+?)\.call\((.*)\)\s*$", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"
_TOOL_CALLS = "[TOOL_CALLS]"


def detect_format(text: str) -> str | None:
    """The syntax a reply's calls are written in, by its markers (None: no call)."""
    if "<function=" in text:
        return "qwen3_coder"
    if "<tool_call>" in text:
        return "hermes"
    body = text.strip()
    if body.startswith(_TOOL_CALLS) or re.match(r"\[\s*\{", body):
        return "mistral"
    if body.startswith(_PYTHON_TAG) or body.startswith("{") or _PYTHON_CALL.match(body):
        return "llama3"
    return None


def parse_calls(text: str, fmt: str = "auto", tools: Sequence[dict] | None = None) -> list[dict]:
    """The tool calls of a reply, [{"name": str, "arguments": dict}] in order (BAD for a call
    that does not parse); [] when the reply calls nothing in that syntax."""
    text = strip_think(text)
    fmt = detect_format(text) if fmt == "auto" else fmt
    if fmt is None:
        return []
    return _PARSERS[fmt](text, tools)


def _hermes(text: str, tools) -> list[dict]:
    return [_call_of_json(body) for body in _HERMES.findall(text)]


def _llama3(text: str, tools) -> list[dict]:
    body = text.strip().removeprefix(_PYTHON_TAG).strip()
    m = _PYTHON_CALL.match(body)
    if m:
        return [_python_call(m.group(1), m.group(2))]
    if not body.startswith("{"):
        return []
    return [_call(obj) for obj in _json_values(body, sep=";")]


def _mistral(text: str, tools) -> list[dict]:
    body = text.strip().removeprefix(_TOOL_CALLS).strip()
    values = _json_values(body, sep="")
    if len(values) != 1 or not isinstance(values[0], list):
        return [BAD] if body else []
    return [_call(obj) for obj in values[0]] or [BAD]


def _qwen3_coder(text: str, tools) -> list[dict]:
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools or ()}
    calls = []
    for name, body in _XML_FUNCTION.findall(text):
        props = (schemas.get(name) or {}).get("properties") or {}
        args = {
            key: _typed(value, (props.get(key) or {}).get("type"))
            for key, value in _XML_PARAM.findall(body)
        }
        calls.append({"name": name, "arguments": args})
    return calls


_PARSERS = {"hermes": _hermes, "llama3": _llama3, "mistral": _mistral, "qwen3_coder": _qwen3_coder}


def _typed(value: str, kind) -> object:
    """An XML parameter value as its schema type: strings verbatim, anything else as JSON
    (a Python literal for True/False/None), the raw string when neither reads."""
    if kind == "string":
        return value
    for read in (json.loads, ast.literal_eval):
        try:
            return read(value)
        except (ValueError, SyntaxError):
            continue
    return value


def _json_values(body: str, sep: str) -> list:
    """The JSON values written one after another in body (separated by whitespace and sep);
    [None] marks the rest when it stops parsing."""
    decoder, out, at = json.JSONDecoder(), [], 0
    while True:
        while at < len(body) and (body[at].isspace() or (sep and body[at] == sep)):
            at += 1
        if at == len(body):
            return out
        try:
            value, at = decoder.raw_decode(body, at)
        except ValueError:
            return [*out, None]
        out.append(value)


def _call_of_json(body: str) -> dict:
    values = _json_values(body, sep="")
    return _call(values[0]) if len(values) == 1 else BAD


def _call(obj) -> dict:
    """{"name", "arguments"} of a parsed call object ({"name", "arguments" | "parameters"},
    or OpenAI's {"function": {...}}); BAD when it is not one."""
    if isinstance(obj, dict) and isinstance(obj.get("function"), dict):
        obj = obj["function"]
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return BAD
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # OpenAI style: arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return BAD
    return {"name": obj["name"], "arguments": args} if isinstance(args, dict) else BAD


def _python_call(name: str, args: str) -> dict:
    """Llama's built-in tool call `name.call(key="value", ...)` (keyword literals only)."""
    try:
        node = ast.parse(f"f({args})", mode="eval").body
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (SyntaxError, ValueError):
        return BAD
    return {"name": name, "arguments": kwargs} if not node.args else BAD


def json_equal(a, b) -> bool:
    """Equal as JSON values: objects key by key, arrays in order, numbers by value, and
    true/false never equal to 1/0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def calls_match(got: Sequence[dict], expected: Sequence[dict]) -> bool:
    """The same calls in any order: each expected call pairs with one call of the same name
    and JSON-equal arguments, and nothing is left over."""
    left = list(got)
    for want in expected:
        hit = next(
            (
                i
                for i, c in enumerate(left)
                if c["name"] == want["name"] and json_equal(c["arguments"], want["arguments"])
            ),
            None,
        )
        if hit is None:
            return False
        left.pop(hit)
    return not left


def matches(reply: str, expected: Sequence[dict], tools=None, fmt: str = "auto") -> bool:
    """True when the reply's calls are `expected` ([{"name", "arguments"}]; [] means the
    reply must call nothing)."""
    return calls_match(parse_calls(reply, fmt, tools), expected)
