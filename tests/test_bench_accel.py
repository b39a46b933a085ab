"""tools/bench_accel.py without an accelerator: --smoke runs the real setup and compiled train
step end to end on CPU and prints every field; the batch, the 8B full-SFT fit decision and the
summary are checked directly. The benchmark itself is not a timed test."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from cli_utils import REPO, compilation_cache_env

spec = importlib.util.spec_from_file_location("bench_accel", REPO / "tools" / "bench_accel.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

FIELDS = (
    "tokens_per_sec",
    "tokens_per_sec_per_device",
    "mfu",
    "step_time_s",
    "compile_s",
    "peak_device_memory_bytes",
    "peak_flops_per_device",
    "device_kind",
)


def run_bench(tmp_path, *args, timeout=240):
    out = tmp_path / "bench.json"
    argv = [sys.executable, str(REPO / "tools" / "bench_accel.py"), "--smoke", "--json", str(out)]
    env = {**__import__("os").environ, **compilation_cache_env(), "JAX_PLATFORMS": "cpu"}
    p = subprocess.run(
        [*argv, "--steps", "1", "--warmup", "1", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout, json.loads(out.read_text())


def check_row(row, name):
    assert row["config"] == name and "error" not in row, row
    for f in FIELDS:
        assert f in row
    assert row["tokens_per_sec"] > 0 and 0 < row["mfu"] < 1 and row["compile_s"] > 0
    assert row["peak_device_memory_bytes"] is None  # CPU: no memory_stats()
    assert np.isfinite(row["loss"]) and row["skipped_steps"] == 0


def test_smoke_full_runs_end_to_end(tmp_path):
    stdout, result = run_bench(tmp_path, "--configs", "smoke_full")
    check_row(result["configs"][0], "smoke_full")
    assert "tok/s" in stdout and "MFU" in stdout and "compile" in stdout
    assert stdout.splitlines()[-1].startswith("BENCH_ACCEL {")


@pytest.mark.slow
def test_smoke_default_set_with_lora_and_an_override(tmp_path):
    _, result = run_bench(tmp_path, "--config.train.loss_chunk=64")
    for row, name in zip(result["configs"], ("smoke_full", "smoke_lora"), strict=True):
        check_row(row, name)
    assert result["configs"][1]["lora_rank"] == 16 and result["overrides"]


def test_packed_batch_fills_rows_with_documents():
    b = bench.packed_batch(3, 256, 1000)
    seg, pos, mask = b["segment_ids"], b["positions"], b["loss_mask"]
    assert all(v.shape == (3, 256) and v.dtype == np.int32 for v in b.values())
    assert (seg > 0).all() and seg.max() > 2  # no padding, several documents a row
    for row_seg, row_pos, row_mask in zip(seg, pos, mask, strict=True):
        for d in np.unique(row_seg):
            n = int((row_seg == d).sum())
            assert (row_pos[row_seg == d] == np.arange(n)).all()
            assert row_mask[row_seg == d].sum() == n - n // 2


def test_8b_full_fit_decision(tmp_path):
    config = bench.run_config(str(tmp_path), "8b_full_2048", [])

    def decide(limit, devices):
        info = {"bytes_limit": limit, "devices": devices, "backend": "gpu"}
        return bench.fit_full_8b(config, [], str(tmp_path), "8b_full_2048", info)

    kept, why = decide(80e9, 8)  # 8 x 80 GB: fp32 master weights and moments fit under fsdp
    assert why is None and kept.model.param_dtype == "float32"
    bf16, why = decide(130e9, 1)  # one H200: bf16 weights and moments
    assert why is None and bf16.model.param_dtype == "bfloat16"
    none, why = decide(75e9, 1)  # one 80 GB GPU: skipped, with the reason
    assert none is None and "GB for bf16 weights and gradients and float32" in why


def test_a_failed_platform_kernel_is_retried_with_auto_once():
    failed = {"config": "1b_full_2048", "error": "x", "attention": "cudnn"}
    assert bench.fallback(failed, []) == "1b_full_2048@auto"
    assert bench.fallback({**failed, "out_of_memory": True}, []) is None
    assert bench.fallback({**failed, "attention": "auto"}, []) is None  # nothing else to try
    assert bench.fallback({**failed, "config": "1b_full_2048@cudnn"}, []) is None  # chosen
    assert bench.fallback(failed, ["--config.model.attention=cudnn"]) is None
    assert bench.fallback({"config": "1b_full_2048", "tokens_per_sec": 1.0}, []) is None
    rows = [failed, {"config": "1b_full_2048@auto", "mfu": 0.3, "tokens_per_sec": 1.0}]
    assert bench.summary(rows) == {"1b_full_2048_mfu": 0.3}


def test_summary_ratio_and_bad_arguments():
    rows = [
        {"config": "8b_lora_2048", "tokens_per_sec_per_device": 1400.0, "tokens_per_sec": 1},
        {"config": "8b_full_2048", "tokens_per_sec_per_device": 1000.0, "tokens_per_sec": 1},
        {"config": "1b_full_2048", "mfu": 0.47, "tokens_per_sec": 1},
    ]
    assert bench.summary(rows) == {"lora_over_full_8b_2048": 1.4, "1b_full_2048_mfu": 0.47}
    with pytest.raises(SystemExit):
        bench.parse_args(["--configs", "nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--stray"])
    args, overrides = bench.parse_args(["--config.model.remat=full"])
    assert args.names == bench.DEFAULT.split(",") and overrides == ["--config.model.remat=full"]


def test_json_never_replaces_a_file_it_did_not_write(tmp_path):
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "data"}')
    argv = [sys.executable, str(REPO / "tools" / "bench_accel.py"), "--smoke", "--json", str(mine)]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "did not write" in p.stderr
    assert mine.read_text() == '{"my": "data"}'
