"""The data report, the refuse-to-train check and `python -m jaxsft.data check`."""

from __future__ import annotations

import json

import pytest
from cli_utils import run_module
from tokenizers_fixture import build_tokenizer, make_tokenizer, tokenizer_dir

from jaxsft.data import pipeline
from jaxsft.errors import UserError

try:
    from jaxsft.configs.base import get_config
except ImportError:
    from configs.base import get_config


def chat(user: str, reply: str, system: str | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    return {
        "messages": msgs
        + [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    }


LONG = (
    "the quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat all day, "
    "and later in the evening both of them walk along the river to watch the boats go by "
    "until the sun sets behind the hills and the first stars appear above the quiet town"
)
TRAIN = [
    chat("Tell me about foxes.", LONG),
    chat("Tell me about foxes.", LONG),  # exact duplicate
    chat("Tell me about foxes!", LONG.replace("warm", "cold")),  # near duplicate
    chat("Write code.", "Here:\n```python\nprint(1)\n"),  # unbalanced fence
    chat("Fill the form.", "Dear {{name}}, TODO"),  # placeholders
    chat("Do something bad.", "I'm sorry, but I cannot help with that."),  # refusal
    chat("", "An answer to nothing.", system="Be nice."),  # empty user content
    chat("Leak me.", "This row is also in eval."),
    {"text": "Plain text with <|im_end|> inside."},  # control token string in content
]
EVAL = [chat("Leak me.", "This row is also in eval."), chat("Fresh question?", "Fresh answer.")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def config_file(tmp_path, model_dir, train, eval_="", **data):
    """A run config file like a user's configs/RUN.py."""
    lines = [
        "try:\n    from jaxsft.configs.base import get_config as base\n"
        "except ImportError:\n    from configs.base import get_config as base\n",
        "def get_config():",
        "    c = base()",
        f"    c.run_dir = {str(tmp_path / 'run')!r}",
        f"    c.model.path = {str(model_dir)!r}",
        f"    c.data.train = {train!r}",
        f"    c.data.eval = {eval_!r}",
        "    c.data.max_length = 64",
        "    c.train.batch_size = 2",
    ]
    lines += [f"    c.data.{k} = {v!r}" for k, v in data.items()]
    path = tmp_path / "run_config.py"
    path.write_text("\n".join(lines + ["    return c", ""]))
    return str(path)


def run_check(args):
    return run_module("jaxsft.data", "check", *args)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("check")
    tok = make_tokenizer("chatml", tmp_path_factory.getbasetemp() / "data_tokenizers")
    c = get_config()
    c.data.train = write_jsonl(tmp / "train.jsonl", TRAIN)
    c.data.eval = write_jsonl(tmp / "eval.jsonl", EVAL)
    c.data.max_length = 96  # the three long rows (~200 tokens) are truncated
    c.train.batch_size = 2
    return pipeline.build_datasets(c, tok).report, c.data.train


def test_report_finds_content_problems(report):
    rep, train = report
    t = rep["train"]
    c = t["content"]
    assert t["rows_read"] == len(TRAIN) and t["examples"] == len(TRAIN)
    assert c["exact_duplicates"]["count"] == 1
    assert c["exact_duplicates"]["groups"] == [[f"{train}:1", f"{train}:2"]]
    assert c["near_duplicates"]["count"] == 1
    assert c["near_duplicates"]["groups"] == [[f"{train}:1", f"{train}:3"]]
    assert c["unbalanced_code_fences"]["examples"] == [f"{train}:4"]
    assert c["placeholders"]["examples"] == [f"{train}:5"]
    assert c["refusal_like_replies"]["examples"] == [f"{train}:6"]
    assert c["refusal_like_replies"]["share"] == round(1 / 8, 4)
    assert c["empty_contents"]["examples"] == [f"{train}:7"]
    assert c["control_tokens_in_content"]["examples"] == [f"{train}:9"]
    assert rep["leakage"]["eval_examples_in_train"]["count"] == 1
    assert rep["leakage"]["eval_prompts_in_train"]["count"] == 1
    assert any("exact duplicates" in w for w in rep["warnings"])


def test_report_lengths_truncation_supervision_packing(report):
    t = report[0]["train"]
    assert set(t["tokens"]) >= {"p50", "p90", "p99", "max", "total_kept"}
    assert t["tokens"]["max"] > 96 and t["truncated_examples"]["count"] == 3
    # 8 assistant turns + the text row (a completion or text counts as one supervised turn)
    assert t["assistant_turns"]["truncated"] == 3 and t["assistant_turns"]["count"] == 9
    assert 0 < t["supervised_tokens"]["share"] < 1
    p = t["packing"]
    assert p["enabled"] and 0 < p["efficiency"] <= 1 and p["steps_per_epoch"] >= 1
    json.dumps(report[0])  # JSON-able


def test_refuses_a_template_without_end_of_turn(tmp_path):
    tok = build_tokenizer("chatml")
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}\n{% endfor %}"
    )
    c = get_config()
    c.data.train = write_jsonl(tmp_path / "t.jsonl", TRAIN[:2])
    c.data.max_length = 256
    with pytest.raises(UserError, match="end-of-turn") as e:
        pipeline.build_datasets(c, tok)
    assert f"{c.data.train}:1" in e.value.message
    data = pipeline.build_datasets(c, tok, strict=False)  # the check CLI reports first
    assert data.report["train"]["assistant_turns"]["without_end_of_turn"]["count"] == 2


def test_refuses_when_nothing_is_supervised(tmp_path):
    tok = build_tokenizer("chatml")
    c = get_config()
    c.data.train = write_jsonl(tmp_path / "t.jsonl", [chat("word " * 50, "ok")])
    c.data.max_length = 16
    with pytest.raises(UserError, match="no supervised token"):
        pipeline.build_datasets(c, tok)


def test_cli_writes_report_and_shows_examples(tmp_path_factory, tmp_path):
    model = tokenizer_dir("llama3", tmp_path_factory.getbasetemp() / "data_tokenizers")
    train = write_jsonl(tmp_path / "train.jsonl", TRAIN)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    cfg = config_file(tmp_path, model, train, write_jsonl(tmp_path / "eval.jsonl", EVAL))
    r = run_check(["--config", cfg, "--show", "2", "--config.data.max_length=256"])
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert (
        rep["train"]["examples"] == len(TRAIN) and rep["train"]["truncated_examples"]["count"] == 0
    )
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"  # nothing deleted
    assert "supervised tokens" in r.stdout and "exact duplicates" in r.stdout
    assert "[[" + LONG + "<|eot_id|>]]" in r.stdout


def test_cli_malformed_file_exits_2_with_file_line_and_no_traceback(tmp_path_factory, tmp_path):
    model = tokenizer_dir("chatml", tmp_path_factory.getbasetemp() / "data_tokenizers")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(TRAIN[0]) + "\n" + '{"messages": [}\n')
    r = run_check(["--config", config_file(tmp_path, model, str(bad))])
    assert r.returncode == 2
    assert f"{bad}:2" in r.stderr and "malformed JSON" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "run" / "data_report.json").exists()


