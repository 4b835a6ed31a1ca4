import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmnewsrec.formats.store import Behaviors
from mmnewsrec.rank.model import (
    MODELS,
    PRESETS,
    FastRecTransformerConfig,
    NewsProjection,
    PopularityRanker,
    RankingTable,
    RecTransformerConfig,
    build_model,
    click_counts,
    model_config,
)

NEURAL = ["rec_transformer", "fast_rec_transformer", "additive_attention"]
TINY = {"d_model": 32, "n_heads": 4, "dropout": 0.0, "max_history": 8}


def tiny(name: str) -> dict:
    """A small config for a model name (baselines take none)."""
    if name == "gbdt":
        return {"rounds": 20, "min_data_in_leaf": 5}
    if name not in NEURAL:
        return {}
    extra = {"n_layers": 1, "d_ff": 64} if "transformer" in name else {"query_dim": 32}
    return TINY | extra


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster, and steadier on a busy machine, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def vectors() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    v = torch.randn(61, 16, generator=g)
    v[0] = 0
    return v


@pytest.fixture
def has_image() -> torch.Tensor:
    flags = torch.arange(61) % 3 != 0
    flags[0] = False
    return flags


def content_table(features: int = 1, rows: int = 400) -> RankingTable:
    """Impressions of 8 candidates whose clicks follow the features' sum."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, features))
    labels = x.sum(axis=1) + rng.normal(size=rows) > 1.0
    return RankingTable(x, labels, np.arange(0, rows + 1, 8))


def make(name, vectors, has_image, **overrides):
    torch.manual_seed(0)
    model = build_model(name, tiny(name) | overrides, vectors, has_image)
    if name == "gbdt":
        model.fit(content_table(1 + len(overrides.get("signals", []))), None)
    return model.eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shapes_finite_and_padding_candidates(name, vectors, has_image):
    model = make(name, vectors, has_image)
    history = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5], [0, 0, 0, 0, 0]])
    candidates = torch.tensor([[7, 8, 9, 0], [10, 11, 0, 0], [12, 13, 14, 15]])
    scores = model(history, candidates)
    assert scores.shape == (3, 4)
    assert scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    assert (scores[candidates == 0] == 0).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_left_padding_does_not_change_scores(name, vectors, has_image):
    model = make(name, vectors, has_image)
    history = torch.tensor([[3, 4, 5], [6, 7, 8]])
    padded = F.pad(history, (4, 0))
    candidates = torch.tensor([[9, 10, 11], [12, 13, 14]])
    expected = model(history, candidates)
    torch.testing.assert_close(model(padded, candidates), expected)
    with torch.no_grad():  # the encoder's inference fast path must mask the same way
        torch.testing.assert_close(model(padded, candidates), expected)
        assert torch.isfinite(model(torch.zeros_like(padded), candidates)).all()


@pytest.mark.parametrize("name", NEURAL + ["mean_cosine", "random"])
def test_history_change_in_one_row_leaves_other_rows(name, vectors, has_image):
    model = make(name, vectors, has_image)
    history = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    candidates = torch.tensor([[9, 10], [11, 12]])
    before = model(history, candidates)
    changed = history.clone()
    changed[0, :2] = 0  # row 0: two clicks fewer, more padding
    after = model(changed, candidates)
    torch.testing.assert_close(after[1], before[1])
    assert not torch.allclose(after[0], before[0])


@pytest.mark.parametrize("name", NEURAL)
def test_empty_history_is_finite_in_training(name, vectors, has_image):
    model = make(name, vectors, has_image).train()
    history = torch.zeros(2, 6, dtype=torch.long)
    candidates = torch.tensor([[1, 2, 3], [4, 5, 6]])
    scores = model(history, candidates)
    assert torch.isfinite(scores).all()
    F.cross_entropy(scores, torch.tensor([0, 1])).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    no_history = model.embed.no_history if hasattr(model, "embed") else model.no_history
    assert no_history.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cached_news_tokens_give_the_same_scores(name, vectors, has_image):
    model = make(name, vectors, has_image).eval()
    history = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    candidates = torch.tensor([[10, 11, 12, 0], [14, 15, 16, 17]])
    with torch.no_grad():
        expected = model(history, candidates)
        cached = model.cache_news_tokens()(history, candidates)
    torch.testing.assert_close(cached, expected)  # other batch shapes: float32 tolerance
    encoders = [m for m in model.modules() if isinstance(m, NewsProjection)]
    assert all(m.cached is not None and len(m.cached) == len(vectors) for m in encoders)
    model.train()  # weights may change again: the cache is dropped
    assert all(m.cached is None for m in encoders)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_candidates_are_scored_independently(name, vectors, has_image):
    model = make(name, vectors, has_image)
    history = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    candidates = torch.tensor([[10, 11, 12, 13], [14, 15, 16, 17]])
    before = model(history, candidates)
    changed = candidates.clone()
    changed[:, 1] = torch.tensor([30, 31])
    after = model(history, changed)
    keep = [0, 2, 3]
    torch.testing.assert_close(after[:, keep], before[:, keep])
    perm = torch.tensor([3, 1, 0, 2])
    torch.testing.assert_close(model(history, candidates[:, perm]), before[:, perm])


@pytest.mark.parametrize("name", ["rec_transformer", "fast_rec_transformer"])
def test_only_the_last_max_history_clicks_count(name, vectors, has_image):
    model = make(name, vectors, has_image)  # max_history 8
    history = torch.arange(1, 13).unsqueeze(0)  # 12 clicks
    candidates = torch.tensor([[20, 21]])
    older = history.clone()
    older[0, :4] = torch.tensor([40, 41, 42, 43])
    torch.testing.assert_close(model(older, candidates), model(history, candidates))
    recent = history.clone()
    recent[0, -1] = 44
    assert not torch.allclose(model(recent, candidates), model(history, candidates))


def test_missing_image_flag_changes_the_score(vectors, has_image):
    model = make("fast_rec_transformer", vectors, has_image)
    with torch.no_grad():
        model.embed.news.no_image.copy_(torch.randn(32))  # not constant: LayerNorm follows
    history, candidates = torch.tensor([[1, 2]]), torch.tensor([[4, 5]])  # 4 has an image
    before = model(history, candidates)
    model.has_image[4] = False
    after = model(history, candidates)
    assert not torch.isclose(after[0, 0], before[0, 0])
    torch.testing.assert_close(after[0, 1], before[0, 1])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_args_round_trip_without_vectors_in_state(name, vectors, has_image):
    model = make(name, vectors, has_image)
    state = model.state_dict()
    assert "news_vectors" not in state and "has_image" not in state
    rebuilt = build_model(name, model.model_args, vectors, has_image).eval()
    rebuilt.load_state_dict(state)
    history, candidates = torch.tensor([[0, 1, 2]]), torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(rebuilt(history, candidates), model(history, candidates))


def test_presets_and_config_errors():
    seed = model_config("rec_transformer", {"preset": "seed"})
    assert seed == RecTransformerConfig(d_model=768, n_layers=4, n_heads=8, d_ff=1024, dropout=0.1)
    gpu = model_config("fast-rec-transformer", {"preset": "gpu", "dropout": 0.2})
    assert isinstance(gpu, FastRecTransformerConfig)
    assert (gpu.d_model, gpu.n_layers, gpu.dropout) == (PRESETS["gpu"]["d_model"], 4, 0.2)
    assert model_config("additive_attention", {"preset": "seed"}).d_model == 768
    assert model_config("fast_rec_transformer") == FastRecTransformerConfig()
    with pytest.raises(ValueError, match="unknown config keys"):
        model_config("rec_transformer", {"d_modl": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        model_config("rec_transformer", {"preset": "tpu"})
    with pytest.raises(ValueError, match="unknown model"):
        build_model("transformer", None, torch.zeros(3, 2))
    with pytest.raises(TypeError):
        model_config("rec_transformer", FastRecTransformerConfig())


def test_news_vectors_are_a_frozen_buffer(vectors, has_image):
    model = make("additive_attention", vectors, has_image).train()
    assert all(p.data_ptr() != model.news_vectors.data_ptr() for p in model.parameters())
    model(torch.tensor([[1, 2]]), torch.tensor([[3, 4]])).sum().backward()
    assert model.news_vectors.grad is None
    with pytest.raises(ValueError, match="has_image"):
        build_model("random", None, vectors, has_image[:-1])


@pytest.mark.parametrize("name", NEURAL)
def test_scale_of_each_input_dimension_does_not_matter(name, vectors, has_image):
    """Inputs are standardised per dimension, so rescaling one part of a concatenated vector
    (e.g. image features on another scale than text) leaves the scores unchanged."""
    scaled = vectors.clone()
    scaled[:, 8:] = scaled[:, 8:] * 25.0 + 3.0
    history, candidates = torch.tensor([[0, 5, 9, 2]]), torch.tensor([[1, 7, 0, 40]])
    with torch.no_grad():
        expected = make(name, vectors, has_image)(history, candidates)
        got = make(name, scaled, has_image)(history, candidates)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def topic_problem(n_rows: int, seed: int = 0):
    """News of 4 topics; the clicked candidate (column 0 of 5) shares the history's topic."""
    g = torch.Generator().manual_seed(seed)
    topics = torch.arange(200) % 4  # news index r + 1 has topic r % 4
    centres = torch.randn(4, 16, generator=g)
    vectors = F.pad(centres[topics] + 0.5 * torch.randn(200, 16, generator=g), (0, 0, 1, 0))

    def draw(topic: torch.Tensor) -> torch.Tensor:
        return topic + 1 + 4 * torch.randint(0, 50, topic.shape, generator=g)

    user = torch.randint(0, 4, (n_rows, 1), generator=g)
    history = draw(user.expand(n_rows, 6))
    history[:, :2] *= (torch.rand(n_rows, 2, generator=g) > 0.5).long()  # some left padding
    negative_topics = (user + torch.randint(1, 4, (n_rows, 4), generator=g)) % 4
    return vectors, history, torch.cat([draw(user), draw(negative_topics)], dim=1)


