"""Read and validate raw MIND files (news.tsv, behaviors.tsv) with polars.

MIND files are tab-separated, have no header and no quoting: a title may contain `"`.
Files are read by polars with quoting off; a file whose rows do not all have the expected
column count is re-split line by line to find the first bad line. Columns are then checked
with vectorised expressions, and every error names the file, the 1-based line and the field.
Behaviors are parsed in chunks of lines, so memory stays bounded on MIND-large.

Behaviors keep their news ids as strings here; mapping them to store indices is the
store's job (see `mmnewsrec.data.store`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

logger = logging.getLogger(__name__)

NEWS_COLUMNS = [
    "news_id",
    "category",
    "subcategory",
    "title",
    "abstract",
    "url",
    "title_entities",
    "abstract_entities",
]
BEHAVIORS_COLUMNS = ["impression_id", "user_id", "time", "history", "impressions"]
TIME_FORMAT = "%m/%d/%Y %I:%M:%S %p"  # e.g. 11/15/2019 8:55:22 AM (naive, read as UTC)
SPLIT_NAMES = ("train", "dev", "test")
CHUNK_ROWS = 20_000  # behaviors lines parsed at once; bounds the memory of exploded tokens
IMPRESSION_ID = pl.col("impression_id").str.strip_chars().cast(pl.Int64, strict=False)
BLOCK_BYTES = 1 << 26  # bytes of lines split at once when polars' reader cannot be used


class MindFormatError(ValueError):
    """A MIND file that cannot be read; names the file, line and field where known."""

    def __init__(self, path: Path | str, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field, self.message = Path(path), line, field, message
        where = str(path) + (f", line {line}" if line is not None else "")
        where += f", field {field}" if field is not None else ""
        super().__init__(f"{where}: {message}")


@dataclass
class RawBehaviors:
    """One behaviors.tsv (or a chunk of its lines), validated, news ids still strings.

    rows: impression_id (i64), user_id (str), time (i64 unix s), line (u32), one per impression.
    history: row (u32, line - 1), news_id (str), one per history click, in file order.
    candidates: row (u32, line - 1), news_id (str), label (i8, -1 when unlabelled), in file order.
    """

    path: Path
    labelled: bool
    rows: pl.DataFrame
    history: pl.DataFrame
    candidates: pl.DataFrame

    @property
    def first_row(self) -> int:
        """0-based file row of this chunk's first impression (tokens' `row` is file-wide)."""
        return int(self.rows["line"][0]) - 1 if self.rows.height else 0


def file_digest(path: Path, block: int = 1 << 20) -> dict:
    """Size and sha256 of a file (read in blocks), for the store manifest."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def read_table(path: Path, names: list[str]) -> pl.DataFrame:
    """Read a raw MIND tsv into named string columns plus `line` (1-based).

    The fast path is polars' reader; when its result does not have exactly one row per line and
    len(names) columns per row, the file is split line by line, block by block, to name the
    first bad line.
    """
    frame = read_whole(path, names)
    if frame is None:
        frame = split_file(path, names)
    return frame.with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.UInt32).alias("line"))


def read_whole(path: Path, names: list[str]) -> pl.DataFrame | None:
    """polars' reader over the whole file; None unless it gives one row of len(names) columns
    per line."""
    data = path.read_bytes()
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    try:
        frame = pl.read_csv(
            data,
            has_header=False,
            separator="\t",
            quote_char=None,
            new_columns=names,
            schema=dict.fromkeys(names, pl.String),
            empty_string_is_null=False,
            raise_if_empty=False,
        )
    except pl.exceptions.PolarsError:
        return None
    tabs_ok = data.count(b"\t") == lines * (len(names) - 1)
    return frame if frame.height == lines and tabs_ok else None


