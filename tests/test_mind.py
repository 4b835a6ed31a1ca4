"""Reading and validating raw MIND files."""

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mmnewsrec.data.mind import (
    BEHAVIORS_COLUMNS,
    MindFormatError,
    find_splits,
    iter_behaviors,
    read_behaviors,
    read_news,
    read_table,
    split_file,
)

T1 = "11/15/2019 8:55:22 AM"


def news_row(news_id: str, title: str = "A title", entities: str = "[]") -> str:
    return "\t".join(
        [news_id, "sports", "golf", title, "An abstract.", "https://x", entities, "[]"]
    )


def behaviors_row(imp: str, history: str, impressions: str, time: str = T1, user="U1") -> str:
    return "\t".join([imp, user, time, history, impressions])


def write(path: Path, rows: list[str], end: str = "\n") -> Path:
    path.write_bytes((end.join(rows) + end).encode())
    return path


def raises(path: Path, reader=read_behaviors) -> MindFormatError:
    with pytest.raises(MindFormatError) as info:
        reader(path)
    assert str(path) in str(info.value)
    return info.value


# ---------------------------------------------------------------------------- real rows


def test_small_train_5k_behaviors(mind_samples):
    path = mind_samples / "small_train_5k/behaviors.tsv"
    raw = read_behaviors(path)
    assert raw.labelled
    assert raw.rows.height == 5000
    assert raw.rows["user_id"].n_unique() == 4637
    assert 5000 - raw.history["row"].n_unique() == 107  # empty histories
    assert raw.candidates.height / 5000 == pytest.approx(37.9, abs=0.05)
    assert raw.candidates["label"].mean() == pytest.approx(0.040, abs=0.001)
    # the first line, parsed by hand
    imp, user, time, history, impressions = path.read_text().split("\n")[0].split("\t")
    first = raw.rows.row(0, named=True)
    assert (first["impression_id"], first["user_id"]) == (int(imp), user)
    when = datetime.strptime(time, "%m/%d/%Y %I:%M:%S %p").replace(tzinfo=UTC)
    assert first["time"] == when.timestamp()
    assert raw.history.filter(row=0)["news_id"].to_list() == history.split()
    tokens = raw.candidates.filter(row=0)
    assert [f"{i}-{lab}" for i, lab in tokens.select("news_id", "label").rows()] == (
        impressions.split()
    )


def test_small_train_5k_news(mind_samples):
    news = read_news(mind_samples / "small_train_5k/news.tsv")
    assert news.height == 2000
    assert news["category"].n_unique() == 15
    assert (news["abstract"] == "").sum() == 99
    assert news["news_id"][0] == "N34700"
    assert news["title"][0].endswith("| PHOTOS")


def test_large_test_is_unlabelled(mind_samples):
    raw = read_behaviors(mind_samples / "large_test_10/behaviors.tsv")
    assert not raw.labelled
    assert raw.rows["impression_id"].to_list() == list(range(1, 11))
    assert raw.candidates.height == 405
    assert set(raw.candidates["label"].to_list()) == {-1}
    assert raw.candidates["news_id"].str.starts_with("N").all()


def test_head100_behaviors_are_raw_mind(mind_samples):
    raw = read_behaviors(mind_samples / "head100_small_train_dev/behaviors_train_small.tsv")
    assert raw.labelled and raw.rows.height == 101


def test_head100_news_is_reported_as_csv_quoted(mind_samples):
    path = mind_samples / "head100_small_train_dev/news_train_small.tsv"
    err = raises(path, read_news)
    assert (err.line, err.field) == (1, "title_entities")
    assert "CSV-quoted" in str(err) and "line 1" in str(err)


# ---------------------------------------------------------------------------- good input


def test_quotes_crlf_bom_and_empty_history(tmp_path):
    news = tmp_path / "news.tsv"
    titles = ['He said "no" twice', '"Frozen 2" review']
    rows = [news_row("N1", titles[0]), news_row("N2", titles[1])]
    news.write_bytes(("\ufeff" + "\r\n".join(rows) + "\r\n").encode())
    assert read_news(news)["title"].to_list() == titles
    path = write(tmp_path / "b.tsv", [behaviors_row("1", "", "N1-1 N2-0")], end="\r\n")
    raw = read_behaviors(path)
    assert raw.history.height == 0
    assert raw.candidates["news_id"].to_list() == ["N1", "N2"]
    assert raw.candidates["label"].to_list() == [1, 0]


