"""Files on disk: atomic writes of a file or a whole folder, and the hash of a JSON value.

A file or folder is written beside its target under a temporary name, then renamed into place,
so readers see the old one or the new one, never half of one. A temporary folder is locked
(`flock`) by the process writing it while it lives, so another process that sweeps the folders
left by interrupted runs removes only those whose writer is gone (POSIX).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
_OWNED: set[Path] = set()  # the temporary folders this process holds locked


def temp_path(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed to `path`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is
    removed, so readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path | str, text: str) -> None:
    """Write UTF-8 text atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path | str, value: Any) -> None:
    """Write indented JSON atomically."""
    write_text(path, json.dumps(value, indent=2) + "\n")


def write_columns(path: Path | str, columns: dict[str, Any]) -> None:
    """Write equally long named columns (numpy arrays) as a parquet file, atomically."""
    import polars as pl

    with atomic_file(path) as tmp:
        pl.DataFrame(columns).write_parquet(tmp)


@contextlib.contextmanager
def atomic_dir(
    out: Path,
    kind: str = "an mmnewsrec folder",
    error: Callable[[str], Exception] = FileExistsError,
) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on error it is removed.

    An existing `out` is only replaced if it is empty or holds a manifest.json; otherwise
    `error` is raised, saying that `out` is not `kind`. Several processes may write the same
    `out` at once: the last to finish wins, and none removes another's temporary folder.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise error(f"{out} exists and is not {kind}; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out.parent):  # no sweep between another writer's mkdtemp and its lock
        _sweep(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        owner = _lock(tmp)
    _OWNED.add(tmp)
    tmp.chmod(0o755)  # mkdtemp makes it private; an artifact is an ordinary folder
    try:
        yield tmp
        with _locked(out.parent):  # one swap at a time
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            if out.exists():
                out.rename(old)
            tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        _OWNED.discard(tmp)
        os.close(owner)
        shutil.rmtree(tmp, ignore_errors=True)


def _sweep(out: Path) -> None:
    """Remove the temporary folders of `out` whose writing process is gone (none holds a lock)."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            fd = _lock(stale, wait=False)
        except (BlockingIOError, FileNotFoundError):
            continue  # being written, or removed meanwhile
        try:
            logger.info("removing %s left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)
        finally:
            os.close(fd)


def _lock(folder: Path, wait: bool = True) -> int:
    """Open `folder` and lock it exclusively; return the descriptor (closing it unlocks)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold `folder` locked; a no-op inside a temporary folder this process holds already."""
    if folder in _OWNED:
        yield
        return
    fd = _lock(folder)
    try:
        yield
    finally:
        os.close(fd)


def sha256_json(value: Any) -> str:
    """sha256 (hex) of a JSON value, keys sorted: the same for equal values."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