def pairwise_auc(scores: torch.Tensor) -> float:
    """Share of (positive, negative) pairs ranked right; the positive is column 0."""
    return (scores[:, :1] > scores[:, 1:]).float().mean().item()


@pytest.mark.parametrize("name", ["rec_transformer", "fast_rec_transformer", "additive_attention"])
def test_overfits_a_topic_problem(name):
    vectors, history, candidates = topic_problem(256)
    torch.manual_seed(0)
    model = build_model(name, tiny(name), vectors)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    target = torch.zeros(64, dtype=torch.long)
    for step in range(120):
        rows = torch.arange(step * 64, step * 64 + 64) % 256
        loss = F.cross_entropy(model(history[rows], candidates[rows]), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        auc = pairwise_auc(model.eval()(history, candidates))
    assert auc > 0.97, (name, auc, loss.item())


def test_random_ranker_is_deterministic_and_seeded(vectors):
    history = torch.tensor([[0, 1, 2], [3, 4, 5]])
    candidates = torch.arange(1, 41).view(2, 20)
    a = build_model("random", None, vectors)(history, candidates)
    b = build_model("random", {"seed": 0}, vectors)(history, candidates)
    c = build_model("random", {"seed": 1}, vectors)(history, candidates)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert ((a >= 0) & (a < 1)).all() and a.std() > 0.15
    assert not build_model("random", None, vectors).trainable


def test_random_ranker_is_at_chance_on_a_large_synthetic_dev(tmp_path):
    """5,000 dev impressions (AUC's spread over seeds ~0.005) whose clicks follow the synthetic
    click model: ordering them by news index alone already gives AUC 0.56."""
    from mmnewsrec.data.store import build_store
    from mmnewsrec.data.synthetic import SynthConfig, generate
    from mmnewsrec.metrics import evaluate_scores
    from mmnewsrec.rank.ranker import score_behaviors

    synth = SynthConfig(news=500, users=600, impressions=10_000, dev_share=0.5, image_share=0)
    generate(tmp_path / "data", synth)
    store = build_store(tmp_path / "data", tmp_path / "store")
    dev = store.behaviors("dev")
    assert dev.num_impressions == 5000
    model = build_model("random", None, np.zeros((store.num_news + 1, 8), np.float32))
    scores = score_behaviors(model, dev, 8, torch.device("cpu"), 4096)
    auc = evaluate_scores(scores, dev.candidate_labels, dev.candidate_offsets)["auc"]
    assert auc == pytest.approx(0.5, abs=0.02)


def test_popularity_orders_by_train_clicks(vectors):
    behaviors = Behaviors(
        split="train",
        labelled=True,
        impression_ids=np.array([1, 2]),
        user_index=np.array([0, 1]),
        times=np.array([0, 0]),
        history_offsets=np.array([0, 0, 0]),
        history_items=np.array([], dtype=np.int32),
        candidate_offsets=np.array([0, 3, 6]),
        candidate_items=np.array([5, 6, 7, 5, 6, 8]),
        candidate_labels=np.array([1, 1, 0, 1, 0, 0]),
    )
    counts = click_counts(behaviors, num_news=60)
    assert counts.shape == (61,) and counts[5] == 2 and counts[6] == 1 and counts[7] == 0
    model = build_model("popularity", None, vectors).fit_counts(counts)
    scores = model(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[7, 6, 5]]))
    assert scores.argsort(descending=True).tolist() == [[2, 1, 0]]
    assert "counts" in model.state_dict()
    again = PopularityRanker(model.config, vectors, counts=counts)
    torch.testing.assert_close(again.counts, model.counts)