def test_chunks_match_whole_file(tmp_path):
    rows = [behaviors_row(str(i), f"N{i} N{i + 1}", f"N{i}-1 N9-0") for i in range(1, 8)]
    path = write(tmp_path / "b.tsv", rows)
    whole = read_behaviors(path)
    chunks = list(iter_behaviors(path, chunk_rows=3))
    assert [c.rows.height for c in chunks] == [3, 3, 1]
    assert [c.first_row for c in chunks] == [0, 3, 6]
    assert sum((c.history["row"].to_list() for c in chunks), []) == whole.history["row"].to_list()


def test_empty_file_has_no_impressions(tmp_path):
    raw = read_behaviors(write(tmp_path / "b.tsv", [], end=""))
    assert raw.rows.height == 0 and raw.candidates.height == 0


# ---------------------------------------------------------------------------- bad input

BAD_BEHAVIORS = [
    ("1\tU1\t" + T1 + "\tN1", 2, None, "expected 5 tab-separated columns, found 4"),
    (behaviors_row("1", "N1", "N1-1\tN2-0"), 2, None, "found 6"),
    (behaviors_row("x1", "N1", "N1-1"), 2, "impression_id", "not an integer"),
    (behaviors_row("1", "N1", "N1-1", user=""), 2, "user_id", "empty user id"),
    (behaviors_row("1", "N1", "N1-1", time="2019-11-15 08:55:22"), 2, "time", "MIND time"),
    (behaviors_row("1", "N1", "N1-1", time="13/15/2019 8:55:22 AM"), 2, "time", "MIND time"),
    (behaviors_row("1", "N1", "N1-1 N1-2"), 2, "impressions", "'N1-2'"),
    (behaviors_row("1", "N1", "N1-1 N1-"), 2, "impressions", "'N1-'"),
    (behaviors_row("1", "N1", "N1-1  N2-0"), 2, "impressions", "empty candidate token"),
    (behaviors_row("1", "N1", ""), 2, "impressions", "empty candidate token"),
    (behaviors_row("1", "N1", "N2 N3-0"), 2, "impressions", "mixes labelled"),
    (behaviors_row("1", "", "N2-1 N5-0 N2-0"), 2, "impressions", "own negative): 'N2'"),
    (behaviors_row(" 7", "", "N1-1"), 2, "impression_id", "id 7 repeats the one on line 1"),
]


@pytest.mark.parametrize(("row", "line", "field", "message"), BAD_BEHAVIORS)
def test_bad_behaviors(tmp_path, row, line, field, message):
    good = [behaviors_row(imp, "N1 N2", "N3-1 N4-0") for imp in ("7", "8")]
    err = raises(write(tmp_path / "behaviors.tsv", [good[0], row, good[1]]))
    assert (err.line, err.field) == (line, field)
    assert message in str(err)


def test_labelled_then_unlabelled_across_chunks(tmp_path):
    rows = [behaviors_row(str(i), "", "N1-1 N2-0") for i in range(4)]
    path = write(tmp_path / "behaviors.tsv", [*rows, behaviors_row("9", "", "N1 N2")])
    with pytest.raises(MindFormatError, match="mixes labelled") as info:
        list(iter_behaviors(path, chunk_rows=2))
    assert info.value.line == 5


def test_repeated_impression_id_is_found_across_chunks(tmp_path):
    rows = [behaviors_row(str(i), "", "N1-1 N2-0") for i in (4, 5, 6, 5)]
    with pytest.raises(MindFormatError, match="impression id 5 repeats the one on line 2") as info:
        list(iter_behaviors(write(tmp_path / "behaviors.tsv", rows), chunk_rows=2))
    assert (info.value.line, info.value.field) == (4, "impression_id")


def test_repeated_candidate_of_an_unlabelled_impression(tmp_path):
    rows = [behaviors_row("1", "", "N2 N5"), behaviors_row("2", "N2", "N5 N2 N6 N2")]
    err = raises(write(tmp_path / "behaviors.tsv", rows))
    assert (err.line, err.field) == (2, "impressions")
    assert "own negative): 'N2'" in str(err)


