"""Download the official MIND archives: resumable, verified, extracted atomically.

`download_mind("small", out)` fetches MINDsmall_train.zip and MINDsmall_dev.zip into
out/<archive>.part from the first host that serves it (HOSTS: the public host, then the former
one; `base_url` names a mirror instead) with HTTP range requests (an interrupted download resumes
where it stopped), checks the size (against the table, when known, and against what the server
announced), the sha256 (when known) and the zip itself (`testzip`), extracts it to a temporary
folder and renames that to out/train, out/dev (out/test for large) — the layout `prepare` reads.
A split folder that already holds news.tsv and behaviors.tsv is skipped. A corrupt or truncated
archive is deleted and reported as a `DownloadError`.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

PUBLIC_URL = "https://recodatasets.z20.web.core.windows.net/newsrec"  # serves every size
FORMER_URL = "https://mind201910small.blob.core.windows.net/release"  # closed since 2024-07
HOSTS = (PUBLIC_URL, FORMER_URL)  # tried in this order
ARCHIVES = {  # name: {split: archive file}
    "demo": {"train": "MINDdemo_train.zip", "dev": "MINDdemo_dev.zip"},
    "small": {"train": "MINDsmall_train.zip", "dev": "MINDsmall_dev.zip"},
    "large": {
        "train": "MINDlarge_train.zip",
        "dev": "MINDlarge_dev.zip",
        "test": "MINDlarge_test.zip",
    },
}
KNOWN: dict[str, tuple[int | None, str | None]] = {}  # archive file: (bytes, sha256) once known
REQUIRED_FILES = ("news.tsv", "behaviors.tsv")
CHUNK = 1 << 20
ATTEMPTS = 3


class DownloadError(RuntimeError):
    """A download failed or its archive is invalid."""


@dataclass(frozen=True)
class Archive:
    """One archive to fetch and the split folder it is extracted to."""

    split: str  # folder under the output directory: train, dev or test
    url: str
    size: int | None = None  # expected bytes, when known
    sha256: str | None = None  # expected digest, when known
    fallbacks: tuple[str, ...] = ()  # other URLs of the same file, tried in order after url

    @property
    def filename(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


def mind_archives(name: str, base_url: str | None = None) -> list[Archive]:
    """The archives of MIND `name` (demo, small, large), from base_url or else from HOSTS."""
    if name not in ARCHIVES:
        raise DownloadError(f"unknown MIND data set {name!r}; choose one of {', '.join(ARCHIVES)}")
    bases = [b.rstrip("/") for b in ([base_url] if base_url else HOSTS)]
    return [
        Archive(
            split,
            f"{bases[0]}/{file}",
            *KNOWN.get(file, (None, None)),
            fallbacks=tuple(f"{base}/{file}" for base in bases[1:]),
        )
        for split, file in ARCHIVES[name].items()
    ]


def download_mind(
    name: str,
    out: Path | str,
    base_url: str | None = None,
    archives: Sequence[Archive] | None = None,
) -> Path:
    """Download and extract MIND `name` into out/{train,dev[,test]}; return out.

    `archives` replaces the built-in table (a mirror with its own sizes, or a test server).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with httpx.Client(follow_redirects=True, timeout=httpx.Timeout(30.0, read=120.0)) as client:
        for archive in archives or mind_archives(name, base_url):
            target = out / archive.split
            if _complete(target):
                logger.info("%s already present, skipping %s", target, archive.filename)
                continue
            path = out / archive.filename
            if not path.is_file():
                _fetch(client, archive, path)
            _verify(archive, path)
            _extract(path, target)
            path.unlink()
    return out


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def _fetch(client: httpx.Client, archive: Archive, path: Path) -> None:
    """Download archive to path via path.part from the first of its URLs that serves it."""
    part = path.with_name(path.name + ".part")
    failures = []
    for url in (archive.url, *archive.fallbacks):
        try:
            expected = _fetch_from(client, url, archive, part)
            break
        except DownloadError as err:
            logger.warning("%s", err)
            failures.append(str(err))
    else:
        if len(failures) == 1:
            raise DownloadError(failures[0])
        raise DownloadError(
            f"no host served {archive.filename}; tried, in order:\n  " + "\n  ".join(failures)
        )
    have = part.stat().st_size
    if expected is not None and have != expected:
        if have > expected:
            part.unlink()  # not a prefix of this archive: start over next time
        raise DownloadError(f"{url}: got {have:,} bytes of {expected:,} announced; run again")
    part.rename(path)


