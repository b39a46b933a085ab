"""An export never deletes or overwrites a file it did not write (jaxsft/export/targets.py).

Each case snapshots every file of the directories involved (path -> sha256) before the export
and compares after: a refusal exits 2 (or raises UserError in process) with one message naming
the directory and leaves the snapshot as it was. The command line runs as a user runs it (a
subprocess) where the CLI is the point; the other cases call export_run on a tiny model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from cli_utils import run_module  # noqa: E402

import jaxsft  # noqa: E402
from jaxsft import config as config_lib  # noqa: E402
from jaxsft import export  # noqa: E402
from jaxsft.errors import UserError  # noqa: E402
from jaxsft.export.targets import MARKER  # noqa: E402

FAMILY = "llama_tied"  # the smallest fixture: tied embeddings, 2 layers


def snapshot(*dirs: Path) -> dict[str, str]:
    """{path: sha256} of every file under dirs ('' for each directory, so new ones show)."""
    out = {}
    for d in dirs:
        for root, subdirs, files in os.walk(d):
            out.update({os.path.join(root, s) + "/": "" for s in subdirs})
            for f in files:
                path = os.path.join(root, f)
                out[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


def user_files(d: Path) -> Path:
    """A user's directory: a README, notes and a file in a subdirectory."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "README.md").write_text("# my model card\n")
    (d / "notes.txt").write_text("lr 1e-5 was better\n")
    (d / "eval").mkdir(exist_ok=True)
    (d / "eval" / "results.json").write_text('{"acc": 0.5}\n')
    return d


def run_config(run: Path, source: Path, **export) -> dict:
    return {
        "run_dir": str(run),
        "model": {"path": str(source)},
        "lora": {"rank": 0},
        "export": {"format": "merged", "dtype": "source", **export},
    }


def marker(d: Path) -> dict:
    return json.loads((d / MARKER).read_text())


def shard_dtypes(d: Path) -> set[str]:
    """The safetensors dtypes ("F32", "BF16") of every tensor in a directory's weight files."""
    dtypes = set()
    for f in d.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return dtypes


@pytest.fixture(scope="module")
def source(hf_checkpoints, tmp_path_factory) -> Path:
    """A private copy of the base checkpoint (model.path)."""
    src = tmp_path_factory.mktemp("base") / FAMILY
    shutil.copytree(hf_checkpoints[FAMILY], src)
    return src


@pytest.fixture(scope="module")
def model(source):
    return jaxsft.load_hf(source, dtype="float32")


@pytest.fixture(scope="module")
def project(source, model, tmp_path_factory):
    """A user's project: their files next to a real run (config.json, one orbax checkpoint)."""
    from jaxsft.checkpoint import Checkpointer
    from jaxsft.train.setup import split_trainable

    root = user_files(tmp_path_factory.mktemp("project"))
    run = root / "run"
    config = config_lib.base_config.get_config()
    config.run_dir, config.model.path = str(run), str(source)
    run.mkdir()
    (run / "config.json").write_text(config_lib.to_json(config))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    _, params, _ = split_trainable(model[0], None)
    ckpt = Checkpointer(str(run), use_async=False)
    ckpt.save(1, {"params": params})
    ckpt.close()
    return SimpleNamespace(root=root, run=run)


def export_to(model, source, run: Path, out=None, **kw) -> dict:
    """In process, as `python -m jaxsft.export --run-dir RUN [--out OUT]` exports."""
    m, cfg = model
    return export.export_run(m, cfg, None, run_config(run, source), out=out, run_dir=run, **kw)


