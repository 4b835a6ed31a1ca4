import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import check_prediction, free_port
from typer.testing import CliRunner

from mmnewsrec.cli import app
from mmnewsrec.config import ConfigError, TrainConfig, load_config
from mmnewsrec.data.store import build_store
from mmnewsrec.formats.store import SIGNAL_NAMES
from mmnewsrec.formats.vectors import NewsVectors
from mmnewsrec.metrics import evaluate_scores
from mmnewsrec.rank import CheckpointError, load_ranker
from mmnewsrec.rank.batches import Batch
from mmnewsrec.rank.distributed import DistInfo, init_distributed
from mmnewsrec.rank.train import (
    TrainRecipe,
    lr_factor,
    ranking_loss,
    resolve_valid_rule,
    run_training,
    valid_mask,
)

TOPICS, NEWS, DIM = 6, 240, 12
TINY = {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "dropout": 0.0}


def write_mind(
    folder: Path, impressions: int, rng: np.random.Generator, clicks: int, first_day: int
) -> None:
    """Behaviors where each user clicks news of one topic (news n has topic n % TOPICS), one
    day of November 2019 per 40 impressions from `first_day` on."""
    folder.mkdir(parents=True)
    news = [f"N{n}\tcat{n % TOPICS}\tsub\ttitle {n}\t\t\t[]\t[]" for n in range(1, NEWS + 1)]
    (folder / "news.tsv").write_text("\n".join(news) + "\n")
    ids = np.arange(1, NEWS + 1)
    lines = []
    for i in range(impressions):
        topic = rng.integers(TOPICS)
        liked, other = ids[ids % TOPICS == topic], ids[ids % TOPICS != topic]
        history = rng.choice(liked, rng.integers(0, 8), replace=False)
        pos = rng.choice(liked, clicks, replace=False)
        neg = rng.choice(other, rng.integers(2, 9), replace=False)
        cands = [f"N{n}-1" for n in pos] + [f"N{n}-0" for n in neg]
        rng.shuffle(cands)
        hist = " ".join(f"N{n}" for n in history)
        when = f"11/{first_day + i // 40}/2019 8:55:22 AM"
        lines.append(f"{i + 1}\tU{topic}{i}\t{when}\t{hist}\t{' '.join(cands)}")
    (folder / "behaviors.tsv").write_text("\n".join(lines) + "\n")


def write_vectors(folder: Path, store_hash: str, seed: int, tag: str) -> None:
    """Topic direction + noise per news; row 0 zeros."""
    rng = np.random.default_rng(seed)
    topics = rng.normal(size=(TOPICS, DIM))
    idx = np.arange(1, NEWS + 1)
    vectors = np.zeros((NEWS + 1, DIM), dtype=np.float32)
    vectors[1:] = topics[idx % TOPICS] + 0.5 * rng.normal(size=(NEWS, DIM))
    has_image = np.zeros(NEWS + 1, dtype=bool)
    manifest = {"hash": tag, "store": {"content_hash": store_hash}}
    NewsVectors(vectors.astype(np.float16), has_image, manifest).save(folder)


def build_data(root: Path) -> Path:
    """A small store (train: 2 clicks per impression, dev) and two sets of vectors in root."""
    rng = np.random.default_rng(0)
    write_mind(root / "raw" / "train", 160, rng, clicks=2, first_day=11)  # Nov 11-14
    write_mind(root / "raw" / "dev", 60, rng, clicks=1, first_day=15)
    store = build_store(root / "raw", root / "store")
    write_vectors(root / "emb", store.content_hash, seed=1, tag="vectors-a")
    write_vectors(root / "emb_other", store.content_hash, seed=2, tag="vectors-b")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_data(tmp_path_factory.mktemp("mind"))


def settings(model: str = "fast_rec_transformer") -> list[str]:
    """The overrides every run of these tests starts from. Selection on dev unless an override
    says otherwise: these tests compare with dev."""
    base = [
        "data.valid_split=dev",
        f"model.name={model}",
        "optim.batch_size=32",
        "optim.epochs=2",
        "optim.lr=3e-3",
        "run.progress=false",
        "run.log_every=5",
        "run.device=cpu",
    ]
    if model.endswith("transformer"):
        base += [f"model.args.{k}={v}" for k, v in TINY.items()]
    return base


