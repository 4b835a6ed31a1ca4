import hashlib
import os
import socket
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def beside_checkout(path: Path, what: str) -> Path:
    """`path`, data kept outside the repository. Absent, the test is skipped; but under CI
    (the variable CI set, as CI services set it) it fails, so that a missing folder cannot
    turn the tests that read it into skips."""
    if path.is_dir():
        return path
    message = f"{what} not found at {path}"
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{message}; CI is set, so the tests that read it must run")
    pytest.skip(message)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """Tests that change torch's thread count (`serve` sets it, one-thread comparisons) leave
    it as they found it, so that later tests do not run on one thread by accident."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mind_samples() -> Path:
    """Real MIND rows kept beside the checkout (../shared/data/mind-samples)."""
    path = Path(os.environ.get("MMNEWSREC_SAMPLES", REPO.parent / "shared/data/mind-samples"))
    return beside_checkout(path, "real MIND samples")


def free_port() -> int:
    """A TCP port free on this machine now (for a process group's MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY_HISTORY_LEN = 8


def topic_vectors(store, dim: int = 32, seed: int = 0):
    """Random vectors around one centre per subcategory, so recall finds the same topic."""
    from mmnewsrec.formats.vectors import NewsVectors

    rng = np.random.default_rng(seed)
    news = store.news
    _, topic = np.unique(news["subcategory"].to_numpy(), return_inverse=True)
    centres = rng.normal(size=(topic.max() + 1, dim))
    vectors = centres[topic] + 0.3 * rng.normal(size=(len(news), dim))
    vectors = np.vstack([np.zeros((1, dim)), vectors]).astype(np.float16)
    has_image = np.concatenate([[False], news["image_path"].is_not_null().to_numpy()])
    manifest = {
        "hash": hashlib.sha256(vectors.tobytes()).hexdigest(),
        "store": {"content_hash": store.content_hash},
        "fusion": {"method": "random topic centres (tests)"},
    }
    return NewsVectors(vectors, has_image, manifest)


def with_random_image_part(text, out: Path, image_dim: int = 8):
    """`text` vectors (a NewsVectors) concatenated with a random 'image' part, which the odd
    news indices have, saved to `out` as a concat fusion."""
    from mmnewsrec.formats.vectors import NewsVectors

    image = np.random.default_rng(0).normal(size=(len(text.vectors), image_dim))
    image[0] = 0
    has_image = np.arange(len(text.vectors)) % 2 == 1
    image[~has_image] = 0
    fused = np.hstack([text.vectors, image]).astype(np.float16)
    fusion = {"method": "concat", "text_dim": text.dim, "image_dim": image_dim}
    image_part = {"encoder": {"id": "random (tests)"}}
    manifest = text.manifest | {
        "hash": f"concat-{text.hash}",
        "fusion": fusion,
        "image": image_part,
    }
    vectors = NewsVectors(fused, has_image, manifest)
    vectors.save(out)
    return vectors


def build_tiny_run(root: Path) -> Path:
    """A real run under root: synthetic data -> store -> topic-shaped random vectors -> a small
    ranker trained for a few steps."""
    from mmnewsrec.config import load_config
    from mmnewsrec.data.store import build_store
    from mmnewsrec.data.synthetic import SynthConfig, generate
    from mmnewsrec.rank.train import run_training

    run = root / "run"
    generate(root / "data", SynthConfig.quick())
    store = build_store(root / "data", root / "store")
    topic_vectors(store).save(root / "emb")
    values = {
        "data.store_dir": root / "store",
        "data.vectors_dir": root / "emb",
        "data.history_len": TINY_HISTORY_LEN,
        "data.dev_impressions": 50,
        "run.out_dir": run,
        "run.max_steps": 3,
        "run.progress": False,
        "optim.epochs": 1,
        "optim.batch_size": 32,
        "model.args": {"d_model": 32, "n_heads": 2, "d_ff": 64, "n_layers": 1},
    }
    run_training(load_config("train_cpu", values=values))
    return run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A trained run shared by the evaluation and serving tests (built once per session)."""
    return build_tiny_run(tmp_path_factory.mktemp("tiny-run"))


def check_prediction(path: Path, behaviors, metrics: dict, folder: Path) -> None:
    """A leaderboard prediction file of `behaviors`: one line per impression with its id, in the
    split's order, as many ranks as candidates, and scored against the split's truth it gives
    `metrics` (those of `evaluate`)."""
    from mmnewsrec.evaluate.leaderboard import read_prediction, score_files, write_truth

    prediction = read_prediction(path)
    assert prediction.impression_ids.tolist() == [str(i) for i in behaviors.impression_ids]
    np.testing.assert_array_equal(prediction.sizes, np.diff(behaviors.candidate_offsets))
    scored = score_files(write_truth(folder / "truth.txt", behaviors), path)
    for key in ("auc", "mrr", "ndcg5", "ndcg10"):
        assert scored[key] == pytest.approx(metrics[key], abs=1e-9), key


@pytest.fixture(scope="session")
def postgres_cluster():
    """A real PostgreSQL server for the session (initdb + pg_ctl in a temporary folder)."""
    from postgres_cluster import ThrowawayCluster, postgres_bin

    if postgres_bin("initdb") is None:
        pytest.skip("PostgreSQL server programs (initdb, pg_ctl) not installed")
    cluster = ThrowawayCluster(fsync=False)
    yield cluster
    cluster.stop()


@pytest.fixture
def postgres_url(postgres_cluster, request) -> str:
    """URL of a new, empty database on the session's PostgreSQL server."""
    name = "test_" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:16]
    return postgres_cluster.new_database(name)
