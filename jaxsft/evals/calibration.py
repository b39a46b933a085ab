"""Calibration: does the model know what it knows?

- Multiple choice: the choice probabilities are the softmax of the choices' summed
  log-likelihoods (normalised over the choices). Expected calibration error (ECE, 10 equal-width
  bins of the top probability; bin m holds (m-1)/10 < p <= m/10) is the row-weighted mean gap
  |accuracy - mean confidence| over the bins; the Brier score is the mean over rows of
  sum_k (p_k - [k == answer])^2 (multi-class, 0 best, 2 worst).
- Golden rows marked unanswerable: a reply abstains when it contains one of ABSTAIN_PHRASES
  (case-insensitive, curly apostrophes read as straight ones).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# A reply that contains any of these (lowercased) abstains. docs/evaluation.md lists them.
ABSTAIN_PHRASES = (
    "i don't know",
    "i do not know",
    "i'm not sure",
    "i am not sure",
    "i'm not certain",
    "i am not certain",
    "i cannot answer",
    "i can't answer",
    "i am unable to answer",
    "i'm unable to answer",
    "i don't have enough information",
    "i do not have enough information",
    "not enough information",
    "there is no way to know",
    "i have no way of knowing",
    "cannot be determined",
    "can't be determined",
    "cannot be known",
    "no one knows",
    "nobody knows",
    "unanswerable",
)


def plain_lower(text: str) -> str:
    """Lowercased, curly apostrophes straightened, whitespace runs collapsed."""
    return " ".join(str(text).replace("\u2019", "'").replace("\u2018", "'").lower().split())


def abstains(reply: str) -> bool:
    """True when the reply declines to answer (one of ABSTAIN_PHRASES occurs in it)."""
    low = plain_lower(reply)
    return any(p in low for p in ABSTAIN_PHRASES)


def choice_probs(logprob_sums: Sequence[float]) -> list[float]:
    """Softmax over the choices' summed log-likelihoods."""
    top = max(logprob_sums)
    exps = [math.exp(s - top) for s in logprob_sums]
    total = sum(exps)
    return [e / total for e in exps]


def ece(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float:
    """Expected calibration error over equal-width bins ((m-1)/bins, m/bins]."""
    n = len(confidences)
    if n == 0:
        return 0.0
    groups: dict[int, list[tuple[float, bool]]] = {}
    for c, ok in zip(confidences, correct, strict=True):
        # round: 0.3 * 10 is 3.0000000000000004, which belongs in bin (0.2, 0.3]
        b = min(max(math.ceil(round(c * bins, 9)) - 1, 0), bins - 1)
        groups.setdefault(b, []).append((c, bool(ok)))
    total = 0.0
    for items in groups.values():
        acc = sum(ok for _, ok in items) / len(items)
        conf = sum(c for c, _ in items) / len(items)
        total += len(items) / n * abs(acc - conf)
    return total


def brier(probs: Sequence[Sequence[float]], answers: Sequence[int]) -> float:
    """Mean over rows of sum_k (p_k - onehot(answer)_k)^2."""
    if not probs:
        return 0.0
    per_row = [
        sum((p - (k == a)) ** 2 for k, p in enumerate(row))
        for row, a in zip(probs, answers, strict=True)
    ]
    return sum(per_row) / len(per_row)
