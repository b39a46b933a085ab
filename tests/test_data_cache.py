"""The tokenized data cache (data.cache_dir), parallel rendering (data.workers) and
`python -m jaxsft.data prepare`."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
from cli_utils import run_module
from test_data_check import config_file
from test_data_pipeline import _words, write_jsonl
from tokenizers_fixture import make_tokenizer, tokenizer_dir

from jaxsft.data import cache as cache_lib
from jaxsft.data import pipeline, splits
from jaxsft.errors import UserError

try:
    from jaxsft.configs.base import get_config
except ImportError:
    from configs.base import get_config

WORDS = "the cat sat on a mat and then it ran to see what all the people did there".split()


def conversation(rng: random.Random, i: int, system_every: int = 4) -> dict:
    msgs = [{"role": "system", "content": "Be brief."}] if i % system_every == 0 else []
    for t in range(1 + i % 2):
        msgs.append({"role": "user", "content": f"Q{i}.{t} " + _words(rng, 2, 10)})
        reply = {"role": "assistant", "content": f"A{i}.{t} " + _words(rng, 2, 30)}
        if i % 5 == 1:
            reply["weight"] = 0.5  # fractional loss weights: float32 masks
        msgs.append(reply)
    return {"messages": msgs}


def rows(n=40, seed=0, **kw):
    rng = random.Random(seed)
    return [conversation(rng, i, **kw) for i in range(n)]


def make_config(tmp_path, train, eval_="", **data):
    c = get_config()
    c.run_dir = str(tmp_path / "run")
    c.data.train, c.data.eval = train, eval_
    c.data.max_length = 64  # a few rows are truncated
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.workers = 1
    c.train.batch_size = 4
    for k, v in data.items():
        c.data[k] = v
    return c


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer("chatml", tmp_path_factory.getbasetemp() / "data_tokenizers")


@pytest.fixture
def files(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", rows()), write_jsonl(
        tmp_path / "eval.jsonl", rows(8, seed=1)
    )


def assert_same(a: pipeline.Datasets, b: pipeline.Datasets):
    assert (a.eval is None) == (b.eval is None)
    for x, y in ((a.train, b.train), (a.eval, b.eval)):
        if x is None:
            continue
        assert len(x) == len(y) and list(x.where) == list(y.where) and x.weights == y.weights
        assert x.source.dtype == y.source.dtype and np.array_equal(x.source, y.source)
        for field in ("input_ids", "loss_mask", "kinds"):
            u, v = getattr(x, field), getattr(y, field)
            assert len(u) == len(v)
            for p, q in zip(u, v, strict=True):
                assert p.dtype == q.dtype and np.array_equal(p, q)
    assert json.dumps(a.report) == json.dumps(b.report)


def test_second_build_loads_the_cache(tmp_path, files, tok, capsys):
    c = make_config(tmp_path, *files)
    first = pipeline.build_datasets(c, tok, show=3)
    out = capsys.readouterr().out
    assert f"rendering, key {first.cache.key}" in out and "wrote" in out
    assert any(m.dtype == np.float32 for m in first.train.loss_mask)
    second = pipeline.build_datasets(c, tok, show=3)
    assert f"loaded {len(first.train) + len(first.eval)} examples" in capsys.readouterr().out
    assert_same(first, second)
    assert len(second.train.kinds) == 3
    path = first.cache.path
    assert sorted(os.listdir(path)) == sorted(
        ["manifest.json", "meta.json", "report.json"]
        + [
            f"{s}.{x}"
            for s in ("train", "eval")
            for x in ("array_record", "lengths.npy", "source.npy")
        ]
    )
    # random access by example index, as a host reading its shard will
    split = cache_lib.CachedSplit(path, "train")
    assert np.array_equal(split.lengths, first.train.lengths)
    ex = split[7]
    assert ex["where"] == first.train.where[7]
    import grain  # the file is one grain reads natively

    source = grain.sources.ArrayRecordDataSource([split.path])
    assert len(source) == len(split) and cache_lib.decode_example(source[7])["where"] == ex["where"]
    assert np.array_equal(ex["input_ids"], first.train.input_ids[7])
    # settings that do not change rendering reuse the cache and recompute the packing section
    c.train.batch_size = 2
    third = pipeline.build_datasets(c, tok)
    assert "loaded" in capsys.readouterr().out
    assert third.report["train"]["packing"]["batch_size"] == 2


@pytest.mark.parametrize(
    "change, why",
    [
        ("data_file", "train.jsonl changed"),
        ("template", "tokenizer or chat template changed"),
        ("max_length", "data.max_length 64 -> 80"),
        ("turns", "data.turns 'all' -> 'last'"),
        ("mixture", "data.train changed"),
    ],
)
def test_a_changed_input_renders_again_and_says_why(tmp_path, files, tok, capsys, change, why):
    c = make_config(tmp_path, *files)
    before = pipeline.build_datasets(c, tok)
    capsys.readouterr()
    if change == "data_file":
        with open(files[0], "a") as f:
            f.write(json.dumps(rows(1, seed=5)[0]) + "\n")
    elif change == "template":
        tok = make_tokenizer("chatml", tmp_path / "tok")  # a fresh copy to change
        tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ", 1)
    elif change == "max_length":
        c.data.max_length = 80
    elif change == "turns":
        c.data.turns = "last"
    else:
        c.data.train = [{"path": files[0], "weight": 2.0}]
    after = pipeline.build_datasets(c, tok)
    out = capsys.readouterr().out
    assert after.cache.key != before.cache.key
    assert f"rendering, key {after.cache.key}" in out and why in out, out
    assert "loaded" not in out
    assert os.path.isdir(after.cache.path) and os.path.isdir(before.cache.path)


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_manifest"])
def test_a_corrupt_cache_is_moved_aside_and_rendered_again(tmp_path, files, tok, capsys, damage):
    c = make_config(tmp_path, *files)
    first = pipeline.build_datasets(c, tok)
    path = first.cache.path
    target = os.path.join(path, "train.array_record")
    if damage == "flip":
        data = bytearray(open(target, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(target, "wb").write(bytes(data))
    elif damage == "truncate":
        os.truncate(target, os.path.getsize(target) // 2)
    else:
        os.remove(os.path.join(path, "manifest.json"))
    capsys.readouterr()
    second = pipeline.build_datasets(c, tok)
    err = capsys.readouterr().err
    assert f"warning: data cache {path} is corrupt" in err and "rendering again" in err
    aside = [n for n in os.listdir(c.data.cache_dir) if ".corrupt-" in n]
    assert len(aside) == 1  # kept for a look, never read again
    assert_same(first, second)
    assert os.path.isfile(os.path.join(path, "manifest.json"))  # written afresh
    pipeline.build_datasets(c, tok)
    assert "loaded" in capsys.readouterr().out


def test_a_half_written_cache_is_never_read(tmp_path, files, tok, capsys, monkeypatch):
    c = make_config(tmp_path, *files)
    first = pipeline.build_datasets(c, tok)
    key, root = first.cache.key, c.data.cache_dir
    # a render killed while writing: its temp dir holds files but no rename happened
    os.rename(first.cache.path, os.path.join(root, f".tmp-{key}-999-deadbeef"))
    os.remove(os.path.join(root, f".tmp-{key}-999-deadbeef", "manifest.json"))
    capsys.readouterr()
    second = pipeline.build_datasets(c, tok)
    assert f"rendering, key {key}" in capsys.readouterr().out
    assert_same(first, second)

    # a write interrupted in this process leaves nothing behind, not even the temp dir
    def stop(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_lib.DataCache, "_write", stop)
    c.data.max_length = 60
    with pytest.raises(KeyboardInterrupt):
        pipeline.build_datasets(c, tok)
    assert sorted(os.listdir(root)) == sorted([key, f".tmp-{key}-999-deadbeef"])


def test_two_writers_of_one_key_keep_the_first(tmp_path, files, tok):
    c = make_config(tmp_path, *files)
    a = pipeline.build_datasets(c, tok)
    manifest = open(os.path.join(a.cache.path, "manifest.json")).read()
    b = pipeline.build_datasets(c, tok)  # loaded: a second host that rendered too writes again
    b.unsaved = (a.train, a.eval, {"other": "report"}, [])
    assert pipeline.save_cache(b) == a.cache.path
    assert open(os.path.join(a.cache.path, "manifest.json")).read() == manifest
    assert not [n for n in os.listdir(c.data.cache_dir) if n.startswith(".tmp-")]


def test_default_cache_dir_is_written_only_by_save_cache(tmp_path, files, tok, capsys):
    c = make_config(tmp_path, *files, cache_dir="")
    data = pipeline.build_datasets(c, tok)
    assert data.cache.path == os.path.join(str(tmp_path / "run"), "data_cache", data.cache.key)
    assert not (tmp_path / "run").exists()  # a failed start after this leaves no trace
    assert pipeline.save_cache(data) == data.cache.path
    capsys.readouterr()
    pipeline.build_datasets(c, tok)
    assert "loaded" in capsys.readouterr().out


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return make_tokenizer("gemma2", tmp_path_factory.getbasetemp() / "data_tokenizers")


def test_workers_render_the_same_bytes_and_errors(tmp_path, gemma, monkeypatch):
    # gemma2's template refuses system messages: a render-time row error in every 7th row
    monkeypatch.setattr(splits, "RENDER_CHUNK", 16)  # 48 rows: three worker tasks
    monkeypatch.setattr(splits, "MIN_TASKS_PER_WORKER", 1)
    train = write_jsonl(tmp_path / "train.jsonl", rows(48, system_every=7)[1:])
    pools = []
    get_context = splits.multiprocessing.get_context
    monkeypatch.setattr(
        splits.multiprocessing, "get_context", lambda m: pools.append(m) or get_context(m)
    )
    built = []
    for workers in (1, 2):
        c = make_config(tmp_path / f"w{workers}", train, on_invalid="skip", workers=workers)
        built.append(pipeline.build_datasets(c, gemma))
    assert_same(*built)
    assert built[0].report["train"]["dropped"]["count"] == 6
    errors = []
    for workers in (1, 2):
        c = make_config(tmp_path / f"e{workers}", train, workers=workers)
        with pytest.raises(UserError) as e:
            pipeline.build_datasets(c, gemma)
        errors.append(str(e.value))
        assert not os.path.exists(c.data.cache_dir)  # nothing cached from a failed render
    assert errors[0] == errors[1] and f"{train}:7:" in errors[0]
    assert pools == ["forkserver", "forkserver"]  # workers=2 rendered in worker processes


def test_prepare_then_check_uses_the_cache(tmp_path_factory, tmp_path):
    model = tokenizer_dir("chatml", tmp_path_factory.getbasetemp() / "data_tokenizers")
    train = write_jsonl(tmp_path / "train.jsonl", rows(30))
    shared = tmp_path / "shared_cache"
    cfg = config_file(tmp_path, model, train, cache_dir=str(shared))
    r = run_module("jaxsft.data", "prepare", "--config", cfg)
    assert r.returncode == 0, r.stderr
    (key,) = os.listdir(shared)
    assert f"data cache: {shared / key}" in r.stdout and f"key: {key}" in r.stdout
    meta = json.loads((shared / key / "meta.json").read_text())["splits"]["train"]
    n = meta["examples"]
    assert 0 < n <= 30 and f"train {n} examples {meta['tokens']} tokens" in r.stdout
    assert not (tmp_path / "run").exists()  # prepare writes the cache only
    r = run_module("jaxsft.data", "check", "--config", cfg, "--show", "1")
    assert r.returncode == 0, r.stderr
    assert f"data cache: loaded {n} examples from {shared / key} (key {key})" in r.stdout
    assert "[[" in r.stdout  # --show works from the cache
    assert json.loads((tmp_path / "run" / "data_report.json").read_text())["train"]["examples"]


def test_prepare_bad_row_exits_2_with_file_line(tmp_path_factory, tmp_path):
    model = tokenizer_dir("chatml", tmp_path_factory.getbasetemp() / "data_tokenizers")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows(1)[0]) + "\n" + '{"messages": [{"role": "user"}]}\n')
    r = run_module("jaxsft.data", "prepare", "--config", config_file(tmp_path, model, str(bad)))
    assert r.returncode == 2, r.stderr
    assert f"{bad}:2" in r.stderr and "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "run").exists()


def test_the_key_ignores_where_the_tokenizer_lies(tmp_path_factory, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from jaxsft.data import cache_key

    model = tokenizer_dir("chatml", tmp_path_factory.getbasetemp() / "data_tokenizers")
    shutil.copytree(model, tmp_path / "elsewhere")
    a = AutoTokenizer.from_pretrained(model, local_files_only=True)
    b = AutoTokenizer.from_pretrained(tmp_path / "elsewhere", local_files_only=True)
    assert cache_key.tokenizer_digest(a) == cache_key.tokenizer_digest(b)
    b.chat_template += " "
    assert cache_key.tokenizer_digest(a) != cache_key.tokenizer_digest(b)


def test_the_public_render_stays_the_function():
    """jaxsft.data.render is the public rendering function: no submodule of jaxsft.data may
    take its name (importing it would replace the attribute)."""
    import jaxsft.data
    from jaxsft.data import cache, cache_key, check, splits  # noqa: F401

    assert callable(jaxsft.data.render) and jaxsft.data.render.__module__ == "jaxsft.data.chat"


def test_temp_dirs_of_killed_renders_on_this_host_are_removed(tmp_path, files, tok):
    import socket
    import subprocess
    import sys
    import time

    c = make_config(tmp_path, *files)
    root = c.data.cache_dir
    os.makedirs(root)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    host, pid, key = socket.gethostname(), int(gone.stdout), "a" * 20
    dead = f".tmp-{key}-{host}-{pid}-0badc0de"
    young = f".tmp-{key}-{host}-{pid}-0badc0df"  # dead too, but written minutes ago
    alive = f".tmp-{key}-{host}-{os.getpid()}-0badc0de"  # a render still writing
    other = f".tmp-{key}-elsewhere-{pid}-0badc0de"  # another host's
    suffix = f".tmp-{key}-a-{host}-{pid}-0badc0de"  # host "a-<this host>": not this host
    older = f".tmp-{key}-999-deadbeef"  # no host in the name: not ours to judge
    names = (dead, young, alive, other, suffix, older)
    hour_ago = time.time() - 2 * cache_lib.STALE_TEMP_S
    for name in names:
        os.makedirs(os.path.join(root, name, "x"))
        if name != young:
            os.utime(os.path.join(root, name), (hour_ago, hour_ago))
    data = pipeline.build_datasets(c, tok)
    assert sorted(os.listdir(root)) == sorted([data.cache.key, *names[1:]])
