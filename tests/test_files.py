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
