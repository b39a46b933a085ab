"""Calibration (jaxsft.evals.calibration): ECE and Brier on hand-computed examples, choice
probabilities, and abstention on golden rows marked unanswerable."""

from __future__ import annotations

import json
import math

import pytest

from jaxsft.errors import UserError
from jaxsft.evals.calibration import abstains, brier, choice_probs, ece
from jaxsft.evals.golden import load_golden, score_golden

# probs, answer -> confidence (top prob), correct
#   [.9 .1] 0 -> .9 right     [.8 .2] 1 -> .8 wrong     [.3 .3 .4] 2 -> .4 right
#   [.6 .4] 0 -> .6 right     [.85 .15] 0 -> .85 right
# bins: (.8, .9] holds .9 and .85: accuracy 1, confidence .875, gap .125 (2 rows);
#       (.7, .8] .8 wrong: gap .8; (.3, .4] .4 right: .6; (.5, .6] .6 right: .4
# ECE = (2 * .125 + .8 + .6 + .4) / 5 = .41
# Brier = (.02 + 1.28 + .54 + .32 + .045) / 5 = .441
PROBS = [[0.9, 0.1], [0.8, 0.2], [0.3, 0.3, 0.4], [0.6, 0.4], [0.85, 0.15]]
ANSWERS = [0, 1, 2, 0, 0]


def test_ece_by_hand():
    conf = [max(p) for p in PROBS]
    correct = [p.index(max(p)) == a for p, a in zip(PROBS, ANSWERS, strict=True)]
    assert ece(conf, correct) == pytest.approx(0.41)
    assert ece([], []) == 0.0


def test_ece_bin_edges_are_right_closed():
    # 0.3 belongs to (0.2, 0.3], 0.35 to (0.3, 0.4]: two bins, (0.7 + 0.35) / 2
    assert ece([0.3, 0.35], [True, False]) == pytest.approx(0.525)
    assert ece([1.0], [True]) == 0.0


def test_brier_by_hand():
    assert brier(PROBS, ANSWERS) == pytest.approx(0.441)
    assert brier([[1.0, 0.0]], [1]) == pytest.approx(2.0)


def test_choice_probs_normalise_log_likelihoods():
    sums = [math.log(p) - 7.0 for p in (0.2, 0.3, 0.5)]
    assert choice_probs(sums) == pytest.approx([0.2, 0.3, 0.5])


@pytest.mark.parametrize(
    "reply, want",
    [
        ("I don't know.", True),
        ("I\u2019m not sure who that is.", True),
        ("That cannot be determined from the question.", True),
        ("Paris.", False),
        ("I know: it is Paris.", False),
    ],
)
def test_abstains(reply, want):
    assert abstains(reply) is want


def write(tmp_path, rows):
    p = tmp_path / "golden.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_golden_abstention_rates_by_hand(tmp_path):
    rows = load_golden(
        write(
            tmp_path,
            [
                {"prompt": "Capital of France?", "expected": "Paris", "metric": "contains"},
                {"prompt": "Who wins the 2050 cup?", "expected": None},
                {"prompt": "What did I eat today?", "label": "abstain"},
                {"prompt": "2+2?", "expected": "4", "metric": "contains"},
            ],
        )
    )
    assert [r["metric"] for r in rows] == ["contains", "abstain", "abstain", "contains"]
    replies = ["Paris.", "I don't know.", "Pizza.", "I\u2019m not sure, maybe 4"]
    metrics, scored = score_golden(rows, replies)
    assert [r["pass"] for r in scored] == [True, True, False, True]
    # unanswerable: 1 of 2 abstain; answerable: 1 of 2 abstain (the hedged "4" still passes)
    assert metrics["abstention_rate"] == 0.5
    assert metrics["false_abstention_rate"] == 0.5
    assert metrics["score"] == 0.75
    assert metrics["by_metric"] == {"abstain": 0.5, "contains": 1.0}
    plain = score_golden(rows[:1], replies[:1])[0]
    assert "abstention_rate" not in plain and "false_abstention_rate" not in plain


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "x", "label": "skip"}, "unknown label 'skip'"),
        ({"prompt": "x", "label": "abstain", "expected": "y"}, "has no 'expected'"),
    ],
)
def test_golden_abstain_rows_are_checked(tmp_path, bad, message):
    p = write(tmp_path, [{"prompt": "q", "expected": "a"}, bad])
    with pytest.raises(UserError) as e:
        load_golden(p)
    assert e.value.where == f"{p}:2" and message in e.value.message
