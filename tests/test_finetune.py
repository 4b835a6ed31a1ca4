"""Fine-tuning the text encoder's top layers with a ranker (`model.finetune_layers`), on the
shipped MiniLM and the quick synthetic data."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, with_random_image_part

from mmnewsrec.config import ConfigError, TrainConfig, load_config
from mmnewsrec.data.store import build_store
from mmnewsrec.data.synthetic import SynthConfig, generate
from mmnewsrec.encode import finetune
from mmnewsrec.encode.base import model_identity
from mmnewsrec.encode.finetune import TextTower, load_sentence_model, token_states
from mmnewsrec.encode.pipeline import EncodeConfig, encode_store, news_texts
from mmnewsrec.encode.text import text_model_path
from mmnewsrec.formats.runs import CheckpointError, read_checkpoint
from mmnewsrec.formats.store import Store
from mmnewsrec.formats.vectors import NewsVectors
from mmnewsrec.rank import news_encoder
from mmnewsrec.rank.distributed import DistInfo, init_distributed
from mmnewsrec.rank.news_encoder import STATES_DIR, FineTunedRanker
from mmnewsrec.rank.ranker import load_ranker
from mmnewsrec.rank.train import TrainRecipe, run_training

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_identity() -> dict:
    """The identity token_states keys its cache by."""
    return model_identity(MINILM, text_model_path(MINILM))


IMAGE_DIM = 8
TINY = {"d_model": 32, "n_heads": 2, "d_ff": 64, "n_layers": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Quick synthetic store; MiniLM text vectors (emb) and the same text part concatenated
    with a random 'image' part (emb_concat)."""
    root = tmp_path_factory.mktemp("finetune")
    generate(root / "data", SynthConfig.quick())
    build_store(root / "data", root / "store")
    text = encode_store(root / "store", root / "emb", EncodeConfig(image_encoder="none"))
    with_random_image_part(text, root / "emb_concat", IMAGE_DIM)
    return root


def train_config(data: Path, out: Path, *overrides: str, vectors: str = "emb"):
    values = {
        "data.store_dir": data / "store",
        "data.vectors_dir": data / vectors,
        "run.out_dir": out,
    }
    base = [
        "model.finetune_layers=1",
        "model.finetune_lr=1e-3",
        "data.history_len=8",
        "data.dev_impressions=40",
        "optim.batch_size=16",
        "optim.epochs=1",
        "run.max_steps=4",
        "run.eval_each_epoch=false",
        "run.progress=false",
        "run.device=cpu",
        *[f"model.args.{k}={v}" for k, v in TINY.items()],
    ]
    return load_config(None, [*base, *overrides], values)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    """A fine-tuned run on the concatenated vectors, selected on the whole dev split."""
    out = tmp_path_factory.mktemp("run") / "run"
    selection = ("data.valid_split=dev", "data.dev_impressions=0")
    run_training(train_config(data, out, *selection, vectors="emb_concat"))
    return out


@pytest.fixture(scope="module")
def minilm():
    return load_sentence_model(MINILM)


def texts(data: Path) -> list[str]:
    return news_texts(
        Store.load(data / "store").news, ["category", "subcategory", "title"]
    ).to_list()


def test_the_tower_starts_at_the_frozen_vectors(data, minilm):
    store = Store.load(data / "store")
    cache = data / "cache"
    args = (minilm, minilm_identity(), texts(data), store.content_hash)
    states = token_states(*args, 2, 32, cache, "cpu")
    tower = TextTower(minilm, 2).eval()
    with torch.no_grad():
        out = tower(*states.rows(torch.arange(1, store.num_news + 1)))
    frozen = NewsVectors.load(data / "emb").vectors[1:].astype(np.float32)
    np.testing.assert_allclose(out.numpy(), frozen, atol=2e-3)  # float16 states and vectors


def test_token_states_are_cached_once_per_model_split_and_length(data, minilm, monkeypatch):
    store = Store.load(data / "store")
    cache = data / "cache-keys"
    args = (minilm, minilm_identity(), texts(data), store.content_hash)
    first = token_states(*args, 1, 16, cache, "cpu")
    assert first.states.dtype == np.float16 and first.states.shape[0] == store.num_news + 1
    assert first.states.shape[1:] == (16, 384)
    assert not np.any(first.states[0]) and first.lengths[0] == 0
    assert first.lengths[1:].min() >= 3 and first.lengths.max() <= 16

    def no_work(*args, **kwargs):
        raise AssertionError("recomputed cached token states")

    monkeypatch.setattr("mmnewsrec.encode.finetune.write_states", no_work)
    again = token_states(*args, 1, 16, cache, "cpu")
    assert again.manifest == first.manifest
    with pytest.raises(AssertionError, match="recomputed"):
        token_states(*args, 2, 16, cache, "cpu")  # another split layer: another key
    with pytest.raises(AssertionError, match="recomputed"):
        token_states(*args, 1, 24, cache, "cpu")