def make_config(data: Path, out: Path, *overrides: str, model: str = "fast_rec_transformer"):
    """The test settings, then `overrides`, on the store and vectors of `data`."""
    values = {
        "data.store_dir": data / "store",
        "data.vectors_dir": data / "emb",
        "run.out_dir": out,
    }
    return load_config(None, [*settings(model), *overrides], values)


def read_log(run: Path) -> list[dict]:
    with (run / "log.csv").open() as f:
        return list(csv.DictReader(f))


def final_weights(run: Path) -> dict:
    return torch.load(run / "last.pt", weights_only=True)["model"]


def test_loss_decreases_and_the_best_checkpoint_scores_dev(data, tmp_path):
    cfg = make_config(data, tmp_path / "run", "optim.epochs=4", "run.patience=0")
    result = run_training(cfg)
    assert result.finished and result.step == 4 * 10  # 320 samples / 32
    losses = [float(r["loss"]) for r in read_log(tmp_path / "run") if r["loss"]]
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:2]), losses
    assert result.best_metrics["auc"] > 0.85

    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert Path(saved["data"]["store_dir"]).is_absolute()
    assert Path(saved["data"]["vectors_dir"]) == (data / "emb").resolve()
    evals = [r for r in read_log(tmp_path / "run") if r["auc"]]
    assert [int(r["step"]) for r in evals] == [10, 20, 30, 40]

    from mmnewsrec.formats.store import Store

    store = Store.load(data / "store")
    dev = store.behaviors("dev")
    ranker = load_ranker(tmp_path / "run", vectors=NewsVectors.load(data / "emb"))
    assert ranker.signal_names == list(SIGNAL_NAMES)  # the default: every signal
    # the default: the news' categories, by the store's names, saved with the weights
    news = store.news
    assert ranker.model.config.category_names == sorted(set(news["category"]))
    ids = ranker.model.news_categories[1:].numpy()
    names = np.array(ranker.model.config.subcategory_names)[ids[:, 1] - 1]
    assert (ids > 0).all() and names.tolist() == news["subcategory"].to_list()
    scores = ranker.score(dev, signals=store.signals("dev", ranker.signal_names))
    assert scores.dtype == np.float32 and scores.shape == dev.candidate_items.shape
    metrics = evaluate_scores(scores, dev.candidate_labels, dev.candidate_offsets)
    assert metrics["auc"] == pytest.approx(result.best_metrics["auc"], abs=1e-6)
    start, end = dev.candidate_offsets[3], dev.candidate_offsets[4]
    signals = store.signals("dev", ranker.signal_names)[start:end]
    one = ranker.score_items(dev.history(3), dev.candidates(3)[0], width=2, signals=signals)
    np.testing.assert_allclose(one, scores[start:end], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("rule", "n_valid"), [("last-day", 40), ("2019-11-13", 80), ("0.1", 16), (0.25, 40)]
)
def test_valid_mask_cuts_by_day_or_fraction(data, rule, n_valid):
    from mmnewsrec.formats.store import Store

    times = Store.load(data / "store").behaviors("train").times  # 40 per day, Nov 11-14
    mask = valid_mask(times, str(rule))
    assert mask.sum() == n_valid
    assert times[mask].min() >= times[~mask].max()  # validation is the latest part
    assert valid_mask(times[:0], str(rule)).shape == (0,)  # an empty split holds nothing out


def test_the_default_validation_is_the_last_day_unless_it_is_thin():
    day = 86_400
    days = np.repeat(np.arange(18_000, 18_004), [300, 300, 300, 100]) * day  # last day: 10%
    assert resolve_valid_rule(days, "auto") == "last-day"
    assert valid_mask(days, "auto").sum() == 100
    thin = np.append(days[:-100], days[-1])  # the last day holds one of 901 impressions
    assert resolve_valid_rule(thin, "auto") == "0.1"
    mask = valid_mask(thin, "auto")
    assert mask.sum() == 91 and thin[mask].min() >= thin[~mask].max()  # the latest tenth
    assert (
        resolve_valid_rule(thin, "last-day") == "last-day"
        and valid_mask(thin, "last-day").sum() == 1
    )