def split_file(path: Path, names: list[str], block_bytes: int = BLOCK_BYTES) -> pl.DataFrame:
    """Split a file into named columns block by block of whole lines, so that memory holds the
    result and one block; the first line with a wrong column count is an error."""
    frames, done = [], 0  # lines in the blocks before this one
    for block in iter_blocks(path, block_bytes):
        lines = decode_lines(path, block, done)
        frames.append(split_columns(path, lines, names, first_line=done + 1))
        done += len(lines)
    if not frames:
        return pl.DataFrame(schema=dict.fromkeys(names, pl.String))
    return pl.concat(frames)


def iter_blocks(path: Path, block_bytes: int) -> Iterator[bytes]:
    """The file in blocks of about `block_bytes`, each ending at a newline (but the last)."""
    rest = b""
    with open(path, "rb") as f:
        while chunk := f.read(block_bytes):
            cut = chunk.rfind(b"\n") + 1
            if cut:
                yield rest + chunk[:cut]
                rest = chunk[cut:]
            else:
                rest += chunk
    if rest:
        yield rest


def decode_lines(path: Path, block: bytes, before: int) -> pl.Series:
    """The lines of a UTF-8 block (the file's lines `before + 1`, ...) as a string Series,
    without line ends; the BOM of the file's first line is dropped."""
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError as err:
        line = before + block.count(b"\n", 0, err.start) + 1
        raise MindFormatError(path, line, None, f"not valid UTF-8 ({err.reason})") from None
    if before == 0:
        text = text.removeprefix("\ufeff")
    lines = pl.Series("line", [text.removesuffix("\n")]).str.split("\n").explode()
    return lines.str.strip_suffix("\r")


def split_columns(
    path: Path, lines: pl.Series, names: list[str], first_line: int = 1
) -> pl.DataFrame:
    """Split tab-separated lines (the first is file line `first_line`) into named string
    columns; wrong column counts are errors."""
    counts = lines.str.count_matches("\t", literal=True) + 1
    bad = (counts != len(names)).arg_true()
    if len(bad):
        i = int(bad[0])
        raise MindFormatError(
            path,
            first_line + i,
            None,
            f"expected {len(names)} tab-separated columns, found {counts[i]}" + csv_hint(lines[i]),
        )
    return lines.str.splitn("\t", len(names)).struct.rename_fields(names).struct.unnest()


def csv_hint(line: str) -> str:
    """A hint appended to errors on lines that look re-saved by a CSV writer."""
    quoted = any(f.startswith('"') and f.endswith('"') and len(f) > 1 for f in line.split("\t"))
    if quoted or '""' in line:
        return CSV_QUOTED
    return ""


CSV_QUOTED = (
    "; the file looks CSV-quoted (re-saved by a CSV/pandas writer), but raw MIND files are "
    "tab-separated with no quoting: re-export it unquoted (e.g. quoting=csv.QUOTE_NONE)"
)


def first_bad(
    path: Path,
    frame: pl.DataFrame,
    bad: pl.Expr,
    field: str,
    message: str,
    show: str = "",
    hint: str = "",
) -> None:
    """Raise for the first row where `bad` holds, quoting its `show` column (default `field`).

    `frame` has a 1-based `line` column or a 0-based `row` column.
    """
    hit = frame.filter(bad.fill_null(True)).head(1)
    if hit.height:
        line = int(hit["line"][0]) if "line" in hit.columns else int(hit["row"][0]) + 1
        value = hit[show or field][0]
        shown = "" if value is None else f": {value[:80]!r}"
        raise MindFormatError(path, line, field, message + shown + hint)


def read_news(path: Path) -> pl.DataFrame:
    """Read and validate one news.tsv: 8 string columns plus `line`, ids unique and non-empty."""
    news = read_table(path, NEWS_COLUMNS)
    first_bad(path, news, pl.col("news_id").str.len_bytes() == 0, "news_id", "empty news id")
    for field in ("title_entities", "abstract_entities"):
        col = pl.col(field)
        first_bad(
            path,
            news,
            col.str.starts_with('"'),
            field,
            "entities are not JSON-array text",
            hint=CSV_QUOTED,
        )
        not_json = (col.str.len_bytes() > 0) & ~col.str.starts_with("[")
        first_bad(path, news, not_json, field, "entities are not JSON-array text")
    quoted = pl.col("title").str.starts_with('"') & pl.col("title").str.contains('""', literal=True)
    first_bad(path, news, quoted, "title", "title is quoted", hint=CSV_QUOTED)
    reject_repeats(path, news, "news_id", "duplicate news id {value!r} (first on line {first})")
    return news


