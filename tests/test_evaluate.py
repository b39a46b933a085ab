"""Golden-set and multiple-choice evaluation (jaxsft.evals.golden, .mc, python -m jaxsft.evaluate).

Metrics and scoring helpers are checked on hand-made values; the log-likelihoods of mc_eval
against transformers on a tiny checkpoint; the CLI end to end on tiny checkpoints that carry a
tokenizer with a chat template; malformed golden files exit 2 naming file:line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from chat_checkpoint import build_chat_checkpoint
from cli_utils import run_module

import jaxsft
from jaxsft.errors import UserError
from jaxsft.evals import calibration, golden_eval, load_golden, load_mc, mc_eval
from jaxsft.evals.cli import main
from jaxsft.evals.golden import normalize, pick_option, score_reply
from jaxsft.evals.mc import choice_pick, encode_pair, gather_logprobs, mc_prompt
from jaxsft.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
MC_SAMPLE = REPO / "configs" / "mc_sample.jsonl"


# ----------------------------------------------------------------------------- metrics
def test_normalize():
    assert normalize("  Paris \n\t is  nice ") == "Paris is nice"


@pytest.mark.parametrize(
    "metric, reply, expected, options, ok",
    [
        ("exact", " Paris\n", "Paris", None, True),
        ("exact", "Paris  France", "Paris France", None, True),
        ("exact", "paris", "Paris", None, False),  # case-sensitive
        ("exact", "Paris.", "Paris", None, False),
        ("exact", "Lyon", ["Paris", "Lyon"], None, True),
        ("contains", "The capital is PARIS, of course.", "paris", None, True),
        ("contains", "The capital is Lyon.", "Paris", None, False),
        ("contains", "answer:\n 42  apples", "42 apples", None, True),
        ("regex", "The total is 1,234 dollars", r"\b1,?234\b", None, True),
        ("regex", "The total is 1235", r"\b1,?234\b", None, False),
        ("regex", "YES", r"(?i)^\s*yes\b", None, True),
        ("choice", "B", "B", ["A", "B", "C"], True),
        ("choice", "I think the answer is b.", "B", ["A", "B", "C"], True),
        ("choice", "It is C, not B.", "B", ["A", "B", "C"], False),  # first mention wins
        ("choice", "positive", "negative", ["positive", "negative"], False),
        ("choice", "nothing relevant", "yes", ["yes", "no"], False),
        (
            "choice",
            "New York City is larger",
            "New York City",
            ["New York", "New York City"],
            True,
        ),  # ties at one position go to the longer option
    ],
)
def test_score_reply(metric, reply, expected, options, ok):
    assert score_reply(metric, reply, expected, options) is ok


def test_pick_option_exact_reply_wins():
    assert pick_option(" no ", ["yes", "no"]) == "no"
    assert pick_option("maybe", ["yes", "no"]) is None


# ----------------------------------------------------------------------------- golden files
def write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}], "expected": "hello"})


def test_load_golden_defaults_and_shortcuts(tmp_path):
    p = write(
        tmp_path,
        "g.jsonl",
        [
            GOOD,
            "",
            json.dumps({"prompt": "2+2?", "expected": ["4", "four"], "metric": "contains"}),
            json.dumps(
                {
                    "prompt": "yes or no?",
                    "expected": "yes",
                    "metric": "choice",
                    "options": ["yes", "no"],
                }
            ),
        ],
    )
    rows = load_golden(p, metric="contains")
    assert [r["line"] for r in rows] == [1, 3, 4]
    assert [r["metric"] for r in rows] == ["contains", "contains", "choice"]
    assert rows[1]["messages"] == [{"role": "user", "content": "2+2?"}]
    assert len(load_golden(p, max_rows=2)) == 2


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"messages": [{"role": "user", "content": "x"}], "expected": ', "malformed JSON line"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "missing field 'expected'"),
        ('{"prompt": "x", "expected": "y", "metric": "bleu"}', "unknown metric 'bleu'"),
        ('{"prompt": "x", "expected": "(", "metric": "regex"}', "bad regex"),
        (
            '{"prompt": "x", "expected": "C", "metric": "choice", "options": ["A", "B"]}',
            "not one of 'options'",
        ),
        ('{"prompt": "x", "expected": "A", "metric": "choice"}', "needs 'options'"),
        ('{"messages": [{"role": "bot", "content": "x"}], "expected": "y"}', "role"),
        (
            '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": '
            '"y"}], "expected": "y"}',
            "last message is an assistant turn",
        ),
        ('{"expected": "y"}', "missing 'messages'"),
        ('["not", "an", "object"]', "JSON object"),
    ],
)
def test_load_golden_rejects_bad_rows_with_line(tmp_path, bad, message):
    p = write(tmp_path, "bad.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(UserError) as e:
        load_golden(p)
    assert e.value.where == f"{p}:3"
    assert message in e.value.message


def test_load_golden_and_mc_name_a_non_utf8_line(tmp_path):
    mc_row = json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0})
    for good, load in ((GOOD, load_golden), (mc_row, load_mc)):
        p = tmp_path / f"{load.__name__}.jsonl"
        p.write_bytes(good.encode() + b"\n\n" + b'{"question": "caf\xe9"}\n')
        with pytest.raises(UserError) as e:
            load(p)
        assert e.value.where == f"{p}:3" and "not UTF-8" in e.value.message


def test_cli_malformed_golden_exits_2_without_traceback(tmp_path):
    p = write(tmp_path, "bad.jsonl", [GOOD, '{"prompt": "x"}'])
    r = run_module("jaxsft.evaluate", "--model", str(tmp_path / "none"), "--golden", str(p))
    assert r.returncode == 2, r.stderr
    assert f"{p}:2: missing field 'expected'" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_out_directory_fails_before_loading_a_model(tmp_path, capsys):
    p = write(tmp_path, "golden.jsonl", [GOOD])
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / "none"), "--golden", str(p), "--out", str(tmp_path)])
    assert e.value.code == 2
    assert f"{tmp_path}: --out is a directory" in capsys.readouterr().err


def test_load_mc_validates(tmp_path):
    rows = load_mc(MC_SAMPLE)
    assert len(rows) == 40 and all(len(r["choices"]) == 4 for r in rows)
    assert sorted({r["answer"] for r in rows}) == [0, 1, 2, 3]
    p = write(
        tmp_path,
        "mc.jsonl",
        [
            json.dumps({"question": "q", "choices": ["a", "b"], "answer": "B"}),
            json.dumps({"question": "q", "choices": ["a", "b"], "answer": 2}),
        ],
    )
    with pytest.raises(UserError) as e:
        load_mc(p)
    assert e.value.where == f"{p}:2"
    assert load_mc(p, max_rows=1)[0]["answer"] == 1


# ----------------------------------------------------------------------------- MC scoring
def test_gather_logprobs_by_hand():
    probs = np.array([[0.5, 0.25, 0.125, 0.125], [0.1, 0.2, 0.3, 0.4]])
    logits = np.log(probs) + np.array([[3.0], [-1.0]])  # log-softmax removes any shift
    got = np.asarray(gather_logprobs(logits.astype(np.float32), np.array([1, 3])))
    np.testing.assert_allclose(got, [math.log(0.25), math.log(0.4)], rtol=1e-6)


def test_choice_pick_by_hand():
    # sums: choice 2 best (-0.7); per token: choice 1 best (-2.5 / 5 = -0.5)
    assert choice_pick([(-1.0, 1), (-2.5, 5), (-0.7, 1)]) == (2, 1)
    assert choice_pick([(-1.0, 1), (-1.0, 1)]) == (0, 0)  # ties: the first


def test_mc_prompt_format():
    row = {
        "question": " Which is a fruit? ",
        "choices": ["Apple", "Chair"],
        "answer": 0,
        "subject": "everyday_knowledge",
    }
    assert mc_prompt(row) == (
        "The following are multiple choice questions (with answers) about everyday knowledge."
        "\n\nWhich is a fruit?\nA. Apple\nB. Chair\nAnswer:"
    )
    assert mc_prompt({**row, "subject": ""}) == "Which is a fruit?\nA. Apple\nB. Chair\nAnswer:"


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("chat_ckpts"))


@pytest.fixture(scope="module")
def tuned_dir(ckpt_root):
    return build_chat_checkpoint(ckpt_root, "llama3", 0)


@pytest.fixture(scope="module")
def loaded(tuned_dir):
    return jaxsft.load_hf(tuned_dir)[0], load_tokenizer(tuned_dir)


def hf_choice_logprobs(path, tokenizer, row, style):
    """Reference: transformers' float32 forward over context + continuation per choice."""
    from hf_fixtures import hf_model

    from jaxsft.evals.mc import continuations

    model = hf_model(path)
    out = []
    for cont in continuations(row, style):
        ctx, c = encode_pair(tokenizer, mc_prompt(row), cont)
        ids = torch.tensor([ctx + c])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        out.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(c)))
    return out