def test_each_distinct_news_of_a_batch_goes_through_the_tower_once(data, tmp_path, monkeypatch):
    recipe = TrainRecipe(train_config(data, tmp_path / "r"), torch.device("cpu"))
    recipe.setup()
    model = recipe.model
    assert isinstance(model, FineTunedRanker)
    seen = []
    forward = TextTower.forward

    def counting(self, states, lengths):
        seen.append(len(lengths))
        return forward(self, states, lengths)

    monkeypatch.setattr(TextTower, "forward", counting)
    batch = next(iter(recipe.loader))
    model.train()
    scores = model(batch.history, batch.candidates, batch.signals)
    ids = torch.cat([batch.history.flatten(), batch.candidates.flatten()])
    assert seen == [len(torch.unique(ids[ids > 0]))]
    # the same scores as the ranker on the full table (dropout off)
    model.eval()
    np.testing.assert_allclose(
        model(batch.history, batch.candidates, batch.signals).detach().numpy(),
        model.with_table(
            model.full_table(),
            model.ranker.has_image,
            batch.history,
            batch.candidates,
            batch.signals,
        )
        .detach()
        .numpy(),
        atol=1e-5,
    )
    assert scores.requires_grad


def test_the_run_trains_the_text_part_and_writes_its_own_vectors(data, run):
    source = NewsVectors.load(data / "emb_concat")
    tuned = NewsVectors.load(run / "vectors")
    assert tuned.manifest["finetuned"]["layers"] == 1
    assert tuned.hash != source.hash and tuned.vectors.shape == source.vectors.shape
    text_dim = source.dim - IMAGE_DIM
    moved = np.abs(tuned.vectors[1:, :text_dim].astype(np.float32) - source.vectors[1:, :text_dim])
    assert moved.max() > 1e-2
    np.testing.assert_array_equal(tuned.vectors[:, text_dim:], source.vectors[:, text_dim:])
    flat = source.vectors[1:, :text_dim].astype(np.float32).std(axis=0) < 1e-4
    assert flat.any()  # MiniLM leaves a few dimensions constant over these news
    np.testing.assert_allclose(  # pinned to their mean
        tuned.vectors[1:, :text_dim][:, flat], source.vectors[1:, :text_dim][:, flat], atol=1e-6
    )
    np.testing.assert_array_equal(tuned.has_image, source.has_image)
    ranker = load_ranker(run)
    assert Path(ranker.config.data.vectors_dir) == run / "vectors"
    assert ranker.vectors_hash == tuned.hash
    assert (data / "emb_concat" / STATES_DIR).is_dir()


def test_the_runs_text_encoder_encodes_new_news_as_its_vectors(data, run):
    from mmnewsrec.encode.text import SentenceEncoder

    encoder = SentenceEncoder(str(run / "text_encoder"))
    tuned = NewsVectors.load(run / "vectors")
    got = encoder.encode(texts(data)[:20])
    constant = json.loads((run / "text_encoder" / "manifest.json").read_text())["constant_dims"]
    got[:, constant["dims"]] = constant["values"]
    np.testing.assert_allclose(got, tuned.vectors[1:21, : encoder.dim], atol=2e-3)


def test_evaluate_and_serve_use_the_runs_vectors(data, run):
    from mmnewsrec.evaluate.experiment import evaluate_run
    from mmnewsrec.serve.recommender import Recommender

    metrics = evaluate_run(run)
    # the plain ranker on the exported vectors scores dev as the training's selection did
    selected = read_checkpoint(run / "checkpoint.pt")["metrics"]
    assert metrics["auc"] == pytest.approx(selected["auc"], abs=2e-3)
    recommender = Recommender.from_run(run, recall_k=20)
    assert recommender.vectors.hash == NewsVectors.load(run / "vectors").hash
    # a dev history: the served top 5 are the recalled 20 ordered by the ranker's own scores
    # on the run's exported vectors
    store = recommender.store
    dev = store.behaviors("dev")
    history = next(h for h in map(dev.history, range(dev.num_impressions)) if len(h) >= 3)
    news_ids = store.news["news_id"].to_numpy()
    served = recommender.recommend(news_ids[history - 1].tolist(), k=5).items
    ranker = load_ranker(run, vectors=NewsVectors.load(run / "vectors"))
    used = history[-ranker.history_len :]
    _, recalled = recommender.recaller.search_one(used, 20, np.unique(history))
    signals = recommender.signal_source(history, recalled)  # after the store's logs
    scores = ranker.score_items(used, recalled, width=len(recalled), signals=signals)
    best = np.argsort(-scores, kind="stable")[:5]
    assert [item.news_id for item in served] == news_ids[recalled[best] - 1].tolist()
    assert [item.stage for item in served] == ["rerank"] * 5
    np.testing.assert_allclose([item.score for item in served], scores[best], rtol=1e-4, atol=1e-5)