def _fetch_from(client: httpx.Client, url: str, archive: Archive, part: Path) -> int | None:
    """Download url into part, resuming after dropped connections; return the announced size."""
    attempt = 1
    while True:
        try:
            return _stream(client, url, archive, part)
        except httpx.TransportError as err:
            have = part.stat().st_size if part.exists() else 0
            logger.warning("%s interrupted at %d bytes (%s)", url, have, err)
            if attempt == ATTEMPTS:
                raise DownloadError(
                    f"download of {url} failed at {have:,} bytes ({err}); run again to resume"
                ) from err
            attempt += 1


def _stream(client: httpx.Client, url: str, archive: Archive, part: Path) -> int | None:
    """Append the missing bytes of url to part; return the announced total size."""
    offset = part.stat().st_size if part.exists() else 0
    if archive.size is not None and offset >= archive.size:
        return offset  # complete already (checked by _verify); never ask past the end
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with client.stream("GET", url, headers=headers) as response:
        if response.status_code == 416 and offset:  # nothing left to send
            return None
        if response.status_code not in (200, 206):
            raise DownloadError(f"HTTP {response.status_code} for {url}")
        if response.status_code == 200 and offset:
            logger.info("%s: server ignored the range request, starting over", archive.filename)
            offset = 0
        total = _announced_total(response, offset)
        mode = "ab" if offset else "wb"
        with part.open(mode) as file, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=archive.filename,
            disable=None,
        ) as bar:  # fmt: skip
            for chunk in response.iter_bytes():  # as received, so a drop loses nothing
                file.write(chunk)
                bar.update(len(chunk))
    return total


def _announced_total(response: httpx.Response, offset: int) -> int | None:
    """Total archive size from Content-Range (206) or Content-Length (200)."""
    if response.status_code == 206:
        content_range = response.headers.get("content-range", "")
        start = content_range.removeprefix("bytes ").split("-", 1)[0]
        if start != str(offset):
            raise DownloadError(f"{response.url}: asked for bytes {offset}-, got {content_range}")
        total = content_range.rsplit("/", 1)[-1]
        return int(total) if total.isdigit() else None
    length = response.headers.get("content-length")
    return int(length) if length and length.isdigit() else None


def _verify(archive: Archive, path: Path) -> None:
    """Check size, sha256 and zip integrity; delete the file and raise if any check fails."""
    size = path.stat().st_size
    problem = None
    if archive.size is not None and size != archive.size:
        problem = f"size {size:,} bytes, expected {archive.size:,}"
    elif archive.sha256 is not None and _sha256(path) != archive.sha256.lower():
        problem = "sha256 mismatch"
    else:
        problem = _zip_problem(path)
    if problem:
        path.unlink()
        raise DownloadError(f"{archive.url}: {problem}; the file was deleted, run again")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _zip_problem(path: Path) -> str | None:
    """What is wrong with the zip at path, or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = {Path(n).name for n in archive.namelist()}
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
        return f"not a valid zip archive ({err})"
    if bad is not None:
        return f"corrupt member {bad}"
    missing = [n for n in REQUIRED_FILES if n not in names]
    return f"archive lacks {', '.join(missing)}" if missing else None


def _extract(path: Path, target: Path) -> None:
    """Extract the zip at path into target atomically (temporary folder, then rename)."""
    tmp = target.with_name(f".{target.name}.extract")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if not (tmp / member).resolve().is_relative_to(tmp.resolve()):
                    raise DownloadError(f"{path}: member {member} points outside the folder")
            archive.extractall(tmp)
        root = min((p.parent for p in tmp.rglob(REQUIRED_FILES[0])), key=lambda p: len(p.parts))
        if not _complete(root):
            raise DownloadError(f"{path}: {', '.join(REQUIRED_FILES)} are not in one folder")
        if target.exists():
            if any(target.iterdir()):
                raise DownloadError(f"{target} exists but is incomplete; remove it and run again")
            target.rmdir()
        root.rename(target)
        logger.info("extracted %s to %s", path.name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