@pytest.mark.parametrize("style", ["letter", "text"])
def test_mc_eval_matches_transformers(loaded, tuned_dir, style):
    model, tok = loaded
    rows = load_mc(MC_SAMPLE, max_rows=5)
    res = mc_eval(model, tok, rows, style=style, batch_size=4)
    want = [hf_choice_logprobs(tuned_dir, tok, r, style) for r in rows]
    got = [r["logprob_sum"] for r in res["rows"]]
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    # the rows whose answer is the reference argmax are exactly the correct ones
    best = [int(np.argmax(w)) for w in want]
    assert [r["pred"] for r in res["rows"]] == best
    rigged = [{**r, "answer": b} for r, b in zip(rows, best, strict=True)]
    assert mc_eval(model, tok, rigged, style=style, batch_size=4)["accuracy"] == 1.0
    assert res["accuracy"] == np.mean([b == r["answer"] for b, r in zip(best, rows, strict=True)])
    assert set(res["subjects"]) == {r["subject"] for r in rows}
    # calibration from the reference log-likelihoods' choice probabilities
    probs = [calibration.choice_probs(w) for w in want]
    np.testing.assert_allclose([r["probs"] for r in res["rows"]], probs, atol=1e-4)
    answers = [r["answer"] for r in rows]
    assert res["brier"] == pytest.approx(calibration.brier(probs, answers), abs=1e-4)
    conf = [max(p) for p in probs]
    correct = [b == a for b, a in zip(best, answers, strict=True)]
    assert res["ece"] == pytest.approx(calibration.ece(conf, correct), abs=1e-4)


