"""Files in the MIND leaderboard format: one line per impression, ``impression_id [v1,v2,...]``.

A prediction lists the 1-based rank of every candidate, in candidate order; a truth file lists
their 0/1 click labels. `score_files` scores a prediction as the official scorer does: the same
impression ids in the same order, line for line, one rank of 1 or more per candidate of the
truth, scored as 1 / rank, so tied ranks are scored (half credit in AUC), with a warning. A truth
line with an empty list is a masked impression: its prediction line must still name it, and it
is skipped. `write_prediction` writes only what the leaderboard accepts: every list a permutation
of 1..n, the text read back and checked before the file is written.

Lines are parsed and written with vectorised string operations (polars), never line by line.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmnewsrec.files import atomic_file, write_text
from mmnewsrec.metrics import (
    check_offsets,
    evaluate_scores,
    impression_chunks,
    ranks_from_scores,
)

if TYPE_CHECKING:
    import polars as pl

    from mmnewsrec.formats.store import Behaviors

logger = logging.getLogger(__name__)

__all__ = [
    "PREDICTION_MEMBER",
    "ImpressionLists",
    "ScoreFileError",
    "ranks_from_scores",
    "read_prediction",
    "read_truth",
    "score_files",
    "write_prediction",
    "write_truth",
]

PREDICTION_MEMBER = "prediction.txt"  # the file name the leaderboard expects inside the zip
_LINE = r"^\s*(\S+)\s+\[((?:\d+(?:,\d+)*)?)\]\s*$"


class ScoreFileError(ValueError):
    """A truth or prediction file that is malformed, or does not match its counterpart."""


@dataclass(frozen=True)
class ImpressionLists:
    """The lines of a leaderboard file as CSR arrays; line i + 1 holds impression i."""

    path: Path
    impression_ids: np.ndarray  # (I,) object array of str, as written
    values: np.ndarray  # (V,) int64, all lists concatenated
    offsets: np.ndarray  # (I+1,) int64

    def __len__(self) -> int:
        return len(self.impression_ids)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        """The list on line i + 1."""
        return self.values[self.offsets[i] : self.offsets[i + 1]]


def read_prediction(path: Path | str, ties: bool = False) -> ImpressionLists:
    """Read a prediction file (or a zip holding prediction.txt); every line a permutation.

    With `ties`, any ranks of 1 or more are read, as the official scorer does (it scores
    1 / rank): tied or out-of-range ranks only raise a warning that counts such lines.
    """
    pred = _read_lists(Path(path))
    bad = _non_permutations(pred.values, pred.offsets)
    if not bad.size:
        return pred
    if not ties:
        i = int(bad[0])
        raise ScoreFileError(
            f"{pred.path}:{i + 1}: ranks of impression {pred.impression_ids[i]} are not a "
            f"permutation of 1..{pred.sizes[i]}: {_permutation_problem(pred.row(i))}"
        )
    below = np.flatnonzero(pred.values < 1)
    if below.size:
        line = int(np.searchsorted(pred.offsets, below[0], side="right"))
        raise ScoreFileError(
            f"{pred.path}:{line}: rank {pred.values[below[0]]} of impression "
            f"{pred.impression_ids[line - 1]}; ranks start at 1"
        )
    logger.warning(
        "%s: %d of %d lines are not permutations of 1..n (first: line %d, %s); scored as the "
        "official scorer does, by 1 / rank: tied candidates get half credit in AUC",
        pred.path,
        bad.size,
        len(pred),
        bad[0] + 1,
        _permutation_problem(pred.row(int(bad[0]))),
    )
    return pred


def read_truth(path: Path | str) -> ImpressionLists:
    """Read a truth file; every label 0 or 1."""
    truth = _read_lists(Path(path))
    bad = np.flatnonzero(truth.values > 1)
    if bad.size:
        line = int(np.searchsorted(truth.offsets, bad[0], side="right"))
        raise ScoreFileError(
            f"{truth.path}:{line}: labels must be 0 or 1, got {truth.values[bad[0]]}"
        )
    return truth


def write_prediction(
    path: Path | str,
    impression_ids: np.ndarray,
    ranks: np.ndarray,
    offsets: np.ndarray,
    zip: bool = False,
) -> Path:
    """Write ``impression_id [r1,r2,...]`` lines in the given order; return the file written.

    The text is read back and checked before anything is written: one line per impression,
    the ids in order, one rank per candidate, every list a permutation of 1..n.
    With `zip`, writes `path` with suffix .zip holding one member, prediction.txt.
    """
    ranks, offsets = np.asarray(ranks), check_offsets(np.asarray(offsets), len(ranks))
    if len(impression_ids) != len(offsets) - 1:
        raise ValueError(f"{len(impression_ids)} impression ids for {len(offsets) - 1} rank lists")
    path = Path(path)
    text = _format_lines(impression_ids, ranks, offsets)
    _check_text(path, text, impression_ids, offsets)
    if not zip:
        write_text(path, text)
        return path
    path = path.with_suffix(".zip")
    with atomic_file(path) as tmp:
        _write_zip(tmp, text)
    return path


def _check_text(path: Path, text: str, impression_ids: np.ndarray, offsets: np.ndarray) -> None:
    """Raise ValueError unless `text` parses to `impression_ids` in order, with the list
    lengths of `offsets`, each list a permutation of 1..n (parsed in chunks of lines)."""
    import polars as pl

    lines = _split_lines(text)
    expected = pl.Series(np.asarray(impression_ids)).cast(pl.String).to_numpy()
    if len(lines) != len(expected):
        raise ValueError(f"{path}: {len(lines)} lines written for {len(expected)} impressions")
    for a, b in impression_chunks(offsets):
        pred = _parse_lists(path, lines.slice(a, b - a), first_line=a + 1)
        differ = np.flatnonzero(pred.impression_ids != expected[a:b])
        if differ.size:
            i = a + int(differ[0])
            raise ValueError(
                f"{path}:{i + 1}: impression id {pred.impression_ids[i - a]!r}, "
                f"expected {expected[i]!r}"
            )
        differ = np.flatnonzero(pred.sizes != np.diff(offsets[a : b + 1]))
        if differ.size:
            i = a + int(differ[0])
            raise ValueError(
                f"{path}:{i + 1}: {pred.sizes[i - a]} ranks for the {offsets[i + 1] - offsets[i]} "
                f"candidates of impression {expected[i]}"
            )
        bad = _non_permutations(pred.values, pred.offsets)
        if bad.size:
            problem = _permutation_problem(pred.row(int(bad[0])))
            raise ValueError(f"ranks of impression {expected[a + bad[0]]} are invalid: {problem}")


def write_truth(path: Path | str, behaviors: Behaviors) -> Path:
    """Write the truth file ``impression_id [l1,l2,...]`` of a labelled split."""
    labels = behaviors.candidate_labels
    if not behaviors.labelled or np.any(labels < 0):
        raise ScoreFileError(
            f"split {behaviors.split!r} has no click labels (a test split?); "
            "a truth file needs a labelled split"
        )
    path = Path(path)
    text = _format_lines(behaviors.impression_ids, labels, behaviors.candidate_offsets)
    write_text(path, text)
    logger.info("truth of %d impressions written to %s", behaviors.num_impressions, path)
    return path


def score_files(truth_path: Path | str, prediction_path: Path | str) -> dict:
    """Score a prediction file against a truth file, as the MIND leaderboard does: what
    `mmnewsrec score` does.

    Tied ranks are scored, with a warning, as the official scorer does (1/rank, half credit
    in AUC); MRR and nDCG order tied candidates as `mmnewsrec.metrics` does.

    Args:
        truth_path: Lines `impression_id [0,1,...]` (`mmnewsrec truth` writes them).
        prediction_path: Lines `impression_id [r1,r2,...]`, or a zip holding them.

    Returns:
        Mean `auc`, `mrr`, `ndcg5`, `ndcg10`, and the counts `impressions` and `skipped`.

    Raises:
        ScoreFileError: A malformed file, or files whose impressions do not align; the
            message names the file and line.
    """
    truth, pred = read_truth(truth_path), read_prediction(prediction_path, ties=True)
    _check_alignment(truth, pred)
    keep = np.repeat(truth.sizes > 0, pred.sizes)  # masked truth lines are not scored
    ranks = pred.values if keep.all() else pred.values[keep]
    return evaluate_scores(-ranks, truth.values, truth.offsets)


def _check_alignment(truth: ImpressionLists, pred: ImpressionLists) -> None:
    """Same ids in the same order, same number of lines, same list lengths."""
    common = min(len(truth), len(pred))
    differ = np.flatnonzero(truth.impression_ids[:common] != pred.impression_ids[:common])
    if differ.size:
        i = int(differ[0])
        raise ScoreFileError(
            f"{pred.path}:{i + 1}: impression id {pred.impression_ids[i]}, but line {i + 1} of "
            f"{truth.path} has {truth.impression_ids[i]} (the order must match the truth)"
        )
    if len(pred) < len(truth):
        raise ScoreFileError(
            f"{pred.path}: ends after line {len(pred)}, but {truth.path} has {len(truth)} lines"
        )
    if len(pred) > len(truth):
        raise ScoreFileError(
            f"{pred.path}:{len(truth) + 1}: more lines than the {len(truth)} of {truth.path}"
        )
    differ = np.flatnonzero((truth.sizes != pred.sizes) & (truth.sizes > 0))
    if differ.size:
        i = int(differ[0])
        raise ScoreFileError(
            f"{pred.path}:{i + 1}: {pred.sizes[i]} ranks for impression {pred.impression_ids[i]}, "
            f"but {truth.path} lists {truth.sizes[i]} candidates"
        )


def _read_lists(path: Path) -> ImpressionLists:
    """Parse the ``id [n1,n2,...]`` lines of a file into CSR arrays."""
    return _parse_lists(path, _read_lines(path))


def _parse_lists(path: Path, lines: pl.Series, first_line: int = 1) -> ImpressionLists:
    """Parse ``id [n1,n2,...]`` lines (`first_line` and on of `path`) into CSR arrays, naming
    the first bad line."""
    import polars as pl

    parts = lines.str.extract_groups(_LINE)
    ids, body = parts.struct.field("1"), parts.struct.field("2")
    if ids.null_count():
        i = int(ids.is_null().arg_max() or 0)
        raise ScoreFileError(
            f"{path}:{first_line + i}: expected 'IMPRESSION_ID [n1,n2,...]' (no spaces inside the "
            f"brackets), got {_excerpt(lines[i])}"
        )
    filled = body != ""
    counts = body.str.count_matches(",", literal=True).to_numpy().astype(np.int64) + 1
    sizes = np.where(filled.to_numpy(), counts, 0)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    values = body.filter(filled).str.split(",").explode().cast(pl.Int64, strict=False)
    if values.null_count():
        row = int(values.is_null().arg_max() or 0)
        line = first_line - 1 + int(np.searchsorted(offsets, row, side="right"))
        raise ScoreFileError(f"{path}:{line}: number out of range")
    return ImpressionLists(path, ids.to_numpy(), values.to_numpy().astype(np.int64), offsets)


def _read_lines(path: Path) -> pl.Series:
    """The lines of a text file (or of the prediction in a zip), without line ends."""
    try:
        data = _read_bytes(path)
    except (OSError, zipfile.BadZipFile) as err:
        raise ScoreFileError(f"{path}: cannot read ({err})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ScoreFileError(f"{path}:{line}: not UTF-8 text") from None
    return _split_lines(text)


def _split_lines(text: str) -> pl.Series:
    """The lines of `text`, without line ends (a final newline ends the last line)."""
    import polars as pl

    if not text:
        return pl.Series("line", [], dtype=pl.String)
    lines = pl.Series("line", [text]).str.split("\n").explode()
    return lines.head(-1) if text.endswith("\n") else lines


def _read_bytes(path: Path) -> bytes:
    """File contents; for a zip archive, those of its prediction.txt (or its only member)."""
    if not zipfile.is_zipfile(path):
        return path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if PREDICTION_MEMBER in names:
            return archive.read(PREDICTION_MEMBER)
        if len(names) == 1:
            return archive.read(names[0])
    raise ScoreFileError(f"{path}: zip archive without {PREDICTION_MEMBER} (holds {names})")


def _format_lines(ids: np.ndarray, values: np.ndarray, offsets: np.ndarray) -> str:
    """``id [v1,v2,...]`` lines, newline-terminated."""
    import polars as pl
    import pyarrow as pa

    lists = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(values))
    body = pl.Series(lists).cast(pl.List(pl.String)).list.join(",")
    lines = pl.Series(np.asarray(ids)).cast(pl.String) + " [" + body + "]"
    return pl.DataFrame({"line": lines}).write_csv(include_header=False, quote_style="never")


def _non_permutations(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Indices (ascending) of the lists that are not permutations of 1..len."""
    bad = [np.zeros(0, dtype=np.int64)]
    for a, b in impression_chunks(offsets):
        lo, hi = offsets[a], offsets[b]
        sizes = np.diff(offsets[a : b + 1])
        row = values[lo:hi]
        fits = (row >= 1) & (row <= np.repeat(sizes, sizes))
        slot = np.where(fits, np.repeat(offsets[a:b] - lo, sizes) + row - 1, hi - lo)
        taken = np.bincount(slot, minlength=hi - lo + 1)[: hi - lo]
        missed = np.flatnonzero(taken != 1) + lo  # a slot missed or hit twice: its list is wrong
        bad.append(np.unique(np.searchsorted(offsets, missed, side="right") - 1))
    return np.concatenate(bad)


def _permutation_problem(ranks: np.ndarray) -> str:
    """What keeps one list from being a permutation of 1..len."""
    outside = ranks[(ranks < 1) | (ranks > len(ranks))]
    if outside.size:
        return f"rank {outside[0]} is outside 1..{len(ranks)}"
    values, counts = np.unique(ranks, return_counts=True)
    return f"rank {values[counts.argmax()]} appears {counts.max()} times"


def _excerpt(line: str, limit: int = 80) -> str:
    return repr(line if len(line) <= limit else line[:limit] + "...")


def _write_zip(path: Path, text: str) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(PREDICTION_MEMBER, text)
