"""A corpus of malformed inputs to the training CLI: broken data files, model directories,
config files and overrides, run directories.

Each case runs `python -m jaxsft.main` in-process and must end with exit code 2 and one message
on stderr that names the file (and `:LINE` for a data row), no traceback, and the run_dir as it
was: a fresh run_dir is not created, and a run_dir holding an earlier run (config.json,
metrics.jsonl) keeps exactly its files and bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from train_utils import DEMO_CONFIG, FAST

N_TRAIN, N_EVAL, N_GOLDEN = 32, 16, 4
GOOD = {
    "messages": [{"role": "user", "content": "Is 3 odd?"}, {"role": "assistant", "content": "odd"}]
}


@dataclasses.dataclass
class Setup:
    """What a case runs: overrides after the base arguments, another config file, the strings
    stderr must contain, and (run_dir cases) the run_dir the case made itself."""

    overrides: list[str] = dataclasses.field(default_factory=list)
    expect: list[str] = dataclasses.field(default_factory=list)
    config: str | None = None
    run_dir: Path | None = None


@dataclasses.dataclass
class Ctx:
    tmp: Path  # this case's own files
    assets: Path  # the demo assets (read-only: cases copy what they break)
    small: dict  # {"train", "eval", "golden"}: small valid files


@pytest.fixture(scope="module")
def corpus_env(demo_assets, tmp_path_factory):
    """Demo assets (the session's) and small valid data files (fast starts), made once for the
    module."""
    assets = Path(demo_assets)
    small_dir = tmp_path_factory.mktemp("corpus_small")
    small = {}
    for name, n in (("train", N_TRAIN), ("eval", N_EVAL), ("golden", N_GOLDEN)):
        lines = (assets / f"{name}.jsonl").read_text().splitlines(True)[:n]
        small[name] = small_dir / f"{name}.jsonl"
        small[name].write_text("".join(lines))
    return assets, small


# --------------------------------------------------------------------------------------------
# Helpers that write broken files
# --------------------------------------------------------------------------------------------
def write_lines(path: Path, lines: list) -> Path:
    """JSONL from rows (dicts are dumped, str/bytes are written as they are), one a line."""
    data = b"".join(
        (x if isinstance(x, bytes) else (x if isinstance(x, str) else json.dumps(x)).encode())
        + b"\n"
        for x in lines
    )
    path.write_bytes(data)
    return path


def data_case(name: str, bad, line: int, key: str = "data.train", good: dict = GOOD):
    """A JSONL file of `good` rows with `bad` on `line` (from 1), given as `key`."""

    def make(ctx: Ctx) -> Setup:
        rows = [good] * 4
        rows.insert(line - 1, bad)
        path = write_lines(ctx.tmp / name, rows)
        return Setup([f"--config.{key}={path}"], [f"{path}:{line}"])

    return make


def chat(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def model_copy(ctx: Ctx) -> Path:
    return Path(shutil.copytree(ctx.assets / "model", ctx.tmp / "model"))


def model_case(edit: Callable[[Path], object], expect_file: str = ""):
    """A copy of the demo model directory broken by `edit`; stderr names `expect_file` in it."""

    def make(ctx: Ctx) -> Setup:
        model = model_copy(ctx)
        edit(model)
        return Setup([f"--config.model.path={model}"], [str(model / expect_file).rstrip("/")])

    return make


def edit_json(path: Path, **changes):
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))


def edit_tensors(model: Path, edit):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    edit(tensors, np)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


class _Trap:
    """Unpickling this creates the file `marker`: proof that a pickle was loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_only(model: Path):
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(str(model / "UNPICKLED"))))


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def override_case(*overrides: str, expect: tuple[str, ...] = ("{config}",)):
    def make(ctx: Ctx) -> Setup:
        return Setup(list(overrides), [e.format(config=DEMO_CONFIG) for e in expect])

    return make


def config_file_case(name: str, text: str):
    def make(ctx: Ctx) -> Setup:
        path = ctx.tmp / name
        path.write_text(text.format(model=ctx.assets / "model", train=ctx.small["train"]))
        return Setup([], [str(path)], config=str(path))

    return make


