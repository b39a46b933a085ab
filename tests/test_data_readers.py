"""Readers: formats, and a corpus of malformed files each giving its clear UserError."""

from __future__ import annotations

import json
import os

import pytest

from jaxsft.data.readers import parse_sources, read_rows
from jaxsft.errors import UserError

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
USER_ONLY = {"messages": [{"role": "user", "content": "hi"}]}

# name -> (file content, expected where suffix, expected message fragment)
MALFORMED = {
    "bad_json.jsonl": (
        json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n{not json\n",
        ":3",
        "malformed JSON line",
    ),
    "no_messages.jsonl": (json.dumps({"input": "x"}) + "\n", ":1", "none of 'messages'"),
    "no_role.jsonl": (
        json.dumps(GOOD) + "\n" + json.dumps({"messages": [{"content": "x"}]}) + "\n",
        ":2",
        "messages[0] has no 'role'",
    ),
    "no_content.jsonl": (
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}) + "\n",
        ":1",
        "messages[1] has no 'content'",
    ),
    "unknown_role.jsonl": (
        "\n" + json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n",
        ":2",
        "unknown role 'bot'",
    ),
    "no_assistant.jsonl": (json.dumps(USER_ONLY) + "\n", ":1", "no assistant turn"),
    "non_string.jsonl": (
        json.dumps(
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]}
        )
        + "\n",
        ":1",
        "content is a int, expected a string",
    ),
    "empty.jsonl": ("", "", "empty file"),
    "not_list.json": (json.dumps({"rows": []}), "", "not a list of rows"),
    "broken.json": ('[{"messages": [\n  {"role": "user"\n', ":3", "malformed JSON"),
    "bad_row.json": (json.dumps([GOOD, USER_ONLY]), ":row 1", "no assistant turn"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_file_gives_a_user_error_with_file_and_line(tmp_path, name):
    content, where, fragment = MALFORMED[name]
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError) as e:
        read_rows(str(path))
    assert e.value.where == f"{path}{where}"
    assert fragment in e.value.message
    assert e.value.hint


def test_missing_path_and_unsupported_type(tmp_path):
    with pytest.raises(UserError, match="no such file") as e:
        read_rows(str(tmp_path / "nope.jsonl"))
    assert e.value.where == str(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported"):
        read_rows(str(tmp_path / "x.csv"))
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="no .jsonl"):
        read_rows(str(tmp_path / "d"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match="Parquet"):
        read_rows(str(tmp_path / "bad.parquet"))


def test_unreadable_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads everything")
    path = tmp_path / "locked.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    path.chmod(0)
    with pytest.raises(UserError, match="cannot read") as e:
        read_rows(str(path))
    assert e.value.where == str(path)


def test_skip_drops_and_records_invalid_rows(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for name, (content, _, _) in MALFORMED.items():
        if name.endswith(".jsonl"):
            (d / name).write_text(content)
    (d / "good.jsonl").write_text(json.dumps(GOOD) + "\n")
    res = read_rows(str(d), on_invalid="skip")
    assert len(res.rows) == 4  # 2 good rows in bad_json, 1 in no_role, 1 in good
    by_where = {s["where"]: s["reason"] for s in res.skipped}
    assert "malformed JSON line" in by_where[f"{d}/bad_json.jsonl:3"]
    assert "unknown role" in by_where[f"{d}/unknown_role.jsonl:2"]
    assert by_where[f"{d}/empty.jsonl"] == "empty file (no rows)"
    assert res.n_read == 4 + 7  # valid rows + invalid rows (malformed lines included)


def test_formats_read_the_same_rows(tmp_path):
    rows = [GOOD, {"prompt": "p", "completion": "c"}, {"text": "t"}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "c.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "jsonl_named.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([GOOD, GOOD]), tmp_path / "d.parquet")
    expected = read_rows(str(tmp_path / "a.jsonl")).rows
    for name in ("b.json", "c.json", "jsonl_named.json"):
        got = read_rows(str(tmp_path / name)).rows
        assert [r.example for r in got] == [r.example for r in expected]
    pq_rows = read_rows(str(tmp_path / "d.parquet")).rows
    assert [r.example for r in pq_rows] == [expected[0].example] * 2
    assert pq_rows[1].where == f"{tmp_path}/d.parquet:row 1"
    assert read_rows(str(tmp_path / "a.jsonl")).rows[2].where == f"{tmp_path}/a.jsonl:3"
    everything = read_rows(str(tmp_path))  # a directory: every data file, sorted
    assert len(everything.rows) == 3 * 4 + 2


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    """Editors on Windows start files with a BOM: JSONL, JSON and the eval files read as without."""
    from jaxsft.data.readers import read_jsonl

    bom = b"\xef\xbb\xbf"
    lines = "".join(json.dumps(r) + "\n" for r in (GOOD, GOOD)).encode()
    (tmp_path / "a.jsonl").write_bytes(bom + lines)
    (tmp_path / "b.json").write_bytes(bom + json.dumps([GOOD, GOOD]).encode())
    (tmp_path / "c.json").write_bytes(bom + lines)  # JSONL named .json
    for name in ("a.jsonl", "b.json", "c.json"):
        assert [r.example for r in read_rows(str(tmp_path / name)).rows] == [
            r.example for r in read_rows_of([GOOD, GOOD], tmp_path)
        ], name
    assert [row for _, row in read_jsonl(tmp_path / "a.jsonl")] == [GOOD, GOOD]
    (tmp_path / "late.jsonl").write_bytes(lines + bom + lines)  # only a leading BOM is dropped
    with pytest.raises(UserError, match="malformed JSON line") as e:
        read_rows(str(tmp_path / "late.jsonl"))
    assert e.value.where.endswith("late.jsonl:3")


def test_saved_datasets_directory(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([GOOD, GOOD, GOOD])
    ds.save_to_disk(str(tmp_path / "saved"))
    res = read_rows(str(tmp_path / "saved"))
    assert [r.example for r in res.rows] == [r.example for r in read_rows_of([GOOD] * 3, tmp_path)]
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(UserError, match="DatasetDict") as e:
        read_rows(str(tmp_path / "dd"))
    assert "dd/train" in e.value.hint
    assert len(read_rows(str(tmp_path / "dd" / "train")).rows) == 3


def read_rows_of(rows, tmp_path):
    path = tmp_path / "ref.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_rows(str(path)).rows


def test_parse_sources():
    assert parse_sources("a.jsonl") == [("a.jsonl", 1.0)]
    assert parse_sources("") == []
    assert parse_sources([{"path": "a", "weight": 2}, {"path": "b"}]) == [("a", 2.0), ("b", 1.0)]
    with pytest.raises(UserError, match="weight"):
        parse_sources([{"path": "a", "weight": -1}])
    with pytest.raises(UserError, match="no 'path'"):
        parse_sources([{"weight": 1}])
