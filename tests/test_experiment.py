"""Evaluation of trained runs, leaderboard predictions, oracle AUC, the report and the demo."""

import json
import shutil
from dataclasses import replace

import numpy as np
import polars as pl
import pytest
from conftest import check_prediction, topic_vectors
from mind_reference import reference_means
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from mmnewsrec.cli import app
from mmnewsrec.config import load_config
from mmnewsrec.data.store import build_store
from mmnewsrec.evaluate.experiment import (
    ExperimentError,
    evaluate_run,
    load_experiment,
    oracle_auc,
    predict_run,
)
from mmnewsrec.evaluate.leaderboard import read_prediction
from mmnewsrec.evaluate.report import ReportInputs, RunResult, summarise, write_report
from mmnewsrec.formats.store import SIGNAL_NAMES, Store
from mmnewsrec.formats.vectors import NewsVectors
from mmnewsrec.metrics import impression_metrics
from mmnewsrec.rank.ranker import load_ranker
from mmnewsrec.rank.train import run_training


def test_evaluate_run_matches_the_metrics_of_the_model_scores(tiny_run):
    metrics = evaluate_run(tiny_run)
    ranker = load_ranker(tiny_run)
    store = Store.load(ranker.config.data.store_dir)
    dev = store.behaviors("dev")
    assert ranker.signal_names  # train_cpu's default: every signal
    # the same kernels on the same batches as evaluate_run: bit-equal scores
    scores = ranker.score(dev, signals=store.signals("dev", ranker.signal_names))
    labels, offsets = np.asarray(dev.candidate_labels), np.asarray(dev.candidate_offsets)
    expected = reference_means(scores, labels, offsets)
    assert {k: metrics[k] for k in expected} == pytest.approx(expected, abs=1e-9)
    assert metrics["split"] == "dev"
    # train_cpu's default: no selection split, the last weights
    assert metrics["selected_on"] is None and not metrics["selected_on_reported_split"]
    assert metrics["selection"] == {"split": None, "rule": ""}
    assert json.loads((tiny_run / "metrics.json").read_text()) == metrics
    clicks = np.add.reduceat(labels, offsets[:-1])
    scored = int(((clicks > 0) & (clicks < np.diff(offsets))).sum())
    assert (metrics["impressions"], metrics["skipped"]) == (scored, dev.num_impressions - scored)


def test_evaluate_run_keeps_per_impression_metrics_and_describes_the_top_10(tiny_run):
    metrics = evaluate_run(tiny_run)
    ranker = load_ranker(tiny_run)
    store = Store.load(ranker.config.data.store_dir)
    dev = store.behaviors("dev")
    scores = ranker.score(dev, signals=store.signals("dev", ranker.signal_names))
    labels, offsets = np.asarray(dev.candidate_labels), np.asarray(dev.candidate_offsets)
    expected = impression_metrics(scores, labels, offsets)
    table = pl.read_parquet(tiny_run / "impressions.parquet")
    assert table["impression_id"].to_list() == np.asarray(dev.impression_ids).tolist()
    for name in ("auc", "mrr", "ndcg5", "ndcg10"):
        np.testing.assert_allclose(table[name].to_numpy(), getattr(expected, name), atol=1e-12)
    history = np.diff(np.asarray(dev.history_offsets))
    assert table["history_len"].to_list() == history.tolist()
    beyond = metrics["beyond_accuracy"]
    assert beyond["k"] == 10 and 0 < beyond["coverage"] <= 1 and 0 <= beyond["personalisation"] <= 1
    assert beyond["diversity"] == pytest.approx(np.nanmean(table["diversity"].to_numpy()))
    assert beyond["novelty"] > 0 and 0 <= beyond["image_share"] <= 1
    buckets = metrics["by_history"]
    assert list(buckets) == ["0", "1-5", "6-20", ">20"]
    assert sum(b["impressions"] for b in buckets.values()) == metrics["impressions"]
    assert list(metrics["by_candidate_age"]) == ["<6 h", "6-24 h", ">24 h"]