def test_a_thin_last_day_is_not_the_validation_split_and_a_small_one_is_warned(tmp_path, caplog):
    rng = np.random.default_rng(5)
    write_mind(tmp_path / "raw" / "train", 161, rng, clicks=1, first_day=11)  # Nov 15: 1 of 161
    store = build_store(tmp_path / "raw", tmp_path / "store")
    write_vectors(tmp_path / "emb", store.content_hash, seed=1, tag="vectors")
    cfg = make_config(tmp_path, tmp_path / "run", "data.valid_split=auto", 'data.dev_split=""')
    recipe = TrainRecipe(cfg, torch.device("cpu"))
    with caplog.at_level("INFO", logger="mmnewsrec.rank.train"):
        recipe.setup()
    assert recipe.selection == {
        "split": "valid",
        "rule": "auto",
        "applied": "0.1",
        "held_out_of": "train",
        "impressions": 17,
        "clicks": 17,
    }
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert (
        "INFO",
        "validation (valid_split 'auto': 0.1): 17 of 161 train impressions, 17 clicks",
    ) in messages
    assert any(
        level == "WARNING" and "only 17 impressions (17 clicks)" in m for level, m in messages
    )


def test_the_progress_bar_takes_a_label_and_a_line(data, tmp_path, monkeypatch):
    from mmnewsrec.rank import train

    bars, tqdm = [], train.tqdm

    def recording_tqdm(*args, **kwargs):
        bars.append(kwargs)
        return tqdm(*args, **kwargs | {"disable": True})

    monkeypatch.setattr(train, "tqdm", recording_tqdm)
    cfg = make_config(data, tmp_path / "run", "optim.epochs=1", "run.progress=true")
    run_training(cfg, bar_label="minilm fast_rec_transformer seed0", bar_position=1)
    (bar,) = bars
    assert bar["desc"] == "train minilm fast_rec_transformer seed0" and bar["position"] == 1


def test_selection_holds_out_the_last_train_day_and_leaves_dev_unseen(data, tmp_path):
    run = tmp_path / "run"
    cfg = make_config(data, run, "data.valid_split=last-day", "run.patience=0")
    result = run_training(cfg)
    # 120 of the 160 train impressions (2 clicks each) train: 240 samples / 32 = 8 steps
    assert result.finished and result.step == 2 * 8
    assert result.selected_on == "valid" and "best valid: auc" in result.summary()

    from mmnewsrec.formats.store import Store

    store = Store.load(data / "store")
    train = store.behaviors("train")
    is_valid = valid_mask(train.times, "last-day")
    valid = train.subset(is_valid, "valid")
    assert valid.num_impressions == 40
    ranker = load_ranker(run, vectors=NewsVectors.load(data / "emb"))
    shown = np.repeat(is_valid, np.diff(train.candidate_offsets))
    signals = store.signals("train", ranker.signal_names)[shown]
    scores = ranker.score(valid, signals=signals)
    metrics = evaluate_scores(scores, valid.candidate_labels, valid.candidate_offsets)
    assert metrics["auc"] == pytest.approx(result.best_metrics["auc"], abs=1e-6)
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["selection"] == {
        "split": "valid",
        "rule": "last-day",
        "applied": "last-day",
        "held_out_of": "train",
        "impressions": 40,
        "clicks": 80,
    }


def test_selection_on_dev_is_labelled(data, tmp_path, caplog):
    from mmnewsrec.evaluate.experiment import evaluate_run

    run_training(make_config(data, tmp_path / "run", "optim.epochs=1"))
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["selection"] == {"split": "dev", "rule": "dev", "impressions": 60}
    metrics = evaluate_run(tmp_path / "run")
    assert metrics["selected_on"] == "dev" and metrics["selected_on_reported_split"]
    assert "optimistic" in caplog.text


