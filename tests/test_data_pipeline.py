"""The grain pipeline: epochs, packing, host sharding, resume, mixing, eval."""

from __future__ import annotations

import json
import random

import grain
import numpy as np
import pytest
from tokenizers_fixture import make_tokenizer

from jaxsft.data import pipeline
from jaxsft.data.readers import mixture_counts, mixture_epoch

try:
    from jaxsft.configs.base import get_config
except ImportError:
    from configs.base import get_config

WORDS = "the cat sat on a mat and then it ran to see what all the people did there".split()


def conversation(rng: random.Random, i: int) -> dict:
    msgs = [{"role": "system", "content": "You are helpful."}] if i % 3 == 0 else []
    for t in range(1 + i % 3):
        msgs.append({"role": "user", "content": f"Question {i}.{t}: " + _words(rng, 3, 12)})
        msgs.append({"role": "assistant", "content": f"Answer {i}.{t}: " + _words(rng, 2, 40)})
    return {"messages": msgs}


def _words(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_config(tok_dir, train, eval_="", **kw):
    c = get_config()
    c.model.path = str(tok_dir)
    c.data.train = train
    c.data.eval = eval_
    c.data.max_length = kw.pop("max_length", 128)
    c.data.packing = kw.pop("packing", True)
    c.train.batch_size = kw.pop("batch_size", 4)
    c.train.seed = kw.pop("seed", 0)
    assert not kw
    return c


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer("chatml", tmp_path_factory.getbasetemp() / "data_tokenizers")


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    rng = random.Random(0)
    rows = [conversation(rng, i) for i in range(60)]
    return write_jsonl(tmp_path_factory.mktemp("pipe") / "train.jsonl", rows)


@pytest.fixture(scope="module")
def data(tok, train_file):
    return pipeline.build_datasets(make_config("unused", train_file), tok)


def segments_of(batch):
    """{(row, segment): (ids, mask)} of a batch, checking positions and padding on the way."""
    out = {}
    for r in range(batch["input_ids"].shape[0]):
        seg, pos = batch["segment_ids"][r], batch["positions"][r]
        pad = seg == 0
        assert not batch["loss_mask"][r][pad].any() and not pos[pad].any()
        if pad.any():  # padding only at the end of a row
            assert pad[np.argmax(pad) :].all()
        for s in np.unique(seg[~pad]):
            idx = np.nonzero(seg == s)[0]
            assert (np.diff(idx) == 1).all(), "a segment must be contiguous"
            assert (pos[idx] == np.arange(len(idx))).all()
            assert batch["loss_mask"][r][idx[0]] == 0, "a segment's first token is no target"
            out[(r, int(s))] = (
                tuple(batch["input_ids"][r][idx]),
                tuple(batch["loss_mask"][r][idx]),
            )
    return out


def test_batches_are_fixed_shape_and_cover_an_epoch_once(data):
    cfg = make_config("unused", "x")
    it = pipeline.train_iterator(data, cfg, process_index=0, process_count=1)
    steps = pipeline.steps_per_epoch(data, cfg)
    seen = []
    for _ in range(steps):
        batch = next(it)
        assert set(batch) == {"input_ids", "loss_mask", "segment_ids", "positions"}
        for v in batch.values():
            assert v.shape == (4, 128) and v.dtype == np.int32
        seen += [ids for ids, _ in segments_of(batch).values()]
    expected = sorted(tuple(x) for x in data.train.input_ids)
    assert sorted(seen) == expected  # every example exactly once, unchanged
    assert it.get_state() == {"epoch": 0, "step": steps, "examples": len(data.train)}
    next(it)
    assert it.get_state()["epoch"] == 1 and it.get_state()["step"] == 1


def test_epochs_are_reshuffled_and_repacked(data):
    a, b = pipeline.epoch_rows(data, 0, 0), pipeline.epoch_rows(data, 0, 1)
    assert a != b and sorted(sum(a, [])) == sorted(sum(b, [])) == list(range(len(data.train)))
    assert pipeline.epoch_rows(data, 0, 1) == b  # deterministic from (seed, epoch)
    assert pipeline.epoch_rows(data, 1, 0) != a


def test_unpacked_rows_hold_one_example(tok, train_file):
    data = pipeline.build_datasets(make_config("unused", train_file, packing=False), tok)
    it = pipeline.train_iterator(data, make_config("", "x"), process_index=0, process_count=1)
    batch = next(it)
    assert batch["segment_ids"].max() == 1
    assert data.report["train"]["packing"]["rows_per_epoch"] == len(data.train)


def test_two_processes_get_disjoint_halves_of_the_global_batch(data):
    cfg = make_config("unused", "x")
    full = pipeline.train_iterator(data, cfg, process_index=0, process_count=1)
    hosts = [pipeline.train_iterator(data, cfg, process_index=p, process_count=2) for p in (0, 1)]
    for _ in range(pipeline.steps_per_epoch(data, cfg) + 2):  # across an epoch boundary
        g = next(full)
        h0, h1 = next(hosts[0]), next(hosts[1])
        assert h0["input_ids"].shape == (2, 128)
        for k in g:
            np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), g[k])
        ids0 = {ids for ids, _ in segments_of(h0).values()}
        ids1 = {ids for ids, _ in segments_of(h1).values()}
        assert not ids0 & ids1


