"""IFEval (jaxsft.evals.ifeval): each of the 25 checkers on hand-written responses that pass
and fail, strict and loose; the aggregates on a small set computed by hand; the loader's
file:line errors; `python -m jaxsft.evaluate --ifeval F --responses R` without a model."""

from __future__ import annotations

import json

import pytest

from jaxsft.errors import UserError
from jaxsft.evals.base import strip_think
from jaxsft.evals.cli import main
from jaxsft.evals.ifeval import aggregate, load_ifeval, score_ifeval
from jaxsft.evals.ifeval_checks import CHECKS, follows, follows_loose, loose_variants

FR = "Bonjour, je m'appelle Pierre et j'habite à Paris depuis dix ans avec ma famille."
EN = "Hello, this is an English sentence about the weather today."
AT_LEAST, LESS = "at least", "less than"

# (instruction id, kwargs, response, strict, loose)
CASES = [
    ("keywords:existence", {"keywords": ["apple", "pie"]}, "I baked an Apple pie.", True, True),
    ("keywords:existence", {"keywords": ["apple", "pie"]}, "An apple tart.", False, False),
    (
        "keywords:frequency",
        {"keyword": "cat", "frequency": 2, "relation": AT_LEAST},
        "A cat and a CAT.",
        True,
        True,
    ),
    (
        "keywords:frequency",
        {"keyword": "cat", "frequency": 2, "relation": AT_LEAST},
        "One cat.",
        False,
        False,
    ),
    (
        "keywords:frequency",
        {"keyword": "cat", "frequency": 2, "relation": LESS},
        "One cat.",
        True,
        True,
    ),
    ("keywords:forbidden_words", {"forbidden_words": ["red"]}, "A reddish sky.", True, True),
    ("keywords:forbidden_words", {"forbidden_words": ["red"]}, "The RED car.", False, False),
    (
        "keywords:letter_frequency",
        {"letter": "z", "let_frequency": 3, "let_relation": AT_LEAST},
        "Zizzy",
        True,
        True,
    ),
    (
        "keywords:letter_frequency",
        {"letter": "z", "let_frequency": 3, "let_relation": AT_LEAST},
        "buzz",
        False,
        False,
    ),
    ("language:response_language", {"language": "fr"}, FR, True, True),
    ("language:response_language", {"language": "fr"}, EN, False, False),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 3, "relation": LESS},
        "Dr. Smith came. He left.",  # "Dr." does not end a sentence: 2
        True,
        True,
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 3, "relation": LESS},
        "One. Two. Three.",
        False,
        False,
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 2, "relation": LESS},
        "Sure thing. Here it is.\nJust one sentence.",  # loose: without the first line
        False,
        True,
    ),
    (
        "length_constraints:number_paragraphs",
        {"num_paragraphs": 2},
        "First part.\n***\nSecond part.",
        True,
        True,
    ),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A\n***\n***\nB", False, False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "Only one.", False, False),
    (
        "length_constraints:number_words",
        {"num_words": 5, "relation": AT_LEAST},
        "one two three four five",
        True,
        True,
    ),
    (
        "length_constraints:number_words",
        {"num_words": 5, "relation": AT_LEAST},
        "one two",
        False,
        False,
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
        'Intro here.\n\n"However, there is more."',
        True,
        True,
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "however"},
        "Intro here.\n\nBut there is more.",
        False,
        False,
    ),
    (
        "detectable_content:number_placeholders",
        {"num_placeholders": 2},
        "Dear [name], at [address].",
        True,
        True,
    ),
    (
        "detectable_content:number_placeholders",
        {"num_placeholders": 2},
        "Dear [name].",
        False,
        False,
    ),
    (
        "detectable_content:postscript",
        {"postscript_marker": "P.S."},
        "Hi.\nP.S. see you",
        True,
        True,
    ),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi. PS bye", False, False),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP.P.S x", True, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", True, True),
    (
        "detectable_format:number_bullet_lists",
        {"num_bullets": 2},
        "* one\n* two\n- three",
        False,
        True,  # loose: without the last line
    ),
    ("detectable_format:constrained_response", {}, "My answer is yes.", True, True),
    ("detectable_format:constrained_response", {}, "Yes.", False, False),
    (
        "detectable_format:number_highlighted_sections",
        {"num_highlights": 2},
        "*one* and **two**",
        True,
        True,
    ),
    (
        "detectable_format:number_highlighted_sections",
        {"num_highlights": 2},
        "*one* only",
        False,
        False,
    ),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nfoo\nSection 2\nbar",
        True,
        True,
    ),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nfoo",
        False,
        False,
    ),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', True, True),
    ("detectable_format:json_format", {}, "{a: 1}", False, False),
    ("detectable_format:json_format", {}, 'Here is the JSON:\n{"a": 1}', False, True),
    ("detectable_format:title", {}, "<<My Poem>>\nRoses are red.", True, True),
    ("detectable_format:title", {}, "<< >> My Poem", False, False),
    ("combination:two_responses", {}, "Answer A\n******\nAnswer B", True, True),
    ("combination:two_responses", {}, "Same\n******\nSame", False, False),
    (
        "combination:repeat_prompt",
        {"prompt_to_repeat": "Write a poem."},
        "write a poem. Roses are red.",
        True,
        True,
    ),
    (
        "combination:repeat_prompt",
        {"prompt_to_repeat": "Write a poem."},
        "Sure!\nWrite a poem. Roses are red.",
        False,
        True,  # loose: without the first line
    ),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        "Done. Any other questions?",
        True,
        True,
    ),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        "Any other questions? Bye.",
        False,
        False,
    ),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        "Done. **Any other questions?**",
        False,
        True,  # loose: without asterisks
    ),
    ("startend:quotation", {}, '"hello there"', True, True),
    ("startend:quotation", {}, "hello there", False, False),
    ("startend:quotation", {}, 'Sure:\n"hello there"', False, True),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 3, "capital_relation": AT_LEAST},
        "I LOVE AI-POWERED tools.",  # I, LOVE, AI-POWERED (hyphenated words are one)
        True,
        True,
    ),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 3, "capital_relation": AT_LEAST},
        "I love AI tools.",
        False,
        False,
    ),
    ("change_case:english_capital", {}, EN.upper(), True, True),
    ("change_case:english_capital", {}, EN, False, False),
    ("change_case:english_lowercase", {}, EN.lower(), True, True),
    ("change_case:english_lowercase", {}, EN, False, False),
    ("punctuation:no_comma", {}, "No commas here.", True, True),
    ("punctuation:no_comma", {}, "One, two.", False, False),
    ("punctuation:no_comma", {}, "   ", False, False),  # a blank response follows nothing
]


