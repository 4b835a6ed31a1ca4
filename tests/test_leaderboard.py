"""Leaderboard files: real MIND predictions, round trips, scoring and clear errors."""

import json
import logging
import zipfile

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from mmnewsrec.cli import app
from mmnewsrec.data.store import build_store
from mmnewsrec.evaluate import leaderboard
from mmnewsrec.evaluate.leaderboard import (
    ScoreFileError,
    ranks_from_scores,
    read_prediction,
    read_truth,
    score_files,
    write_prediction,
    write_truth,
)
from mmnewsrec.formats.store import Behaviors
from mmnewsrec.metrics import evaluate_scores, impression_metrics

SAMPLE_PREDICTIONS = [
    "official_sample_prediction/prediction.txt",
    "official_sample_prediction/prediction.zip",
    "large_test_10/prediction.txt",
]


def make_behaviors(labels: list[list[int]], ids: list[int], labelled: bool = True) -> Behaviors:
    num, sizes = len(ids), [len(row) for row in labels]
    flat = np.concatenate([np.asarray(row, dtype=np.int8) for row in labels])
    return Behaviors(
        split="dev" if labelled else "test",
        labelled=labelled,
        impression_ids=np.asarray(ids),
        user_index=np.zeros(num),
        times=np.zeros(num),
        history_offsets=np.zeros(num + 1),
        history_items=np.zeros(0),
        candidate_offsets=np.concatenate([[0], np.cumsum(sizes)]),
        candidate_items=np.arange(1, len(flat) + 1),
        candidate_labels=flat if labelled else np.full(len(flat), -1),
    )