def test_resume_from_checkpoint_gives_the_same_next_batches(data, tmp_path):
    import orbax.checkpoint as ocp

    cfg = make_config("unused", "x")
    steps = pipeline.steps_per_epoch(data, cfg)
    ref = pipeline.train_iterator(data, cfg, process_index=0, process_count=1)
    expected = [next(ref) for _ in range(steps + 3)]

    it = pipeline.train_iterator(data, cfg, process_index=0, process_count=1)
    k = steps - 2  # resume shortly before the epoch boundary
    for _ in range(k):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(k, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        next(it)  # moving on while the (async) save finishes must not change what was saved
        mngr.wait_until_finished()

    fresh = pipeline.train_iterator(data, cfg, process_index=0, process_count=1)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(
            mngr.latest_step(),
            args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)),
        )
    for want in expected[k:]:
        got = next(fresh)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_rows_without_supervised_tokens_are_dropped_and_counted(tok, tmp_path, capsys):
    long_user = {"role": "user", "content": "word " * 200}
    rows = [conversation(random.Random(i), i) for i in range(6)]
    rows += [{"messages": [long_user, {"role": "assistant", "content": "ok"}]}] * 2
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    data = pipeline.build_datasets(make_config("unused", path, max_length=96), tok)
    rep = data.report["train"]
    assert len(data.train) == 6 and rep["examples"] == 6
    assert rep["dropped"]["by_reason"] == {"no supervised token after truncation": 2}
    assert [d["where"] for d in rep["dropped"]["rows"]] == [f"{path}:7", f"{path}:8"]
    assert rep["truncated_examples"]["count"] >= 2
    assert all(m.any() for m in data.train.loss_mask)
    assert (
        f"dropped 2 of 8 train examples with no supervised token left after truncation to "
        f"max_length=96 (first: {path}:7); see data_report.json"
    ) in capsys.readouterr().out


def test_mixing_weights_are_respected(tok, tmp_path):
    rng = random.Random(1)
    a = write_jsonl(tmp_path / "a.jsonl", [conversation(rng, i) for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [conversation(rng, i) for i in range(10)])
    spec = [{"path": a, "weight": 1.0}, {"path": b, "weight": 1.0}]
    data = pipeline.build_datasets(make_config("unused", spec), tok)
    assert [s["rows"] for s in data.report["train"]["sources"]] == [40, 10]
    for epoch in range(3):
        idx = sum(pipeline.epoch_rows(data, 0, epoch), [])
        counts = np.bincount(data.train.source[idx], minlength=2)
        assert counts.tolist() == [25, 25]  # 50 per epoch, half from each source
        b_idx = [i for i in idx if data.train.source[i] == 1]
        assert np.bincount(b_idx).max() >= 2  # b is upsampled: its rows repeat
    assert mixture_counts([40, 10], [3, 1]) == [38, 12]
    src = np.array([0] * 40 + [1] * 10)
    e0, e1 = mixture_epoch(src, [1, 1], 0, 0), mixture_epoch(src, [1, 1], 0, 1)
    assert len(e0) == 50 and not np.array_equal(e0, e1)  # a fresh subsample each epoch
    np.testing.assert_array_equal(e0, mixture_epoch(src, [1, 1], 0, 0))


def test_eval_iterator_one_pass_with_padded_last_batch(tok, train_file, tmp_path):
    rng = random.Random(5)
    ev = write_jsonl(tmp_path / "eval.jsonl", [conversation(rng, i) for i in range(9)])
    for packing in (False, True):
        cfg = make_config("unused", train_file, ev, packing=packing)
        data = pipeline.build_datasets(cfg, tok)
        batches = list(pipeline.eval_iterator(data, cfg, process_index=0, process_count=1))
        assert len(batches) == pipeline.eval_steps(data, cfg)
        seen = [ids for b in batches for ids, _ in segments_of(b).values()]
        assert sorted(seen) == sorted(tuple(x) for x in data.eval.input_ids)
        if not packing:
            last = batches[-1]
            assert len(batches) == 3 and not last["loss_mask"][1:].any()
            assert not last["segment_ids"][1:].any()
        again = list(pipeline.eval_iterator(data, cfg, process_index=0, process_count=1))
        for x, y in zip(batches, again, strict=True):
            np.testing.assert_array_equal(x["input_ids"], y["input_ids"])


def test_batch_size_must_split_over_processes(data):
    from jaxsft.errors import UserError

    with pytest.raises(UserError, match="multiple"):
        pipeline.train_iterator(
            data, make_config("", "x", batch_size=3), process_index=0, process_count=2
        )