# ----------------------------------------------------------------------------- golden + CLI
def test_golden_eval_scores_generated_text(loaded):
    model, tok = loaded
    msgs = [
        [{"role": "user", "content": "hello world"}],
        [{"role": "user", "content": "what is the answer"}],
    ]
    replies = jaxsft.generate(model, tok, msgs, max_new_tokens=8)
    rows = [
        {"messages": msgs[0], "expected": replies[0], "metric": "exact"},
        {"messages": msgs[1], "expected": replies[1] + " and more", "metric": "exact"},
    ]
    res = golden_eval(model, tok, rows, max_new_tokens=8)
    assert [r["pass"] for r in res["rows"]] == [True, False]
    assert res["score"] == 0.5 and res["n"] == 2
    assert [r["output"] for r in res["rows"]] == replies


def test_cli_end_to_end_with_compare(tmp_path, ckpt_root, tuned_dir, capsys):
    base_dir = build_chat_checkpoint(ckpt_root, "llama3", 1)
    golden = write(
        tmp_path,
        "golden.jsonl",
        [
            json.dumps({"prompt": "hello", "expected": "(?s).*", "metric": "regex"}),
            json.dumps({"prompt": "hello", "expected": "no model says exactly this"}),
            json.dumps(
                {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "yes or no?"},
                    ],
                    "expected": "yes",
                    "metric": "choice",
                    "options": ["yes", "no"],
                }
            ),
        ],
    )
    out = tmp_path / "report" / "eval.json"
    rc = main(
        [
            "--model",
            tuned_dir,
            "--compare",
            base_dir,
            "--golden",
            str(golden),
            "--mc",
            str(MC_SAMPLE),
            "--max-rows",
            "6",
            "--max-new-tokens",
            "6",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    g = report["golden"]
    assert [r["pass"] for r in g["rows"]][:2] == [True, False]
    assert [r["base_pass"] for r in g["rows"]][:2] == [True, False]
    assert all(
        {"prompt", "expected", "output", "base_output", "pass", "base_pass"} <= set(r)
        for r in g["rows"]
    )
    assert g["rows"][2]["prompt"] == "yes or no?"
    assert report["mc"]["n"] == 6 and 0.0 <= report["mc"]["base_accuracy"] <= 1.0
    md = out.with_suffix(".md").read_text()
    assert "| eval | base | tuned | change |" in md and "golden pass rate" in md
    assert md in capsys.readouterr().out
