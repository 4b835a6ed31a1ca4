"""The cost of adding news to a running server, per news item, at several corpus sizes.

    python benchmarks/serve_news.py [--news 3000 30000 100000] [--adds 200]
        [--compare-src DIR] [--compare-adds 50] [--work DIR]

For each size: the corpus and run of benchmarks/serve.py (synthetic news, random 384-d vectors,
fast_rec_transformer at the cpu preset trained a few steps; built once, cached in --work), the
app (`create_app`) over `Recommender.from_run` (recall "auto": exact up to 20,000 news, HNSW
beyond), then --adds POST /news through FastAPI's test client, one at a time, each in a new
process per size. The text model is left out: these vectors have none, so the app's encoder
returns a stored news item's vector plus noise (a MiniLM forward costs the same at any corpus
size). Prints the wall milliseconds of the first POST /news (which moves the tables into
buffers with spare rows) and the median, p99 and maximum of the others, then the /recommend
median before and after the adds.

--compare-src DIR measures another checkout of the package (DIR/src first on its PYTHONPATH,
e.g. the main branch) the same way, with --compare-adds additions, right after this one at each
size, so that both meet the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from serve import build_run  # benchmarks/serve.py, beside this file


class NoisyCopies:
    """Stands in for the text encoder: a stored news item's vector plus noise, float16-rounded
    as encoded vectors are."""

    def __init__(self, matrix: np.ndarray) -> None:
        self.matrix, self.rng = matrix, np.random.default_rng(0)

    def encode(self, news: object, has_image: bool = False) -> np.ndarray:
        row = self.matrix[self.rng.integers(1, len(self.matrix))].astype(np.float32)
        row += 0.1 * self.rng.normal(size=row.shape).astype(np.float32)
        return row.astype(np.float16).astype(np.float32)


def recommend_ms(client, history: list[str], n: int = 50) -> float:
    """Median wall ms of n POST /recommend for one history."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        client.post("/recommend", json={"history": history, "k": 10}).raise_for_status()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(run: Path, adds: int) -> dict:
    """Load the run, add `adds` news through POST /news; the figures as a dict."""
    from fastapi.testclient import TestClient

    from mmnewsrec.serve import Recommender, create_app

    rec = Recommender.from_run(run)
    client = TestClient(create_app(rec))
    client.app.state.news_encoder = NoisyCopies(np.asarray(rec.vectors.vectors))
    history = rec.store.news["news_id"].to_list()[:5]
    before = recommend_ms(client, history)
    costs = []
    for i in range(adds):
        body = {"news_id": f"ADDED{i}", "title": f"an added news item {i}", "category": "news"}
        start = time.perf_counter()
        client.post("/news", json=body).raise_for_status()
        costs.append((time.perf_counter() - start) * 1e3)
    after = recommend_ms(client, [*history, f"ADDED{adds - 1}"])
    rest = np.array(costs[1:])
    return {
        "news": rec.store.num_news,
        "recall": rec.recaller.backend_,
        "adds": adds,
        "first": costs[0],
        "median": float(np.median(rest)),
        "p99": float(np.percentile(rest, 99)),
        "max": float(rest.max()),
        "recommend_before": before,
        "recommend_after": after,
    }


def measured(run: Path, adds: int, src: Path | None) -> dict:
    """`measure` in a new process (with the package of `src`/src when given)."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src.resolve() / "src"), env.get("PYTHONPATH", "")])
    command = [sys.executable, __file__, "--measure", str(run), "--adds", str(adds)]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--news", type=int, nargs="+", default=[3000, 30000, 100000])
    parser.add_argument("--adds", type=int, default=200)
    parser.add_argument("--compare-src", type=Path, help="another checkout, measured after")
    parser.add_argument("--compare-adds", type=int, default=50)
    parser.add_argument("--work", type=Path, default=Path("/tmp/mmnewsrec-bench-serve"))
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # one run, as JSON
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.adds)))
        return
    print(f"{os.cpu_count()} CPUs; POST /news wall ms (the encoder left out); this: {Path.cwd()}")
    header = ("news", "recall", "code", "adds", "first", "median", "p99", "max", "/rec before")
    print("{:>7} {:>10} {:>6} {:>5} {:>8} {:>8} {:>8} {:>8} {:>12} {}".format(*header, "after"))
    for news in args.news:
        run = build_run(args.work / f"news{news}-dim384", news, 384, "fast_rec_transformer")
        sources = {"this": (None, args.adds)}
        if args.compare_src:
            sources["other"] = (args.compare_src, args.compare_adds)
        for label, (src, adds) in sources.items():
            r = measured(run, adds, src)
            print(
                f"{r['news']:>7,} {r['recall']:>10} {label:>6} {r['adds']:>5} {r['first']:>8.1f} "
                f"{r['median']:>8.2f} {r['p99']:>8.2f} {r['max']:>8.1f} "
                f"{r['recommend_before']:>12.1f} {r['recommend_after']:.1f}   "
                f"load average {os.getloadavg()[0]:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
