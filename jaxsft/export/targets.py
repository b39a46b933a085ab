"""Where an export may go, and how it gets there without touching anything of the user's.

Every export directory carries a marker, .jaxsft_export.json, listing the files the export
wrote. An export is written into a temp directory next to its target, self-checked, then:
  - target missing, an empty directory, or a previous jaxsft export (the marker and nothing but
    the files it lists): the temp directory is renamed into place (a previous export is renamed
    aside first and removed after: it held only our files);
  - anything else (a user's files, the run directory or a directory above it) is refused with a
    UserError before anything is written. With force (`--force`) the export's own files are
    moved in one by one (os.replace), the files an older marker lists that this export does not
    write are removed, and every other file stays;
  - the base checkpoint (model.path) or a directory above it, and a path that is a file, are
    refused even with force: the base is what a PEFT adapter and the self-check load.
The same rules run before training starts (check_export_targets) and again when the export is
moved into place (the target may have changed meanwhile).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from jaxsft import run_dir as rd
from jaxsft.errors import UserError
from jaxsft.export.check import on_writer
from jaxsft.run_dir import write_json

MARKER = ".jaxsft_export.json"
FORMATS = ("merged", "peft", "both")
SHOWN = 5  # foreign files a refusal names
# Processes other than 0 (which alone looks at the file system) raise this when it refuses.
REFUSED_ELSEWHERE = "the export directory was refused on process 0 (its message says why)"
FORCE_HINT = (
    "or pass --force to write into it anyway: only the files the export writes are replaced, "
    "every other file stays"
)


def setting(config, dotted: str, default=None):
    """config['a']['b'] for 'a.b' on a ConfigDict or a plain dict; default when absent."""
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return default
    return node


def output_dirs(run_dir: str | os.PathLike, fmt: str, out=None) -> dict[str, Path]:
    """{'merged': dir, 'peft': dir} for a format; defaults RUN_DIR/hf and RUN_DIR/adapter."""
    if fmt not in FORMATS:
        raise UserError(
            f"unknown export format {fmt!r}",
            where="export.format",
            hint=f"one of {', '.join(FORMATS)} (or none)",
        )
    if fmt == "both" or out is None:
        root = Path(out if out is not None else run_dir)
        dirs = {"merged": root / rd.HF, "peft": root / rd.ADAPTER}
        return dirs if fmt == "both" else {fmt: dirs[fmt]}
    return {fmt: Path(out)}


def check_export_targets(
    config, out=None, force: bool = False, *, fmt: str | None = None, run_dir=None
) -> dict[str, Path]:
    """Raise UserError, writing nothing, when the rules refuse an export directory of the
    export that the end of training (or `python -m jaxsft.export --out OUT`) would write.
    Every process must call it (process 0 decides, the others follow).

    fmt: export.format by default ("none": nothing to check); run_dir: the config's run_dir.
    Returns {'merged'|'peft': directory} as output_dirs gives them.
    """
    fmt = fmt or setting(config, "export.format", "merged")
    if fmt == "none":
        return {}
    run_dir = run_dir or setting(config, "run_dir")
    dirs = output_dirs(run_dir, fmt, out)
    base = setting(config, "model.path") or None
    for kind, path in dirs.items():
        rules = functools.partial(check_target, path, kind, base, run_dir=run_dir, force=force)
        on_writer(rules, UserError, REFUSED_ELSEWHERE)
    return dirs


@dataclasses.dataclass(frozen=True)
class Target:
    """An export directory the rules accept: state 'new', 'empty', 'ours' (a previous export)
    or 'foreign' (only with force); `listed`: the files its marker lists."""

    path: Path
    state: str
    listed: tuple[str, ...] = ()


def check_target(out, kind: str, base=None, *, run_dir=None, force: bool = False) -> Target:
    """Apply the rules (module docstring) to one export directory; UserError when refused."""
    path = Path(out).resolve()
    _refuse_base(path, base)
    if path.exists() and not path.is_dir():
        raise UserError(
            "the export target exists and is not a directory",
            where=path,
            hint="choose a new or empty directory as --out",
        )
    if run_dir is not None:
        _refuse_run_dir(path, Path(run_dir).resolve(), kind, force)
    listed = read_marker(path)
    foreign = foreign_entries(path, listed)
    if not foreign:
        state = "new" if not path.exists() else "empty" if listed is None else "ours"
        return Target(path, state, tuple(listed or ()))
    if not force:
        names = ", ".join(foreign[:SHOWN]) + (", ..." if len(foreign) > SHOWN else "")
        ours = listed is not None
        what = "is a previous jaxsft export with files added to it" if ours else "is not empty"
        raise UserError(
            f"the export directory {what}, and an export never replaces files it did not write: "
            f"{names}",
            where=path,
            hint=f"choose a new or empty --out (or move those files away), {FORCE_HINT}",
        )
    return Target(path, "foreign", tuple(listed or ()))


def _refuse_base(path: Path, base) -> None:
    """The base checkpoint, or a directory above it: refused, with force too."""
    if base is None or not Path(base).exists():  # a hub name: nothing on disk to protect
        return
    base = Path(base).resolve()
    if path == base or path in base.parents:
        what = "is the base checkpoint itself" if path == base else f"contains the base {base}"
        raise UserError(
            f"the export directory {what} (model.path)",
            where=path,
            hint="choose another --out (the default is RUN_DIR/hf); --force does not apply: a "
            "PEFT adapter is applied to the base checkpoint and the export's self-check "
            "reloads it",
        )


def _refuse_run_dir(path: Path, run: Path, kind: str, force: bool) -> None:
    """The run directory or a directory above it: refused without force. A merged export into
    the run directory itself is refused with force too (its config.json is the run's)."""
    if path != run and path not in run.parents:
        return
    what = "is the run directory itself" if path == run else f"contains the run directory {run}"
    if not force:
        raise UserError(
            f"the export directory {what}",
            where=path,
            hint="export to the default (RUN_DIR/hf, RUN_DIR/adapter) or a new or empty --out, "
            + FORCE_HINT,
        )
    if path == run and kind == "merged":
        raise UserError(
            "the export directory is the run directory itself: the merged export's config.json "
            "would replace the run's own config.json (needed to resume and to export again)",
            where=path,
            hint="choose another --out (--force does not apply here)",
        )


def _safe_name(name) -> bool:
    """A marker entry: a plain relative path inside the directory."""
    if not isinstance(name, str) or not name or name == MARKER:
        return False
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts and p.as_posix() == name


def _parents(name: str) -> list[str]:
    """'a/b/c' -> ['a/b', 'a']: the directories a relative file name lies in."""
    return [str(d) for d in PurePosixPath(name).parents][:-1]


def read_marker(path: Path) -> list[str] | None:
    """The files a valid marker of `path` lists, or None (no marker, or not one of ours)."""
    try:
        marker = json.loads((path / MARKER).read_text())
        files = marker["files"] if marker["jaxsft_export"] == 1 else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, list) and all(map(_safe_name, files)) else None


