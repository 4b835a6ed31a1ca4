"""The cost of adding news while serving: POST /news, then /recommend, on a trained run.

    python benchmarks/serve_news.py RUN_DIR --adds 10

Prints the milliseconds (wall and CPU) of each POST /news after the first (which loads the text
encoder), and the /recommend median before and after the adds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from fastapi.testclient import TestClient

from mmnewsrec.serve import Recommender, create_app


def timed(call) -> tuple[float, float]:
    """(wall ms, CPU ms) of call()."""
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def recommend_ms(client: TestClient, history: list[str], n: int = 50) -> float:
    body = {"history": history, "k": 10}
    return statistics.median(
        timed(lambda: client.post("/recommend", json=body))[0] for _ in range(n)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--adds", type=int, default=10)
    args = parser.parse_args()
    rec = Recommender.from_run(args.run)
    client = TestClient(create_app(rec))
    news = rec.store.news.head(args.adds + 1).rows(named=True)
    history = [row["news_id"] for row in news[:5]]
    before = recommend_ms(client, history)
    costs = []
    for i, row in enumerate(news):
        body = {"news_id": f"ADDED{i}", "title": row["title"], "category": row["category"] or ""}
        costs.append(timed(lambda body=body: client.post("/news", json=body).raise_for_status()))
    after = recommend_ms(client, history)
    wall = statistics.median(c[0] for c in costs[1:])
    cpu = statistics.median(c[1] for c in costs[1:])
    print(
        f"{rec.store.num_news} news, {rec.recaller.backend_} recall: first POST /news "
        f"{costs[0][0]:.0f} ms (loads the encoder), then median {wall:.0f} ms wall, "
        f"{cpu:.0f} ms CPU; /recommend median {before:.1f} ms before, {after:.1f} ms after; "
        f"load average {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