def test_prediction_file_scores_like_the_run(tiny_run, tmp_path):
    store = Store.load(load_ranker(tiny_run).config.data.store_dir)
    dev = store.behaviors("dev")
    path = predict_run(tiny_run, None, tmp_path / "prediction.txt", "dev", zip=True)
    assert path == tmp_path / "prediction.zip"
    check_prediction(path, dev, evaluate_run(tiny_run), tmp_path)


def test_a_run_refuses_another_store(tiny_run, tmp_path, mind_samples):
    from mmnewsrec.data.store import build_store

    other = build_store(mind_samples / "small_train_5k", tmp_path / "other")
    with pytest.raises(ExperimentError, match="not the store the vectors"):
        evaluate_run(tiny_run, other.path, split="train")


def test_evaluate_and_predict_commands(tiny_run, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(tiny_run)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["split"] == "dev"
    out = tmp_path / "p.txt"
    result = runner.invoke(app, ["predict", str(tiny_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "'dev'" in result.output
    dev = Store.load(load_ranker(tiny_run).config.data.store_dir).behaviors("dev")
    check_prediction(out, dev, evaluate_run(tiny_run), tmp_path)
    bad = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert bad.exit_code == 2


def test_oracle_auc_equals_the_auc_of_the_raw_files(tiny_run):
    store_dir = load_ranker(tiny_run).config.data.store_dir
    data = store_dir.parent / "data"
    oracle = pl.read_csv(data / "dev" / "oracle.tsv", separator="\t")
    keys = zip(oracle["impression_id"], oracle["news_id"], strict=True)
    probability = dict(zip(keys, oracle["probability"], strict=True))
    aucs = []
    for line in (data / "dev" / "behaviors.tsv").read_text().splitlines():
        impression, *_, shown = line.split("\t")
        pairs = [token.rsplit("-", 1) for token in shown.split()]
        labels = [int(label) for _, label in pairs]
        scores = [probability[(int(impression), news)] for news, _ in pairs]
        if 0 < sum(labels) < len(labels):
            aucs.append(roc_auc_score(labels, scores))
    auc = oracle_auc(data / "dev" / "oracle.tsv", store_dir, "dev")
    assert auc == pytest.approx(np.mean(aucs), abs=1e-9)
    summary = json.loads((data / "manifest.json").read_text())["summary"]
    assert auc == pytest.approx(summary["oracle_auc"], abs=1e-6)  # exact probabilities, rounded
    assert 0.6 < auc < 1


def test_image_shares_count_the_news_the_image_encoder_found_an_image_for(tiny_run):
    """On IM-MIND every news has a card file, photo or not: what has an image is what the
    image encoder found (its has_image), not the store's image paths."""
    from mmnewsrec.evaluate.experiment import clicked_image_share, news_with_image

    store = Store.load(load_ranker(tiny_run).config.data.store_dir)
    with_file = news_with_image(store)
    text = NewsVectors.load(load_ranker(tiny_run).config.data.vectors_dir)
    assert not text.manifest.get("image")
    found = with_file & (np.arange(len(with_file)) % 3 > 0)  # blank cards: every third news
    image = NewsVectors(text.vectors, found, text.manifest | {"image": {"encoder": "test"}})
    np.testing.assert_array_equal(news_with_image(store, [text, image]), found)
    np.testing.assert_array_equal(news_with_image(store, [text]), with_file)
    dev = store.behaviors("dev")
    clicked = np.asarray(dev.candidate_items)[np.asarray(dev.candidate_labels) == 1]
    share = clicked_image_share(store, "dev", news_with_image(store, [text, image]))
    assert share == pytest.approx(found[clicked].mean(), abs=1e-12)
    assert share < clicked_image_share(store, "dev") - 0.1


def test_report_summarises_seeds_and_writes_plots(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("step,epoch,loss,auc\n10,1,0.5,0.6\n20,1,0.4,\n30,2,0.3,0.7\n")
    splits = {"split": "dev", "selected_on": "valid"}
    results = [
        RunResult("text", "model", 0, {"auc": 0.6, "mrr": 0.3, "ndcg5": 0.3, "ndcg10": 0.4}, log),
        RunResult("text", "model", 1, {"auc": 0.7, "mrr": 0.4, "ndcg5": 0.4, "ndcg10": 0.5}),
        RunResult("-", "random", 0, {"auc": 0.5, "mrr": 0.2, "ndcg5": 0.2, "ndcg10": 0.3}),
    ]
    results = [replace(r, metrics=r.metrics | splits) for r in results]
    rows = summarise(results)
    assert [row["ranker"] for row in rows] == ["model", "random"]
    assert (rows[0]["reported_on"], rows[0]["selected_on"]) == ("dev", "valid")
    assert rows[0]["auc"] == pytest.approx(0.65)
    assert rows[0]["auc_std"] == pytest.approx(np.std([0.6, 0.7], ddof=1))
    inputs = ReportInputs("t", "data", ["mmnewsrec demo"], 0.9, {"text": {10: 0.25}})
    report = write_report(tmp_path / "report", results, inputs).read_text()
    assert "0.6500 ± 0.0707" in report and "| (oracle) |" in report and "0.2500" in report
    assert "Reported on: **dev**. Checkpoints selected on: **valid (impressions held out" in report
    assert "optimistic" not in report
    unselected = [replace(r, metrics=r.metrics | {"selected_on": None}) for r in results]
    report = write_report(tmp_path / "last", unselected, inputs).read_text()
    assert "Checkpoints selected on: **none (the last weights, trained on every train" in report
    peeked = [RunResult("-", "m", 0, {**r.metrics, "selected_on": "dev"}) for r in results[:1]]
    report = write_report(tmp_path / "peeked", peeked, inputs).read_text()
    assert "Selected on the reported split: these figures are optimistic." in report
    for plot in ("auc.png", "curves.png"):
        assert (tmp_path / "report" / plot).read_bytes()[:4] == b"\x89PNG"


def test_report_marks_rows_tied_with_the_best_and_shows_beyond_accuracy(tmp_path):
    scores = {"auc": 0.6, "mrr": 0.3, "ndcg5": 0.3, "ndcg10": 0.4}
    beyond = {"k": 10, "diversity": 0.5, "category_entropy": 1.0, "novelty": 3.0}
    beyond |= {"image_share": 0.25, "coverage": 0.5, "personalisation": 0.9}
    history = {"0": {**scores, "impressions": 3}, ">20": {**scores, "impressions": 7}}
    described = {"beyond_accuracy": beyond | {"clicked_image_share": 0.5}, "by_history": history}
    results = [
        RunResult("text", "a", 0, scores | described),
        RunResult("text", "b", 0, scores | {"auc": 0.59} | described),
        RunResult("-", "c", 0, scores | {"auc": 0.5} | described),
    ]
    entry = {"diff": -0.01, "low": -0.03, "high": 0.01, "p": 0.2, "p_holm": 0.4}
    entry |= {"significant": False, "noise": "-"}
    inputs = ReportInputs("t", "data", ["x"])
    inputs.significance = {
        ("text", "b"): {"auc_vs_best": entry, "tied_with_best": True},
        ("-", "c"): {"auc_vs_best": entry | {"diff": -0.1, "significant": True}},
    }
    report = write_report(tmp_path, results, inputs).read_text()
    assert "| text | b ≈ |" in report and "| - | c |" in report and "| text | a |" in report
    assert "| -0.0100 [-0.0300, +0.0100] | 0.4 (n.s.) |" in report
    assert "| -0.1000 [-0.0300, +0.0100] | 0.4 |" in report
    assert "## Beyond accuracy (top-10 of each dev ranking)" in report
    assert "| text | a | 0.500 | 1.000 | 50.0% | 3.00 | 0.900 | 25.0% |" in report
    assert "among the dev clicks: 50.0%" in report
    assert "| encoder | ranker | 0 (3) | >20 (7) |" in report


def test_experiment_file_errors_name_the_problem(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text('out_dir = "o"\n[encoders.a]\n[rankers.r]\nmodel = "random"\n')
    with pytest.raises(ExperimentError, match="exactly one of data_dir"):
        load_experiment(path)
    path.write_text(
        'data_dir = "d"\nout_dir = "o"\n[encoders.a]\nbogus = 1\n[rankers.r]\nmodel="x"'
    )
    with pytest.raises(ExperimentError, match="bogus"):
        load_experiment(path)
    path.write_text('data_dir = "d"\nout_dir = "o"\n[encoders.a]\nimage_crop = [1, 2, 3]\n')
    with pytest.raises(ExperimentError, match="image_crop"):
        load_experiment(path)
    grid = 'data_dir = "d"\nout_dir = "o"\n[encoders.a]\n[encoders.b]\n'
    grid += '[rankers.r]\nmodel = "mean_cosine"\n[rankers.p]\nmodel = "popularity"\n'
    grid += "per_encoder = false\n"
    for baseline, problem in (
        ("nope", "names no ranker"),
        ("r", "name its encoder"),
        ("p/a", "runs once"),
    ):
        path.write_text(f'baseline = "{baseline}"\n{grid}')
        with pytest.raises(ExperimentError, match=problem):
            load_experiment(path)
    path.write_text(f'baseline = "r/b"\n{grid}')
    assert load_experiment(path).baseline == "r/b"


def test_a_ranker_runs_on_the_encoders_it_names(tmp_path):
    from mmnewsrec.evaluate.experiment import grid_cells

    path = tmp_path / "x.toml"
    grid = 'data_dir = "d"\nout_dir = "o"\nseeds = [0, 1]\n[encoders.a]\n[encoders.b]\n'
    grid += '[rankers.t]\nmodel = "fast_rec_transformer"\n'
    grid += '[rankers.c]\nmodel = "fast_rec_transformer"\nencoders = ["b"]\n'
    path.write_text(grid)
    cells = [(c.ranker_name, c.encoder, c.seed) for c in grid_cells(load_experiment(path))]
    assert cells == [("t", "a", 0), ("t", "a", 1), ("t", "b", 0), ("t", "b", 1)] + [
        ("c", "b", 0),
        ("c", "b", 1),
    ]
    path.write_text(f'baseline = "c"\n{grid}')  # one encoder: no need to name it
    assert load_experiment(path).baseline == "c"
    for bad, problem in (
        ('encoders = ["z"]', r"rankers.c.encoders: \['z'\] names no encoder"),
        ("encoders = []", r"rankers.c.encoders: \[\] names no encoder"),
        ('encoders = ["a"]\nper_encoder = false', "runs once, name no encoders"),
    ):
        path.write_text(grid.replace('encoders = ["b"]', bad))
        with pytest.raises(ExperimentError, match=problem):
            load_experiment(path)
    path.write_text(f'baseline = "c/a"\n{grid}')
    with pytest.raises(ExperimentError, match="names no ranker"):
        load_experiment(path)


def test_experiment_file_image_map_and_crop(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text(
        'data_dir = "d"\nout_dir = "o"\nimages = "IM-MIND"\nimage_map = "projector.csv"\n'
        "[encoders.photo]\nimage_crop = [15, 15, 215, 180]\nimage_blank_std = 1.5\n"
        '[rankers.r]\nmodel = "random"\n'
    )
    config = load_experiment(path)
    assert config.image_map == tmp_path / "projector.csv"
    assert config.image_map_columns == ("nid", "IM-MIND-INDEX")
    spec = config.encoders["photo"].model_dump()
    assert spec["image_crop"] == (15, 15, 215, 180) and spec["image_blank_std"] == 1.5


GRID = """store_dir = "{store}"
out_dir = "{out}"
jobs = {jobs}
train_overrides = ["run.max_steps=2", "optim.batch_size=32", "data.history_len=8"]
[encoders.text]
text_encoder = "{bert}"
image_encoder = "none"
[rankers.additive_attention]
model = "additive_attention"
overrides = ["model.args.d_model=16", "model.args.n_heads=2", "model.args.query_dim=16"]
[rankers.mean_cosine]
model = "mean_cosine"
[rankers.popularity]
model = "popularity"
per_encoder = false
"""


def test_a_grid_in_two_jobs_gives_the_results_of_one_and_times_its_phases(tiny_run, tmp_path):
    from test_encode_encoders import save_tiny_bert

    from mmnewsrec.evaluate.experiment import run_experiment

    bert = save_tiny_bert(tmp_path / "bert")
    results = {}
    for jobs in (1, 2):
        path = tmp_path / f"grid{jobs}.toml"
        out = tmp_path / f"out{jobs}"
        store = tiny_run.parent / "store"
        path.write_text(GRID.format(store=store, out=out, jobs=jobs, bert=bert))
        run_experiment(load_experiment(path), path)
        results[jobs] = json.loads((out / "results.json").read_text())
        timings = json.loads((out / "timings.json").read_text())
        assert timings["jobs"] == jobs
        phases = timings["phases"]
        assert {"prepare", "encode text", "train", "report"} <= phases.keys()
        run = phases["train additive_attention text seed0"]
        assert run["wall_s"] > 0 and run["cpu_s"] > 0
        assert "training job(s) at a time" in (out / "report.md").read_text()
        assert "## Significance (dev AUC)" in (out / "report.md").read_text()
        worst = results[jobs][-1]
        assert worst["auc_vs_best"]["low"] <= worst["auc_vs_best"]["diff"] <= 0
    for one, two in zip(results[1], results[2], strict=True):
        assert (one["encoder"], one["ranker"]) == (two["encoder"], two["ranker"])
        # other thread counts sum in another order: equal up to rounding
        assert one["auc"] == pytest.approx(two["auc"], abs=1e-4)


def rows_of(out):
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    best = max(rows_of(out), key=lambda r: r["auc"])
    served = out / "runs" / best["ranker"] / best["encoder"] / "seed0"
    assert result.output.rstrip().endswith(f"mmnewsrec serve {served}")
    report = (out / "report.md").read_text()
    assert "| (oracle) |" in report and (out / "auc.png").is_file()
    rows = {(r["encoder"], r["ranker"]): r for r in json.loads((out / "results.json").read_text())}
    random_auc = rows[("-", "random")]["auc"]
    assert abs(random_auc - 0.5) < 0.05
    for encoder in ("minilm", "minilm+effnet"):
        assert rows[(encoder, "fast_rec_transformer")]["auc"] > random_auc + 0.05
        metrics = out / "runs" / "fast_rec_transformer" / encoder / "seed0" / "metrics.json"
        reported = rows[(encoder, "fast_rec_transformer")]["auc"]  # rounded to 6 decimals
        assert json.loads(metrics.read_text())["auc"] == pytest.approx(reported, abs=1e-6)
    # the transformer reads every signal (train_cpu's default); its content-only twin runs on
    # the multimodal vectors only
    runs = out / "runs"
    assert load_ranker(runs / "fast_rec_transformer" / "minilm" / "seed0").signal_names == list(
        SIGNAL_NAMES
    )
    assert ("minilm", "fast_rec_transformer_content") not in rows
    content = load_ranker(runs / "fast_rec_transformer_content" / "minilm+effnet" / "seed0")
    assert content.signal_names == [] and content.model.signal_head is None
    # MiniLM ran once: both vector folders fuse the one text part of the shared parts folder
    assert sorted(p.name.split("-")[0] for p in (out / "parts").glob("*.json")) == ["image", "text"]
    manifest = json.loads((out / "vectors" / "minilm+effnet" / "manifest.json").read_text())
    assert manifest["text"]["cached"]
    # a second run reuses every stage: nothing is trained again
    checkpoint = out / "runs" / "fast_rec_transformer" / "minilm" / "seed0" / "checkpoint.pt"
    written = checkpoint.stat().st_mtime_ns
    shutil.rmtree(out / "runs" / "random")
    again = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert checkpoint.stat().st_mtime_ns == written
    assert (out / "runs" / "random" / "any" / "seed0" / "metrics.json").is_file()


@pytest.fixture(scope="module")
def run_with_drops(tmp_path_factory):
    """A popularity run on a store whose test split lost candidates and an impression to news
    ids in no news.tsv (prepared with allow_drops)."""
    root = tmp_path_factory.mktemp("drops")
    news = "".join(f"N{i}\tcat\tsub{i % 3}\tTitle {i}\t\t\t[]\t[]\n" for i in range(1, 9))
    time = "11/15/2019 8:55:22 AM"
    behaviors = {
        "train": [("1", "N1", "N2-1 N3-0 N4-0"), ("2", "N2", "N5-1 N6-0")],
        "dev": [("3", "N1", "N2-0 N7-1")],
        "test": [("4", "N1", "N2 N9 N3"), ("5", "", "N9"), ("6", "N9", "N8 N1")],
    }
    for split, rows in behaviors.items():
        (root / "raw" / split).mkdir(parents=True)
        (root / "raw" / split / "news.tsv").write_text(news)
        lines = "".join(f"{i}\tU1\t{time}\t{h}\t{c}\n" for i, h, c in rows)
        (root / "raw" / split / "behaviors.tsv").write_text(lines)
    store = build_store(root / "raw", root / "store", allow_drops=True)
    topic_vectors(store).save(root / "emb")
    values = {
        "data.store_dir": root / "store",
        "data.vectors_dir": root / "emb",
        "run.out_dir": root / "run",
        "run.progress": False,
        "model.name": "popularity",
        "data.valid_split": "",  # one train day: nothing to hold out
    }
    run_training(load_config("train_cpu", values=values))
    return root / "run"


def test_predict_refuses_a_split_with_drops(run_with_drops, tmp_path):
    out = tmp_path / "prediction.txt"
    with pytest.raises(ExperimentError, match="lost 1 impressions and 2 candidates") as info:
        predict_run(run_with_drops, None, out, "test", zip=True)
    assert "--allow-drops" in str(info.value)
    assert list(tmp_path.iterdir()) == []
    path = predict_run(run_with_drops, None, out, "test", allow_drops=True)
    prediction = read_prediction(path)
    assert list(prediction.impression_ids) == ["4", "6"]
    assert prediction.sizes.tolist() == [2, 2]


def test_predict_command_allow_drops(run_with_drops, tmp_path):
    out = tmp_path / "prediction.zip"
    args = ["predict", str(run_with_drops), "--out", str(out), "--zip"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "split 'test' of" in result.output and "pass --allow-drops" in result.output
    assert not out.exists()
    result = CliRunner().invoke(app, [*args, "--allow-drops"])
    assert result.exit_code == 0, result.output
    assert "ranks of split 'test' written to" in result.output
    assert len(read_prediction(out)) == 2
    dev = CliRunner().invoke(app, [*args, "--split", "dev"])
    assert dev.exit_code == 0, dev.output


def test_demo_grid_for_the_im_mind_layout_maps_and_crops_the_cards(tmp_path):
    from mmnewsrec.data.synthetic.images import PHOTO_BOX
    from mmnewsrec.demo import demo_files

    for layout, expected_map, expected_crop in [
        ("plain", None, None),
        ("im-mind", tmp_path / "data/projector.csv", PHOTO_BOX),
    ]:
        path = tmp_path / "experiment.toml"
        path.write_text(demo_files(tmp_path, quick=True, image_layout=layout)[1])
        config = load_experiment(path)
        assert config.image_map == (expected_map and expected_map.resolve())
        assert config.encoders["minilm+effnet"].image_crop == expected_crop
        assert config.encoders["minilm"].image_crop is None
    bad = CliRunner().invoke(app, ["demo", "--image-layout", "cards", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "image layout must be one of plain, im-mind" in bad.output


def test_demo_grids_train_settings(tmp_path):
    """The default demo trains 2 epochs, the quick demo 3, both on every train impression
    (train_cpu's default: no held-out selection)."""
    from mmnewsrec.demo import demo_files

    for quick, epochs in [(False, 2), (True, 3)]:
        path = tmp_path / "experiment.toml"
        path.write_text(demo_files(tmp_path, quick=quick)[1])
        config = load_experiment(path)
        train = load_config(config.train_config, config.train_overrides)
        assert train.optim.epochs == epochs and train.data.valid_split == ""


def slot_after_a_while() -> int:
    import time

    from mmnewsrec.evaluate import experiment

    time.sleep(1.0)  # both processes get a task
    return experiment._worker_slot


def test_each_training_process_has_a_bar_line_of_its_own():
    import logging
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from mmnewsrec.evaluate.experiment import _init_worker

    context = multiprocessing.get_context("spawn")
    args = (1, logging.WARNING, context.Value("i", 0))
    with ProcessPoolExecutor(2, context, _init_worker, args) as pool:
        slots = [pool.submit(slot_after_a_while) for _ in range(2)]
        assert sorted(s.result() for s in slots) == [0, 1]