@pytest.mark.parametrize(
    ("rule", "message"),
    [("2019-11-11", "160 of the 160"), ("2019-12-01", "0 of the 160"), ("soon", "valid_split")],
)
def test_a_cut_that_leaves_one_side_empty_is_refused(data, tmp_path, rule, message):
    with pytest.raises(ConfigError, match=message):
        cfg = make_config(data, tmp_path / "run", f"data.valid_split={rule}")
        TrainRecipe(cfg, torch.device("cpu")).setup()


def test_subset_keeps_the_rows_of_the_kept_impressions(data):
    from mmnewsrec.formats.store import Behaviors, Store

    train = Store.load(data / "store").behaviors("train")
    keep = np.arange(train.num_impressions) % 3 == 1
    part = train.subset(keep, "part")
    rows = np.flatnonzero(keep)
    assert part.split == "part" and part.num_impressions == len(rows)
    for j, i in enumerate(rows[:10]):
        np.testing.assert_array_equal(part.history(j), train.history(i))
        for got, want in zip(part.candidates(j), train.candidates(i), strict=True):
            np.testing.assert_array_equal(got, want)
    back = Behaviors.concat([part, train.subset(~keep, "rest")])
    assert back.candidate_labels.sum() == train.candidate_labels.sum()


@pytest.fixture
def one_thread():
    """Serial kernels, so that runs compared bit for bit run the same kernels on the same shapes:
    with several threads, the order of parallel sums can change from run to run on a busy
    machine, and Adam turns such last-bit differences into visible ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_resumed_run_ends_with_the_same_weights(data, tmp_path, one_thread):
    common = ("model.args.dropout=0.2", "run.eval_every=7", "run.patience=0")
    run_training(make_config(data, tmp_path / "full", *common))
    # mid-epoch (10 steps per epoch), between evaluations; at a log row (log_every 5), as a loss
    # row spanning a resume averages only the steps after it
    stopped = run_training(make_config(data, tmp_path / "cut", *common, "run.stop_after=15"))
    assert not stopped.finished and stopped.step == 15
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["progress"]["step"] == 15
    with pytest.raises(ConfigError, match="--resume"):
        run_training(make_config(data, tmp_path / "cut", *common))
    resumed = run_training(make_config(data, tmp_path / "cut", *common), resume=True)
    assert resumed.finished and resumed.step == 20

    full, cut = final_weights(tmp_path / "full"), final_weights(tmp_path / "cut")
    assert full.keys() == cut.keys()
    for key in full:
        assert torch.equal(full[key], cut[key]), key
    drop = ("samples_per_s",)
    rows = [[v for k, v in r.items() if k not in drop] for r in read_log(tmp_path / "full")]
    assert rows == [[v for k, v in r.items() if k not in drop] for r in read_log(tmp_path / "cut")]


def test_other_vectors_are_refused(data, tmp_path):
    run = tmp_path / "run"
    run_training(make_config(data, run, "optim.epochs=1", "run.stop_after=3"))
    other = make_config(data, run, "optim.epochs=1")
    other = other.model_copy(
        update={"data": other.data.model_copy(update={"vectors_dir": data / "emb_other"})}
    )
    with pytest.raises(CheckpointError, match="other|hash"):
        run_training(other, resume=True)
    run_training(make_config(data, run, "optim.epochs=1"), resume=True)
    with pytest.raises(CheckpointError, match="hash"):
        load_ranker(run, vectors=NewsVectors.load(data / "emb_other"))
    with pytest.raises(ConfigError, match="optim.lr"):
        run_training(make_config(data, run, "optim.lr=0.1"), resume=True)
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 3e-3


@pytest.fixture(scope="module")
def stopped_run(data, tmp_path_factory) -> Path:
    """A run stopped after 3 of its 20 steps."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    run_training(make_config(data, run, "run.stop_after=3"))
    return run


