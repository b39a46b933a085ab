"""Every shipped config loads and validates; overrides parse to the right types."""

from __future__ import annotations

import glob
import os

import pytest

from jaxsft import config as config_lib
from jaxsft.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_CONFIGS = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if os.path.basename(p) not in ("base.py", "__init__.py")
)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=os.path.basename)
def test_shipped_config_loads(path, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSFT_DEMO_ASSETS", str(tmp_path / "demo_assets"))
    if os.path.basename(path) == "demo.py":  # makes its assets: keep that out of the repo
        monkeypatch.chdir(tmp_path)
    cfg = config_lib.load(path)
    assert cfg.model.path and cfg.data.train
    assert cfg.train.batch_size % cfg.train.grad_accum == 0


def test_overrides_types(tmp_path):
    path = os.path.join(ROOT, "configs", "llama32_1b_full.py")
    cfg = config_lib.load(
        path,
        [
            "--config.train.learning_rate=1e-4",
            "--config.train.max_steps=7",
            "--config.data.packing=false",
            "--config.lora.targets=q_proj,v_proj",
            "--config.lora.rank=8",
            '--config.data.train=[{"path": "a.jsonl", "weight": 3}, '
            '{"path": "b.jsonl", "weight": 1}]',
        ],
    )
    assert cfg.train.learning_rate == 1e-4 and cfg.train.max_steps == 7
    assert cfg.data.packing is False
    assert tuple(cfg.lora.targets) == ("q_proj", "v_proj")
    assert cfg.data.train[0]["weight"] == 3


@pytest.mark.parametrize(
    "override, needle",
    [
        ("--config.nope=1", "unknown config key 'nope'"),
        ("--config.train.warmup_ratio=-1", "train.warmup_ratio"),
        ("--config.lora.targets=q_proj,wq", "lora.targets"),
        ("--config.train.grad_accum=3", "multiple of train.grad_accum"),
        ("--config.export.format=peft", "needs a LoRA run"),
        ("--config.data.packing=maybe", "true or false"),
        ("--config.train.warmup_ratio=1.0", "train.warmup_ratio must be in [0, 1)"),
        ("--config.train.end_lr_ratio=1.5", "train.end_lr_ratio must be in [0, 1]"),
        ("--config.train.divergence_factor=1.0", "train.divergence_factor must be 0 (off) or > 1"),
        ("--config.train.max_bad_steps=0", "train.max_bad_steps must be > 0"),
        ('--config.data.train=[{"path": "a.jsonl", "weight": -2}]', "data.train: mixture entry 0"),
    ],
)
def test_bad_overrides(override, needle):
    path = os.path.join(ROOT, "configs", "llama32_1b_full.py")
    with pytest.raises(UserError, match=None) as e:
        config_lib.load(path, [override])
    assert needle in str(e.value)


def test_lora_without_targets_is_refused():
    path = os.path.join(ROOT, "configs", "llama31_8b_lora.py")  # lora.rank 16
    with pytest.raises(UserError, match=r"lora.targets=\(\) would train no parameter") as e:
        config_lib.load(path, ["--config.lora.targets=()"])
    assert e.value.where == path and "lora.rank=0" in e.value.hint


def test_edge_values_are_accepted(tmp_path):
    path = os.path.join(ROOT, "configs", "llama32_1b_full.py")
    edges = [
        "--config.train.warmup_ratio=0",
        "--config.train.end_lr_ratio=1.0",
        "--config.train.divergence_factor=0",
        "--config.train.max_bad_steps=1",
        "--config.lora.targets=()",  # full fine-tuning (lora.rank 0) ignores the targets
    ]
    cfg = config_lib.load(path, edges)
    assert cfg.train.end_lr_ratio == 1.0 and cfg.train.divergence_factor == 0


def test_run_dir_that_is_a_file_and_missing_keys(tmp_path):
    path = os.path.join(ROOT, "configs", "llama32_1b_full.py")
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(UserError, match="is an existing file") as e:
        config_lib.load(path, [f"--config.run_dir={tmp_path / 'notes'}"])
    assert e.value.where == path
    partial = tmp_path / "partial.py"
    partial.write_text(
        "import ml_collections\n\n\ndef get_config():\n"
        "    return ml_collections.ConfigDict({'run_dir': 'r'})\n"
    )
    with pytest.raises(UserError, match=r"config key '\w+' is missing"):
        config_lib.load(str(partial))