# The start of a valid config file; cases append their change and `return c`.
CONFIG_OK = (
    "from jaxsft.configs import base\n\n\ndef get_config():\n    c = base.get_config()\n"
    "    c.model.path = '{model}'\n    c.data.train = '{train}'\n"
)


def mixture_case(spec: str):
    def make(ctx: Ctx) -> Setup:
        spec_text = spec.format(train=ctx.small["train"])
        return Setup([f"--config.data.train={spec_text}"], [DEMO_CONFIG, "mixture entry"])

    return make


# --------------------------------------------------------------------------------------------
# Data files
# --------------------------------------------------------------------------------------------
def _single_file(name: str, content: bytes | str, expect_suffix: str = ""):
    def make(ctx: Ctx) -> Setup:
        path = ctx.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return Setup([f"--config.data.train={path}"], [f"{path}{expect_suffix}"])

    return make


def _dir_without_data(ctx: Ctx) -> Setup:
    path = ctx.tmp / "data_dir"
    path.mkdir()
    (path / "README.txt").write_text("the data is elsewhere\n")
    return Setup([f"--config.data.train={path}"], [str(path)])


def _parquet_wrong_columns(ctx: Ctx) -> Setup:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = ctx.tmp / "wrong.parquet"
    pq.write_table(pa.table({"question": ["Is 3 odd?"], "answer": ["odd"]}), path)
    return Setup([f"--config.data.train={path}"], [f"{path}:row 0"])


def _missing_file(ctx: Ctx) -> Setup:
    path = ctx.tmp / "missing.jsonl"
    return Setup([f"--config.data.train={path}"], [str(path)])


GOLDEN_GOOD = {"messages": [{"role": "user", "content": "Is 3 odd?"}], "expected": "odd"}
MC_GOOD = {"question": "Is 3 odd?", "choices": ["even", "odd"], "answer": 1}

DATA_CASES = {
    "data-malformed-json": data_case("bad_json.jsonl", '{"messages": [', 3),
    "data-not-utf8": data_case("latin1.jsonl", b'{"text": "caf\xe9"}', 2),
    "data-no-messages-key": data_case("no_messages.jsonl", {"msgs": []}, 2),
    "data-unknown-role": data_case("role.jsonl", chat(("user", "a"), ("bot", "b")), 3),
    "data-no-assistant": data_case("no_assistant.jsonl", chat(("user", "a")), 2),
    "data-empty-content": data_case(
        "empty_content.jsonl", chat(("user", "a"), ("assistant", "")), 2
    ),
    "data-content-not-string": data_case(
        "content_int.jsonl", {"messages": [{"role": "user", "content": 42}]}, 2
    ),
    "data-row-not-object": data_case("row_list.jsonl", "[1, 2]", 4),
    "data-prompt-without-completion": data_case("prompt.jsonl", {"prompt": "Is 3 odd?"}, 2),
    "data-empty-file": _single_file("empty.jsonl", b""),
    "data-dir-without-data-files": _dir_without_data,
    "data-json-dict": _single_file("dict.json", json.dumps({"rows": [GOOD]})),
    "data-json-syntax-error": _single_file(
        "broken.json", '[{"messages": [\n  {"role": "user"\n', ":3"
    ),
    "data-parquet-wrong-columns": _parquet_wrong_columns,
    "data-missing-file": _missing_file,
    "data-unsupported-extension": _single_file("train.csv", "question,answer\n"),
    "data-mixture-negative-weight": mixture_case("[{{'path': '{train}', 'weight': -1}}]"),
    "data-mixture-missing-path": mixture_case("[{{'weight': 1.0}}]"),
    "eval-file-bad-line": data_case("eval_bad.jsonl", "{not json", 2, key="data.eval"),
    "golden-file-bad-line": data_case(
        "golden_bad.jsonl", {"messages": "hi"}, 2, key="eval.golden", good=GOLDEN_GOOD
    ),
    "mc-file-bad-row": data_case(
        "mc_bad.jsonl", {"question": "Q?", "choices": ["a"], "answer": 0}, 2, "eval.mc", MC_GOOD
    ),
}