def test_the_fine_tuned_path_runs_under_bf16_autocast_with_fp32_outputs(data, tmp_path):
    """The mixed precision that training and scoring use on CUDA (CPU has no autocast in the
    recipe; its bf16 autocast runs the same code path here)."""
    recipe = TrainRecipe(train_config(data, tmp_path / "r"), torch.device("cpu"))
    recipe.setup()
    model, batch = recipe.model, next(iter(recipe.loader))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model(batch.history, batch.candidates, batch.signals)
    assert scores.dtype == torch.float32
    scores.logsumexp(dim=1).sum().backward()
    grads = [p.grad for p in model.text.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and g.isfinite().all() for g in grads)
    model.eval()
    with torch.inference_mode():
        exact_table, exact = (
            model.full_table(),
            model(batch.history, batch.candidates, batch.signals),
        )
    exact_stats = model.mean.clone(), model.scale.clone()
    model.eval()  # drops the table: the next one is computed under autocast, in fp32
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model(batch.history, batch.candidates, batch.signals)
        table = model.table
    assert table is not None and table.dtype == scores.dtype == torch.float32
    torch.testing.assert_close(table, exact_table, rtol=1e-6, atol=1e-6)  # what the export writes
    torch.testing.assert_close((model.mean, model.scale), exact_stats, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scores, exact, rtol=0.1, atol=0.1)  # bf16 body, close to fp32


@pytest.mark.parametrize(
    ("override", "vectors", "message"),
    [
        ("model.finetune_layers=7", "emb", "has 6 layers"),
        ("model.name=mean_cosine", "emb", "no weights to train"),
        ("model.text_encoder=bert-base-uncased", "emb", "not the model"),
        ("model.finetune_layers=1", "emb_mean", "fusion 'text' or 'concat'"),
    ],
)
def test_what_cannot_be_fine_tuned_is_refused(data, tmp_path, override, vectors, message):
    if vectors == "emb_mean":
        source = NewsVectors.load(data / "emb")
        manifest = source.manifest | {"fusion": {"method": "mean", "text_dim": 384}}
        NewsVectors(np.array(source.vectors), np.array(source.has_image), manifest).save(
            data / "emb_mean"
        )
    config = train_config(data, tmp_path / "r", override, vectors=vectors)
    with pytest.raises(ConfigError, match=message):
        TrainRecipe(config, torch.device("cpu")).setup()


def test_a_gbdt_asked_to_fine_tune_is_refused_before_it_is_fitted(data, tmp_path, monkeypatch):
    def no_fit(*args):
        raise AssertionError("fitted a model that cannot be fine-tuned")

    monkeypatch.setattr(TrainRecipe, "_fit_gbdt", no_fit)
    config = train_config(data, tmp_path / "r", "model.name=gbdt")
    with pytest.raises(ConfigError, match="gbdt has no weights to train"):
        TrainRecipe(config, torch.device("cpu")).setup()


