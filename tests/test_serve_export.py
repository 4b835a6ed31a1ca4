"""Served traffic back to training data: a store split replayed through POST /events, exported
as MIND tsv (`mmnewsrec export-events`) and prepared again gives the same impressions."""

import numpy as np
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from mmnewsrec.cli import app as cli
from mmnewsrec.data.store import build_store
from mmnewsrec.serve import Recommender, create_app
from mmnewsrec.serve.export import split_events
from mmnewsrec.serve.live import open_live


def impressions(store, split) -> dict[int, tuple]:
    """Impression id -> (user id, time, history ids, candidate ids, labels)."""
    b, ids = store.behaviors(split), store.news_ids
    return {
        int(b.impression_ids[i]): (
            store.user_ids[b.user_index[i]],
            int(b.times[i]),
            ids[b.history(i)].tolist(),
            ids[b.candidates(i)[0]].tolist(),
            b.candidates(i)[1].tolist(),
        )
        for i in range(b.num_impressions)
    }


def test_events_exported_and_prepared_again_are_the_same_impressions(tiny_run, tmp_path):
    rec = Recommender.from_run(tiny_run)
    served, live = open_live(rec, tmp_path / "state")
    events = split_events(rec.store, "train")
    with TestClient(create_app(served, live=live)) as client:
        for start in range(0, len(events), 500):
            client.post("/events/batch", json=events[start : start + 500]).raise_for_status()
    live.state.close()

    result = CliRunner().invoke(
        cli, ["export-events", str(tmp_path / "state"), "--out", str(tmp_path / "mind")]
    )
    assert result.exit_code == 0, result.output
    again = build_store(tmp_path / "mind", tmp_path / "store")
    before, after = impressions(rec.store, "train"), impressions(again, "train")
    assert after == before
    assert again.num_users == len({e["user_id"] for e in events})
    clicks = np.asarray(again.behaviors("train").candidate_labels).sum()
    assert clicks == sum(len(e["clicked"]) for e in events) > 0