def assert_refused(proc, where: Path, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and str(where) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in proc.stderr, proc.stderr


def cli(project, *args):
    return run_module("jaxsft.export", "--run-dir", str(project.run), *args)


# ---- the command line: refusals before anything is restored or written ----


def test_cli_refuses_the_run_dir(project):
    before = snapshot(project.root)
    for extra in ((), ("--format", "merged", "--dtype", "bfloat16")):
        proc = cli(project, "--out", str(project.run), *extra)
        assert_refused(proc, project.run, "is the run directory itself", "--force")
    assert snapshot(project.root) == before


def test_cli_refuses_a_parent_of_the_run_dir(project):
    before = snapshot(project.root)
    proc = cli(project, "--out", str(project.root))
    assert_refused(proc, project.root, f"contains the run directory {project.run}")
    assert snapshot(project.root) == before


def test_cli_refuses_a_user_dir(project, tmp_path):
    mine = user_files(tmp_path / "mine")
    before = snapshot(tmp_path, project.root)
    proc = cli(project, "--out", str(mine))
    assert_refused(proc, mine, "README.md", "eval/", "notes.txt", "--force")
    assert snapshot(tmp_path, project.root) == before


def test_previous_export_plus_readme(project, model, source, tmp_path):
    """Refused as it is; with --force the README survives and the weights are replaced."""
    out = tmp_path / "out"
    export_to(model, source, project.run, out, dtype="bfloat16")
    (out / "README.md").write_text("# card\n")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="previous jaxsft export with files added") as e:
        export_to(model, source, project.run, out)
    assert str(out) in str(e.value) and "README.md" in str(e.value)
    assert snapshot(tmp_path) == before

    proc = cli(project, "--out", str(out), "--force")
    assert proc.returncode == 0, proc.stderr
    assert (out / "README.md").read_text() == "# card\n"
    assert shard_dtypes(out) == {"F32"}  # the bfloat16 weights were replaced
    m = marker(out)
    assert m["step"] == 1 and m["run_dir"] == str(project.run) and m["format"] == "merged"
    assert sorted(p.name for p in out.iterdir()) == sorted([*m["files"], MARKER, "README.md"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left


# ---- in process: the same rules for export_run (the end of training) ----


def test_model_path_refused_even_with_force(project, model, source):
    before = snapshot(source.parent)
    for out in (source, source.parent):
        for force in (False, True):
            with pytest.raises(UserError, match="model.path") as e:
                export_to(model, source, project.run, out, force=force)
            assert str(out) in str(e.value) and "--force does not apply" in str(e.value)
    assert snapshot(source.parent) == before


def test_out_is_a_file(project, model, source, tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"mine")
    for force in (False, True):
        with pytest.raises(UserError, match="not a directory") as e:
            export_to(model, source, project.run, target, force=force)
        assert str(target) in str(e.value)
    assert snapshot(tmp_path) == {str(target): hashlib.sha256(b"mine").hexdigest()}


def test_previous_export_is_replaced(project, model, source, tmp_path):
    out = tmp_path / "out"
    export_to(model, source, project.run, out, dtype="bfloat16")
    first = marker(out)
    assert first["jaxsft_export"] == 1 and first["format"] == "merged"
    assert first["run_dir"] == str(project.run) and "step" not in first and first["created"]
    assert "model.safetensors" in first["files"] and "config.json" in first["files"]
    export_to(model, source, project.run, out, step=7)
    assert shard_dtypes(out) == {"F32"} and marker(out)["step"] == 7
    assert sorted(p.name for p in out.iterdir()) == sorted([*marker(out)["files"], MARKER])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_empty_dir_is_used(project, model, source, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    export_to(model, source, project.run, out)
    assert (out / "model.safetensors").is_file() and marker(out)["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_force_keeps_user_files_and_drops_stale_shards(project, model, source, tmp_path):
    """A sharded export with a user's files added; --force writes one file, removes the shards
    the old marker listed and keeps everything else."""
    out = tmp_path / "out"
    export.export_merged(*model, out, tokenizer_dir=source, max_shard_bytes=60_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    user_files(out)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="README.md"):
        export_to(model, source, project.run, out)
    assert snapshot(tmp_path) == before

    export_to(model, source, project.run, out, force=True)
    after = snapshot(tmp_path)
    for name in ("README.md", "notes.txt", "eval/results.json"):
        assert after[str(out / name)] == before[str(out / name)], name
    assert not [s for s in shards if (out / s).exists()]
    assert not (out / "model.safetensors.index.json").exists()
    files = marker(out)["files"]
    assert "model.safetensors" in files and "README.md" not in files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_writes_next_to_the_run_but_never_replaces_its_config(model, source, tmp_path):
    root = user_files(tmp_path / "project")
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text("{}\n")
    before = snapshot(root)
    with pytest.raises(UserError, match="replace the run's own config.json"):
        export_to(model, source, run, run, force=True)
    assert snapshot(root) == before
    export_to(model, source, run, root, force=True)
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before
    added = {os.path.relpath(k, root) for k in set(after) - set(before)}
    assert added == {*marker(root)["files"], MARKER}


def test_check_export_targets_at_start(source, tmp_path):
    """The end-of-training target (run_dir/hf) holding a user's file refuses the run at start."""
    run = tmp_path / "run"
    config = run_config(run, source)
    assert export.check_export_targets(config) == {"merged": run / "hf"}
    assert not run.exists()  # nothing written
    (run / "hf").mkdir(parents=True)
    (run / "hf" / "README.md").write_text("mine\n")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="README.md") as e:
        export.check_export_targets(config)
    assert str(run / "hf") in str(e.value) and "--force" in str(e.value)
    export.check_export_targets(config, force=True)  # --force of the CLI would write there
    with pytest.raises(UserError, match="is the run directory itself"):
        export.check_export_targets(config, out=run)
    assert export.check_export_targets({**config, "export": {"format": "none"}}) == {}
    assert snapshot(tmp_path) == before