@pytest.mark.parametrize("iid, kwargs, response, strict, loose", CASES)
def test_checker(iid, kwargs, response, strict, loose):
    assert follows(iid, response, kwargs) is strict
    assert follows_loose(iid, response, kwargs) is loose


def test_every_instruction_has_a_passing_and_a_failing_case():
    assert len(CHECKS) == 25
    for iid in CHECKS:
        verdicts = {strict for i, _, _, strict, _ in CASES if i == iid}
        assert verdicts == {True, False}, iid


def test_loose_variants():
    assert loose_variants("a\n*b*\nc") == ["a\n*b*\nc", "*b*\nc", "a\n*b*", "*b*"] + [
        "a\nb\nc",
        "b\nc",
        "a\nb",
        "b",
    ]


@pytest.mark.parametrize(
    "reply, want",
    [
        ("<think>a, b</think>\n\nAnswer", "Answer"),
        ("reasoning, opened by the template</think> Answer", "Answer"),
        ("Answer <think>cut off", "Answer"),
        ("plain", "plain"),
    ],
)
def test_strip_think(reply, want):
    assert strip_think(reply) == want


# Three prompts, by hand:
#   1 no_comma + quotation, '"hi there"' (after its think block): strict T T, loose T T
#   2 no_comma + end_checker "Bye.", 'Hello, friend.\n**Bye.**': strict F F; loose T T (without
#     the first line there is no comma; without asterisks it ends with "Bye.")
#   3 number_words >= 3, "two words": strict F, loose F
# prompt strict 1/3, instruction strict 2/5; prompt loose 2/3, instruction loose 4/5.
SET = [
    (
        {
            "key": 1,
            "prompt": "Quote it.",
            "instruction_id_list": ["punctuation:no_comma", "startend:quotation"],
            "kwargs": [{}, {}],
        },
        '<think>Hmm, quotes, then.</think>\n"hi there"',
    ),
    (
        {
            "key": 2,
            "prompt": "Say bye.",
            "instruction_id_list": ["punctuation:no_comma", "startend:end_checker"],
            "kwargs": [{"end_phrase": None}, {"end_phrase": "Bye.", "num_words": None}],
        },
        "Hello, friend.\n**Bye.**",
    ),
    (
        {
            "key": 3,
            "prompt": "Three words.",
            "instruction_id_list": ["length_constraints:number_words"],
            "kwargs": [{"num_words": 3, "relation": AT_LEAST}],
        },
        "two words",
    ),
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_aggregates_by_hand(tmp_path):
    rows = load_ifeval(write_jsonl(tmp_path / "ifeval.jsonl", [p for p, _ in SET]))
    assert rows[1]["kwargs"] == [{}, {"end_phrase": "Bye."}]  # nulls dropped (HF layout)
    metrics, scored = score_ifeval(rows, [r for _, r in SET])
    assert [r["strict"] for r in scored] == [[True, True], [False, False], [False]]
    assert [r["loose"] for r in scored] == [[True, True], [True, True], [False]]
    assert metrics == pytest.approx(
        {
            "prompt_strict": 1 / 3,
            "instruction_strict": 2 / 5,
            "prompt_loose": 2 / 3,
            "instruction_loose": 4 / 5,
        }
    )
    assert aggregate([]) == dict.fromkeys(metrics, 0.0)


def test_cli_scores_responses_without_a_model(tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "ifeval.jsonl", [p for p, _ in SET])
    responses = write_jsonl(
        tmp_path / "responses.jsonl", [{"prompt": p["prompt"], "response": r} for p, r in SET]
    )
    out = tmp_path / "report.json"
    assert main(["--ifeval", str(prompts), "--responses", str(responses), "--out", str(out)]) == 0
    section = json.loads(out.read_text())["ifeval"]
    assert list(section) == [
        "prompt_strict",
        "instruction_strict",
        "prompt_loose",
        "instruction_loose",
        "rows",
    ]
    assert section["instruction_loose"] == pytest.approx(0.8)
    assert section["rows"][1] == {
        "prompt": "Say bye.",
        "instruction_id_list": ["punctuation:no_comma", "startend:end_checker"],
        "output": SET[1][1],
        "strict": [False, False],
        "loose": [True, True],
    }
    assert "IFEval prompt-level strict accuracy" in capsys.readouterr().out

    write_jsonl(responses, [{"prompt": "Quote it.", "response": "x"}])
    with pytest.raises(SystemExit) as e:
        main(["--ifeval", str(prompts), "--responses", str(responses)])
    assert e.value.code == 2
    assert "no response for the prompt of" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "p", "instruction_id_list": ["x:y"], "kwargs": [{}]}, "unknown instruction"),
        (
            {"prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": []},
            "one per instruction",
        ),
        (
            {
                "prompt": "p",
                "instruction_id_list": ["length_constraints:number_words"],
                "kwargs": [{"num_words": 3}],
            },
            "missing ['relation']",
        ),
        (
            {
                "prompt": "p",
                "instruction_id_list": ["length_constraints:number_words"],
                "kwargs": [{"num_words": 3, "relation": "at most"}],
            },
            "relation must be one of",
        ),
        (
            {
                "prompt": "p",
                "instruction_id_list": ["punctuation:no_comma"],
                "kwargs": [{"letter": "a"}],
            },
            "unknown ['letter']",
        ),
        ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}, "missing 'prompt'"),
    ],
)
def test_load_ifeval_names_file_and_line(tmp_path, bad, message):
    p = write_jsonl(tmp_path / "bad.jsonl", [SET[0][0], bad])
    with pytest.raises(UserError) as e:
        load_ifeval(p)
    assert e.value.where == f"{p}:2"
    assert message in e.value.message