def foreign_entries(path: Path, listed: list[str] | None, limit: int = SHOWN + 1) -> list[str]:
    """Up to `limit` files (and directories, 'name/') under `path` that the marker does not
    list; a foreign directory is named, not walked."""
    ours = set(listed or ()) | ({MARKER} if listed is not None else set())
    ours_dirs = {d for f in ours for d in _parents(f)}
    found: list[str] = []
    for root, subdirs, files in os.walk(path):
        rel = PurePosixPath(Path(root).relative_to(path).as_posix())
        keep = [d for d in subdirs if str(rel / d) in ours_dirs and not Path(root, d).is_symlink()]
        found += sorted(f"{rel / d}/" for d in subdirs if d not in keep)
        found += sorted(str(rel / f) for f in files if str(rel / f) not in ours)
        subdirs[:] = keep
        if len(found) >= limit:
            break
    return found[:limit]


@contextlib.contextmanager
def export_dir(
    out, kind: str, base=None, *, run_dir=None, force: bool = False, step=None, write: bool = True
) -> Iterator[Path]:
    """Yield an empty temp dir next to `out` to write the export into. When the body succeeds
    the marker is added and the files move into place per the rules (checked on entry, before
    anything is written, and again before the move); on any error the temp dir is removed and
    `out` stays as it was. Only process 0 (write=True) touches the file system."""
    rules = functools.partial(check_target, out, kind, base, run_dir=run_dir, force=force)
    on_writer(rules, UserError, REFUSED_ELSEWHERE)
    if not write:  # other processes: a throwaway dir keeps the code path the same
        with tempfile.TemporaryDirectory() as tmp:
            yield Path(tmp)
        return
    path = Path(out).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # (not mkdtemp: its 0700 mode would stay on the renamed directory)
    try:
        yield tmp
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        write_marker(tmp, kind, files, run_dir=run_dir, step=step)
        install(tmp, rules(), files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_marker(tmp: Path, kind: str, files: list[str], *, run_dir=None, step=None) -> None:
    marker = {
        "jaxsft_export": 1,
        "format": kind,
        "files": files,
        "run_dir": os.fspath(Path(run_dir).resolve()) if run_dir is not None else None,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if step is not None:
        marker["step"] = int(step)
    write_json(tmp / MARKER, marker)


def install(tmp: Path, target: Target, files: list[str]) -> None:
    """Move a finished export (temp dir `tmp` holding `files` and the marker) into place."""
    if target.state == "foreign":
        _merge_into(tmp, target, files)
        return
    path = target.path
    if target.state == "new":
        os.rename(tmp, path)
        return
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    remove_listed(old, [*target.listed, MARKER])
    try:
        old.rmdir()
    except OSError:  # a file appeared in the old export while this one was written: keep it
        print(f"warning: kept {old}: it holds files the old export did not list", file=sys.stderr)


def _merge_into(tmp: Path, target: Target, files: list[str]) -> None:
    """--force into a directory with other files: replace only our files, drop stale ones."""
    path = target.path
    for name in [*files, MARKER]:
        dest = path / name
        parents = [path / p for p in _parents(name)]
        if (dest.is_dir() and not dest.is_symlink()) or any(
            p.exists() and not p.is_dir() for p in parents
        ):
            raise UserError(
                f"the export writes {name}, and that place holds something else",
                where=dest,
                hint="move it away or choose another --out",
            )
    for name in files:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / name, path / name)
    remove_listed(path, sorted(set(target.listed) - set(files)))
    os.replace(tmp / MARKER, path / MARKER)


def remove_listed(root: Path, names: list[str]) -> None:
    """Remove these files under root, then their directories that became empty."""
    dirs = set()
    for name in names:
        p = root / name
        if p.is_file() or p.is_symlink():
            p.unlink()
        dirs.update(root / d for d in _parents(name))
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()
