"""The data report (data_report.json) and the refuse-to-train check.

The report says what was read and dropped (with file:line), token lengths, truncation,
supervised share, packing efficiency, and content problems: exact and near duplicates,
train/eval overlap, empty or placeholder contents, unbalanced code fences, refusal-like
assistant replies and control-token strings inside contents; its agentic section (tool calls,
reasoning, template drops, data.turns) is agentic_report.py's. Everything is O(n).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zlib
from collections import Counter, defaultdict

import numpy as np

from jaxsft import run_dir as rd
from jaxsft.data.agentic_report import AgenticStats, agentic_report, agentic_warnings
from jaxsft.data.listing import MAX_LISTED
from jaxsft.data.listing import listed as _listed
from jaxsft.errors import UserError

PLACEHOLDER = re.compile(
    r"\bTODO\b|\bTBD\b|\bFIXME\b|\bXXX\b|(?i:lorem ipsum)|\{\{[^{}\n]{0,80}\}\}"
    r"|(?i:\[(?:insert|placeholder|your)[^\]\n]{0,60}\])|(?i:<placeholder>)"
)
REFUSAL = re.compile(
    r"\b(?:I'm sorry|I am sorry|I apologi[sz]e|As an AI|as a language model|I cannot|I can't|"
    r"I can not|I'm unable to|I am unable to|I'm not able to|I am not able to|I won't)\b",
    re.IGNORECASE,
)
_NON_WORD = re.compile(r"[^\w\s]+")
_SHINGLE = 3  # words per shingle for MinHash
_PERMS, _BANDS = 32, 8  # MinHash permutations, LSH bands (candidates from J ~0.6), verified >= 0.8


@dataclasses.dataclass
class SplitStats:
    """Per-example facts gathered while rendering one split."""

    read: object  # readers.ReadResult
    lengths: list = dataclasses.field(default_factory=list)  # tokens before truncation
    kept_tokens: list = dataclasses.field(default_factory=list)
    supervised: list = dataclasses.field(default_factory=list)
    truncated: list = dataclasses.field(default_factory=list)  # where
    no_target: list = dataclasses.field(default_factory=list)  # where (dropped)
    turns: int = 0
    turns_cut: list = dataclasses.field(default_factory=list)  # (where, n)
    turns_lost: int = 0
    no_eot: list = dataclasses.field(default_factory=list)  # (where, n)
    empty_turns: list = dataclasses.field(default_factory=list)
    rows: list = dataclasses.field(default_factory=list)  # readers.Row of rendered rows
    on_drop: str = "auto"  # data.on_drop
    turn_mode: str = "all"  # data.turns
    agentic: AgenticStats = dataclasses.field(default_factory=AgenticStats)

    def add(self, row, out: dict, first: bool = True, last: bool = True) -> None:
        """One rendered example of `row` (data.turns=expand: first/last of the row's)."""
        n_sup = int(np.count_nonzero(out["loss_mask"]))
        if first:
            self.rows.append(row)
        self.agentic.add(row, out, first, last)
        self.lengths.append(out["length"])
        self.kept_tokens.append(len(out["input_ids"]))
        self.supervised.append(n_sup)
        if out["truncated"]:
            self.truncated.append(row.where)
        if n_sup == 0:
            self.no_target.append(row.where)
        self.turns += out.get("n_assistant_turns", 0)
        if out.get("assistant_turns_cut"):
            self.turns_cut.append((row.where, out["assistant_turns_cut"]))
        self.turns_lost += out.get("assistant_turns_lost", 0)
        if out.get("turns_without_eot"):
            self.no_eot.append((row.where, out["turns_without_eot"]))
        if out.get("turns_empty"):
            self.empty_turns.append(row.where)


def _pct(values) -> dict:
    if not len(values):
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}
    a = np.asarray(values)
    p = np.percentile(a, [50, 90, 99])
    return {
        "p50": int(p[0]),
        "p90": int(p[1]),
        "p99": int(p[2]),
        "max": int(a.max()),
        "mean": round(float(a.mean()), 1),
    }