@pytest.mark.parametrize(
    "change",
    [
        "run.seed=1",
        "run.max_steps=12",
        "run.patience=1",
        "run.eval_every=4",
        "run.device=auto",
        "data.dev_impressions=10",
        "data.valid_split=last-day",
        "data.negatives=2",
        "optim.epochs=1",
        "optim.lr=0.1",
    ],
)
def test_resume_refuses_a_change_that_alters_the_run(data, stopped_run, change):
    before = (stopped_run / "last.pt").read_bytes(), (stopped_run / "config.json").read_text()
    with pytest.raises(ConfigError, match=f"cannot resume .*\\n  {change.split('=')[0]}: "):
        run_training(make_config(data, stopped_run, change), resume=True)
    assert before == (
        (stopped_run / "last.pt").read_bytes(),
        (stopped_run / "config.json").read_text(),
    )


def test_resume_allows_output_keys_and_more_epochs(data, tmp_path, one_thread):
    run = tmp_path / "run"
    run_training(make_config(data, run, "run.stop_after=3"))
    more = ("optim.epochs=3", "run.log_every=2", "run.progress=true")
    resumed = run_training(make_config(data, run, *more), resume=True)
    assert resumed.finished and resumed.step == 30
    assert json.loads((run / "config.json").read_text())["optim"]["epochs"] == 3


def test_resume_refuses_a_store_with_other_content(data, tmp_path):
    run = tmp_path / "run"
    run_training(make_config(data, run, "run.stop_after=3"))
    write_mind(tmp_path / "raw" / "train", 160, np.random.default_rng(5), clicks=2, first_day=11)
    write_mind(tmp_path / "raw" / "dev", 60, np.random.default_rng(6), clicks=1, first_day=15)
    other = build_store(tmp_path / "raw", tmp_path / "store")
    write_vectors(tmp_path / "emb", other.content_hash, seed=1, tag="vectors-a")  # same hash
    config = make_config(data, run)
    moved = {"store_dir": other.path, "vectors_dir": tmp_path / "emb"}
    config = config.model_copy(update={"data": config.data.model_copy(update=moved)})
    with pytest.raises(ConfigError, match="trained on a store with content hash"):
        run_training(config, resume=True)


@pytest.mark.parametrize("model", ["popularity", "random", "mean_cosine"])
def test_baselines_go_through_training(data, tmp_path, model):
    result = run_training(make_config(data, tmp_path / model, model=model))
    assert result.finished and result.step == 0
    assert set(result.best_metrics) >= {"auc", "mrr", "ndcg5", "ndcg10"}
    ranker = load_ranker(tmp_path / model)
    if model == "popularity":
        assert ranker.model.counts.sum() == 2 * 160  # train clicks, saved in the checkpoint
    if model == "mean_cosine":
        assert result.best_metrics["auc"] > 0.8


def test_signals_go_through_training_evaluation_and_prediction(data, tmp_path):
    from mmnewsrec.evaluate.experiment import evaluate_run, predict_run
    from mmnewsrec.formats.store import Store

    run = tmp_path / "signals"
    signals = '["popularity", "freshness"]'
    result = run_training(make_config(data, run, f"model.signals={signals}"))
    ranker = load_ranker(run)
    assert ranker.signal_names == ["popularity", "freshness"]
    train = Store.load(data / "store").signals("train", ranker.signal_names)
    head = ranker.model.signal_head
    torch.testing.assert_close(
        head.mean, torch.from_numpy(train.mean(axis=0)), rtol=1e-4, atol=1e-5
    )
    assert head.out.weight.abs().sum() > 0  # trained away from the content score
    metrics = evaluate_run(run)  # reads the store's dev signals
    assert metrics["auc"] == pytest.approx(result.best_metrics["auc"], abs=1e-6)
    prediction = predict_run(run, None, tmp_path / "prediction.txt", "dev")
    dev = Store.load(data / "store").behaviors("dev")
    check_prediction(prediction, dev, metrics, tmp_path)


def test_gbdt_trains_on_every_signal_and_the_content_cosine(data, tmp_path):
    from mmnewsrec.evaluate.experiment import evaluate_run
    from mmnewsrec.formats.store import SIGNAL_NAMES

    run = tmp_path / "gbdt"
    result = run_training(make_config(data, run, "model.args.rounds=30", model="gbdt"))
    assert result.finished and result.step == 0
    ranker = load_ranker(run)
    assert ranker.signal_names == list(SIGNAL_NAMES)
    assert ranker.model.booster.num_feature() == len(SIGNAL_NAMES) + 1
    assert result.best_metrics["auc"] > 0.8  # the content cosine alone separates topics
    assert evaluate_run(run)["auc"] == pytest.approx(result.best_metrics["auc"], abs=1e-6)