@pytest.mark.parametrize("gamma", [None, 0.5])
@pytest.mark.parametrize("text_dim", [0, 6])
def test_mean_cosine_scores_in_the_recall_space(gamma, text_dim, vectors):
    from mmnewsrec.recall import Part, RecallSpace

    args = {"recency_weighting": gamma, "text_dim": text_dim}
    model = build_model("mean_cosine", args, vectors)
    dim = vectors.shape[1]
    parts = (Part("text", 0, text_dim), Part("image", text_dim, dim)) if text_dim else None
    space = RecallSpace(parts or (Part("all", 0, dim),), weights={"image": 0.5}).fit(vectors)
    rows = space.rows(vectors, torch.arange(len(vectors)))  # centred, unit parts, image x 0.5
    history = torch.tensor([[0, 1, 2, 3]])
    candidates = torch.tensor([[4, 5, 6]])
    weights = torch.tensor([1.0, 1.0, 1.0]) if gamma is None else torch.tensor([0.25, 0.5, 1.0])
    user = F.normalize((weights[:, None] * rows[1:4]).sum(0), dim=0)
    torch.testing.assert_close(model(history, candidates)[0], rows[4:7] @ user)


@pytest.mark.parametrize("name", [*NEURAL, "mean_cosine"])
def test_scores_stay_fp32_under_bf16_autocast(name, vectors, has_image):
    model = make(name, vectors, has_image)
    history = torch.arange(1, 9).repeat(2, 1)  # (2, 8)
    candidates = torch.arange(1, 61).reshape(2, 30)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model(history, candidates)
    exact = model(history, candidates).detach()
    assert scores.dtype == torch.float32
    assert all(len(set(row.tolist())) == 30 for row in scores), "bf16 rounding would tie some"
    torch.testing.assert_close(scores, exact, rtol=0.1, atol=0.1)  # bf16 body, close to fp32


