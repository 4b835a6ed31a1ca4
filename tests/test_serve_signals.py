"""Live behaviour signals: a run that reads them is served, and the signals the server holds
for an impression equal `prepare`'s after a replay of the store through POST /events."""

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_HISTORY_LEN, topic_vectors
from fastapi.testclient import TestClient

from mmnewsrec.config import load_config
from mmnewsrec.data.store import build_store
from mmnewsrec.formats.store import SIGNAL_NAMES, Store
from mmnewsrec.rank.train import run_training
from mmnewsrec.serve import Recommender, create_app
from mmnewsrec.serve.export import split_events
from mmnewsrec.serve.live import SNAPSHOT_FILE, LiveState, open_live

MOVIELENS = Path(__file__).resolve().parents[2] / "shared/data/movielens-100k-mind"
READS = ["popularity", "exposures", "freshness", "coclick", "history_len"]


@pytest.fixture(scope="module")
def signals_run(tiny_run) -> Path:
    """The tiny run: like every run of train_cpu, it reads every signal."""
    from mmnewsrec.rank import load_ranker

    assert load_ranker(tiny_run).signal_names == READS
    return tiny_run


def replay_over_http(store: Store, client: TestClient) -> dict[str, np.ndarray]:
    """The impressions of train (with their clicks) and dev (without) in time order, as the
    batch face orders them: for each, the signals the server gives its candidates at its time,
    then the impression logged."""
    queue, tables, rows = [], {}, {}
    for split, clicks in (("train", True), ("dev", False)):
        b = store.behaviors(split)
        events = split_events(store, split, clicks)  # ids restart in each split, as in MIND
        queue += [
            (e["time"], split, e | {"impression_id": f"{split}-{e['impression_id']}"})
            for e in events
        ]
        tables[split] = np.zeros((len(b.candidate_items), len(SIGNAL_NAMES)), dtype=np.float32)
        ids = np.asarray(b.impression_ids).tolist()
        rows[split] = {f"{split}-{i}": n for n, i in enumerate(ids)}
    queue.sort(key=lambda entry: entry[0])  # stable: train first among equal times
    for _, split, event in queue:
        asked = {k: event[k] for k in ("time", "history")} | {"candidates": event["shown"]}
        response = client.post("/signals", json=asked)
        assert response.status_code == 200, response.text
        n, offsets = rows[split][event["impression_id"]], store.behaviors(split).candidate_offsets
        tables[split][offsets[n] : offsets[n + 1]] = response.json()["values"]
        client.post("/events", json=event).raise_for_status()
    return tables


def assert_http_replay_matches(store: Store, tmp_path: Path, run: Path | None = None) -> None:
    rec = Recommender.from_run(run) if run else None
    if rec is None:
        pytest.skip("no run")
    served, live = open_live(rec, tmp_path / "state", signals_from_store=False)
    with TestClient(create_app(served, live=live)) as client:
        replayed = replay_over_http(store, client)
    live.state.close()
    for split, table in replayed.items():
        batch = np.asarray(store.signals(split))
        for column, name in enumerate(SIGNAL_NAMES):
            np.testing.assert_allclose(
                table[:, column], batch[:, column], atol=1e-6, rtol=0, err_msg=f"{split} {name}"
            )


def test_signals_replayed_over_http_equal_prepares_synthetic(signals_run, tmp_path):
    rec = Recommender.from_run(signals_run)
    assert_http_replay_matches(rec.store, tmp_path, signals_run)


def test_a_run_that_reads_signals_is_served_with_live_signals(signals_run, tmp_path):
    rec = Recommender.from_run(signals_run)
    served, live = open_live(rec, tmp_path / "state")
    ids = rec.store.news["news_id"].to_list()
    assert served.ranker.traced is not None  # the trace takes the signals too
    with TestClient(create_app(served, live=live)) as client:
        before = client.post("/recommend", json={"history": ids[:3], "k": 5}).json()
        assert before["items"][0]["stage"] == "rerank" and "signals" in before["timings_ms"]
        head = [item["news_id"] for item in before["items"]]
        # the same candidates, scored by hand with the signals the server holds now
        indices = np.array([rec.index_of(i) for i in ids[:3]])
        found = rec.recaller.search_one(indices, rec.recall_k, np.unique(indices))[1]
        found = found[found > 0][: rec.recall_k]
        table = live.signal_values(indices, found)
        scores = rec.ranker.score_items(indices, found, len(found), table)
        expected = [rec.news_ids_of([found[j]])[0] for j in np.argsort(-scores, kind="stable")[:5]]
        assert head == expected
        # many clicks on one news item move its popularity, hence the scores
        target = served.index_of(head[-1])
        when = np.datetime64(int(live.signals.time) + 2 * 86_400, "s").astype(str)
        events = [
            {"impression_id": f"P{n}", "user_id": f"W{n}", "time": when, "shown": [head[-1]],
             "clicked": [head[-1]]}
            for n in range(40)
        ]  # fmt: skip
        client.post("/events/batch", json=events).raise_for_status()
        later = np.datetime64(int(live.signals.time) + 86_400, "s").astype(str)
        client.post("/signals", json={"time": later, "candidates": ids[:1]}).raise_for_status()
        after = live.signal_values(indices, np.array([target]))
        assert (
            after[0, SIGNAL_NAMES.index("popularity")]
            > table[list(found).index(target), SIGNAL_NAMES.index("popularity")]
        )