def random_lists(seed: int, num: int = 50):
    """Random labels (at least one click and one non-click) and tie-free scores."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 40, num)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    labels = (rng.random(offsets[-1]) < 0.2).astype(np.int8)
    labels[offsets[:-1]], labels[offsets[1:] - 1] = 1, 0
    return rng.random(offsets[-1]), labels, offsets


def write(path, text: str):
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", SAMPLE_PREDICTIONS)
def test_sample_predictions_parse_and_every_line_is_a_permutation(mind_samples, name):
    pred = read_prediction(mind_samples / name)
    assert list(pred.impression_ids) == [str(i) for i in range(1, len(pred) + 1)]
    for i in range(len(pred)):
        np.testing.assert_array_equal(np.sort(pred.row(i)), np.arange(1, pred.sizes[i] + 1))


def test_official_zip_holds_the_official_text(mind_samples):
    folder = mind_samples / "official_sample_prediction"
    txt, zipped = (
        read_prediction(folder / "prediction.txt"),
        read_prediction(folder / "prediction.zip"),
    )
    np.testing.assert_array_equal(txt.values, zipped.values)
    np.testing.assert_array_equal(txt.offsets, zipped.offsets)


def test_large_test_prediction_ranks_every_candidate(mind_samples):
    rows = (mind_samples / "large_test_10/behaviors.tsv").read_text().splitlines()
    pred = read_prediction(mind_samples / "large_test_10/prediction.txt")
    expected = [len(row.split("\t")[4].split()) for row in rows[: len(pred)]]
    assert list(pred.sizes) == expected
    assert [row.split("\t")[0] for row in rows[: len(pred)]] == list(pred.impression_ids)


@pytest.mark.parametrize("name", [SAMPLE_PREDICTIONS[0], SAMPLE_PREDICTIONS[2]])
def test_round_trip_is_byte_identical(mind_samples, tmp_path, name):
    pred = read_prediction(mind_samples / name)
    out = write_prediction(tmp_path / "p.txt", pred.impression_ids, pred.values, pred.offsets)
    assert out.read_bytes() == (mind_samples / name).read_bytes()


def test_ranks_from_scores_write_and_read_back(tmp_path):
    scores, _, offsets = random_lists(0)
    ranks = ranks_from_scores(scores, offsets)
    ids = np.arange(100, 100 + len(offsets) - 1)
    pred = read_prediction(write_prediction(tmp_path / "p.txt", ids, ranks, offsets))
    assert list(pred.impression_ids) == [str(i) for i in ids]
    np.testing.assert_array_equal(pred.values, ranks)
    np.testing.assert_array_equal(pred.offsets, offsets)
    first = scores[offsets[0] : offsets[1]]
    assert pred.row(0)[np.argmax(first)] == 1


def test_zip_output_holds_prediction_txt(tmp_path):
    ids, ranks, offsets = np.array([3, 4]), np.array([2, 1, 1, 3, 2]), np.array([0, 2, 5])
    out = write_prediction(tmp_path / "prediction.txt", ids, ranks, offsets, zip=True)
    assert out == tmp_path / "prediction.zip"
    assert not (tmp_path / "prediction.txt").exists()
    with zipfile.ZipFile(out) as archive:
        assert archive.namelist() == ["prediction.txt"]
        assert archive.read("prediction.txt") == b"3 [2,1]\n4 [1,3,2]\n"
    np.testing.assert_array_equal(read_prediction(out).values, ranks)


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    out = write(tmp_path / "prediction.zip", "old")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(zipfile.ZipFile, "writestr", broken)
    with pytest.raises(OSError, match="disk full"):
        write_prediction(out, np.array([1]), np.array([1]), np.array([0, 1]), zip=True)
    assert out.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["prediction.zip"]


def test_write_prediction_refuses_ranks_that_are_not_a_permutation(tmp_path):
    with pytest.raises(ValueError, match="impression 8 are invalid: rank 2 appears 2 times"):
        write_prediction(tmp_path / "p.txt", [7, 8], [1, 2, 2], [0, 1, 3])
    assert not (tmp_path / "p.txt").exists()


def test_write_prediction_checks_every_chunk_of_lines(tmp_path, monkeypatch):
    chunks = leaderboard.impression_chunks
    monkeypatch.setattr(leaderboard, "impression_chunks", lambda offsets: chunks(offsets, 3))
    ids, offsets = np.array(["1", "2", "3", " 4"]), np.array([0, 2, 4, 6, 8])
    with pytest.raises(ValueError, match=r"p\.txt:4: impression id '4', expected ' 4'"):
        write_prediction(tmp_path / "p.txt", ids, [1, 2] * 4, offsets)
    with pytest.raises(ValueError, match="impression 3 are invalid: rank 1 appears 2 times"):
        write_prediction(tmp_path / "p.txt", [1, 2, 3, 4], [1, 2, 2, 1, 1, 1, 2, 1], offsets)
    with pytest.raises(ScoreFileError, match=r"p\.txt:3: expected 'IMPRESSION_ID"):
        write_prediction(tmp_path / "p.txt", ["1", "2", "3 3", "4"], [1, 2] * 4, offsets)
    assert list(tmp_path.iterdir()) == []
    path = write_prediction(tmp_path / "p.txt", [1, 2, 3, 4], [1, 2, 2, 1, 1, 2, 2, 1], offsets)
    assert path.read_text() == "1 [1,2]\n2 [2,1]\n3 [1,2]\n4 [2,1]\n"


def test_truth_round_trip(tmp_path):
    behaviors = make_behaviors([[1, 0, 0], [0, 1]], ids=[7, 9])
    path = write_truth(tmp_path / "truth.txt", behaviors)
    assert path.read_text() == "7 [1,0,0]\n9 [0,1]\n"
    truth = read_truth(path)
    np.testing.assert_array_equal(truth.values, behaviors.candidate_labels)
    np.testing.assert_array_equal(truth.offsets, behaviors.candidate_offsets)


def test_write_truth_refuses_an_unlabelled_split(tmp_path):
    with pytest.raises(ScoreFileError, match="split 'test' has no click labels"):
        write_truth(tmp_path / "truth.txt", make_behaviors([[0, 0]], ids=[1], labelled=False))
    assert not (tmp_path / "truth.txt").exists()


def test_perfect_and_reversed_predictions(tmp_path):
    _, labels, offsets = random_lists(1)
    ids = np.arange(1, len(offsets))
    truth = write_truth(tmp_path / "t.txt", make_behaviors(np.split(labels, offsets[1:-1]), ids))
    perfect = ranks_from_scores(labels, offsets)
    m = score_files(truth, write_prediction(tmp_path / "p.txt", ids, perfect, offsets))
    assert (m["auc"], m["ndcg5"], m["ndcg10"]) == (1.0, 1.0, 1.0)
    assert m["impressions"] == len(ids)
    worst = ranks_from_scores(-labels, offsets)
    m = score_files(truth, write_prediction(tmp_path / "w.txt", ids, worst, offsets))
    assert (m["auc"], m["ndcg10"] < 0.5) == (0.0, True)


def test_score_files_equals_scoring_the_scores(tmp_path):
    scores, labels, offsets = random_lists(2)
    ids = np.arange(1, len(offsets))
    truth = write_truth(tmp_path / "t.txt", make_behaviors(np.split(labels, offsets[1:-1]), ids))
    pred = write_prediction(tmp_path / "p.txt", ids, ranks_from_scores(scores, offsets), offsets)
    got, expected = score_files(truth, pred), evaluate_scores(scores, labels, offsets)
    assert got == pytest.approx(expected, abs=1e-12)


def test_masked_truth_lines_are_skipped(tmp_path):
    truth = write(tmp_path / "t.txt", "1 [1,0]\n2 []\n3 [0,1]\n")
    pred = write(tmp_path / "p.txt", "1 [1,2]\n2 [3,1,2]\n3 [2,1]\n")
    assert score_files(truth, pred) == {
        "auc": 1.0,
        "mrr": 1.0,
        "ndcg5": 1.0,
        "ndcg10": 1.0,
        "impressions": 2,
        "skipped": 1,
    }


TRUTH = "1 [1,0,0]\n2 [0,1]\n3 [0,0,1,0]\n"


@pytest.mark.parametrize(
    ("prediction", "message"),
    [
        ("1 [1,2,3]\n2 [1,2]\n", r"p\.txt: ends after line 2, but .*t\.txt has 3 lines"),
        (
            "1 [1,2,3]\n2 [1,2]\n3 [1,2,3,4]\n4 [1]\n",
            r"p\.txt:4: more lines than the 3 of .*t\.txt",
        ),
        ("1 [1,2,3]\n5 [1,2]\n3 [1,2,3,4]\n", r"p\.txt:2: impression id 5, but line 2 of"),
        ("2 [1,2]\n1 [1,2,3]\n3 [1,2,3,4]\n", r"p\.txt:1: impression id 2, .*must match"),
        ("1 [1,2,3]\n2 [1,2,3]\n3 [1,2,3,4]\n", r"p\.txt:2: 3 ranks for impression 2, .*lists 2"),
        (
            "1 [1,2,3]\n2 [1,0]\n3 [1,2,3,4]\n",
            r"p\.txt:2: rank 0 of impression 2; ranks start at 1",
        ),
        ("1 [1,2,3]\n2 [1, 2]\n3 [1,2,3,4]\n", r"p\.txt:2: expected 'IMPRESSION_ID \[n1,n2,...\]'"),
        ("1 [1,2,3]\n2 1,2\n3 [1,2,3,4]\n", r"p\.txt:2: expected .*got '2 1,2'"),
        ("1 [1,2,3]\n\n2 [1,2]\n3 [1,2,3,4]\n", r"p\.txt:2: expected .*got ''"),
        ("1 [1,2,3]\n2 [1,-2]\n3 [1,2,3,4]\n", r"p\.txt:2: expected"),
        ("1 [1,2,3]\n2 [1,x]\n3 [1,2,3,4]\n", r"p\.txt:2: expected"),
        ("[1,2,3]\n2 [1,2]\n3 [1,2,3,4]\n", r"p\.txt:1: expected"),
        ("1 [1,2,3]\n2 [1,2]\n3 [1,2,3,99999999999999999999]\n", r"p\.txt:3: number out of range"),
    ],
)
def test_bad_predictions_name_file_and_line(tmp_path, prediction, message):
    truth, pred = write(tmp_path / "t.txt", TRUTH), write(tmp_path / "p.txt", prediction)
    with pytest.raises(ScoreFileError, match=message):
        score_files(truth, pred)


def test_bad_truth_label_names_file_and_line(tmp_path):
    truth = write(tmp_path / "t.txt", "1 [1,0]\n2 [0,2]\n")
    with pytest.raises(ScoreFileError, match=r"t\.txt:2: labels must be 0 or 1, got 2"):
        read_truth(truth)


def test_unreadable_files(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"1 [1]\n2 [1]\n\xff\n")
    with pytest.raises(ScoreFileError, match=r"bin\.txt:3: not UTF-8 text"):
        read_prediction(tmp_path / "bin.txt")
    with pytest.raises(ScoreFileError, match=r"missing\.txt: cannot read"):
        read_prediction(tmp_path / "missing.txt")
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as archive:
        archive.writestr("a.txt", "1 [1]\n")
        archive.writestr("b.txt", "1 [1]\n")
    with pytest.raises(ScoreFileError, match=r"two\.zip: zip archive without prediction\.txt"):
        read_prediction(tmp_path / "two.zip")


def test_windows_line_ends_and_loose_spacing_are_accepted(tmp_path):
    pred = read_prediction(write(tmp_path / "p.txt", "1\t[2,1]\r\n 2  [1]\r\n"))
    assert list(pred.impression_ids) == ["1", "2"]
    np.testing.assert_array_equal(pred.values, [2, 1, 1])


def test_cli_score_prints_metrics_and_json(tmp_path):
    truth = write(tmp_path / "t.txt", "1 [1,0]\n2 [0,1]\n")
    pred = write(tmp_path / "p.txt", "1 [1,2]\n2 [1,2]\n")
    result = CliRunner().invoke(app, ["score", str(truth), str(pred)])
    assert result.exit_code == 0, result.output
    assert "AUC: 0.5000" in result.output
    assert "MRR: 0.7500" in result.output
    result = CliRunner().invoke(app, ["score", str(truth), str(pred), "--json"])
    assert json.loads(result.stdout) == pytest.approx(score_files(truth, pred))


def test_cli_score_bad_file_exits_2_with_the_message(tmp_path):
    truth = write(tmp_path / "t.txt", "1 [1,0]\n")
    pred = write(tmp_path / "p.txt", "1 [1,0]\n")
    result = CliRunner().invoke(app, ["score", str(truth), str(pred)])
    assert result.exit_code == 2
    assert "p.txt:1: rank 0 of impression 1; ranks start at 1" in result.output


def test_tied_ranks_are_scored_as_the_official_scorer_does(tmp_path, caplog):
    _, labels, offsets = random_lists(4)
    sizes = np.diff(offsets)
    rng = np.random.default_rng(3)
    ranks = rng.integers(1, np.repeat(sizes + 2, sizes))  # ties, some above n
    for i in range(0, len(sizes), 3):  # and some permutations
        ranks[offsets[i] : offsets[i + 1]] = rng.permutation(sizes[i]) + 1
    ids = np.arange(1, len(sizes) + 1)
    rows = list(
        zip(ids, np.split(labels, offsets[1:-1]), np.split(ranks, offsets[1:-1]), strict=True)
    )
    truth = write_truth(tmp_path / "t.txt", make_behaviors([y for _, y, _ in rows], ids))
    pred = write(
        tmp_path / "p.txt", "".join(f"{i} [{','.join(map(str, r))}]\n" for i, _, r in rows)
    )
    with caplog.at_level(logging.WARNING, logger="mmnewsrec.evaluate.leaderboard"):
        got = score_files(truth, pred)
    official = np.mean([roc_auc_score(y, 1 / r) for _, y, r in rows])
    assert got["auc"] == pytest.approx(official, abs=1e-12)
    assert got["impressions"] == len(ids)
    tied = sum(not np.array_equal(np.sort(r), np.arange(1, len(r) + 1)) for _, _, r in rows)
    assert 0 < tied < len(ids)
    assert f"p.txt: {tied} of {len(ids)} lines are not permutations" in caplog.text


def test_cli_score_warns_on_tied_ranks(tmp_path, caplog):
    truth = write(tmp_path / "t.txt", "1 [1,0,0]\n2 [0,1]\n")
    pred = write(tmp_path / "p.txt", "1 [1,1,2]\n2 [2,1]\n")
    with caplog.at_level(logging.WARNING, logger="mmnewsrec.evaluate.leaderboard"):
        result = CliRunner().invoke(app, ["score", str(truth), str(pred)])
    assert result.exit_code == 0, result.output
    assert "AUC: 0.8750" in result.output  # (0.75 + 1) / 2: the click ties with a non-click
    assert "p.txt: 1 of 2 lines are not permutations of 1..n (first: line 1, rank 1 " in caplog.text


def test_tied_ranks_put_the_later_candidate_first_and_the_warning_says_so(tmp_path, caplog):
    truth = write(tmp_path / "t.txt", "1 [1,0]\n2 [0,1,0]\n")
    pred = write(tmp_path / "p.txt", "1 [1,1]\n2 [2,1,1]\n")
    with caplog.at_level(logging.WARNING, logger="mmnewsrec.evaluate.leaderboard"):
        got = score_files(truth, pred)
    assert got["mrr"] == pytest.approx((1 / 2 + 1 / 2) / 2)  # the non-clicks tied after come first
    assert "MRR and nDCG rank the later of tied candidates first" in caplog.text
    assert "may order them otherwise" in caplog.text


def test_write_prediction_reads_its_text_back_before_writing(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"p\.txt:2: impression id '8', expected ' 8'"):
        write_prediction(tmp_path / "p.txt", np.array(["7", " 8"]), [1, 1], [0, 1, 2])
    with pytest.raises(ValueError, match=r"p\.txt:2: expected 'IMPRESSION_ID"):
        write_prediction(tmp_path / "p.txt", np.array(["7", "8 9"]), [1, 1], [0, 1, 2])

    def loses_a_rank(ids, ranks, offsets):
        return "7 [1]\n8 [2]\n"

    monkeypatch.setattr(leaderboard, "_format_lines", loses_a_rank)
    with pytest.raises(ValueError, match=r"p\.txt:2: 1 ranks for the 2 candidates of impression 8"):
        write_prediction(tmp_path / "p.txt", [7, 8], [1, 2, 1], [0, 1, 3], zip=True)
    assert list(tmp_path.iterdir()) == []


def test_cli_truth_of_a_store(tmp_path):
    news = "".join(
        f"N{i}\tnews\tsub\tTitle {i}\tAbstract\thttps://n/{i}\t[]\t[]\n" for i in (1, 2, 3)
    )
    behaviors = {
        "dev": (
            "7\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-1 N3-0 N1-0\n"
            "9\tU2\t11/15/2019 9:00:00 AM\t\tN1-0 N2-1\n"
        ),
        "test": "1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2 N3\n",
    }
    for split, rows in behaviors.items():
        (tmp_path / "raw" / split).mkdir(parents=True)
        write(tmp_path / "raw" / split / "news.tsv", news)
        write(tmp_path / "raw" / split / "behaviors.tsv", rows)
    store = build_store(tmp_path / "raw", tmp_path / "store").path
    out = tmp_path / "truth.txt"
    result = CliRunner().invoke(app, ["truth", str(store), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text() == "7 [1,0,0]\n9 [0,1]\n"
    result = CliRunner().invoke(app, ["truth", str(store), "--out", str(out), "--split", "test"])
    assert result.exit_code == 2
    assert "split 'test' has no click labels" in result.output


def test_several_predictions_are_compared_pairwise_and_kept_per_impression(tmp_path):
    scores, labels, offsets = random_lists(5, num=400)
    ids = np.arange(1, len(offsets))
    truth = write_truth(tmp_path / "t.txt", make_behaviors(np.split(labels, offsets[1:-1]), ids))
    rng = np.random.default_rng(0)
    good = labels + 1.5 * rng.random(len(labels))  # mostly right
    also_good = labels + 1.5 * rng.random(len(labels))  # as good, other noise
    paths = []
    for name, s in (("random", scores), ("good", good), ("also_good", also_good)):
        paths.append(
            write_prediction(tmp_path / f"{name}.txt", ids, ranks_from_scores(s, offsets), offsets)
        )
    out = tmp_path / "per_impression.parquet"
    args = ["score", str(truth), *map(str, paths), "--baseline", "0", "--per-impression", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = {line.split("|")[1].strip(): line for line in result.stdout.splitlines()[2:]}
    assert "≈" in table[str(paths[2])] or "≈" in table[str(paths[1])]  # the two good ones tie
    assert "(baseline)" in table[str(paths[0])] and "(n.s.)" not in table[str(paths[0])]
    rows = json.loads(CliRunner().invoke(app, [*args[:5], "--json"]).stdout)
    assert rows[-1]["prediction"] == str(paths[0])  # random ranks last
    assert rows[-1]["auc_vs_best"]["significant"] and rows[-1]["auc_vs_best"]["high"] < 0
    assert rows[0]["auc"] == pytest.approx(score_files(truth, rows[0]["prediction"])["auc"])
    columns = pl.read_parquet(out)
    assert columns["impression_id"].to_list() == [str(i) for i in ids]
    expected = impression_metrics(scores, labels, offsets).auc  # file 0: the random scores
    np.testing.assert_allclose(columns["auc_0"].to_numpy(), expected, atol=1e-12)


def test_score_refuses_a_baseline_index_out_of_range(tmp_path):
    truth = write(tmp_path / "t.txt", "1 [1,0]\n")
    pred = write(tmp_path / "p.txt", "1 [1,2]\n")
    result = CliRunner().invoke(app, ["score", str(truth), str(pred), "--baseline", "1"])
    assert result.exit_code == 2 and "--baseline" in result.output