# --------------------------------------------------------------------------------------------
# Model directories
# --------------------------------------------------------------------------------------------
def _missing_model_dir(ctx: Ctx) -> Setup:
    path = ctx.tmp / "no_such_model"
    return Setup([f"--config.model.path={path}"], [str(path)])


def _drop_tensor(tensors, np):
    del tensors["model.layers.1.mlp.down_proj.weight"]


def _wrong_shape(tensors, np):
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors[key] = np.ascontiguousarray(tensors[key][: tensors[key].shape[0] // 2])


def _no_tokenizer_files(model: Path):
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model / name).unlink()


MODEL_CASES = {
    "model-missing-dir": _missing_model_dir,
    "model-no-config-json": model_case(lambda m: (m / "config.json").unlink(), "config.json"),
    "model-garbage-config-json": model_case(
        lambda m: (m / "config.json").write_text("{ not json"), "config.json"
    ),
    "model-unsupported-type": model_case(
        lambda m: edit_json(m / "config.json", model_type="mamba"), "config.json"
    ),
    "model-no-safetensors": model_case(lambda m: (m / "model.safetensors").unlink()),
    "model-truncated-safetensors": model_case(
        lambda m: truncate(m / "model.safetensors"), "model.safetensors"
    ),
    "model-pickle-bin-only": model_case(pickle_only),
    "model-wrong-shape-tensor": model_case(
        lambda m: edit_tensors(m, _wrong_shape), "model.safetensors"
    ),
    "model-missing-tensor": model_case(lambda m: edit_tensors(m, _drop_tensor)),
    "model-no-tokenizer-files": model_case(_no_tokenizer_files),
    "model-no-chat-template": model_case(
        lambda m: (m / "chat_template.jinja").unlink(), "tokenizer_config.json"
    ),
}


# --------------------------------------------------------------------------------------------
# Config files and overrides
# --------------------------------------------------------------------------------------------
CONFIG_CASES = {
    "config-unknown-key-override": override_case(
        "--config.train.bogus=1", expect=("'train.bogus'",)
    ),
    "config-unknown-key-in-file": config_file_case(
        "unknown_key.py", CONFIG_OK + "    c.bogus = 1\n    return c\n"
    ),
    "config-wrong-type": override_case(
        "--config.train.batch_size=eight", expect=("train.batch_size",)
    ),
    "config-wrong-type-in-file": config_file_case(
        "wrong_type.py", CONFIG_OK + "    c.train.max_steps = 'many'\n    return c\n"
    ),
    "config-bad-choice": override_case("--config.model.dtype=float8"),
    "config-batch-not-divisible": override_case("--config.train.grad_accum=3"),
    "config-lora-no-targets": override_case("--config.lora.rank=8", "--config.lora.targets=()"),
    "config-warmup-ratio-above-1": override_case("--config.train.warmup_ratio=1.5"),
    "config-end-lr-ratio-above-1": override_case("--config.train.end_lr_ratio=2.0"),
    "config-divergence-factor": override_case("--config.train.divergence_factor=0.5"),
    "config-max-bad-steps-zero": override_case("--config.train.max_bad_steps=0"),
    "config-syntax-error": config_file_case("syntax.py", "def get_config(:\n    return None\n"),
    "config-get-config-raises": config_file_case(
        "raises.py", "def get_config():\n    raise RuntimeError('no such cluster')\n"
    ),
    "config-not-a-configdict": config_file_case("dict.py", "def get_config():\n    return {{}}\n"),
    "config-missing-key": config_file_case(
        "partial.py",
        CONFIG_OK + "    d = c.to_dict()\n    del d['mesh']\n"
        "    import ml_collections\n\n    return ml_collections.ConfigDict(d)\n",
    ),
    "config-missing-file": lambda ctx: Setup(
        [], [str(ctx.tmp / "nope.py")], config=str(ctx.tmp / "nope.py")
    ),
}


# --------------------------------------------------------------------------------------------
# Run directories (each makes its own run_dir)
# --------------------------------------------------------------------------------------------
def _run_dir_is_file(ctx: Ctx) -> Setup:
    path = ctx.tmp / "run_file"
    path.write_text("my notes, not a run\n")
    return Setup([], [str(path)], run_dir=path)


def _run_dir_garbage_config(ctx: Ctx) -> Setup:
    run_dir = ctx.tmp / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"model": ')
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    return Setup([], [str(run_dir / "config.json")], run_dir=run_dir)


def _run_dir_other_model(ctx: Ctx) -> Setup:
    run_dir = ctx.tmp / "run"
    other = model_copy(ctx)
    fake_run(run_dir, base_argv(ctx, run_dir) + [f"--config.model.path={other}"])
    return Setup([], [str(run_dir / "config.json"), "model.path"], run_dir=run_dir)


RUN_DIR_CASES = {
    "rundir-is-a-file": _run_dir_is_file,
    "rundir-garbage-config-json": _run_dir_garbage_config,
    "rundir-other-model-path": _run_dir_other_model,
}

# Cases that fail only where the fix belongs to files outside data/config/tokenizer:
# {case id: reason} (marked xfail(strict=True)).
XFAIL: dict[str, str] = {}


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def base_argv(ctx: Ctx, run_dir: Path) -> list[str]:
    return [
        "--config",
        DEMO_CONFIG,
        *FAST,
        f"--config.run_dir={run_dir}",
        f"--config.data.train={ctx.small['train']}",
        f"--config.data.eval={ctx.small['eval']}",
        f"--config.eval.golden={ctx.small['golden']}",
        "--config.train.max_steps=2",
    ]


def argv_of(ctx: Ctx, setup: Setup, run_dir: Path) -> list[str]:
    argv = base_argv(ctx, run_dir) + setup.overrides
    if setup.config:
        argv[1] = setup.config
    return argv


def fake_run(run_dir: Path, argv: list[str]) -> None:
    """An earlier run in run_dir: its saved config (that of `argv`, or of the demo config when
    `argv` does not load) and a metrics line."""
    from jaxsft import config as config_lib
    from jaxsft.errors import UserError

    try:
        cfg = config_lib.load(argv[1], argv[2:])
    except UserError:
        cfg = config_lib.load(DEMO_CONFIG, [a for a in argv if a.startswith("--config.run_dir")])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(config_lib.to_json(cfg))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.5}) + "\n")