def split_report(s: SplitStats) -> dict:
    """Report section of one split."""
    kept = [i for i, n in enumerate(s.supervised) if n > 0]
    n_tok = int(sum(s.kept_tokens[i] for i in kept))
    n_sup = int(sum(s.supervised[i] for i in kept))
    reasons = Counter(d["reason"] for d in s.read.skipped)
    dropped = s.read.skipped + [
        {"where": w, "reason": "no supervised token after truncation"} for w in s.no_target
    ]
    reasons.update(
        {"no supervised token after truncation": len(s.no_target)} if s.no_target else {}
    )
    return {
        "sources": s.read.sources,
        "rows_read": s.read.n_read,
        "examples": len(kept),
        "dropped": {
            "count": len(dropped),
            "by_reason": dict(reasons.most_common()),
            "rows": dropped[:1000],
        },
        "tokens": {**_pct(s.lengths), "total_kept": n_tok},
        "truncated_examples": {
            **_listed(s.truncated),
            "share": round(len(s.truncated) / max(len(s.lengths), 1), 4),
        },
        "assistant_turns": {
            "count": s.turns,
            "truncated": sum(n for _, n in s.turns_cut),
            "lost_entirely": s.turns_lost,
            "truncated_in": [w for w, _ in s.turns_cut][:MAX_LISTED],
            "without_end_of_turn": _listed(w for w, _ in s.no_eot),
            "without_tokens": _listed(s.empty_turns),
        },
        "supervised_tokens": {
            "count": n_sup,
            "share": round(n_sup / max(n_tok, 1), 4),
        },
        "content": content_report(s.rows),
        "agentic": agentic_report(s, n_sup),
    }


def build_report(
    train: SplitStats, evals: SplitStats | None, packing: dict, tokenizer=None
) -> dict:
    """The whole data report (a JSON-able dict)."""
    report = {"train": split_report(train), "eval": split_report(evals) if evals else None}
    report["train"]["packing"] = packing
    report["leakage"] = leakage(train.rows, evals.rows) if evals else None
    if tokenizer is not None:
        for name, s in (("train", train), ("eval", evals)):
            if s is not None:
                report[name]["content"]["control_tokens_in_content"] = _listed(
                    control_token_rows(s.rows, tokenizer)
                )
    report["warnings"] = warnings_of(report)
    return report


def no_target_line(name: str, s: SplitStats, max_length: int) -> str | None:
    """The terminal line for the examples of a split dropped because truncation left them no
    supervised token (None when there are none); data_report.json lists them all."""
    if not s.no_target:
        return None
    return (
        f"dropped {len(s.no_target)} of {len(s.lengths)} {name} examples with no supervised "
        f"token left after truncation to max_length={max_length} (first: {s.no_target[0]}); "
        "see data_report.json"
    )


def refuse_to_train(report: dict) -> None:
    """UserError when training would be wrong: nothing supervised, or an assistant turn whose
    end-of-turn token is not supervised, or a turn that kept no token (says which examples)."""
    t = report["train"]
    if t["supervised_tokens"]["count"] == 0:
        raise UserError(
            "no supervised token in the training data (supervised share is 0)",
            where="data.train",
            hint="check data.max_length and that rows have assistant turns or completions",
        )
    no_eot = t["assistant_turns"]["without_end_of_turn"]
    if no_eot["count"]:
        raise UserError(
            f"{no_eot['count']} example(s) have assistant turns whose end-of-turn token is not "
            f"supervised: {', '.join(no_eot['examples'][:5])}",
            where="data.train",
            hint="the chat template emits no end-of-turn special token after assistant turns "
            "(the model would never learn to stop); fix the template or the tokenizer",
        )
    empty = t["assistant_turns"]["without_tokens"]
    if empty["count"]:
        raise UserError(
            f"{empty['count']} example(s) have assistant turns with no supervised token: "
            f"{', '.join(empty['examples'][:5])}",
            where="data.train",
        )