SIGNALS = ["popularity", "coclick"]


def with_random_head(model):
    """Give the signal head non-zero output weights (it starts as the content score)."""
    g = torch.Generator().manual_seed(1)
    head = model.signal_head
    with torch.no_grad():
        for weight in (head.out.weight, head.out.bias, head.linear.weight):
            weight.copy_(torch.randn(weight.shape, generator=g) / head.OUTPUT_SCALE)
    return model


@pytest.mark.parametrize("name", NEURAL)
def test_signals_start_at_the_content_score_and_stay_per_candidate(name, vectors, has_image):
    model = make(name, vectors, has_image, signals=SIGNALS)
    history = torch.tensor([[1, 2, 3, 4], [0, 0, 5, 6]])
    candidates = torch.tensor([[7, 8, 9], [10, 11, 0]])
    with pytest.raises(ValueError, match="reads the signals"):
        model(history, candidates)
    signals = torch.randn(2, 3, 2)
    start = model(history, candidates, signals)
    torch.testing.assert_close(model(history, candidates, torch.randn(2, 3, 2)), start)

    with_random_head(model)
    before = model(history, candidates, signals)
    changed = signals.clone()
    changed[0, 1] += 3.0
    after = model(history, candidates, changed)
    assert after[0, 1] != before[0, 1]
    torch.testing.assert_close(after[0, [0, 2]], before[0, [0, 2]])
    torch.testing.assert_close(after[1], before[1])
    assert after[1, 2] == 0  # padding