def test_signals_of_a_model_that_reads_none_are_refused(data, tmp_path):
    config = make_config(data, tmp_path / "r", 'model.signals=["popularity"]', model="random")
    with pytest.raises(ConfigError, match="random reads no signals"):
        run_training(config)
    with pytest.raises(ConfigError, match="unknown signals"):
        make_config(data, tmp_path / "r", 'model.signals=["clicks"]')


def test_categories_off_and_a_content_rank_go_through_training(data, tmp_path):
    from mmnewsrec.evaluate.experiment import evaluate_run

    run = tmp_path / "rank"
    cfg = make_config(data, run, "model.categories=false", "model.args.content_rank=3")
    result = run_training(cfg)
    ranker = load_ranker(run)
    model = ranker.model
    assert model.news_categories is None and model.model_args["category_names"] == []
    assert model.content_parts == [(0, model.news_dim, 3)]  # text vectors: one part
    assert model.feature_dim == 3 and model.content_basis.abs().sum() > 0
    assert evaluate_run(run)["auc"] == pytest.approx(result.best_metrics["auc"], abs=1e-6)


def test_pointwise_loss_trains(data, tmp_path):
    result = run_training(make_config(data, tmp_path / "pw", "data.loss=pointwise"))
    assert result.best_metrics["auc"] > 0.7