def write_report(run_dir: str, report: dict) -> str:
    """Write run_dir/data_report.json (atomically; creates run_dir) and return its path."""
    path = rd.path(run_dir, rd.DATA_REPORT)
    tmp = path + ".tmp"
    try:
        os.makedirs(run_dir, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(
            f"cannot write the data report: {e.strerror or e}", where=run_dir, hint="check run_dir"
        ) from None
    return path


# --------------------------------------------------------------------------------------------
# Content checks
# --------------------------------------------------------------------------------------------
def _messages(example: dict) -> list[tuple[str, str]]:
    if example["format"] == "chat":
        return [(m["role"], m["content"]) for m in example["messages"]]
    if example["format"] == "prompt_completion":
        return [("user", example["prompt"]), ("assistant", example["completion"])]
    return [("assistant", example["text"])]


def canonical(example: dict, system: bool = True) -> str:
    """One string per example, for duplicate detection."""
    return "\n".join(f"<{r}>{c}" for r, c in _messages(example) if system or r != "system")


def prompt_of(example: dict) -> str:
    """Everything before the last supervised reply (empty for plain text)."""
    msgs = _messages(example)
    if example["format"] == "text":
        return ""
    last = max(i for i, (r, _) in enumerate(msgs) if r == "assistant")
    return "\n".join(f"<{r}>{c}" for r, c in msgs[:last])


def _h(text: str) -> int:
    return zlib.crc32(text.encode("utf-8", "surrogatepass"))


def content_report(rows: list) -> dict:
    empty, placeholder, fences, refusals = [], [], [], []
    n_replies = 0
    for row in rows:
        msgs = _messages(row.example)
        if any(not c.strip() for _, c in msgs):
            empty.append(row.where)
        if any(_maybe_placeholder(c) and PLACEHOLDER.search(c) for _, c in msgs):
            placeholder.append(row.where)
        replies = (
            [c for r, c in msgs if r == "assistant"] if row.example["format"] != "text" else []
        )
        n_replies += len(replies)
        if any(c.count("```") % 2 for _, c in msgs):
            fences.append(row.where)
        refusals += [row.where for c in replies if REFUSAL.search(c[:200])]
    exact, near = duplicates(rows)
    return {
        "exact_duplicates": exact,
        "near_duplicates": near,
        "empty_contents": _listed(empty),
        "placeholders": _listed(placeholder),
        "unbalanced_code_fences": _listed(fences),
        "refusal_like_replies": {
            **_listed(refusals),
            "share": round(len(refusals) / max(n_replies, 1), 4),
        },
    }


def _maybe_placeholder(text: str) -> bool:
    """Cheap substring prefilter before the PLACEHOLDER regex."""
    return (
        any(k in text for k in ("TODO", "TBD", "FIXME", "XXX", "{{", "[", "<placeholder>"))
        or "lorem ipsum" in text.lower()
    )


def control_token_rows(rows: list, tokenizer) -> list[str]:
    """Rows whose contents contain a special-token string (it would become a control token)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials = [str(t.content) for t in added.values() if getattr(t, "special", False)]
    if not specials:
        return []
    pat = re.compile("|".join(re.escape(s) for s in specials))
    return [r.where for r in rows if any(pat.search(c) for _, c in _messages(r.example))]


def _normalized(text: str) -> str:
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def duplicates(rows: list) -> tuple[dict, dict]:
    """Exact duplicates (same canonical text) and near duplicates (same normalized text, or
    MinHash Jaccard >= 0.8 on word 3-shingles through LSH buckets), each as
    {"count": examples that repeat an earlier one, "groups": [[where, ...], ...]}."""
    exact = defaultdict(list)
    for i, row in enumerate(rows):
        exact[_h(canonical(row.example))].append(i)
    reps = [g[0] for g in exact.values()]  # one per exact group
    parent = {i: i for i in reps}

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a, b):
        parent[find(b)] = find(a)

    norm_seen, sigs, buckets = {}, {}, {}
    words_cache: dict[str, int] = {}
    for i in reps:  # system prompts are left out: a shared long one is not duplication
        norm = _normalized(canonical(rows[i].example, system=False))
        j = norm_seen.setdefault(_h(norm), i)
        if j != i:
            union(j, i)
            continue
        sig = _minhash(norm.split(), words_cache)
        if sig is None:
            continue
        sigs[i] = sig
        for b, band in enumerate(np.split(sig, _BANDS)):
            key = (b, band.tobytes())
            if key not in buckets:  # the first member represents the bucket: O(n) overall
                buckets[key] = i
            elif find(buckets[key]) != find(i) and np.mean(sigs[buckets[key]] == sig) >= 0.8:
                union(buckets[key], i)
    clusters = defaultdict(list)
    for i in reps:
        clusters[find(i)].append(i)
    return _groups(rows, exact.values()), _groups(rows, clusters.values())


def _groups(rows: list, groups) -> dict:
    """{"count": examples that repeat an earlier one, "groups": [[where, ...], ...]} of the
    groups (lists of row indices) with more than one member."""
    groups = [g for g in groups if len(g) > 1]
    return {
        "count": sum(len(g) - 1 for g in groups),
        "groups": [[rows[i].where for i in g[:5]] for g in groups[:MAX_LISTED]],
    }


_RNG = np.random.default_rng(0x4D48)
_A = _RNG.integers(1, (1 << 31) - 1, _PERMS, dtype=np.uint64)
_B = _RNG.integers(0, (1 << 31) - 1, _PERMS, dtype=np.uint64)
_P = np.uint64((1 << 31) - 1)


def _minhash(words: list[str], cache: dict) -> np.ndarray | None:
    if len(words) < _SHINGLE + 2:
        return None  # too short for a meaningful near-duplicate test (exact/normalized only)
    # Words -> ids of a per-report vocabulary (deterministic: first-seen order), mixed into
    # shingle hashes in numpy.
    w = np.array([cache.setdefault(x, len(cache)) for x in words], np.uint64)
    w = (w * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)
    x = (w[:-2] * np.uint64(0x9E3779B1) + w[1:-1] * np.uint64(0x85EBCA77) + w[2:]) % _P
    return ((x[None, :] * _A[:, None] + _B[:, None]) % _P).min(axis=1)


def leakage(train_rows: list, eval_rows: list) -> dict:
    """Eval examples whose full text, or whose prompt, also occurs in the training data."""
    full = {_h(canonical(r.example)) for r in train_rows}
    prompts = {_h(p) for r in train_rows if (p := prompt_of(r.example))}
    same = [r.where for r in eval_rows if _h(canonical(r.example)) in full]
    same_prompt = [r.where for r in eval_rows if (p := prompt_of(r.example)) and _h(p) in prompts]
    return {"eval_examples_in_train": _listed(same), "eval_prompts_in_train": _listed(same_prompt)}


def warnings_of(report: dict) -> list[str]:
    """Human-readable findings worth a look."""
    out = []
    for name in ("train", "eval"):
        r = report.get(name)
        if not r:
            continue
        c = r["content"]
        checks = [
            (r["dropped"]["count"], "rows dropped"),
            (r["truncated_examples"]["count"], "examples truncated to data.max_length"),
            (r["assistant_turns"]["truncated"], "assistant turns cut by truncation"),
            (c["exact_duplicates"]["count"], "exact duplicates"),
            (c["near_duplicates"]["count"], "near duplicates"),
            (c["empty_contents"]["count"], "examples with an empty message"),
            (c["placeholders"]["count"], "examples with placeholder text"),
            (c["unbalanced_code_fences"]["count"], "examples with unbalanced ``` fences"),
            (c["refusal_like_replies"]["count"], "refusal-like assistant replies"),
            (
                c.get("control_tokens_in_content", {}).get("count", 0),
                "contents with control tokens",
            ),
        ]
        out += [f"{name}: {n} {what}" for n, what in checks if n]
        out += [f"{name}: {w}" for w in agentic_warnings(r["agentic"])]
    leak = report.get("leakage")
    if leak:
        for key, what in (
            ("eval_examples_in_train", "eval examples also in train"),
            ("eval_prompts_in_train", "eval prompts also in train"),
        ):
            if leak[key]["count"]:
                out.append(f"leakage: {leak[key]['count']} {what}")
    return out
