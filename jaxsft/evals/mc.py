"""Multiple-choice log-likelihood eval (general-capability regression check, MMLU style).

Rows (JSONL): {"question": str, "choices": [str, ...], "answer": index (or letter "A".."Z"),
"subject": optional str}. Each row becomes the zero-shot prompt of lm-evaluation-harness'
MMLU task:

    The following are multiple choice questions (with answers) about {subject}.\\n\\n   (if any)
    {question}\\nA. {choice 0}\\nB. {choice 1}\\nC. ...\\nAnswer:

and every choice is scored by the log-likelihood of its continuation given that prompt:
" A", " B", ... with style="letter" (the harness' MMLU default), or " " + the choice text with
style="text". The prediction is the choice with the highest summed log-likelihood
(`accuracy`); `accuracy_mean` uses the mean log-likelihood per continuation token instead (the
same for single-token letters, a length-normalised score for texts). Calibration comes with
it: `ece` and `brier` of the choice probabilities (softmax of the summed log-likelihoods over
the choices; jaxsft.evals.calibration).

Tokenisation follows the harness' pair encoding: context and context + continuation are encoded
separately and the continuation is the tail of the second. The tokenizer's own special tokens
are added (a Llama tokenizer prepends BOS, Qwen adds nothing); the harness leaves BOS out by
default, so absolute numbers can differ slightly from published harness runs.
"""

from __future__ import annotations

import functools
import os
import string
from collections.abc import Sequence

import numpy as np

from jaxsft.data.readers import read_jsonl
from jaxsft.errors import UserError
from jaxsft.evals import base, calibration

LETTERS = string.ascii_uppercase
SEQ_BUCKET = 64  # sequence lengths are rounded up to a multiple of this (fewer compiles)
QUERY_BUCKET = 8  # scored positions per sequence, rounded up likewise
DEFAULT_BATCH = 8


def load_mc(path: str | os.PathLike, max_rows: int = 0) -> list[dict]:
    """Read and validate a multiple-choice JSONL file -> rows {question, choices, answer (int),
    subject, line}."""
    path = os.fspath(path)
    rows = [
        _mc_row(obj, f"{path}:{line}") | {"line": line} for line, obj in read_jsonl(path, max_rows)
    ]
    if not rows:
        raise UserError("the multiple-choice file has no rows", where=path)
    return rows