def read_behaviors(path: Path) -> RawBehaviors:
    """Read and validate one whole behaviors.tsv (labelled or unlabelled impressions)."""
    return next(iter_behaviors(path, chunk_rows=None))


def iter_behaviors(path: Path, chunk_rows: int | None = CHUNK_ROWS) -> Iterator[RawBehaviors]:
    """Read and validate one behaviors.tsv in chunks of lines (None: one chunk), to bound memory.

    All chunks agree on `labelled`; at least one chunk is yielded, even for an empty file.
    Impression ids are unique over the whole file.
    """
    frame = read_table(path, BEHAVIORS_COLUMNS)
    reject_repeated_impressions(path, frame)
    step = chunk_rows or max(frame.height, 1)
    labelled = None
    for start in range(0, max(frame.height, 1), step):
        part = frame.slice(start, step)
        rows = parse_rows(path, part)
        history = explode_ids(part, "history").filter(pl.col("news_id").str.len_bytes() > 0)
        candidates, labelled = parse_impressions(path, part.drop("history"), labelled)
        yield RawBehaviors(path, labelled, rows, history, candidates)


def reject_repeated_impressions(path: Path, frame: pl.DataFrame) -> None:
    """Raise for the first line whose impression id an earlier line already has.

    A prediction file names impressions by id, so two impressions with one id cannot both be
    scored. Ids that are not integers are left to `parse_rows`.
    """
    ids = frame.select(IMPRESSION_ID.alias("impression_id"), "line")
    ids = ids.filter(pl.col("impression_id").is_not_null())
    reject_repeats(
        path, ids, "impression_id", "impression id {value} repeats the one on line {first}"
    )


def reject_repeats(path: Path, frame: pl.DataFrame, field: str, message: str) -> None:
    """Raise at the first line whose `field` an earlier line already has; `message` is formatted
    with the repeated `value` and the `first` line that has it."""
    repeat = frame.filter(~pl.col(field).is_first_distinct()).head(1)
    if repeat.height:
        value = repeat[field][0]
        first = frame.filter(pl.col(field) == value)["line"][0]
        line = int(repeat["line"][0])
        raise MindFormatError(path, line, field, message.format(value=value, first=first))


def parse_rows(path: Path, frame: pl.DataFrame) -> pl.DataFrame:
    """Impression id, user id and time per row, each checked."""
    rows = frame.select(
        IMPRESSION_ID.alias("id"),
        pl.col("time").str.strptime(pl.Datetime("us"), TIME_FORMAT, strict=False).alias("t"),
        "impression_id",
        "user_id",
        "time",
        "line",
    )
    first_bad(path, rows, pl.col("id").is_null(), "impression_id", "not an integer")
    first_bad(path, rows, pl.col("user_id").str.len_bytes() == 0, "user_id", "empty user id")
    first_bad(
        path, rows, pl.col("t").is_null(), "time", "not a MIND time like '11/15/2019 8:55:22 AM'"
    )
    return rows.select(
        pl.col("id").alias("impression_id"),
        "user_id",
        pl.col("t").dt.epoch("s").alias("time"),
        "line",
    )


def explode_ids(frame: pl.DataFrame, field: str) -> pl.DataFrame:
    """One row per space-separated token of `field`: row (0-based line), news_id (the token)."""
    return (
        frame.lazy()
        .select((pl.col("line") - 1).alias("row"), pl.col(field).str.split(" ").alias("news_id"))
        .explode("news_id")
        .with_columns(pl.col("news_id").fill_null(""))
        .collect()
    )


