import hashlib
import os
import socket
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mind_samples() -> Path:
    """Real MIND rows kept beside the checkout (../shared/data/mind-samples)."""
    path = Path(os.environ.get("MMNEWSREC_SAMPLES", REPO.parent / "shared/data/mind-samples"))
    if not path.is_dir():
        pytest.skip(f"real MIND samples not found at {path}")
    return path


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