def test_hash_collisions_are_not_reported_as_repeats(tmp_path, monkeypatch):
    def one_bucket(series, *args, **kwargs):
        return pl.Series(np.zeros(len(series), np.uint64))

    monkeypatch.setattr(pl.Series, "hash", one_bucket)
    rows = [behaviors_row("1", "", "N1-0 N2-1 N3-0"), behaviors_row("2", "", "N4-1 N5-0")]
    assert read_behaviors(write(tmp_path / "good.tsv", rows)).candidates.height == 5
    rows.append(behaviors_row("3", "", "N4-1 N6-0 N4-0"))
    err = raises(write(tmp_path / "bad.tsv", rows))
    assert (err.line, err.field) == (3, "impressions")


def test_a_history_may_repeat_a_news_id(tmp_path):
    raw = read_behaviors(write(tmp_path / "b.tsv", [behaviors_row("1", "N1 N2 N1", "N1-0 N3-1")]))
    assert raw.history["news_id"].to_list() == ["N1", "N2", "N1"]


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "behaviors.tsv"
    path.write_bytes(
        b"1\tU1\t" + T1.encode() + b"\t\tN1-1\n2\tU\xff\t" + T1.encode() + b"\t\tN1-1\n"
    )
    err = raises(path)
    assert err.line == 2 and "UTF-8" in str(err)


def test_line_by_line_split_reads_block_by_block(tmp_path):
    rows = [behaviors_row(str(i), f"N{i}", "N1-1 Né-0") for i in range(1, 40)]
    path = write(tmp_path / "b.tsv", rows, end="\r\n")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # a BOM
    polars = read_table(path, BEHAVIORS_COLUMNS).drop("line")
    for block_bytes in (7, 64, 1 << 20):  # a block smaller than a line, a few lines, the file
        assert split_file(path, BEHAVIORS_COLUMNS, block_bytes).equals(polars)
    rows[30] += "\textra"
    err = raises(write(tmp_path / "bad.tsv", rows))
    assert err.line == 31 and "found 6" in str(err)
    with pytest.raises(MindFormatError) as info:
        split_file(tmp_path / "bad.tsv", BEHAVIORS_COLUMNS, block_bytes=100)
    assert info.value.line == 31
    data = bytearray((tmp_path / "b.tsv").read_bytes())
    data[data.index(b"N35\t")] = 0xFF  # in line 35
    (tmp_path / "utf.tsv").write_bytes(bytes(data))
    with pytest.raises(MindFormatError, match="UTF-8") as info:
        split_file(tmp_path / "utf.tsv", BEHAVIORS_COLUMNS, block_bytes=100)
    assert info.value.line == 35


BAD_NEWS = [
    ("N2\tsports\tgolf\tTitle\tAbstract\thttps://x\t[]", 2, None, "found 7"),
    (news_row("N1"), 2, "news_id", "duplicate news id 'N1' (first on line 1)"),
    (news_row(""), 2, "news_id", "empty news id"),
    (news_row("N2", entities='"[{""Label"": ""X""}]"'), 2, "title_entities", "CSV-quoted"),
    (news_row("N2", entities="{}"), 2, "title_entities", "not JSON-array text"),
    (news_row("N2", title='"A ""quoted"" title"'), 2, "title", "CSV-quoted"),
]


@pytest.mark.parametrize(("row", "line", "field", "message"), BAD_NEWS)
def test_bad_news(tmp_path, row, line, field, message):
    err = raises(write(tmp_path / "news.tsv", [news_row("N1"), row, news_row("N3")]), read_news)
    assert (err.line, err.field) == (line, field)
    assert message in str(err)


# ---------------------------------------------------------------------------- layout


def test_find_splits(tmp_path):
    for split in ("dev", "train"):
        (tmp_path / "multi" / split).mkdir(parents=True)
        write(tmp_path / "multi" / split / "behaviors.tsv", [])
    assert find_splits(tmp_path / "multi") == {
        "train": tmp_path / "multi/train",
        "dev": tmp_path / "multi/dev",
    }
    write(tmp_path / "behaviors.tsv", [])
    assert find_splits(tmp_path) == {"train": tmp_path}
    assert find_splits(tmp_path, "dev") == {"dev": tmp_path}
    with pytest.raises(MindFormatError, match="no behaviors.tsv"):
        find_splits(tmp_path / "multi" / "missing")