def parse_impressions(
    path: Path, frame: pl.DataFrame, labelled: bool | None = None
) -> tuple[pl.DataFrame, bool]:
    """Candidates with labels; tokens are all `<id>-<0|1>` (labelled) or all `<id>` (not).

    `labelled` is what earlier lines of the file were (None: decided by the first token).
    A news id may appear once per impression (it may repeat in a history).
    """
    tokens = explode_ids(frame, "impressions")
    tok = pl.col("news_id")
    is_label = (tok.str.ends_with("-0") | tok.str.ends_with("-1")) & (tok.str.len_bytes() > 2)
    tokens = tokens.with_columns(is_label.alias("labelled"))
    if labelled is None:
        labelled = bool(tokens["labelled"][0]) if tokens.height else True
    if not (labelled and tokens["labelled"].all()):  # all labelled: none of the errors can occur
        check_tokens(path, tokens, labelled)
    if labelled:
        label = tok.str.ends_with("-1").cast(pl.Int8)
        candidates = tokens.select("row", tok.str.head(-2), label.alias("label"))
    else:
        candidates = tokens.select("row", "news_id", pl.lit(-1, dtype=pl.Int8).alias("label"))
    reject_repeated_candidates(path, candidates)
    return candidates, labelled


def check_tokens(path: Path, tokens: pl.DataFrame, labelled: bool) -> None:
    """Raise for the first empty, malformed, or (not `labelled`) mislabelled candidate token."""
    tok = pl.col("news_id")
    empty = tok.str.len_bytes() == 0
    first_bad(path, tokens, empty, "impressions", "empty candidate token", show="news_id")
    first_bad(
        path,
        tokens,
        tok.str.contains("-", literal=True) & ~pl.col("labelled"),
        "impressions",
        "bad candidate token, expected <news id>-0, <news id>-1 or <news id>",
        show="news_id",
    )
    kinds = ("unlabelled", "labelled")
    first_bad(
        path,
        tokens,
        pl.col("labelled") != labelled,
        "impressions",
        f"mixes labelled (<id>-0/1) and unlabelled (<id>) candidates; line 1 is "
        f"{kinds[labelled]}, this token is {kinds[not labelled]}",
        show="news_id",
    )


def reject_repeated_candidates(path: Path, candidates: pl.DataFrame) -> None:
    """Raise for the first news id listed twice among one impression's candidates.

    One sort of (row, 32 bits of the id's hash) keys finds the impressions that may repeat an
    id; only those are compared exactly (an exact check of every token is several times slower).
    """
    rows = candidates["row"].to_numpy().astype(np.uint64)
    hashed = candidates["news_id"].hash().to_numpy() >> np.uint64(32)
    keys = np.sort((rows << np.uint64(32)) | hashed)
    suspect_rows = np.unique(keys[1:][keys[1:] == keys[:-1]] >> np.uint64(32))
    if suspect_rows.size:
        first_bad(
            path,
            candidates.filter(pl.col("row").is_in(suspect_rows.astype(np.uint32))),
            ~pl.struct("row", "news_id").is_first_distinct(),
            "impressions",
            "news id repeated among the candidates of one impression (a click would also be "
            "its own negative)",
            show="news_id",
        )


def find_splits(data_dir: Path, split: str | None = None) -> dict[str, Path]:
    """Split name -> folder holding behaviors.tsv (and usually news.tsv).

    DATA_DIR is either one split (DATA_DIR/behaviors.tsv; named `split`, default "train")
    or several sub-folders named train/dev/test (then `split` is not used).
    """
    data_dir = Path(data_dir)
    if (data_dir / "behaviors.tsv").is_file():
        return {split or "train": data_dir}
    found = {name: data_dir / name for name in SPLIT_NAMES if (data_dir / name).is_dir()}
    for name, folder in found.items():
        if not (folder / "behaviors.tsv").is_file():
            raise MindFormatError(folder / "behaviors.tsv", None, None, f"split {name}: missing")
    if not found:
        raise MindFormatError(
            data_dir,
            None,
            None,
            "no behaviors.tsv here nor in train/, dev/ or test/ sub-folders",
        )
    return found
