import hashlib
import io
import random
import threading
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mmnewsrec.data import download
from mmnewsrec.data.download import (
    FORMER_URL,
    PUBLIC_URL,
    Archive,
    DownloadError,
    download_mind,
    mind_archives,
)


@dataclass
class Served:
    """What the test server serves and what it saw."""

    files: dict[str, bytes] = field(default_factory=dict)
    honour_ranges: bool = True
    drop_once_after: int | None = None  # first response stops after this many bytes
    requests: list[tuple[str, str | None]] = field(default_factory=list)


class Handler(BaseHTTPRequestHandler):
    served: Served

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        served = self.served
        name = self.path.lstrip("/")
        wanted = self.headers.get("Range")
        served.requests.append((name, wanted))
        if name not in served.files:
            self.send_error(404)
            return
        data = served.files[name]
        start = int(wanted.removeprefix("bytes=").split("-")[0]) if wanted else 0
        partial = bool(wanted) and served.honour_ranges
        start = start if partial else 0
        if start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        body = data[start:]
        self.send_response(206 if partial else 200)
        self.send_header("Content-Length", str(len(body)))
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if served.drop_once_after is not None:
            body, served.drop_once_after = body[: served.drop_once_after], None
            self.close_connection = True
        self.wfile.write(body)


@pytest.fixture
def server():
    served = Served()
    handler = type("BoundHandler", (Handler,), {"served": served})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield served, base
    httpd.shutdown()
    httpd.server_close()


def mind_zip(split: str, folder: str = "") -> bytes:
    """A small MIND-like archive whose news.tsv is large enough to be sent in pieces."""
    rng = random.Random(split)
    news = "".join(
        f"N{i}\tsports\tgolf\tTitle {rng.random()}\tAbstract {rng.random()}\thttp://x\t[]\t[]\n"
        for i in range(1500)
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(folder + "news.tsv", news)
        archive.writestr(folder + "behaviors.tsv", "1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-1 N3-0\n")
        archive.writestr(folder + "entity_embedding.vec", "Q1\t0.1\t0.2\n")
    return buffer.getvalue()


def publish(served: Served, base: str, splits=("train", "dev"), **known) -> list[Archive]:
    """Serve one archive per split; return the archive table pointing at the server."""
    table = []
    for split in splits:
        data = mind_zip(split)
        served.files[f"MINDtest_{split}.zip"] = data
        size = len(data) if known.get("size") else None
        digest = hashlib.sha256(data).hexdigest() if known.get("sha256") else None
        table.append(Archive(split, f"{base}/MINDtest_{split}.zip", size, digest))
    return table


def extracted(out: Path, split: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(mind_zip(split))) as archive:
        assert (out / split / "news.tsv").read_bytes() == archive.read("news.tsv")
    return (out / split / "behaviors.tsv").read_bytes()


def test_download_verifies_and_extracts_every_split(server, tmp_path):
    served, base = server
    table = publish(served, base, ("train", "dev", "test"), size=True, sha256=True)
    assert download_mind("large", tmp_path / "mind", archives=table) == tmp_path / "mind"
    for split in ("train", "dev", "test"):
        assert extracted(tmp_path / "mind", split).startswith(b"1\tU1\t")
        assert (tmp_path / "mind" / split / "entity_embedding.vec").is_file()
    assert sorted(p.name for p in (tmp_path / "mind").iterdir()) == ["dev", "test", "train"]
    assert all(wanted is None for _, wanted in served.requests)


def test_archive_with_a_top_folder_is_flattened(server, tmp_path):
    served, base = server
    served.files["nested.zip"] = mind_zip("train", folder="MINDsmall_train/")
    download_mind("small", tmp_path, archives=[Archive("train", f"{base}/nested.zip")])
    assert extracted(tmp_path, "train")
    assert not (tmp_path / "train" / "MINDsmall_train").exists()


def test_resumes_a_partial_download(server, tmp_path):
    served, base = server
    table = publish(served, base, ("train",), size=True)
    data = served.files["MINDtest_train.zip"]
    (tmp_path / "MINDtest_train.zip.part").write_bytes(data[:4000])
    download_mind("small", tmp_path, archives=table)
    assert served.requests == [("MINDtest_train.zip", "bytes=4000-")]
    assert extracted(tmp_path, "train")
    assert not list(tmp_path.glob("*.zip*"))


def test_resumes_after_a_dropped_connection(server, tmp_path):
    served, base = server
    table = publish(served, base, ("train",))
    served.drop_once_after = 5000
    download_mind("small", tmp_path, archives=table)
    assert served.requests == [("MINDtest_train.zip", None), ("MINDtest_train.zip", "bytes=5000-")]
    assert extracted(tmp_path, "train")


def test_server_ignoring_ranges_restarts_from_zero(server, tmp_path):
    served, base = server
    table = publish(served, base, ("train",))
    served.honour_ranges = False
    (tmp_path / "MINDtest_train.zip.part").write_bytes(b"stale bytes from another file")
    download_mind("small", tmp_path, archives=table)
    assert served.requests == [("MINDtest_train.zip", "bytes=29-")]
    assert extracted(tmp_path, "train")


@pytest.mark.parametrize("known_size", [True, False])
def test_truncated_archive_is_rejected_and_deleted(server, tmp_path, known_size):
    served, base = server
    table = publish(served, base, ("train",), size=known_size)
    served.files["MINDtest_train.zip"] = served.files["MINDtest_train.zip"][:-3000]
    with pytest.raises(DownloadError, match="size|not a valid zip"):
        download_mind("small", tmp_path, archives=table)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_archive_is_rejected_and_deleted(server, tmp_path):
    served, base = server
    table = publish(served, base, ("train",))
    data = bytearray(served.files["MINDtest_train.zip"])
    data[2000:2010] = bytes(10)  # inside news.tsv's compressed data
    served.files["MINDtest_train.zip"] = bytes(data)
    with pytest.raises(DownloadError, match="corrupt member news.tsv|not a valid zip"):
        download_mind("small", tmp_path, archives=table)
    assert list(tmp_path.iterdir()) == []


def test_checksum_mismatch_is_an_error(server, tmp_path):
    served, base = server
    (archive,) = publish(served, base, ("train",))
    wrong = Archive(archive.split, archive.url, sha256="0" * 64)
    with pytest.raises(DownloadError, match="sha256"):
        download_mind("small", tmp_path, archives=[wrong])
    assert list(tmp_path.iterdir()) == []


def test_archive_without_mind_files_is_an_error(server, tmp_path):
    served, base = server
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "nothing here")
    served.files["other.zip"] = buffer.getvalue()
    with pytest.raises(DownloadError, match="lacks news.tsv, behaviors.tsv"):
        download_mind("small", tmp_path, archives=[Archive("train", f"{base}/other.zip")])


