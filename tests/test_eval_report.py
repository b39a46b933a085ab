"""The before/after report (jaxsft.evals.report): the regression guard, the golden rows that
changed the most, report.md holding the summary's numbers, and evals.png."""

from __future__ import annotations

from jaxsft.evals import report

BEFORE = {"eval_loss": 2.0, "golden_score": 0.1, "mc_accuracy": 0.6, "ifeval_prompt_strict": 0.3}
AFTER = {"eval_loss": 1.0, "golden_score": 0.8, "mc_accuracy": 0.5, "ifeval_prompt_strict": 0.28}


def test_regressions_watch_general_capability_only():
    found = report.regressions(BEFORE, AFTER, 0.05)
    assert [r["metric"] for r in found] == ["mc_accuracy"]  # ifeval fell 0.02 only
    assert abs(found[0]["drop"] - 0.1) < 1e-12
    assert report.regressions(BEFORE, AFTER, 0.0) == []
    assert report.verdict(found, 0.05).startswith("REGRESSION (drop > eval.max_regression 0.05)")
    assert "mc_accuracy 0.6000 -> 0.5000" in report.verdict(found, 0.05)
    assert report.verdict([], 0.05).startswith("no general-capability metric")


def golden_row(line, output, ok):
    return {"line": line, "prompt": f"q{line}", "expected": "a", "output": output, "pass": ok}


def test_changed_rows_put_pass_flips_first():
    before = [golden_row(1, "abc", False), golden_row(2, "same", True), golden_row(3, "x", True)]
    after = [golden_row(1, "abd", True), golden_row(2, "same", True), golden_row(3, "yyy", True)]
    rows = report.changed_rows(before, after)
    assert [r["line"] for r in rows] == [1, 3]  # the flip, then the text change; 2 unchanged
    assert rows[0]["before_pass"] is False and rows[0]["after_pass"] is True


def test_markdown_and_png_hold_the_summary(tmp_path):
    found = report.regressions(BEFORE, AFTER, 0.05)
    summary = {"step": 9, "before": BEFORE, "after": AFTER, "verdict": report.verdict(found, 0.05)}
    text = report.markdown(summary, [golden_row(1, "no", False)], [golden_row(1, "a", True)])
    assert text.splitlines()[2].startswith("REGRESSION")
    assert "| mc_accuracy | 0.6000 | 0.5000 | -0.1000 |" in text
    assert "| golden_score | 0.1000 | 0.8000 | +0.7000 |" in text
    assert "- line 1 (fail -> pass): `q1`" in text
    out = tmp_path / "evals.png"
    report.plot(summary, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}], str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evals.png"]  # no temp file left


def test_fail_on_regression_exit_code():
    from jaxsft.errors import EXIT_OK, EXIT_REGRESSION, EXIT_SIGNAL
    from jaxsft.main import exit_code

    found = report.regressions(BEFORE, AFTER, 0.05)
    summary = {"step": 9, "regressions": found, "verdict": report.verdict(found, 0.05)}
    assert EXIT_REGRESSION == 5
    assert exit_code(summary, fail_on_regression=False) == EXIT_OK  # advice by default
    assert exit_code(summary, fail_on_regression=True) == EXIT_REGRESSION
    assert exit_code({**summary, "regressions": []}, fail_on_regression=True) == EXIT_OK
    assert exit_code({"step": 3, "stopped": "signal"}, True) == EXIT_SIGNAL


def test_main_exits_5_after_the_run_when_told(tmp_path, monkeypatch, capsys):
    """main returns run()'s summary's exit code: run() has written and exported everything."""
    import jaxsft.train.loop as loop
    from jaxsft.main import main

    found = report.regressions(BEFORE, AFTER, 0.05)
    summary = {"step": 9, "regressions": found, "verdict": report.verdict(found, 0.05)}
    monkeypatch.setattr(loop, "run", lambda config: summary)
    cfg = tmp_path / "run.py"
    (tmp_path / "train.jsonl").write_text("{}\n")
    cfg.write_text(
        "from jaxsft.configs import base\n\n"
        "def get_config():\n"
        "    c = base.get_config()\n"
        f"    c.model.path, c.data.train = {str(tmp_path)!r}, {str(tmp_path / 'train.jsonl')!r}\n"
        "    return c\n"
    )
    assert main(["--config", str(cfg)]) == 0
    assert main(["--config", str(cfg), "--config.eval.fail_on_regression=true"]) == 5
    assert "REGRESSION" in capsys.readouterr().err