def test_signals_replayed_over_http_equal_prepares_movielens(signals_run, tmp_path):
    if not MOVIELENS.is_dir():
        pytest.skip(f"{MOVIELENS} not found")
    store = build_store(MOVIELENS, tmp_path / "store")
    topic_vectors(store).save(tmp_path / "emb")
    run = tmp_path / "run"
    values = {
        "data.store_dir": tmp_path / "store",
        "data.vectors_dir": tmp_path / "emb",
        "data.history_len": TINY_HISTORY_LEN,
        "data.dev_impressions": 50,
        "run.out_dir": run,
        "run.max_steps": 2,
        "run.progress": False,
        "optim.epochs": 1,
        "optim.batch_size": 32,
        "model.signals": READS,
        "model.args": {"d_model": 32, "n_heads": 2, "d_ff": 64, "n_layers": 1},
    }
    run_training(load_config("train_cpu", values=values))
    assert_http_replay_matches(store, tmp_path, run)


def assert_same_signals(expected: LiveState, got: LiveState) -> None:
    """Equal counts, users and cold-start counts, and equal signals (1e-6) of every news item
    for a history."""
    want, have = expected.snapshot()[1], got.snapshot()[1]
    assert want.keys() == have.keys()
    for name, values in want.items():  # float sums within 1e-9, the rest exactly
        if values.dtype.kind == "f":
            np.testing.assert_allclose(have[name], values, rtol=1e-9, atol=0, err_msg=name)
        else:
            np.testing.assert_array_equal(have[name], values, err_msg=name)
    assert got.counts() == expected.counts()
    for user_id in want["users.logged_users"].tolist()[:50]:
        np.testing.assert_array_equal(got.users.history(user_id), expected.users.history(user_id))
    at, news = expected.signals.time or 0, np.arange(1, expected.signals.num_news + 1)
    np.testing.assert_allclose(
        got.signals.signals(0, at, news[:5], news),
        expected.signals.signals(0, at, news[:5], news),
        atol=1e-6,
        rtol=0,
    )


def log_events(live: LiveState, rec: Recommender, events: list[dict], stop: bool) -> None:
    """Log `events` in batches; stop: then stop the app cleanly (else leave it as a crash
    would, its lifespan never run)."""
    client = TestClient(create_app(rec, live=live))
    with client if stop else nullcontext():
        for start in range(0, len(events), 300):
            client.post("/events/batch", json=events[start : start + 300]).raise_for_status()
    live.state.close()


def test_a_snapshot_of_the_signals_then_the_log_after_it_equal_a_full_replay(
    signals_run, tmp_path, caplog
):
    rec = Recommender.from_run(signals_run)
    events = sorted(split_events(rec.store, "train"), key=lambda e: e["time"])
    events = [e | {"impression_id": f"S{n}"} for n, e in enumerate(events)]
    half, state = len(events) // 2, tmp_path / "state"
    served, live = open_live(rec, state)
    log_events(live, served, events[:half], stop=True)  # a snapshot at the half's last one
    assert (state / SNAPSHOT_FILE).is_file()
    served, live = open_live(rec, state)
    assert live.snapshot_seq == half
    log_events(live, served, events[half:], stop=False)  # the snapshot stays at the half
    _, from_snapshot = open_live(rec, state)
    assert from_snapshot.snapshot_seq == half  # only the second half replayed
    from_snapshot.state.close()
    (state / SNAPSHOT_FILE).rename(tmp_path / "saved.npz")
    _, replayed = open_live(rec, state)
    assert replayed.snapshot_seq == 0
    replayed.state.close()
    assert_same_signals(replayed, from_snapshot)

    # a snapshot of another log (its impression at the snapshot's place differs): ignored
    other = tmp_path / "other"
    _, live = open_live(rec, other)
    ids = [e | {"impression_id": f"T{n}"} for n, e in enumerate(events)]
    log_events(live, served, ids, stop=False)
    (tmp_path / "saved.npz").rename(other / SNAPSHOT_FILE)
    caplog.set_level("INFO", logger="mmnewsrec.serve.live")
    _, stale = open_live(rec, other)
    stale.state.close()
    assert stale.snapshot_seq == 0
    assert f"the log holds no impression 'S{half - 1}' at {half}" in caplog.text
    assert_same_signals(replayed, stale)

    # a snapshot written for other settings (signals that did not start from the store)
    _, bare = open_live(rec, state, signals_from_store=False)
    log_events(bare, served, [], stop=True)
    caplog.clear()
    _, again = open_live(rec, state)
    again.state.close()
    assert again.snapshot_seq == 0 and "written for other signals_from_store" in caplog.text
    assert_same_signals(replayed, again)