def test_present_split_is_skipped(server, tmp_path):
    served, base = server
    table = publish(served, base)
    (tmp_path / "train").mkdir()
    for name in ("news.tsv", "behaviors.tsv"):
        (tmp_path / "train" / name).write_text("already here\n")
    download_mind("small", tmp_path, archives=table)
    assert served.requests == [("MINDtest_dev.zip", None)]
    assert (tmp_path / "train" / "news.tsv").read_text() == "already here\n"
    assert extracted(tmp_path, "dev")
    download_mind("small", tmp_path, archives=table)
    assert len(served.requests) == 1


def test_http_error_is_reported(server, tmp_path):
    _, base = server
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_mind("small", tmp_path, archives=[Archive("train", f"{base}/missing.zip")])


def test_archive_table():
    small = mind_archives("small")
    assert [(a.split, a.url, a.fallbacks) for a in small] == [
        ("train", f"{PUBLIC_URL}/MINDsmall_train.zip", (f"{FORMER_URL}/MINDsmall_train.zip",)),
        ("dev", f"{PUBLIC_URL}/MINDsmall_dev.zip", (f"{FORMER_URL}/MINDsmall_dev.zip",)),
    ]
    assert PUBLIC_URL == "https://recodatasets.z20.web.core.windows.net/newsrec"
    assert [a.filename for a in mind_archives("large")] == [
        "MINDlarge_train.zip",
        "MINDlarge_dev.zip",
        "MINDlarge_test.zip",
    ]
    assert all("MINDdemo_" in a.url and "newsrec" in a.url for a in mind_archives("demo"))
    mirror = mind_archives("small", base_url="http://mirror.example/mind/")
    assert mirror[0].url == "http://mirror.example/mind/MINDsmall_train.zip"
    assert mirror[0].fallbacks == ()
    with pytest.raises(DownloadError, match="unknown MIND data set"):
        mind_archives("huge")


@pytest.fixture
def hosts(server, monkeypatch):
    """The default hosts pointed at the test server: the public one, then the former one."""
    served, base = server
    monkeypatch.setattr(download, "HOSTS", (f"{base}/public", f"{base}/former"))
    return served


def test_default_host_first_then_the_former_one(hosts, tmp_path):
    hosts.files["former/MINDsmall_train.zip"] = mind_zip("train")
    hosts.files["public/MINDsmall_dev.zip"] = mind_zip("dev")
    download_mind("small", tmp_path)
    assert [name for name, _ in hosts.requests] == [
        "public/MINDsmall_train.zip",
        "former/MINDsmall_train.zip",
        "public/MINDsmall_dev.zip",
    ]
    assert extracted(tmp_path, "train") and extracted(tmp_path, "dev")


def test_error_names_every_host_tried(hosts, tmp_path):
    with pytest.raises(DownloadError) as caught:
        download_mind("small", tmp_path)
    public, former = download.HOSTS
    assert str(caught.value) == (
        "no host served MINDsmall_train.zip; tried, in order:\n"
        f"  HTTP 404 for {public}/MINDsmall_train.zip\n"
        f"  HTTP 404 for {former}/MINDsmall_train.zip"
    )
