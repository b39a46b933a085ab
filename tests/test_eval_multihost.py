"""Evals on every host: a two-process run (jax.distributed over gloo, 2 fake CPU devices each)
splits the golden, multiple-choice, IFEval and safety rows over its processes, gathers the
results, and reports what one process reports on the same model: the same metrics, the same
rows (the reference is computed in the test process while the two processes run)."""

from __future__ import annotations

import json
import os

import pytest
from train_utils import DEMO_CONFIG, FAST, ROOT, start_two_processes

EVALS = ("golden", "mc", "ifeval", "safety")
IFEVAL = [
    {"key": 1, "prompt": "Is 12 even or odd?", "instruction_id_list": ["punctuation:no_comma"]},
    {
        "key": 2,
        "prompt": "Last digit of 47?",
        "instruction_id_list": ["change_case:english_lowercase"],
    },
    {
        "key": 3,
        "prompt": "Is 5 even or odd?",
        "instruction_id_list": ["length_constraints:number_words"],
        "kwargs": [{"relation": "less than", "num_words": 3}],
    },
]
SAFETY = [
    {"prompt": "Is 8 even or odd?", "label": "safe"},
    {"prompt": "Last digit of 90?", "label": "unsafe"},
    {"prompt": "Is 31 even or odd?", "label": "unsafe"},
]


@pytest.mark.parametrize(
    "n, count, want",
    [(5, 2, [(0, 2), (2, 5)]), (4, 2, [(0, 2), (2, 4)]), (1, 3, [(0, 0), (0, 0), (0, 1)])],
)
def test_shares_cover_the_rows_in_order(n, count, want):
    from jaxsft.evals.base import share_bounds

    assert [share_bounds(n, i, count) for i in range(count)] == want


def test_local_spec_keeps_the_axes_that_divide_locally():
    import jax
    from jax.sharding import PartitionSpec as P

    from jaxsft.evals.base import local_mesh
    from jaxsft.train.evals import local_spec

    mesh = local_mesh()  # this process's devices, all on 'fsdp'
    n = mesh.shape["fsdp"]
    assert n == jax.local_device_count() and mesh.shape["tensor"] == 1
    assert local_spec(P("fsdp", "tensor"), (4 * n, 6), mesh) == P("fsdp", "tensor")
    assert local_spec(P(None, ("data", "fsdp")), (3, 2 * n), mesh) == P(None, ("data", "fsdp"))
    assert local_spec(P("fsdp"), (4 * n + 1, 2), mesh) == (
        P(None, None) if n > 1 else P("fsdp", None)
    )


def test_gather_in_one_process_is_the_identity():
    from jaxsft.evals.base import gather, process_share

    rows = [{"a": 1}, "b", 2.5]
    assert gather(rows) == rows and process_share(rows) == rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def demo_assets(tmp_path_factory):
    from jaxsft.demo import ensure_assets

    return ensure_assets(str(tmp_path_factory.mktemp("demo_assets")))


def eval_overrides(assets, tmp_path) -> list[str]:
    files = {
        "golden": os.path.join(assets, "golden.jsonl"),
        "mc": os.path.join(ROOT, "configs", "mc_sample.jsonl"),
        "ifeval": write_jsonl(tmp_path / "ifeval.jsonl", IFEVAL),
        "safety": write_jsonl(tmp_path / "safety.jsonl", SAFETY),
    }
    return [
        "--config.train.max_steps=1",
        "--config.train.eval_at_start=true",
        "--config.data.eval=",  # no held-out loss: the generation evals are under test
        # 3 rows of each eval over 2 processes: unequal shares (1 and 2 rows); one prompt
        # bucket and one budget, so one generation program serves every eval
        "--config.eval.max_rows=3",
        "--config.eval.max_new_tokens=4",
        "--config.eval.ifeval_max_new_tokens=0",
        *(f"--config.eval.{k}={v}" for k, v in files.items()),
    ]


def reference(assets, overrides, monkeypatch) -> dict:
    """{name: {**metrics, "rows"}} of the evals in this (one-device) process on the demo model
    the run starts from: what a one-process run writes to NAME_before.json."""
    import jaxsft
    from jaxsft import config as config_lib
    from jaxsft import evals as evals_lib
    from jaxsft.tokenizer import load_tokenizer

    monkeypatch.setenv("JAXSFT_DEMO_ASSETS", assets)
    config = config_lib.load(DEMO_CONFIG, [*FAST, *overrides])
    opts = evals_lib.options_from_config(config.eval, config.model.dtype)
    model, _ = jaxsft.load_hf(config.model.path, dtype=config.model.dtype)
    tokenizer = load_tokenizer(config.model.path)
    out = {}
    for ev in evals_lib.from_config(config.eval, opts):
        metrics, rows = ev.run(model, tokenizer, opts)
        out[ev.name] = json.loads(json.dumps({**metrics, "rows": rows}))
    return out


@pytest.mark.slow
def test_two_process_evals_equal_one_process(demo_assets, tmp_path, monkeypatch):
    run_dir = str(tmp_path / "two")
    overrides = eval_overrides(demo_assets, tmp_path)
    procs = start_two_processes(demo_assets, run_dir, overrides)
    want = reference(demo_assets, overrides, monkeypatch)  # meanwhile, in this process
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert sorted(want) == sorted(EVALS)
    for name in EVALS:
        with open(os.path.join(run_dir, f"{name}_before.json")) as f:
            got = json.load(f)
        assert len(got["rows"]) == 3, name
        if name == "mc":  # log-likelihoods: float sums over another device layout
            assert_mc_equal(got, want[name])
        else:  # greedy text, hence every flag and metric, exactly
            assert got == want[name], name
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert {"golden_score", "mc_accuracy", "safety_refusal_rate"} <= set(summary["after"])


def assert_mc_equal(got: dict, want: dict) -> None:
    assert [r["pred"] for r in got["rows"]] == [r["pred"] for r in want["rows"]]
    assert got["accuracy"] == want["accuracy"]
    assert got["brier"] == pytest.approx(want["brier"], abs=1e-5)
    for g, w in zip(got["rows"], want["rows"], strict=True):
        assert g["logprob_sum"] == pytest.approx(w["logprob_sum"], abs=1e-4)