def snapshot(path: Path) -> dict | None:
    """{relative path: sha256} of every file under path (directories as "dir/"); None when
    path does not exist."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for root, dirs, files in os.walk(path):
        rel = os.path.relpath(root, path)
        out.update({os.path.join(rel, d) + "/": "" for d in dirs})
        for f in files:
            out[os.path.join(rel, f)] = hashlib.sha256(Path(root, f).read_bytes()).hexdigest()
    return out


CASES = {**DATA_CASES, **MODEL_CASES, **CONFIG_CASES, **RUN_DIR_CASES}
PARAMS = [
    pytest.param(
        case,
        variant,
        id=f"{case}-{variant}",
        marks=[pytest.mark.xfail(strict=True, reason=XFAIL[case])] if case in XFAIL else [],
    )
    for case in CASES
    for variant in (("own",) if case in RUN_DIR_CASES else ("fresh", "existing"))
]


@pytest.mark.parametrize("case, variant", PARAMS)
def test_malformed_input_exits_2_naming_the_file(
    case, variant, corpus_env, tmp_path, capsys, monkeypatch
):
    assets, small = corpus_env
    monkeypatch.setenv("JAXSFT_DEMO_ASSETS", str(assets))
    monkeypatch.delenv("JAXSFT_DEBUG", raising=False)
    ctx = Ctx(tmp=tmp_path, assets=assets, small=small)
    setup = CASES[case](ctx)
    run_dir = setup.run_dir or tmp_path / "run"
    argv = argv_of(ctx, setup, run_dir)
    if variant == "existing":
        fake_run(run_dir, argv)
    before = snapshot(run_dir)
    capsys.readouterr()

    from jaxsft.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err, err
    assert err.count("error: ") == 1, err
    for needle in setup.expect:
        assert needle in err, f"{needle!r} not in stderr:\n{err}"
    assert snapshot(run_dir) == before, f"run_dir changed: {before} -> {snapshot(run_dir)}"
    assert not (tmp_path / "model" / "UNPICKLED").exists(), "a pickle was loaded"