def test_cli_train(data, tmp_path):
    out = tmp_path / "cli"
    args = ["train", "--store", str(data / "store"), "--vectors", str(data / "emb")]
    args += ["--out", str(out), "--model", "popularity", "--set", "run.progress=false"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "finished" in result.output and (out / "checkpoint.pt").is_file()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--resume" in again.output


def test_ranking_loss_ignores_padding():
    scores = torch.tensor([[2.0, 1.0, 0.0], [0.5, 3.0, 9.0]])
    cands = torch.tensor([[5, 6, 7], [5, 6, 0]])
    labels = torch.tensor([[1.0, 0, 0], [1.0, 0, 0]])
    batch = Batch(torch.zeros(2, 1, dtype=torch.long), cands, labels)
    expected = -(torch.log_softmax(scores[0], 0)[0] + torch.log_softmax(scores[1, :2], 0)[0]) / 2
    assert ranking_loss(scores, batch, "listwise").item() == pytest.approx(expected.item())
    bce = torch.nn.functional.binary_cross_entropy_with_logits(scores[cands > 0], labels[cands > 0])
    assert ranking_loss(scores, batch, "pointwise").item() == pytest.approx(bce.item())


def test_lr_schedule():
    f = [lr_factor(s, 10, 100, "cosine", 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:], strict=False)) and f[99] > 0.1
    assert lr_factor(55, 10, 100, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(90, 0, 100, "constant", 0.0) == 1.0


def on_device_only(collective, device: torch.device):
    """`collective` refusing tensors off `device`, as NCCL refuses CPU tensors."""

    def call(*args, **kwargs):
        for arg in (*args, *kwargs.values()):
            for t in arg if isinstance(arg, list) else [arg]:
                if isinstance(t, torch.Tensor) and t.device != device:
                    raise RuntimeError(
                        f"{collective.__name__}: a tensor on {t.device}, not {device}"
                    )
        return collective(*args, **kwargs)

    return call


def default_device_meta(method):
    """`method` run with 'meta' as the default device: a tensor made without the run's device
    lands there instead of on the run's device."""

    def call(*args, **kwargs):
        with torch.device("meta"):
            return method(*args, **kwargs)

    return call


def check_collective_devices(monkeypatch, device: torch.device) -> None:
    """Make every collective of the recipe refuse tensors off `device`."""
    for name in ("broadcast", "all_reduce", "all_gather"):
        monkeypatch.setattr(dist, name, on_device_only(getattr(dist, name), device))
    for name in ("_evaluate_and_track", "_log_window"):
        monkeypatch.setattr(TrainRecipe, name, default_device_meta(getattr(TrainRecipe, name)))


def test_one_process_under_torchrun_runs_a_process_group_with_collectives_on_its_device(
    data, tmp_path, monkeypatch
):
    common = ("optim.epochs=2", "run.eval_every=4", "run.patience=2")
    single = run_training(make_config(data, tmp_path / "single", *common))
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for key, value in (env | {"MASTER_PORT": str(free_port())}).items():
        monkeypatch.setenv(key, value)
    check_collective_devices(monkeypatch, torch.device("cpu"))
    backends = []
    make_group = dist.init_process_group
    monkeypatch.setattr(
        dist, "init_process_group", lambda **kw: backends.append(kw["backend"]) or make_group(**kw)
    )
    grouped = run_training(make_config(data, tmp_path / "group", *common))
    assert backends == ["gloo"] and not dist.is_initialized(), "made at world size 1, then freed"
    evals = [float(r["auc"]) for r in read_log(tmp_path / "group") if r["auc"]]
    assert len(evals) >= 3 and grouped.step == single.step
    assert evals == pytest.approx(
        [float(r["auc"]) for r in read_log(tmp_path / "single") if r["auc"]], abs=1e-6
    )


def ddp_worker(rank: int, world: int, port: int, config: dict, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    info = DistInfo.from_env()
    device = torch.device("cpu")
    init_distributed(device, info)
    recipe = TrainRecipe(TrainConfig.model_validate(config), device, info)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            check_collective_devices(monkeypatch, device)
            recipe.setup()
            recipe.train()
        torch.save(recipe.model.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        recipe.cleanup()


def exclude_zero_gradient(key: str, value: torch.Tensor) -> torch.Tensor:
    """Drop the weights whose true gradient is exactly 0 under softmax cross-entropy: the final
    score bias (a shift of every score), the signal head's additive bias and its linear weight
    on history_len, a signal equal for all of an impression's candidates (the same shift), and
    attention key biases (a shift of every logit). Adam turns rounding noise in their gradients
    into full steps, so they differ between any two summation orders."""
    if key == "head.3.bias":
        return value[:0]
    if key == "signal_head.out.bias":  # (gate logit, bias): keep the gate's
        return value[:1]
    if key == "signal_head.linear.weight":  # rows (gate logit, bias) x signals
        keep = torch.ones_like(value, dtype=torch.bool)
        keep[1, SIGNAL_NAMES.index("history_len")] = False
        return value[keep]
    if key.endswith("in_proj_bias"):
        q, _, v = value.chunk(3)
        return torch.cat([q, v])
    return value


@pytest.mark.slow
def test_ddp_two_processes_match_one_with_the_same_global_batch(data, tmp_path):
    common = ("optim.epochs=1", "run.eval_every=4", "run.patience=0")
    torch.set_num_threads(1)  # put back by conftest's keep_torch_threads
    run_training(make_config(data, tmp_path / "single", *common))
    cfg = make_config(data, tmp_path / "ddp", *common).to_dict()
    mp.spawn(ddp_worker, args=(2, free_port(), cfg, str(tmp_path)), nprocs=2, join=True)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = final_weights(tmp_path / "single")
    saved = final_weights(tmp_path / "ddp")
    for key in single:
        # The ranks step with one all-reduced gradient, so their weights are bit-equal; the
        # single process sums the same gradient in another order, so it matches to a tolerance.
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert torch.equal(ranks[0][key], saved[key]), key
        ddp, one = (
            exclude_zero_gradient(key, ranks[0][key]),
            exclude_zero_gradient(key, single[key]),
        )
        torch.testing.assert_close(ddp, one, rtol=1e-4, atol=1e-6, msg=key)
    assert [float(r["auc"]) for r in read_log(tmp_path / "ddp") if r["auc"]] == pytest.approx(
        [float(r["auc"]) for r in read_log(tmp_path / "single") if r["auc"]], abs=1e-3
    )