@pytest.mark.parametrize("name", NEURAL)
def test_candidates_with_equal_signals_keep_their_content_order(name, vectors, has_image):
    """Cold items (all without clicks, say) are told apart by content alone."""
    model = make(name, vectors, has_image, signals=SIGNALS)
    history = torch.tensor([[1, 2, 3, 4]])
    candidates = torch.arange(5, 25).unsqueeze(0)
    cold = torch.tensor([-3.0, 0.0]).expand(1, 20, 2)
    content = model(history, candidates, cold)  # the head starts as the identity
    scores = with_random_head(model)(history, candidates, cold)
    assert not torch.allclose(scores, content)
    assert torch.equal(scores.argsort(), content.argsort())


def test_signal_head_standardises_by_the_training_rows(vectors):
    model = build_model(
        "additive_attention", tiny("additive_attention") | {"signals": SIGNALS}, vectors
    )
    rows = np.array([[1.0, 10.0], [3.0, 30.0]])
    model.signal_head.fit(rows)
    torch.testing.assert_close(model.signal_head.mean, torch.tensor([2.0, 20.0]))
    torch.testing.assert_close(model.signal_head.scale, torch.tensor([1.0, 0.1]))
    assert "signal_head.mean" in model.state_dict()  # travels with the checkpoint


def test_gbdt_reads_signals_then_the_content_cosine(vectors):
    model = make("gbdt", vectors, None, signals=SIGNALS)
    history = torch.tensor([[1, 2, 3]])
    candidates = torch.tensor([[4, 5, 6, 0]])
    with pytest.raises(ValueError, match="reads the signals"):
        model(history, candidates)
    low = torch.full((1, 4, 2), -2.0)
    high = low.clone()
    high[0, 1] = 2.0
    scores = model(history, candidates, high)
    assert scores[0, 1] > model(history, candidates, low)[0, 1]  # clicks follow the features
    assert scores[0, 3] == 0
    rebuilt = build_model("gbdt", model.model_args, vectors)
    torch.testing.assert_close(rebuilt(history, candidates, high), scores)


@pytest.mark.parametrize("name", ["random", "popularity", "mean_cosine"])
def test_models_without_signals_refuse_them_in_config(name, vectors):
    with pytest.raises(ValueError, match="unknown config keys"):
        build_model(name, {"signals": SIGNALS}, vectors)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_kept_history_encoding_scores_as_the_forward(name, vectors, has_image):
    """What a server keeps per user (the history's encoding) gives the forward's scores, for
    any candidates and signals; models that encode nothing keep the history itself."""
    signals = ["a", "b"] if name in [*NEURAL, "gbdt"] else []
    model = make(name, vectors, has_image, **({"signals": signals} if signals else {}))
    history = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    encoded = model.encode_history(history)
    g = torch.Generator().manual_seed(1)
    for width in (3, 11):
        candidates = torch.randint(1, len(vectors), (2, width), generator=g)
        candidates[1, -1] = 0
        table = torch.randn(2, width, len(signals), generator=g) if signals else None
        torch.testing.assert_close(
            model.score_encoded(encoded, candidates, table), model(history, candidates, table)
        )
    neural = name in NEURAL
    assert neural == (encoded[0] is not history)  # the neural models encode the history


