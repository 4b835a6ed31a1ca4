"""`mmnewsrec serve` as users start it: a process listening on a port, answering /health,
/recommend and POST /news over HTTP, stopped by SIGTERM (a clean shutdown)."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port

from mmnewsrec.config import load_config
from mmnewsrec.data.store import build_store
from mmnewsrec.data.synthetic import SynthConfig, generate
from mmnewsrec.encode.pipeline import EncodeConfig, encode_store
from mmnewsrec.formats.runs import read_run_config
from mmnewsrec.formats.store import Store
from mmnewsrec.rank.train import run_training


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A mean-cosine run on MiniLM text vectors of the quick synthetic data (it can encode a
    posted news item)."""
    root = tmp_path_factory.mktemp("serve-process")
    generate(root / "data", SynthConfig.quick())
    build_store(root / "data", root / "store")
    encode_store(root / "store", root / "emb", EncodeConfig(image_encoder="none"))
    values = {
        "data.store_dir": root / "store",
        "data.vectors_dir": root / "emb",
        "data.history_len": 8,
        "model.name": "mean_cosine",
        "run.out_dir": root / "run",
        "run.progress": False,
    }
    run_training(load_config("train_cpu", values=values))
    return root / "run"


def wait_until_up(process: subprocess.Popen, base: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"serve exited with {process.returncode}: {process.stdout.read()}")
        try:
            return httpx.get(f"{base}/health", timeout=5).raise_for_status().json()
        except httpx.TransportError:
            time.sleep(0.2)
    pytest.fail("serve did not answer /health in time")


@pytest.mark.slow
def test_the_serve_command_answers_over_http_and_stops_on_sigterm(run):
    news = Store.load(read_run_config(run).data.store_dir).news
    port = free_port()
    code = "from mmnewsrec.cli import app; app()"
    command = [sys.executable, "-c", code, "serve", str(run), "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--recall-k", "20"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        health = wait_until_up(process, base)
        assert health["status"] == "ok", health

        history = news["news_id"].to_list()[:3]
        answer = httpx.post(f"{base}/recommend", json={"history": history, "k": 5}, timeout=30)
        assert answer.status_code == 200, answer.text
        items = answer.json()["items"]
        assert len(items) == 5 and not {item["news_id"] for item in items} & set(history)

        row = news.row(0, named=True)
        body = {"news_id": "NEW1"} | {
            f: row[f] or "" for f in ("title", "abstract", "category", "subcategory", "url")
        }
        added = httpx.post(f"{base}/news", json=body, timeout=60)
        assert added.status_code == 201, added.text
        after = httpx.post(f"{base}/recommend", json={"history": [row["news_id"]], "k": 20})
        found = {item["news_id"]: item for item in after.json()["items"]}
        assert found["NEW1"]["recall_rank"] == 1  # the same text as the history's one click
        assert httpx.get(f"{base}/health").json()["counts"]["added_news"] == 1
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=60)
    # uvicorn shuts down cleanly, then raises the signal it caught again: ended by SIGTERM
    assert process.returncode == -signal.SIGTERM, output
    assert "Finished server process" in output
    assert f"serving {run} on http://127.0.0.1:{port}/" in output
