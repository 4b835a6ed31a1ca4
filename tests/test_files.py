import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmnewsrec.files import atomic_dir, atomic_file, sha256_json, write_json


class NotOurs(RuntimeError):
    pass


def test_atomic_dir_replaces_a_folder_with_a_manifest(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left


def test_atomic_dir_keeps_the_old_folder_when_writing_fails(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "manifest.json").write_text("{}")
    with pytest.raises(KeyError), atomic_dir(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise KeyError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_refuses_a_foreign_folder_with_the_given_error(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with (
        pytest.raises(NotOurs, match="is not a thing; refusing"),
        atomic_dir(tmp_path, "a thing", NotOurs),
    ):
        pass
    with pytest.raises(FileExistsError), atomic_dir(tmp_path):
        pass
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_atomic_file_leaves_the_old_file_on_error(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"x": 1})
    with pytest.raises(ValueError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise ValueError("interrupted")
    assert path.read_text() == '{\n  "x": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_json_hash_ignores_key_order_only():
    assert sha256_json({"a": 1, "b": [1, 2]}) == sha256_json({"b": [1, 2], "a": 1})
    assert sha256_json({"a": 1, "b": [1, 2]}) != sha256_json({"a": 1, "b": [2, 1]})
    assert len(sha256_json(None)) == 64


WRITER = """
import sys, time
from pathlib import Path
from mmnewsrec.files import atomic_dir, write_text
out, flags, exit_early = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "crash"
with atomic_dir(out) as tmp:
    write_text(tmp / "first.txt", "writer")
    (flags / "started").touch()
    if exit_early:
        import os; os._exit(0)  # killed mid-write: its temporary folder stays behind
    while not (flags / "go").exists():
        time.sleep(0.01)
    write_text(tmp / "second.txt", "writer")
    (tmp / "manifest.json").write_text("{}")
"""


def start_writer(out: Path, flags: Path, how: str = "finish") -> subprocess.Popen:
    """A process writing `out` through atomic_dir; it waits inside for flags/go."""
    flags.mkdir(exist_ok=True)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(flags), how])
    deadline = time.monotonic() + 60
    while not (flags / "started").exists():
        assert writer.poll() in (None, 0) and time.monotonic() < deadline
        time.sleep(0.01)
    return writer


def test_atomic_dir_leaves_another_process_temporary_folder_alone(tmp_path):
    out, flags = tmp_path / "cache", tmp_path / "flags"
    writer = start_writer(out, flags)
    with atomic_dir(out) as tmp:  # a second writer of the same folder, while the first writes
        (tmp / "first.txt").write_text("test")
        (tmp / "second.txt").write_text("test")
        (tmp / "manifest.json").write_text("{}")
    (flags / "go").touch()
    assert writer.wait(60) == 0
    assert sorted(p.name for p in out.iterdir()) == ["first.txt", "manifest.json", "second.txt"]
    assert (out / "first.txt").read_text() == (out / "second.txt").read_text() == "writer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "flags"]


def test_atomic_dir_removes_the_folder_of_a_process_that_is_gone(tmp_path):
    out, flags = tmp_path / "cache", tmp_path / "flags"
    assert start_writer(out, flags, "crash").wait(60) == 0
    (left,) = tmp_path.glob(".cache.tmp-*")
    assert (left / "first.txt").is_file()
    with atomic_dir(out) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "flags"]


def test_atomic_dir_nests(tmp_path):
    with atomic_dir(tmp_path / "out") as tmp, atomic_dir(tmp / "inner") as inner:
        (inner / "manifest.json").write_text("{}")
    assert (tmp_path / "out" / "inner" / "manifest.json").is_file()