def _mc_row(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise UserError("a row must be a JSON object", where=where)
    q, choices, answer = obj.get("question"), obj.get("choices"), obj.get("answer")
    if not isinstance(q, str) or not q.strip():
        raise UserError("missing 'question' (a string)", where=where)
    if not (
        isinstance(choices, list)
        and 2 <= len(choices) <= len(LETTERS)
        and all(isinstance(c, str) for c in choices)
    ):
        raise UserError("'choices' must be a list of 2 to 26 strings", where=where)
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
        answer = LETTERS.index(answer.strip().upper())
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise UserError(
            f"'answer' must be a choice index 0..{len(choices) - 1} or its letter", where=where
        )
    subject = obj.get("subject") or ""
    if not isinstance(subject, str):
        raise UserError("'subject' must be a string", where=where)
    return {"question": q, "choices": choices, "answer": answer, "subject": subject}


def mc_prompt(row: dict) -> str:
    """The zero-shot MMLU prompt of a row (ends with 'Answer:')."""
    head = ""
    if row.get("subject"):
        subject = row["subject"].replace("_", " ")
        head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    lines = [row["question"].strip()]
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"])]
    return head + "\n".join(lines) + "\nAnswer:"


def continuations(row: dict, style: str = "letter") -> list[str]:
    if style == "letter":
        return [f" {LETTERS[i]}" for i in range(len(row["choices"]))]
    if style == "text":
        return [f" {c}" for c in row["choices"]]
    raise UserError(f"unknown multiple-choice style {style!r}", hint="letter or text")


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness does: the continuation is the tail of
    encode(context + continuation) after encode(context)."""
    ctx = list(tokenizer(context)["input_ids"])
    whole = list(tokenizer(context + continuation)["input_ids"])
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx) :]
    # The boundary merged into one token: encode the continuation on its own.
    return ctx, list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


def choice_pick(scores: Sequence[tuple[float, int]]) -> tuple[int, int]:
    """[(summed log-likelihood, continuation tokens)] per choice -> (argmax of sum, argmax of
    mean per token); ties go to the first choice."""
    sums = [s for s, _ in scores]
    means = [s / max(n, 1) for s, n in scores]
    return int(np.argmax(sums)), int(np.argmax(means))


def gather_logprobs(logits, targets):
    """logits [..., V] float32, targets [...] int -> log p(target) [...] (log-softmax)."""
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _requests(tokenizer, rows: Sequence[dict], style: str):
    """Sequences to run and, per row, the (sequence, first read position, targets) per choice.

    When every continuation of a row is one token, the row needs one sequence (its context):
    all choices are read at the context's last position.
    """
    seqs, plan = [], []
    for row in rows:
        pairs = [encode_pair(tokenizer, mc_prompt(row), c) for c in continuations(row, style)]
        ctx = pairs[0][0]
        if all(len(c) == 1 and p == ctx for p, c in pairs):
            seqs.append(ctx)
            plan.append([(len(seqs) - 1, len(ctx) - 1, c) for _, c in pairs])
        else:
            items = []
            for p, c in pairs:
                seqs.append(p + c)
                items.append((len(seqs) - 1, len(p) - 1, c))
            plan.append(items)
    return seqs, plan


def _reads_per_seq(seqs, plan):
    """Per sequence: the positions to read and the target token at each."""
    reads = [([], []) for _ in seqs]
    for items in plan:
        for s, start, targets in items:
            for j, t in enumerate(targets):
                reads[s][0].append(start + j)
                reads[s][1].append(t)
    return reads


def sequence_logprobs(model, seqs: Sequence[Sequence[int]], reads, batch_size: int | None = None):
    """log p(target) at each read position of each sequence -> list of float arrays.

    reads[i] = (positions, targets): the logit at position p predicts the target token.
    Sequences are right-padded (segment id 0 on pads) into [batch, bucketed length] batches.
    """
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    bs = min(batch_size or DEFAULT_BATCH, len(seqs))
    out = []
    for start in range(0, len(seqs), bs):
        idx = list(range(start, min(start + bs, len(seqs))))
        idx += [idx[-1]] * (bs - len(idx))
        T = _bucket(max(len(seqs[i]) for i in idx), SEQ_BUCKET)
        Q = _bucket(max(len(reads[i][0]) for i in idx), QUERY_BUCKET)
        ids, seg, qpos, tgt = (np.zeros((bs, n), np.int32) for n in (T, T, Q, Q))
        for b, i in enumerate(idx):
            ids[b, : len(seqs[i])] = seqs[i]
            seg[b, : len(seqs[i])] = 1
            qpos[b, : len(reads[i][0])] = reads[i][0]
            tgt[b, : len(reads[i][1])] = reads[i][1]
        lp = np.asarray(jax.device_get(_score(graphdef, state, ids, seg, qpos, tgt)))
        for b, i in enumerate(idx[: min(bs, len(seqs) - start)]):
            out.append(lp[b, : len(reads[i][0])].astype(np.float64))
    return out


def _bucket(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


@functools.cache
def _score_fn():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    @functools.partial(jax.jit, static_argnames=("graphdef",))
    def score(graphdef, state, ids, seg, qpos, tgt):
        """Only the read positions are projected to the vocabulary: [B, Q, V], not [B, T, V]."""
        model = nnx.merge(graphdef, state)
        T = ids.shape[1]
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), ids.shape)
        h = model.hidden(ids, pos, seg)
        h = jnp.take_along_axis(h, qpos[..., None], axis=1)
        return gather_logprobs(model.logits(h), tgt)

    return score


def _score(graphdef, state, ids, seg, qpos, tgt):
    return _score_fn()(graphdef, state, ids, seg, qpos, tgt)


def mc_eval(
    model, tokenizer, rows: Sequence[dict], *, style: str = "letter", batch_size: int | None = None
) -> dict:
    """Score every choice by log-likelihood; accuracy overall and per subject.

    Returns {"accuracy", "accuracy_mean", "ece", "brier", "n", "style", "subjects": {subject:
    {"accuracy", "accuracy_mean", "n"}}, "rows": [{line, subject, answer, pred, pred_mean,
    logprob_sum, logprob_mean, probs, correct}]}.
    """
    scored = score_rows(model, tokenizer, rows, style=style, batch_size=batch_size)
    return {**summarize(scored, style), "rows": scored}


def score_rows(
    model, tokenizer, rows: Sequence[dict], *, style: str = "letter", batch_size: int | None = None
) -> list[dict]:
    """The per-row results of mc_eval (no metrics)."""
    seqs, plan = _requests(tokenizer, rows, style)
    lps = sequence_logprobs(model, seqs, _reads_per_seq(seqs, plan), batch_size)
    cursor = [0] * len(seqs)  # reads are consumed in the order _reads_per_seq laid them out
    scored = []
    for row, items in zip(rows, plan, strict=True):
        per_choice = []
        for s, _, targets in items:
            vals = lps[s][cursor[s] : cursor[s] + len(targets)]
            cursor[s] += len(targets)
            per_choice.append((float(vals.sum()), len(targets)))
        pred, pred_mean = choice_pick(per_choice)
        probs = calibration.choice_probs([s for s, _ in per_choice])
        scored.append(
            {
                "line": row.get("line"),
                "subject": row.get("subject", ""),
                "answer": row["answer"],
                "pred": pred,
                "pred_mean": pred_mean,
                "logprob_sum": [s for s, _ in per_choice],
                "logprob_mean": [s / n for s, n in per_choice],
                "probs": probs,
                "correct": pred == row["answer"],
            }
        )
    return scored


def summarize(scored: Sequence[dict], style: str = "letter") -> dict:
    """The metrics of mc_eval from its per-row results."""
    return {
        **_accuracy(scored),
        **calibration_metrics(scored),
        "style": style,
        "subjects": _by_subject(scored),
    }


def calibration_metrics(scored: Sequence[dict]) -> dict:
    """ECE (10 bins) and Brier score of the rows' choice probabilities."""
    return {
        "ece": calibration.ece([max(r["probs"]) for r in scored], [r["correct"] for r in scored]),
        "brier": calibration.brier([r["probs"] for r in scored], [r["answer"] for r in scored]),
    }


def _accuracy(scored: Sequence[dict]) -> dict:
    n = len(scored)
    return {
        "accuracy": sum(r["pred"] == r["answer"] for r in scored) / max(n, 1),
        "accuracy_mean": sum(r["pred_mean"] == r["answer"] for r in scored) / max(n, 1),
        "n": n,
    }


def _by_subject(scored: Sequence[dict]) -> dict:
    subjects = sorted({r["subject"] for r in scored if r["subject"]})
    return {s: _accuracy([r for r in scored if r["subject"] == s]) for s in subjects}


KIND = base.Kind(
    name="mc",
    load=lambda path, opts: load_mc(path, opts.max_rows),
    keys=("accuracy", "ece", "brier"),
    pair=("pred", "correct"),
    verdict="correct",
    labels={"accuracy": "multiple-choice accuracy"},
    lower_better=("ece", "brier"),
    general=("accuracy",),
    run=lambda model, tok, rows, opts: score_rows(
        model, tok, rows, style=opts.mc_style, batch_size=opts.batch_size
    ),
    summarize=lambda scored, opts: summarize(scored, opts.mc_style),
)
