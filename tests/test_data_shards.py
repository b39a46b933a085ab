"""Each host reads only its shard of the data cache, and weighted mixtures keep their weights
over an epoch whichever host reads which rows (data.mix_epoch)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from test_data_cache import make_config, rows
from test_data_pipeline import write_jsonl
from tokenizers_fixture import make_tokenizer

from jaxsft import checkpoint
from jaxsft.data import cache as cache_lib
from jaxsft.data import pipeline
from jaxsft.data.readers import mixture_counts, mixture_epoch


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer("chatml", tmp_path_factory.getbasetemp() / "data_tokenizers")


@pytest.fixture
def files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", rows())
    return train, write_jsonl(tmp_path / "eval.jsonl", rows(8, seed=1))


def host_batches(c, tok, process_count: int, steps: int):
    """Per host: (its Datasets, its first `steps` batches), each host with its own load of
    the cache, as on a pod."""
    out = []
    for p in range(process_count):
        data = pipeline.build_datasets(c, tok)
        it = pipeline.train_iterator(data, c, process_index=p, process_count=process_count)
        out.append((data, [next(it) for _ in range(steps)]))
    return out


def test_hosts_read_only_their_rows_and_together_make_the_global_batch(tmp_path, files, tok):
    c = make_config(tmp_path, *files)
    pipeline.build_datasets(c, tok)  # renders and writes the cache
    ((one, global_batches),) = host_batches(c, tok, 1, 6)
    hosts = host_batches(c, tok, 2, 6)
    for data, _ in [(one, None), *hosts]:
        assert isinstance(data.train.input_ids, cache_lib.Column)  # tokens stay on disk
    for step in range(6):
        for key, value in global_batches[step].items():
            halves = [batches[step][key] for _, batches in hosts]
            np.testing.assert_array_equal(np.concatenate(halves), value)
    # each host decoded only the examples of its own rows, once per place in a row
    for data, batches in hosts:
        slots = sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches)
        assert data.train.input_ids.split.reads == slots
    total = sum(d.train.input_ids.split.reads for d, _ in hosts)
    assert total == one.train.input_ids.split.reads


def test_a_fresh_render_is_read_back_from_the_cache_once_written(tmp_path, files, tok):
    c = make_config(tmp_path, *files, cache_dir="")  # in run_dir: written by save_cache
    data = pipeline.build_datasets(c, tok)
    assert isinstance(data.train.input_ids, list)  # nothing written before the start succeeded
    before = pipeline.epoch_rows(data, 0, 0)
    it = pipeline.train_iterator(data, c, process_index=0, process_count=1)
    first = next(it)
    fingerprint = data.train.fingerprint
    assert pipeline.save_cache(data) == data.cache.path
    assert isinstance(data.train.input_ids, cache_lib.Column)
    assert isinstance(data.eval.input_ids, cache_lib.Column)
    assert pipeline.epoch_rows(data, 0, 0) == before
    it.set_state({"epoch": 0, "step": 0})
    for key, value in next(it).items():  # the running iterator now reads the cache
        np.testing.assert_array_equal(value, first[key])
    from jaxsft import run_dir as rd

    assert fingerprint is None and data.train.fingerprint is not None
    reloaded = pipeline.build_datasets(c, tok)
    assert rd.data_fingerprint(reloaded.train) == data.train.fingerprint
    fresh = make_config(tmp_path / "fresh", *files, cache_dir=str(tmp_path / "other"))
    assert rd.data_fingerprint(pipeline.build_datasets(fresh, tok).train) == (
        data.train.fingerprint
    )


def test_a_run_keeps_reading_its_cache_when_the_directory_is_moved(tmp_path, files, tok):
    """The cache files are opened when the splits are: another start moving the cache aside
    (or a user deleting it) does not break a running job's later batches or evals."""
    c = make_config(tmp_path, *files)
    pipeline.build_datasets(c, tok)
    data = pipeline.build_datasets(c, tok)  # loaded from the cache
    it = pipeline.train_iterator(data, c, process_index=0, process_count=1)
    first = next(it)
    os.rename(data.cache.path, data.cache.path + ".corrupt-x")
    assert next(it)["input_ids"].shape == first["input_ids"].shape
    assert len(list(pipeline.eval_iterator(data, c, process_index=0, process_count=1))) > 0


