"""Two replicas over one PostgreSQL state against one server over SQLite, under the same mixed
load: 16 clients, each alternating one POST /events (an impression with a click) and one
POST /recommend by user id, the requests spread round robin over the replicas.

Uses the corpus and run of benchmarks/serve.py (built once, cached in --work). PostgreSQL: a
throwaway server (tests/postgres_cluster.py: initdb + pg_ctl in a temporary folder, fsync and
synchronous_commit on, as in production) unless --state-url names one. Prints per setup:
events/s, /recommend and /events p50/p99, errors; for the replicas, the replication lag: a
probe posts an event to one replica (in turn) and polls the other's GET /users/{id} until the
click is there, every --probe-every seconds during the load, p50/p99 of the time from the 2xx
to the click seen. The servers' CPU time per pair (the replicas' summed; not the database's), a
figure that other load on the machine inflates less than latency. The load average before and
after.

    python benchmarks/serve_replicas.py [--news 10000] [--pairs 2000] [--state-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from serve import Tally, build_run, cpu_seconds, free_port, start_server

from mmnewsrec.formats.store import Store

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from postgres_cluster import ThrowawayCluster  # noqa: E402

CLIENTS = 16


async def mixed(
    bases: list[str], users: list[str], news: list[str], pairs: int, prefix: str
) -> tuple[Tally, Tally, float]:
    """CLIENTS workers, each: POST /events (a click on one of ten news shown) then POST
    /recommend for the same user, every request to the next replica in turn; returns the
    /recommend and /events tallies and the seconds taken."""
    rng = np.random.default_rng(0)
    plan, turn = iter(range(pairs)), itertools.cycle(bases)
    recommend, events = Tally(), Tally()

    async def timed_post(client: httpx.AsyncClient, url: str, body: dict, tally: Tally) -> None:
        start = time.perf_counter()
        try:
            response = await client.post(url, json=body)
            failure = None if response.status_code == 200 else f"{response.status_code} {url}"
        except httpx.HTTPError as err:
            failure = f"{type(err).__name__} {url}"
        tally.latencies_ms.append((time.perf_counter() - start) * 1000)
        if failure is not None:
            tally.errors += 1
            print("error:", failure, file=sys.stderr)

    async def worker(client: httpx.AsyncClient) -> None:
        for n in plan:
            user = users[n % len(users)]
            shown = rng.choice(news, 10, replace=False).tolist()
            event = {"impression_id": f"{prefix}{n}", "user_id": user, "shown": shown}
            await timed_post(client, f"{next(turn)}/events", event | {"clicked": shown[:1]}, events)
            body = {"user_id": user, "k": 10}
            await timed_post(client, f"{next(turn)}/recommend", body, recommend)

    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(CLIENTS)))
        seconds = time.perf_counter() - start
    for tally in (recommend, events):
        tally.seconds = seconds
    return recommend, events, seconds


async def probe_lag(
    bases: list[str], news: list[str], every: float, stop: asyncio.Event, prefix: str
) -> list[float]:
    """Until `stop`: an event for a new user on one replica, then the other replica's
    /users/{id} polled until the click is there; seconds from the 2xx to the click seen."""
    lags: list[float] = []
    async with httpx.AsyncClient(timeout=60) as client:
        for n in itertools.count():
            if stop.is_set():
                return lags
            source, other = bases[n % 2], bases[(n + 1) % 2]
            user, shown = f"probe-{prefix}{n}", news[n % len(news)]
            event = {"impression_id": f"probe-{prefix}{n}", "user_id": user, "shown": [shown]}
            (
                await client.post(f"{source}/events", json=event | {"clicked": [shown]})
            ).raise_for_status()
            acked = time.perf_counter()
            while (await client.get(f"{other}/users/{user}")).json()["history"] != [shown]:
                await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - acked)
            await asyncio.sleep(every)
    return lags


async def load_with_probe(
    bases: list[str], users: list[str], news: list[str], pairs: int, every: float, prefix: str
) -> tuple[Tally, Tally, float, list[float]]:
    stop = asyncio.Event()
    prober = (
        asyncio.create_task(probe_lag(bases, news, every, stop, prefix)) if len(bases) > 1 else None
    )
    recommend, events, seconds = await mixed(bases, users, news, pairs, prefix)
    stop.set()
    lags = await prober if prober else []
    return recommend, events, seconds, lags


def report(
    label: str, recommend: Tally, events: Tally, seconds: float, lags: list[float], cpu: float
) -> None:
    def p(ms: list[float], q: float) -> float:
        return float(np.percentile(ms, q)) if ms else float("nan")

    stored = len(events.latencies_ms) - events.errors
    print(
        f"{label:<28} {stored / seconds:>9,.0f} {p(recommend.latencies_ms, 50):>8.1f} "
        f"{p(recommend.latencies_ms, 99):>8.1f} {p(events.latencies_ms, 50):>8.1f} "
        f"{p(events.latencies_ms, 99):>8.1f} {recommend.errors + events.errors:>7} {cpu:>8.2f} "
        + (
            f"{p([x * 1000 for x in lags], 50):>8.1f} {p([x * 1000 for x in lags], 99):>8.1f}"
            f" {max(lags) * 1000:>8.1f} ({len(lags)} probes)"
            if lags
            else "       -        -        -"
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mmnewsrec-bench-serve"))
    parser.add_argument("--news", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--model", default="fast_rec_transformer")
    parser.add_argument("--pairs", type=int, default=2000, help="event + recommend pairs")
    parser.add_argument("--probe-every", type=float, default=0.02, help="seconds between probes")
    parser.add_argument("--state-url", help="a PostgreSQL database (default: a throwaway one)")
    args = parser.parse_args()

    work = args.work / f"news{args.news}-dim{args.dim}"
    run = build_run(work, args.news, args.dim, args.model)
    store = Store.load(work / "store")
    users = store.user_ids[np.unique(np.asarray(store.behaviors("dev").user_index))].tolist()
    news = store.news_ids[1:].tolist()
    load_before = os.getloadavg()
    cluster = None if args.state_url else ThrowawayCluster(fsync=True)
    results, cpu_ms = {}, {}  # cpu_ms: the servers' CPU time per event + /recommend pair
    servers = []
    try:
        url = args.state_url or cluster.url  # type: ignore[union-attr]
        ports = [free_port(), free_port()]
        servers = [start_server(run, port, ["--state", url], None) for port in ports]
        bases = [f"http://127.0.0.1:{port}" for port in ports]
        asyncio.run(mixed(bases, users, news, 100, "warm"))
        cpu = sum(cpu_seconds(server.pid) for server in servers)
        results["PostgreSQL, 2 replicas"] = asyncio.run(
            load_with_probe(bases, users, news, args.pairs, args.probe_every, "pg")
        )
        cpu_ms["PostgreSQL, 2 replicas"] = (
            (sum(cpu_seconds(server.pid) for server in servers) - cpu) * 1000 / args.pairs
        )
        for server in servers:
            server.terminate()
            server.wait(30)
        with tempfile.TemporaryDirectory(dir=work) as state:
            port = free_port()
            servers = [start_server(run, port, ["--state", state], None)]
            base = f"http://127.0.0.1:{port}"
            asyncio.run(mixed([base], users, news, 100, "warm"))
            cpu = cpu_seconds(servers[0].pid)
            results["SQLite, 1 server"] = asyncio.run(
                load_with_probe([base], users, news, args.pairs, args.probe_every, "lite")
            )
            cpu_ms["SQLite, 1 server"] = (cpu_seconds(servers[0].pid) - cpu) * 1000 / args.pairs
    finally:
        for server in servers:
            server.terminate()
            server.wait(30)
        if cluster is not None:
            cluster.stop()
    load_after = os.getloadavg()
    print(
        f"\nmixed load at {args.news:,} news x {args.dim}-d, {args.model} (cpu preset), "
        f"{CLIENTS} clients, {args.pairs:,} event + /recommend pairs, round robin over the "
        f"replicas; {os.cpu_count()} CPUs; load average before "
        f"{' '.join(f'{x:.1f}' for x in load_before)}, after "
        f"{' '.join(f'{x:.1f}' for x in load_after)}"
    )
    header = ("", "events/s", "rec p50", "rec p99", "ev p50", "ev p99", "errors")
    print("{:<28} {:>9} {:>8} {:>8} {:>8} {:>8} {:>7}".format(*header), end="")
    print(f" {'cpu/pair':>8} {'lag p50':>8} {'lag p99':>8} {'lag max':>8}  (ms)")
    for label, (recommend, events, seconds, lags) in results.items():
        report(label, recommend, events, seconds, lags, cpu_ms[label])
    errors = sum(r.errors + e.errors for r, e, _, _ in results.values())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
