"""Where the live service's CPU goes, in process (no HTTP): one logged impression (`POST
/events`' checks, the SQLite commit, what the state learns) and one `/recommend` by user id
(first visit and returning), at 100k news with every signal.

Uses the corpus and signals run of benchmarks/serve_live.py (run it once first; the same --work,
--news, --dim). The state is a fresh folder, loaded with --ingest of the store's train
impressions (cycled under new ids, as serve_live.py does) in batches, then: --events single
impressions one at a time (10 news shown, one clicked, of the dev users), each awaited until
committed and learned; then /recommend for --requests dev users asking for the first time, then
again (returning). Prints CPU time per call of the whole process (every thread) and of the
calling thread, and wall-clock p50/p99. --src DIR: the package of another checkout (DIR/src
first on the path), for a before/after on the same machine.

    python benchmarks/serve_live_profile.py [--ingest 157000] [--events 500] [--requests 500]
        [--sync full|normal] [--src DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mmnewsrec-bench-serve"))
    parser.add_argument("--news", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--ingest", type=int, default=157_000)
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--sync", default="full")
    parser.add_argument("--src", type=Path, help="import the package of this checkout")
    args = parser.parse_args()
    if args.src is not None:
        sys.path.insert(0, str(args.src.resolve() / "src"))

    import torch
    from serve_live import ingest_bodies

    from mmnewsrec.formats.store import Store
    from mmnewsrec.serve import events as routes
    from mmnewsrec.serve.live import open_live
    from mmnewsrec.serve.recommender import Recommender

    torch.set_num_threads(1)
    work = args.work / f"news{args.news}-dim{args.dim}"
    store = Store.load(work / "store")
    recommender = Recommender.from_run(work / "run-signals")
    users = store.user_ids[np.unique(np.asarray(store.behaviors("dev").user_index))].tolist()
    news = store.news_ids[1:].tolist()
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory(dir=work) as folder:
        recommender, live = open_live(recommender, folder, args.sync)

        async def post(bodies: list[dict], nested: bool) -> None:
            """As `POST /events` does after parsing (the route's own helpers)."""
            events = [routes.EventIn.model_validate(body) for body in bodies]
            if hasattr(routes, "to_batch"):
                await routes.log_batch(
                    live, routes.to_batch(events, recommender.news_lookup, nested)
                )
            else:  # a checkout from before the columnar batch path
                impressions, rows = routes.to_impressions(events, recommender.news_lookup, nested)
                await routes.log_impressions(live, recommender, impressions, rows)

        async def ingest() -> None:
            bodies = ingest_bodies(store, args.ingest)
            for first in range(0, len(bodies), 5000):
                await post(bodies[first : first + 5000], True)

        def one_event(n: int) -> dict:
            shown = rng.choice(news, 10, replace=False).tolist()
            user = users[(7 * n) % len(users)]
            return {"impression_id": f"e{n}", "user_id": user, "shown": shown} | {
                "clicked": shown[:1]
            }

        async def events() -> list[tuple[float, float, float]]:
            out = []
            for n in range(args.events):
                body = one_event(n)
                cpu, thread, wall = time.process_time(), time.thread_time(), time.perf_counter()
                await post([body], False)
                out.append(
                    (
                        time.process_time() - cpu,
                        time.thread_time() - thread,
                        time.perf_counter() - wall,
                    )
                )
            return out

        def recommends(asked: list[str]) -> list[tuple[float, float, float]]:
            out = []
            for user in asked:
                cpu, thread, wall = time.process_time(), time.thread_time(), time.perf_counter()
                live.recommend(recommender, user, 10, True)
                out.append(
                    (
                        time.process_time() - cpu,
                        time.thread_time() - thread,
                        time.perf_counter() - wall,
                    )
                )
            return out

        asyncio.run(ingest())
        asyncio.run(events())  # warm-up: the first of a period, caches
        rows = {"one POST /events": asyncio.run(events())}
        asked = [users[i % len(users)] for i in range(args.requests)]
        recommender.recall_cache.__init__(recommender.recall_cache.size)
        recommender.history_cache.__init__(recommender.history_cache.size)
        rows["/recommend, first visit"] = recommends(asked)
        rows["/recommend, returning"] = recommends(asked)
        live.state.close()
    print(
        f"\nin process, {args.news:,} news, {args.ingest:,} impressions logged, sync {args.sync},"
        f" load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
        + (f", package {args.src}" if args.src else "")
    )
    print(f"{'':26} {'cpu ms':>8} {'thread ms':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for label, times in rows.items():
        cpu, thread, wall = (np.array(x) * 1000 for x in zip(*times, strict=True))
        print(
            f"{label:26} {cpu.mean():8.3f} {thread.mean():10.3f} "
            f"{np.percentile(wall, 50):8.3f} {np.percentile(wall, 99):8.3f}"
        )


if __name__ == "__main__":
    main()