def test_cli_prints_truncation_drops(tmp_path_factory, tmp_path):
    model = tokenizer_dir("chatml", tmp_path_factory.getbasetemp() / "data_tokenizers")
    train = write_jsonl(tmp_path / "train.jsonl", [chat("word " * 80, "ok")] + TRAIN[3:6])
    r = run_check(["--config", config_file(tmp_path, model, train)])
    assert r.returncode == 0, r.stderr
    assert (
        "dropped 1 of 4 train examples with no supervised token left after truncation to "
        f"max_length=64 (first: {train}:1); see data_report.json"
    ) in r.stdout


@pytest.mark.parametrize("on_invalid", ["error", "skip"])
def test_no_chat_template_blames_the_tokenizer_not_the_data(tmp_path_factory, tmp_path, on_invalid):
    from transformers import AutoTokenizer

    model = tokenizer_dir("chatml", tmp_path_factory.getbasetemp() / "data_tokenizers")
    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)  # a copy to change
    tok.chat_template = None
    c = get_config()
    c.data.train = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain"}] + TRAIN[:2])
    c.data.on_invalid = on_invalid
    with pytest.raises(UserError, match="no chat template") as e:
        pipeline.build_datasets(c, tok)
    assert e.value.where == f"{model}/tokenizer_config.json"
    assert f"{c.data.train}:2" in e.value.message and "chat_template.jinja" in e.value.hint


def test_unwritable_run_dir_is_a_user_error(tmp_path):
    from jaxsft.data import check

    (tmp_path / "file").write_text("")
    run_dir = str(tmp_path / "file" / "run")
    with pytest.raises(UserError) as e:
        check.write_report(run_dir, {})
    assert e.value.where == run_dir and "cannot write the data report" in e.value.message