def test_mix_epoch_first_ends_when_a_source_is_used_up():
    # sizes 40 and 10, weights 3:1: "sum" has 50 examples (b repeated to 12); "first" ends
    # when b is used up, at 10 = 1/4 of 40 examples, of which a gives 30 of its 40
    assert mixture_counts([40, 10], [3, 1]) == [38, 12]
    assert mixture_counts([40, 10], [3, 1], "first") == [30, 10]
    assert mixture_counts([40, 10], [1, 1], "first") == [10, 10]
    assert mixture_counts([3, 7], [0.3, 0.7], "first") == [3, 7]  # 3 / 0.3 is 10, not 10.0...2
    assert mixture_counts([40, 0], [1, 1], "first") == [40, 0]  # an empty source ends nothing
    src = np.array([0] * 40 + [1] * 10)
    for epoch in range(3):
        idx = mixture_epoch(src, [3, 1], 7, epoch, "first")
        assert np.bincount(src[idx]).tolist() == [30, 10]
        assert len(set(idx.tolist())) == len(idx)  # no example twice in an epoch
    with pytest.raises(ValueError, match="mix_epoch"):
        mixture_counts([1], [1], "longest")


@pytest.mark.parametrize("mix_epoch, counts", [("sum", [38, 12]), ("first", [30, 10])])
def test_mixture_weights_hold_over_an_epoch_read_by_two_hosts(tmp_path, tok, mix_epoch, counts):
    a = write_jsonl(tmp_path / "a.jsonl", rows(40, system_every=1000))
    b = write_jsonl(tmp_path / "b.jsonl", rows(10, seed=3, system_every=1000))
    spec = [{"path": a, "weight": 3.0}, {"path": b, "weight": 1.0}]
    c = make_config(tmp_path, spec, packing=False, mix_epoch=mix_epoch, max_length=512)
    c.train.batch_size = 2
    data = pipeline.build_datasets(c, tok)
    assert np.bincount(data.train.source).tolist() == [40, 10]
    steps = pipeline.steps_per_epoch(data, c)
    assert steps == sum(counts) // 2
    rows_ = pipeline.epoch_rows(data, int(c.train.seed), 0)
    assert np.bincount(data.train.source[[r[0] for r in rows_]]).tolist() == counts
    # the two hosts together read every row of the epoch once (the last batch is padded)
    filled = 0
    for p in range(2):
        it = pipeline.train_iterator(data, c, process_index=p, process_count=2)
        filled += sum(int((next(it)["segment_ids"] > 0).any()) for _ in range(steps))
    assert filled == sum(counts)


def test_bad_mix_epoch_is_a_config_error(tmp_path, files, tok):
    from jaxsft.errors import UserError

    c = make_config(tmp_path, *files, mix_epoch="longest")
    with pytest.raises(UserError, match="data.mix_epoch"):
        pipeline.build_datasets(c, tok)


def test_a_grain_position_of_an_earlier_version_is_read(tmp_path):
    """A checkpoint whose data item grain's own handler wrote (process_I-of-N.json, as
    earlier versions saved it) restores through Checkpointer at its position."""
    import grain
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    state = {"epoch": 1, "step": 4, "examples": 33}

    class Position(grain.DatasetIterator):
        def __init__(self, state):
            super().__init__()
            self.state = state

        def __next__(self):
            raise StopIteration

        def get_state(self):
            return dict(self.state)

        def set_state(self, state):
            self.state = dict(state)

    run_dir = tmp_path / "run"
    os.makedirs(checkpoint.checkpoint_dir(str(run_dir)))
    ckpt = checkpoint.Checkpointer(str(run_dir), use_async=False)
    train_state = {"w": jnp.arange(3.0)}
    items = {
        "state": ocp.args.StandardSave(train_state),
        "data": grain.checkpoint.CheckpointSave(Position(state)),
    }
    ckpt.manager.save(3, args=ocp.args.Composite(**items))
    ckpt.wait()
    data_dir = run_dir / "checkpoints" / "3" / "data"
    assert [f.name for f in data_dir.iterdir() if f.name.startswith("process_")]
    restored = Position({})
    got = ckpt.restore(3, train_state, restored)
    assert restored.state == state
    assert list(got["w"]) == [0.0, 1.0, 2.0]
    ckpt.close()
