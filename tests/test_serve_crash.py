"""kill -9 of a real server in the middle of a sustained event load: after a restart every
event that got a 2xx is in the log and in what the server learned, and none is there twice;
its behaviour signals are those of the logs replayed afresh, after a restart from the log and
after one from the signals' snapshot of a clean stop."""

import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import free_port

from mmnewsrec.data.signals import SignalState, replay_store
from mmnewsrec.formats.store import Store
from mmnewsrec.serve.live import SNAPSHOT_FILE

pytestmark = pytest.mark.slow  # three server starts: about 30 s


def start_server(run: Path, state: Path, port: int) -> subprocess.Popen:
    command = [shutil.which("mmnewsrec") or "mmnewsrec", "serve", str(run), "--state", str(state)]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--no-access-log"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read().decode()}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
            return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start")


def test_every_acknowledged_event_survives_a_kill_9_once(tiny_run, tmp_path):
    state = tmp_path / "state"
    news = Store.load(tiny_run.parent / "store").news["news_id"].to_list()
    port = free_port()
    server = start_server(tiny_run, state, port)
    acked: dict[str, str] = {}  # impression id -> the news its user clicked
    stop = threading.Event()

    def load(worker: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            n = 0
            while not stop.is_set():
                n += 1
                imp = f"{worker}-{n}"
                a, b = news[(7 * n + worker) % len(news)], news[(7 * n + worker + 1) % len(news)]
                body = {"impression_id": imp, "user_id": f"K{imp}", "shown": [a, b]}
                for _ in range(1 + (n % 5 == 0)):  # every fifth sent twice, as a retry would
                    try:
                        response = client.post("/events", json=body | {"clicked": [a]})
                    except httpx.HTTPError:
                        return  # the server is gone
                    if response.status_code == 200:
                        acked[imp] = a

    workers = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(3)
    server.send_signal(signal.SIGKILL)
    server.wait()
    stop.set()
    for worker in workers:
        worker.join()
    assert len(acked) > 50

    with sqlite3.connect(state / "state.sqlite") as db:
        rows = db.execute("SELECT impression_id, clicked FROM impressions").fetchall()
    logged = dict(rows)
    assert len(logged) == len(rows)  # each id once
    assert all(logged.get(imp) == clicked for imp, clicked in acked.items())

    port = free_port()
    server = start_server(tiny_run, state, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            for imp, clicked in acked.items():
                assert client.get(f"/users/K{imp}").json()["history"] == [clicked]
            counts = client.get("/health").json()["counts"]
            assert counts["logged_impressions"] == len(logged)
            assert counts["logged_clicks"] == len(logged)
            expected, at = replayed_signals(tiny_run.parent / "store", state)
            assert_signals_equal(client, expected, at, news)
        server.terminate()  # a clean stop: the signals' snapshot
        server.wait(60)
        assert (state / SNAPSHOT_FILE).is_file()
        server = start_server(tiny_run, state, port)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            assert_signals_equal(client, expected, at, news)
    finally:
        server.kill()
        server.wait()


def replayed_signals(store_dir: Path, state: Path) -> tuple[SignalState, int]:
    """The signals of the store's logs, then of the logged impressions one at a time, in log
    order; and the latest logged time."""
    store = Store.load(store_dir)
    signals = SignalState.for_store(store, store.num_news)
    replay_store(signals, store, "train")
    with sqlite3.connect(state / "state.sqlite") as db:
        rows = db.execute(
            "SELECT user_id, time, history, shown, clicked FROM impressions ORDER BY seq"
        ).fetchall()
    users: dict[str, int] = {}
    for user, at, *lists in rows:
        index = users.setdefault(user, store.num_users + len(users))
        history, shown, clicked = (store.news_index(ids.split()).astype(np.int64) for ids in lists)
        signals.observe(index, max(at, signals.time or 0), history, shown, clicked)
    return signals, max(at for _, at, *_ in rows)


def assert_signals_equal(
    client: httpx.Client, expected: SignalState, at: int, news: list[str]
) -> None:
    """The server's signals of every news item for a history, at `at`, are `expected`'s."""
    when = datetime.fromtimestamp(at, UTC).isoformat()
    asked = {"time": when, "history": news[:5], "candidates": news}
    response = client.post("/signals", json=asked)
    assert response.status_code == 200, response.text
    indices = np.arange(1, len(news) + 1)
    want = expected.signals(0, at, indices[:5], indices)
    np.testing.assert_allclose(response.json()["values"], want, atol=1e-6, rtol=0)
