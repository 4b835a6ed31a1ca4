"""Building, loading and replacing the compact store."""

import hashlib
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from mmnewsrec.cli import app
from mmnewsrec.data.mind import MindFormatError
from mmnewsrec.data.store import NewsMap, build_store
from mmnewsrec.data.synthetic import SynthConfig, generate
from mmnewsrec.formats.store import Behaviors, Store, StoreError

TIME = "11/15/2019 8:55:22 AM"
UNIX = int(datetime(2019, 11, 15, 8, 55, 22, tzinfo=UTC).timestamp())


def news_rows(*items: tuple[str, str]) -> str:
    return "".join(f"{i}\tnews\tworld\t{t}\tabstract\turl\t[]\t[]\n" for i, t in items)


def behaviors_rows(*rows: tuple[int, str, str, str]) -> str:
    return "".join(f"{i}\t{u}\t{TIME}\t{h}\t{c}\n" for i, u, h, c in rows)


@pytest.fixture
def data(tmp_path) -> Path:
    """train/dev/test splits: N3 in both news files, N9 in no news file, test without news."""
    root = tmp_path / "mind"
    files = {
        "train/news.tsv": news_rows(("N1", "one"), ("N2", "two"), ("N3", "three")),
        "dev/news.tsv": news_rows(("N3", "three again"), ("N4", "four")),
        "train/behaviors.tsv": behaviors_rows(
            (1, "U1", "N1 N2", "N3-1 N4-0"),
            (2, "U2", "", "N2-0 N1-1 N3-0"),
            (3, "U1", "N3 N9", "N9-1"),
            (4, "U3", "N9 N4", "N9-0 N1-1"),
        ),
        "dev/behaviors.tsv": behaviors_rows((10, "U2", "N4", "N1-1 N4-0")),
        "test/behaviors.tsv": behaviors_rows((20, "U4", "N1", "N1 N2 N3")),
        "images/N1.jpg": "jpg",
        "images/N2.png": "png",
        "images/N2.jpg": "jpg",
        "images/N4.txt": "not an image",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def arrays(b: Behaviors) -> dict:
    return {
        "impression_ids": b.impression_ids.tolist(),
        "user_index": b.user_index.tolist(),
        "history": [b.history(i).tolist() for i in range(b.num_impressions)],
        "candidates": [b.candidates(i)[0].tolist() for i in range(b.num_impressions)],
        "labels": [b.candidates(i)[1].tolist() for i in range(b.num_impressions)],
    }


def test_round_trip(data, tmp_path):
    build_store(data, tmp_path / "store")
    store = Store.load(tmp_path / "store")
    assert store.splits == ["train", "dev", "test"]
    assert store.num_news == 4
    assert store.news_ids.tolist() == ["", "N1", "N2", "N3", "N4"]
    assert store.news["title"].to_list() == ["one", "two", "three", "four"]  # first wins
    assert store.news["index"].to_list() == [1, 2, 3, 4]
    images = store.news["image_path"].to_list()
    assert (
        images
        == [str(data.resolve() / "images/N1.jpg"), str(data.resolve() / "images/N2.jpg")]
        + [None] * 2
    )
    assert store.news_index(["N4", "N9", "N1"]).tolist() == [4, 0, 1]
    assert store.user_ids.tolist() == ["U1", "U2", "U3", "U4"]

    train = store.behaviors("train")
    assert train.labelled and isinstance(train.candidate_items, np.memmap)
    assert arrays(train) == {
        "impression_ids": [1, 2, 4],  # 3 had only unknown candidates
        "user_index": [0, 1, 2],
        "history": [[1, 2], [], [4]],
        "candidates": [[3, 4], [2, 1, 3], [1]],
        "labels": [[1, 0], [0, 1, 0], [1]],
    }
    assert train.times.tolist() == [UNIX] * 3
    assert store.news_ids[train.history(0)].tolist() == ["N1", "N2"]
    assert arrays(store.behaviors("dev"))["candidates"] == [[1, 4]]
    test = store.behaviors("test")
    assert not test.labelled
    assert arrays(test)["labels"] == [[-1, -1, -1]] and test.user_index.tolist() == [3]


def test_manifest_and_summary(data, tmp_path):
    store = build_store(data, tmp_path / "store")
    sources = store.manifest["sources"]
    for split, kind in [("train", "news"), ("dev", "behaviors"), ("test", "behaviors")]:
        raw = (data / split / f"{kind}.tsv").read_bytes()
        assert sources[split][kind] == {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    train = store.manifest["splits"]["train"]
    assert train["impressions"] == 3 and train["candidates"] == 6 and train["clicks"] == 3
    assert train["dropped"] == {"history": 2, "candidates": 2, "impressions": 1, "unknown_ids": 1}
    assert store.manifest["num_news_with_image"] == 2
    summary = store.summary()
    assert "news 4 (2 with image), users 4" in summary
    assert "train: impressions 3, candidates 6, clicks 3" in summary
    assert "test: impressions 1, candidates 3, clicks unlabelled" in summary


def test_content_hash_follows_the_sources(data, tmp_path):
    first = build_store(data, tmp_path / "a").content_hash
    assert build_store(data, tmp_path / "b").content_hash == first
    with open(data / "dev/news.tsv", "a") as f:
        f.write(news_rows(("N5", "five")))
    assert build_store(data, tmp_path / "c").content_hash != first


def test_unchanged_sources_keep_the_store(data, tmp_path, caplog):
    out = tmp_path / "store"
    build_store(data, out)
    marker = out / "users.parquet"
    written = marker.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="mmnewsrec.data.store"):
        build_store(data, out)
    assert "store up to date" in caplog.text
    assert marker.stat().st_mtime_ns == written
    build_store(data, out, strict=False, force=True)
    assert marker.stat().st_mtime_ns != written
    written = marker.stat().st_mtime_ns
    (data / "images/N4.jpg").write_text("new image")
    assert build_store(data, out).news.filter(pl.col("news_id") == "N4")["image_path"][0]
    assert marker.stat().st_mtime_ns != written


def test_unknown_ids_are_dropped_with_a_warning(data, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mmnewsrec.data.store"):
        build_store(data, tmp_path / "store")
    assert "1 news ids not in any news.tsv: dropped 2 history clicks, 2 candidates" in caplog.text


def test_strict_rejects_unknown_ids(data, tmp_path):
    with pytest.raises(MindFormatError) as info:
        build_store(data, tmp_path / "store", strict=True)
    err = info.value
    assert (err.path, err.line, err.field) == (data / "train/behaviors.tsv", 3, "history")
    assert "'N9'" in str(err)
    assert not (tmp_path / "store").exists()


def test_unknown_candidate_of_a_test_split_is_an_error(data, tmp_path):
    with open(data / "test/behaviors.tsv", "a") as f:
        f.write(f"21\tU4\t{TIME}\tN9\tN1 N9 N2\n")
    with pytest.raises(MindFormatError) as info:
        build_store(data, tmp_path / "store")
    err = info.value
    assert (err.path, err.line, err.field) == (data / "test/behaviors.tsv", 2, "impressions")
    assert "'N9'" in str(err) and "--allow-drops" in str(err)
    assert not (tmp_path / "store").exists()

    test = build_store(data, tmp_path / "store", allow_drops=True).manifest["splits"]["test"]
    assert test["candidates"] == 5
    assert test["dropped"] == {"history": 1, "candidates": 1, "impressions": 0, "unknown_ids": 1}


def test_an_option_change_rebuilds_the_store(data, tmp_path, caplog):
    out = tmp_path / "store"
    build_store(data, out)
    with caplog.at_level(logging.INFO, logger="mmnewsrec.data.store"):
        assert build_store(data, out, allow_drops=True).manifest["allow_drops"]
    assert "store up to date" not in caplog.text
    with caplog.at_level(logging.INFO, logger="mmnewsrec.data.store"):
        assert build_store(data, out, allow_drops=True).manifest["allow_drops"]
    assert "store up to date" in caplog.text


def test_cli_prepare_allow_drops(data, tmp_path):
    with open(data / "test/behaviors.tsv", "a") as f:
        f.write(f"21\tU4\t{TIME}\t\tN9\n")
    args = ["prepare", str(data), "--out", str(tmp_path / "store")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "test/behaviors.tsv, line 2, field impressions: news id 'N9'" in result.output
    result = CliRunner().invoke(app, [*args, "--allow-drops"])
    assert result.exit_code == 0, result.output
    assert "test: impressions 1, candidates 3" in result.output
    assert "1 empty impressions" in result.output


def test_failed_build_keeps_the_old_store(data, tmp_path):
    out = tmp_path / "store"
    old = build_store(data, out).content_hash
    (tmp_path / ".store.tmp-stale").mkdir()  # left by an interrupted run
    with open(data / "dev/behaviors.tsv", "a") as f:
        f.write(f"11\tU1\t{TIME}\t\tN1-2\n")
    with pytest.raises(MindFormatError, match="line 2, field impressions"):
        build_store(data, out)
    assert Store.load(out).content_hash == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mind", "store"]


def test_replaces_only_a_store(data, tmp_path):
    out = tmp_path / "not-a-store"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a store"):
        build_store(data, out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_images_folder_option(data, tmp_path):
    other = tmp_path / "pictures"
    shutil.move(data / "images", other)
    assert build_store(data, tmp_path / "a").news["image_path"].null_count() == 4
    store = build_store(data, tmp_path / "b", images=other)
    assert store.news["image_path"][0] == str(other / "N1.jpg")
    with pytest.raises(MindFormatError, match="image folder not found"):
        build_store(data, tmp_path / "c", images=tmp_path / "missing")


def test_single_split_folder_and_empty_arrays(tmp_path):
    (tmp_path / "news.tsv").write_text(news_rows(("N1", "one")))
    (tmp_path / "behaviors.tsv").write_text(behaviors_rows((1, "U1", "", "N1-0")))
    store = build_store(tmp_path, tmp_path / "store", split="dev")
    dev = store.behaviors("dev")
    assert store.splits == ["dev"] and dev.history_items.shape == (0,)
    assert dev.history(0).tolist() == [] and dev.candidates(0)[0].tolist() == [1]


def test_behaviors_from_plain_arrays():
    b = Behaviors(
        split="dev",
        labelled=True,
        impression_ids=[7, 8],
        user_index=[0, 1],
        times=[0, 1],
        history_offsets=[0, 0, 2],
        history_items=[3, 4],
        candidate_offsets=[0, 1, 3],
        candidate_items=[1, 2, 3],
        candidate_labels=[1, 0, 1],
    )
    assert b.num_impressions == 2 and b.candidate_labels.dtype == np.int8
    assert b.history(1).tolist() == [3, 4]
    both = Behaviors.concat([b, b])
    assert both.candidate_offsets.tolist() == [0, 1, 3, 4, 6]
    assert both.history(3).tolist() == [3, 4]
    with pytest.raises(ValueError, match="candidate_offsets"):
        Behaviors("dev", True, [7], [0], [0], [0, 0], [], [0, 2], [1], [1])


def test_news_map_by_number_agrees_with_the_join():
    news = pl.DataFrame({"news_id": ["N7", "N55528", "N0", "N130000"], "index": [1, 2, 3, 4]})
    good = ["N55528", "N7", "N0", "N130000"]
    bad = ["N07", "N+7", "n7", "N7\t", "N", "N8", "N99999999999", "X7"]
    tokens = pl.Series(good + bad)
    expected = [2, 1, 3, 4] + [0] * len(bad)
    by_number = NewsMap.build(news)
    assert by_number.by_number is not None
    assert by_number.lookup(tokens).tolist() == expected
    other = NewsMap.build(news.vstack(pl.DataFrame({"news_id": ["A1"], "index": [5]})))
    assert other.by_number is None, "not MIND ids: looked up by a join"
    assert other.lookup(tokens).tolist() == expected
    assert other.lookup(pl.Series(["A1", "N7"])).dtype == np.int32


def test_real_sample_matches_a_plain_parse(mind_samples, tmp_path):
    folder = mind_samples / "small_train_5k"
    store = build_store(folder, tmp_path / "store")
    b = store.behaviors("train")
    lines = (folder / "news.tsv").read_text().splitlines()
    known = {line.split("\t")[0] for line in lines}
    expected = {}
    for line in (folder / "behaviors.tsv").read_text().splitlines():
        imp, _, _, history, impressions = line.split("\t")
        cands = [t.rsplit("-", 1) for t in impressions.split() if t.rsplit("-", 1)[0] in known]
        if cands:
            expected[int(imp)] = ([h for h in history.split() if h in known], cands)
    assert b.impression_ids.tolist() == list(expected)
    for i, imp in enumerate(b.impression_ids.tolist()):
        history, cands = expected[imp]
        items, labels = b.candidates(i)
        assert store.news_ids[b.history(i)].tolist() == history
        assert store.news_ids[items].tolist() == [c[0] for c in cands]
        assert labels.tolist() == [int(c[1]) for c in cands]


def test_prepare_command(data, mind_samples, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["prepare", str(data), "--out", str(tmp_path / "store")])
    assert result.exit_code == 0, result.output
    assert "train: impressions 3" in result.output
    bad = tmp_path / "quoted"
    bad.mkdir()
    head = mind_samples / "head100_small_train_dev"
    shutil.copy(head / "news_train_small.tsv", bad / "news.tsv")
    shutil.copy(head / "behaviors_train_small.tsv", bad / "behaviors.tsv")
    result = runner.invoke(app, ["prepare", str(bad), "--out", str(tmp_path / "store2")])
    assert result.exit_code == 2
    assert "news.tsv, line 1, field title_entities" in result.output
    assert "CSV-quoted" in result.output


def test_real_test_rows_keep_every_candidate(mind_samples, tmp_path):
    lines = (mind_samples / "large_test_10/behaviors.tsv").read_text().splitlines()
    fields = [line.split("\t") for line in lines]
    ids = {i for f in fields for i in f[3].split() + f[4].split()}
    missing = fields[3][4].split()[5]  # a candidate of line 4
    (tmp_path / "test").mkdir()
    (tmp_path / "test/behaviors.tsv").write_text("\n".join(lines) + "\n")
    (tmp_path / "test/news.tsv").write_text(news_rows(*((i, i) for i in sorted(ids - {missing}))))
    with pytest.raises(MindFormatError, match=f"'{missing}' is in no news.tsv") as info:
        build_store(tmp_path, tmp_path / "store")
    assert (info.value.line, info.value.field) == (4, "impressions")
    with open(tmp_path / "test/news.tsv", "a") as f:
        f.write(news_rows((missing, missing)))
    test = build_store(tmp_path, tmp_path / "store").behaviors("test")
    assert not test.labelled and test.num_impressions == 10
    assert np.diff(test.candidate_offsets).tolist() == [len(f[4].split()) for f in fields]


def im_mind_images(data: Path, rows: str) -> Path:
    """An IM-MIND style folder (files named by index) and its projector.csv with `rows`."""
    shutil.rmtree(data / "images")
    folder = data / "IM-MIND"
    folder.mkdir()
    for stem in ("7", "3", "12"):
        (folder / f"{stem}.jpg").write_text(f"image {stem}")
    (data / "projector.csv").write_text("nid,IM-MIND-INDEX\n" + rows)
    return folder


def test_image_map_counts_duplicates_unmapped_and_missing(data, tmp_path, caplog):
    rows = "N2,7\nN1,3\nN2,12\nN3,99\nN77,12\nN1,3.jpg\n"
    folder = im_mind_images(data, rows)
    with caplog.at_level(logging.WARNING):
        store = build_store(data, tmp_path / "s", images=folder, image_map=data / "projector.csv")
    assert store.news["image_path"].to_list() == [
        str(folder / "3.jpg"),
        str(folder / "7.jpg"),  # first row of N2 wins over N2,12
        None,  # N3 -> 99, no such file
        None,  # N4 has no row
    ]
    counts = store.manifest["image_map"]
    assert {key: counts[key] for key in counts if key not in ("path", "columns")} == {
        "rows": 6,
        "duplicate_rows": 2,
        "conflicting_ids": 1,
        "unknown_news": 1,
        "unmapped_news": 1,
        "missing_files": 1,
    }
    assert store.manifest["num_news_with_image"] == 2
    assert "2 duplicate rows" in caplog.text and "1 mapped files missing" in caplog.text
    assert "2 duplicate rows" in store.summary()


def test_image_map_columns_and_cache_key(data, tmp_path):
    folder = im_mind_images(data, "")
    (data / "map.csv").write_text("image,news\n12,N4\n")
    out = tmp_path / "s"
    store = build_store(
        data, out, images=folder, image_map=data / "map.csv", image_map_columns=("news", "image")
    )
    assert store.news["image_path"].to_list() == [None, None, None, str(folder / "12.jpg")]
    content = store.content_hash
    (data / "map.csv").write_text("image,news\n12,N3\n")  # a changed map rebuilds the store
    store = build_store(
        data, out, images=folder, image_map=data / "map.csv", image_map_columns=("news", "image")
    )
    assert store.content_hash != content
    assert store.news["image_path"].to_list() == [None, None, str(folder / "12.jpg"), None]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("news,IM-MIND-INDEX\nN1,3\n", r"projector.csv, line 1, field nid: column missing"),
        ("nid,IM-MIND-INDEX\nN1,3\nN2,\n", r"projector.csv, line 3, field IM-MIND-INDEX: empty"),
        ("nid,IM-MIND-INDEX\n ,3\n", r"projector.csv, line 2, field nid: empty"),
    ],
)
def test_image_map_errors_leave_no_store(data, tmp_path, text, match):
    folder = im_mind_images(data, "")
    (data / "projector.csv").write_text(text)
    out = tmp_path / "s"
    with pytest.raises(MindFormatError, match=match):
        build_store(data, out, images=folder, image_map=data / "projector.csv")
    assert not out.exists()


def test_image_map_needs_file_and_folder(data, tmp_path):
    (data / "projector.csv").write_text("nid,IM-MIND-INDEX\n")
    with pytest.raises(MindFormatError, match="image map not found"):
        build_store(data, tmp_path / "s", image_map=data / "missing.csv")
    shutil.rmtree(data / "images")
    with pytest.raises(MindFormatError, match="needs an image folder"):
        build_store(data, tmp_path / "s", image_map=data / "projector.csv")


def test_prepare_cli_image_map(data, tmp_path):
    folder = im_mind_images(data, "")
    (data / "map.csv").write_text("id,file\nN1,7.jpg\n")
    base = ["prepare", str(data), "--out", str(tmp_path / "s"), "--images", str(folder)]
    result = CliRunner().invoke(
        app, [*base, "--image-map", str(data / "map.csv"), "--image-map-columns", "id,file"]
    )
    assert result.exit_code == 0, result.output
    assert "news 4 (1 with image)" in result.output
    assert "0 duplicate rows" in result.output and "3 news without a row" in result.output
    bad = CliRunner().invoke(
        app, [*base, "--image-map", str(data / "map.csv"), "--image-map-columns", "id"]
    )
    assert bad.exit_code != 0 and "expected NID,IMAGE" in bad.output


@pytest.mark.parametrize("named_by_id", [False, True])
def test_an_image_folder_naming_no_news_id_is_a_warning(data, tmp_path, caplog, named_by_id):
    """IM-MIND cards are named by index: without the image map no news gets its image."""
    folder = im_mind_images(data, "N1,3\n")  # files 7, 3 and 12
    if named_by_id:
        (folder / "N4.jpg").write_text("image N4")
    with caplog.at_level(logging.WARNING):
        store = build_store(data, tmp_path / "s", images=folder)
    warning = "only 0 of 4 news ids (0.0%) name one of its 3 image files; an IM-MIND folder"
    assert (warning in caplog.text) is not named_by_id
    assert ("projector.csv as the image map (prepare --image-map" in caplog.text) is not named_by_id
    assert store.manifest["num_news_with_image"] == named_by_id
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        mapped = build_store(data, tmp_path / "m", images=folder, image_map=data / "projector.csv")
    assert "image files" not in caplog.text
    assert mapped.manifest["num_news_with_image"] == 1


def test_prepare_cli_warns_of_an_image_folder_naming_no_news_id(tmp_path, caplog):
    data = tmp_path / "data"
    generate(data, SynthConfig.quick(), image_layout="im-mind")
    base = ["prepare", str(data), "--out", str(tmp_path / "s")]
    with caplog.at_level(logging.WARNING):
        result = CliRunner().invoke(app, base)
    assert result.exit_code == 0, result.output
    assert "news 500 (0 with image)" in result.output
    assert "only 0 of 500 news ids (0.0%) name one of its 500 image files" in caplog.text
    assert "--image-map" in caplog.text
    caplog.clear()
    mapped = ["--image-map", str(data / "projector.csv"), "--out", str(tmp_path / "m")]
    with caplog.at_level(logging.WARNING):
        result = CliRunner().invoke(app, [*base[:2], *mapped])
    assert result.exit_code == 0, result.output
    assert "image files" not in caplog.text and "(0 with image)" not in result.output
