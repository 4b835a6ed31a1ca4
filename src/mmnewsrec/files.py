"""Files on disk: atomic writes of a file or a whole folder, and the hash of a JSON value.

A file or folder is written beside its target under a temporary name, then renamed into place,
so readers see the old one or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
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
    `error` is raised, saying that `out` is not `kind`.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise error(f"{out} exists and is not {kind}; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        logger.info("removing %s left by an interrupted run", stale)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; an artifact is an ordinary folder
    try:
        yield tmp
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_json(value: Any) -> str:
    """sha256 (hex) of a JSON value, keys sorted: the same for equal values."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