def test_a_stopped_fine_tuning_run_resumes_to_the_same_weights(data, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(train_config(data, tmp_path / "full"))
        run_training(train_config(data, tmp_path / "cut", "run.stop_after=2"))
        run_training(train_config(data, tmp_path / "cut"), resume=True)
    finally:
        torch.set_num_threads(threads)
    full, cut = (
        torch.load(p / "last.pt", weights_only=True) for p in (tmp_path / "full", tmp_path / "cut")
    )
    assert any(k.startswith("text.layers.") for k in full["model"])
    for key in full["model"]:
        assert torch.equal(full["model"][key], cut["model"][key]), key
    np.testing.assert_array_equal(
        NewsVectors.load(tmp_path / "full" / "vectors").vectors,
        NewsVectors.load(tmp_path / "cut" / "vectors").vectors,
    )


def test_a_checkpoint_before_the_export_is_refused_with_what_to_run(data, tmp_path):
    out = tmp_path / "cut"
    selected = ("run.eval_every=1", "data.valid_split=dev")  # a checkpoint.pt before the end
    run_training(train_config(data, out, "run.stop_after=2", *selected))
    assert "finetune" in read_checkpoint(out / "checkpoint.pt")  # selected, not exported
    with pytest.raises(
        CheckpointError, match="before the run's news vectors were exported.*--resume"
    ):
        load_ranker(out)
    run_training(train_config(data, out, *selected), resume=True)
    assert load_ranker(out).vectors_hash == NewsVectors.load(out / "vectors").hash


def test_the_tower_has_its_own_learning_rate_and_clipping(data, tmp_path):
    recipe = TrainRecipe(train_config(data, tmp_path / "r", "optim.lr=3e-3"), torch.device("cpu"))
    recipe.setup()
    tower = {id(p) for p in recipe.model.text.parameters()}
    groups = recipe.optimizer.param_groups
    assert [g["initial_lr"] for g in groups] == [3e-3, 3e-3, 1e-3]
    assert {id(p) for p in groups[-1]["params"]} == tower
    assert not tower & {id(p) for g in groups[:-1] for p in g["params"]}
    # clipped apart: the tower's gradient norm is thousands of times the ranker's
    assert [{id(p) for p in params} for params in recipe.clip_groups][1] == tower


def test_a_fine_tuned_ranker_reads_the_behaviour_signals(data, tmp_path):
    from mmnewsrec.evaluate.experiment import evaluate_run

    out = tmp_path / "signals"
    selection = ("data.valid_split=dev", "data.dev_impressions=0")
    run_training(train_config(data, out, 'model.signals=["popularity", "freshness"]', *selection))
    ranker = load_ranker(out)
    assert ranker.signal_names == ["popularity", "freshness"]
    assert ranker.model.signal_head.out.weight.abs().sum() > 0  # trained through the wrapper
    selected = read_checkpoint(out / "checkpoint.pt")["metrics"]
    assert evaluate_run(out)["auc"] == pytest.approx(selected["auc"], abs=2e-3)


def ddp_worker(rank: int, world: int, port: int, config: dict, out: str) -> None:
    """One rank of a fine-tuning run: saves its final weights, its table of every news item and
    how often it wrote the token states and the run's vectors."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    info, device = DistInfo.from_env(), torch.device("cpu")
    init_distributed(device, info)
    recipe = TrainRecipe(TrainConfig.model_validate(config), device, info)
    writes = {"write_states": 0, "export_run": 0}
    try:
        with pytest.MonkeyPatch.context() as patch:
            count_calls(patch, finetune, "write_states", writes)
            count_calls(patch, news_encoder, "export_run", writes)
            recipe.setup()
            recipe.train()
        model = recipe.model.eval()
        state = {"model": model.state_dict(), "table": model.full_table(), "writes": writes}
        torch.save(state, Path(out) / f"rank{rank}.pt")
    finally:
        recipe.cleanup()


def count_calls(patch: pytest.MonkeyPatch, module, name: str, counts: dict[str, int]) -> None:
    """Count the calls of module.name in counts[name]."""
    function = getattr(module, name)

    def call(*args, **kwargs):
        counts[name] += 1
        return function(*args, **kwargs)

    patch.setattr(module, name, call)


@pytest.mark.slow
def test_ddp_ranks_train_the_same_tower_and_rank_0_writes_the_run(data, tmp_path):
    """Two gloo processes: one all-reduced gradient per step, so both ranks end with bit-equal
    tower and ranker weights; rank 0 alone caches the token states and exports the run."""
    source = NewsVectors.load(data / "emb")  # a copy: no token states cached beside it yet
    NewsVectors(np.array(source.vectors), np.array(source.has_image), source.manifest).save(
        data / "emb_ddp"
    )
    out = tmp_path / "run"
    selection = ("data.valid_split=dev", "model.args.dropout=0.1")
    config = train_config(data, out, *selection, vectors="emb_ddp").to_dict()
    mp.spawn(ddp_worker, args=(2, free_port(), config, str(tmp_path)), nprocs=2, join=True)

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["writes"] for r in ranks] == [
        {"write_states": 1, "export_run": 1},
        {"write_states": 0, "export_run": 0},
    ]
    weights = [r["model"] for r in ranks]
    assert any(k.startswith("text.layers.") for k in weights[0])
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    tuned = NewsVectors.load(out / "vectors")  # rank 0's export: the weights both ranks hold
    assert tuned.manifest["finetuned"]["step"] == 4
    np.testing.assert_array_equal(tuned.vectors, ranks[1]["table"].numpy().astype(np.float16))
    moved = np.abs(tuned.vectors[1:].astype(np.float32) - source.vectors[1:])
    assert moved.max() > 1e-2