CATEGORIES = {"category_names": ["news", "sports"], "subcategory_names": ["golf", "tennis"]}


def with_categories(name, vectors, has_image):
    """A model reading the categories of CATEGORIES: news i has ids (i % 2 + 1, i // 2 % 2 + 1)."""
    model = make(name, vectors, has_image, **CATEGORIES)
    index = torch.arange(len(vectors))
    ids = torch.stack([index % 2 + 1, index // 2 % 2 + 1], dim=1)
    ids[0] = 0
    model.fit_news_features(ids.numpy())
    return model


def test_category_ids_map_names_and_unknown_names_to_zero(vectors, has_image):
    model = make("fast_rec_transformer", vectors, has_image, **CATEGORIES)
    ids = model.category_ids(["sports", "news", "weather", ""], ["golf", "chess", "tennis", ""])
    np.testing.assert_array_equal(ids, [[2, 1], [1, 0], [0, 2], [0, 0]])
    plain = make("fast_rec_transformer", vectors, has_image)
    np.testing.assert_array_equal(plain.category_ids(["sports"], ["golf"]), [[0, 0]])
    assert plain.news_categories is None and plain.feature_dim == vectors.shape[1]


@pytest.mark.parametrize("name", NEURAL)
def test_categories_are_standardised_one_hot_inputs_saved_with_the_weights(
    name, vectors, has_image
):
    model = with_categories(name, vectors, has_image).eval()
    features = model.news_features(torch.arange(1, len(vectors)))
    assert features.shape == (60, 16 + 3 + 3)
    one_hot = features[:, 16:]
    # the columns seen vary and are standardised; the unknown ids (never seen) stay at 0
    seen = [1, 2, 4, 5]
    torch.testing.assert_close(one_hot[:, seen].mean(dim=0), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(one_hot[:, seen].std(dim=0, correction=0), torch.ones(4))
    assert (one_hot[:, [0, 3]] == 0).all()
    history, candidates = torch.tensor([[1, 2, 3]]), torch.tensor([[4, 5, 6]])
    expected = model(history, candidates)
    state = model.state_dict()
    assert {"news_categories", "category_mean", "category_scale"} <= set(state)
    rebuilt = build_model(name, model.model_args, vectors, has_image).eval()
    rebuilt.load_state_dict(state)
    torch.testing.assert_close(rebuilt(history, candidates), expected)
    rebuilt.news_categories[4] = torch.tensor([2, 2])  # news 4 in another category (was 1, 1)
    assert rebuilt(history, candidates)[0, 0] != expected[0, 0]
    torch.testing.assert_close(rebuilt(history, candidates)[0, 1:], expected[0, 1:])


def test_categories_must_be_given_to_a_model_that_reads_them(vectors, has_image):
    model = make("fast_rec_transformer", vectors, has_image, **CATEGORIES)
    with pytest.raises(ValueError, match=r"reads news categories: pass ids \(61, 2\)"):
        model.fit_news_features(None)


@pytest.mark.parametrize("name", NEURAL)
def test_added_news_take_their_categories(name, vectors, has_image):
    model = with_categories(name, vectors, has_image).eval().cache_news_tokens()
    copied = torch.tensor([5, 5, 5])
    ids = model.news_categories[copied].clone()
    ids[1, 0] = 1 if ids[1, 0] == 2 else 2  # another category
    model.add_news(vectors[copied], has_image[copied], categories=ids)
    model.add_news(vectors[copied[:1]], has_image[copied[:1]])  # none given: unknown (0, 0)
    assert len(model.news_tables()["news_categories"]) == 65
    assert (model.news_categories[64] == 0).all()
    history = torch.tensor([[1, 2, 3]])
    scores = model(history, torch.tensor([[5, 61, 62, 63, 64]]))[0]
    torch.testing.assert_close(scores[1], scores[0])  # the same vector and categories
    torch.testing.assert_close(scores[3], scores[0])
    assert scores[2] != scores[0] and torch.isfinite(scores[4]) and scores[4] != scores[0]


@pytest.mark.parametrize("text_dim", [0, 10])
def test_content_rank_whitens_each_parts_top_principal_directions(text_dim, vectors, has_image):
    scaled = vectors * torch.linspace(0.1, 3.0, 16)  # distinct variances: distinct directions
    model = make("fast_rec_transformer", scaled, has_image, content_rank=4, text_dim=text_dim)
    assert model.content_basis is not None and not model.content_basis.any()  # until fitted
    model.fit_news_features()
    parts = 2 if text_dim else 1
    assert model.feature_dim == 4 * parts
    features = model.news_features(torch.arange(1, 61)).double()
    covariance = features.T @ features / 60
    basis = model.content_basis
    for i, (start, stop, rank) in enumerate(model.content_parts):
        assert rank == 4
        block = covariance[4 * i : 4 * i + 4, 4 * i : 4 * i + 4]
        torch.testing.assert_close(block, torch.eye(4, dtype=torch.float64), atol=1e-4, rtol=0)
        # the part's directions read that part only, and span its top principal subspace
        assert not basis[:start, 4 * i : 4 * i + 4].any()
        assert not basis[stop:, 4 * i : 4 * i + 4].any()
        centred = scaled[1:, start:stop] - scaled[1:, start:stop].mean(dim=0)
        top = torch.linalg.svd(centred, full_matrices=False).Vh[:4].T  # (part, 4)
        found = torch.linalg.qr(basis[start:stop, 4 * i : 4 * i + 4])[0]
        torch.testing.assert_close(top @ top.T, found @ found.T, atol=1e-4, rtol=0)
    state = model.state_dict()
    rebuilt = build_model("fast_rec_transformer", model.model_args, scaled, has_image)
    rebuilt.load_state_dict(state)  # the basis is saved with the weights
    torch.testing.assert_close(rebuilt.content_basis, basis)


def test_image_rank_reduces_the_image_part_alone(vectors, has_image):
    scaled = vectors * torch.linspace(0.1, 3.0, 16)
    model = make("fast_rec_transformer", scaled, has_image, image_rank=3, text_dim=10)
    assert model.content_parts == [(0, 10, 0), (10, 16, 3)]
    model.fit_news_features()
    assert model.feature_dim == 10 + 3
    features = model.news_features(torch.arange(1, 61)).double()
    standardised = (scaled[1:61, :10] - model.vector_mean[:10]) * model.vector_scale[:10]
    torch.testing.assert_close(features[:, :10], standardised.double())  # the text part whole
    assert not model.content_basis[:10].any()  # the directions read the image part only
    covariance = features[:, 10:].T @ features[:, 10:] / 60
    torch.testing.assert_close(covariance, torch.eye(3, dtype=torch.float64), atol=1e-4, rtol=0)
    # content_rank reduces the text part too; image_rank keeps its place for the image part
    ranks = {"content_rank": 2, "image_rank": 3}
    both = make("fast_rec_transformer", scaled, has_image, text_dim=10, **ranks)
    assert both.content_parts == [(0, 10, 2), (10, 16, 3)] and both.feature_dim == 5
    # a model saved before image_rank (its args lack it) reads its image part whole
    older = make("fast_rec_transformer", scaled, has_image, text_dim=10)
    assert older.content_basis is None and older.feature_dim == 16


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"content_rank": -1}, "content_rank must be >= 0"),
        ({"image_rank": -2}, "image_rank must be >= 0"),
        ({"category_names": ["sports", "news"]}, "category_names must be sorted and distinct"),
        ({**CATEGORIES, "subcategory_names": ["golf", "golf"]}, "subcategory_names must be sorted"),
    ],
)
def test_bad_news_input_settings_are_refused(args, message, vectors, has_image):
    with pytest.raises(ValueError, match=message):
        make("fast_rec_transformer", vectors, has_image, **args)
