"""The live service under load: bulk event ingest, /recommend by user id, and a mixed load of
one POST /events per /recommend, against one `mmnewsrec serve --state` process.

Uses the corpus and run of benchmarks/serve.py (built once, cached in --work), a fresh state
folder per invocation. Phases, in order:

- ingest: --ingest impressions (the store's train impressions, cycled under new ids) through
  POST /events/batch in batches of --batch, one request at a time, the bodies encoded as JSON
  beforehand (the server's work, not the client's): impressions/s;
- by user: POST /recommend {"user_id"} at each --concurrency, each level for users of its own
  (the store's users, shuffled, each asked once: first visits): p50, p99, req/s, errors, the
  server's CPU time per request; then the first level's requests again at concurrency 1, each
  user now a returning one (their recall and history encoding kept);
- mixed: 16 clients, each alternating POST /events (one impression with a click) and POST
  /recommend for the same user: /recommend p50/p99, events/s;
- the server's resident memory and the state file's size after all of it;
- start-up: the server stopped (a clean stop writes the state's snapshot) and started again
  on its state, timed to its first /health answer, with the snapshot and without it, and on an
  empty state for reference.

--src DIR serves the package of another checkout (DIR/src first on its PYTHONPATH, e.g. the
main branch), for a before/after on the same machine; --skip-recommend leaves out the
/recommend and mixed phases, --ingest-only every phase but the ingest (then --repeat N runs it N
times, each on a fresh server and state, alternating with the --src server where given).

    python benchmarks/serve_live.py [--news 100000] [--ingest 200000] [--batch 5000]
        [--requests 1000] [--concurrency 1 16] [--mixed 2000] [--sync full|normal] [--no-signals]
        [--parallel 1] [--src DIR] [--skip-recommend] [--ingest-only [--repeat N]]

The run reads every behaviour signal (the model of benchmarks/serve.py retrained a few steps
with model.signals) unless --no-signals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from serve import (
    Tally,
    build_run,
    cpu_seconds,
    drive,
    free_port,
    rss_mb,
    start_server,
    timed,
)

from mmnewsrec.formats.store import Store
from mmnewsrec.serve.export import split_events


def signals_run(work: Path, run: Path) -> Path:
    """`run`'s model retrained (a few steps) to read every behaviour signal (cached)."""
    from mmnewsrec.config import load_config
    from mmnewsrec.formats.store import SIGNAL_NAMES
    from mmnewsrec.rank.train import run_training

    out = run.parent / f"{run.name}-signals"
    if not (out / "checkpoint.pt").is_file():
        values = {
            "data.store_dir": work / "store",
            "data.vectors_dir": work / "emb",
            "data.dev_impressions": 100,
            "run.out_dir": out,
            "run.max_steps": 5,
            "run.progress": False,
            "model.signals": list(SIGNAL_NAMES),
        }
        run_training(load_config("train_cpu", values=values))
    return out


def ingest_bodies(store: Store, count: int) -> list[dict]:
    """`count` events: the train split's impressions in time order, cycled under new ids."""
    events = split_events(store, "train")
    return [
        events[i % len(events)] | {"impression_id": f"b{i}"} for i in range(count)
    ]  # fmt: skip


async def ingest(url: str, bodies: list[dict], batch: int) -> tuple[float, float]:
    """POST every body in batches (encoded beforehand), one request at a time; seconds taken,
    and the CPU seconds of this client meanwhile."""
    encoded = [json.dumps(bodies[first : first + batch]) for first in range(0, len(bodies), batch)]
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(timeout=300) as client:
        start, cpu = time.perf_counter(), time.process_time()
        for content in encoded:
            response = await client.post(url, content=content, headers=headers)
            response.raise_for_status()
        return time.perf_counter() - start, time.process_time() - cpu


def ingest_only(
    run: Path, work: Path, bodies: list[dict], args: argparse.Namespace, options: list[str]
) -> None:
    """The ingest alone, --repeat times on a fresh server and state (this checkout's, then the
    --src one's, in turn): wall seconds, impressions/s and the server's CPU seconds."""
    port = free_port()
    sources = [("this checkout", None)] + ([(f"--src {args.src}", args.src)] if args.src else [])
    print(f"ingest of {len(bodies):,} impressions in batches of {args.batch:,}, sync {args.sync}")
    for attempt in range(args.repeat):
        for label, src in sources:
            with tempfile.TemporaryDirectory(dir=work) as state:
                server = start_server(run, port, ["--state", state, *options], src)
                try:
                    cpu = cpu_seconds(server.pid)
                    url = f"http://127.0.0.1:{port}/events/batch"
                    seconds, client = asyncio.run(ingest(url, bodies, args.batch))
                    cpu = cpu_seconds(server.pid) - cpu
                finally:
                    stop(server)
            load = " ".join(f"{x:.1f}" for x in os.getloadavg())
            print(
                f"{attempt + 1} {label}: {seconds:.2f} s, {len(bodies) / seconds:,.0f} "
                f"impressions/s, CPU: server {cpu:.2f} s, client {client:.2f} s; load {load}"
            )


def timed_start(run: Path, port: int, options: list[str], src: Path | None) -> tuple[float, Any]:
    """Seconds until a new server on `run` answers /health, and the server."""
    start = time.perf_counter()
    server = start_server(run, port, options, src)
    return time.perf_counter() - start, server


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(60)


async def mixed(
    base: str, users: list[str], news: list[str], count: int, tally: Tally
) -> tuple[int, list[float]]:
    """16 clients, each: POST /events (a click of one of ten news) then POST /recommend for
    that user; the /recommend latencies go to `tally`; returns the events stored and their
    latencies (ms)."""
    rng = np.random.default_rng(0)
    plan = iter(range(count))
    stored, event_ms = 0, []
    ids = np.array(news)  # once: a choice among the list itself converts it at every call

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal stored
        for n in plan:
            user = users[n % len(users)]
            shown = ids[rng.choice(len(ids), 10, replace=False)].tolist()
            event = {"impression_id": f"m{n}", "user_id": user, "shown": shown}
            start = time.perf_counter()
            response = await client.post(f"{base}/events", json=event | {"clicked": shown[:1]})
            event_ms.append((time.perf_counter() - start) * 1000)
            stored += response.status_code == 200
            start = time.perf_counter()
            response = await client.post(f"{base}/recommend", json={"user_id": user, "k": 10})
            tally.latencies_ms.append((time.perf_counter() - start) * 1000)
            tally.errors += response.status_code != 200
            if response.status_code == 200:
                tally.server_ms.append(response.json()["timings_ms"])

    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(16)))
    return stored, event_ms


def client_timed(server: subprocess.Popen, tally: Tally, job: Any) -> float:
    """`timed`, and the CPU seconds this process (the benchmark's client) spent meanwhile."""
    start = time.process_time()
    timed(server, tally, job)
    return time.process_time() - start


def asks(users: list[str], count: int, block: int) -> list[dict]:
    """`count` /recommend bodies for the users of the `block`-th run of `count` users."""
    return [{"user_id": users[(block * count + i) % len(users)], "k": 10} for i in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mmnewsrec-bench-serve"))
    parser.add_argument("--news", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--model", default="fast_rec_transformer")
    parser.add_argument("--ingest", type=int, default=200_000, help="impressions bulk-loaded")
    parser.add_argument("--batch", type=int, default=5000, help="impressions per batch")
    parser.add_argument("--requests", type=int, default=1000, help="per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--mixed", type=int, default=2000, help="event + recommend pairs")
    parser.add_argument("--sync", default="full", help="serve --sync")
    parser.add_argument("--parallel", type=int, default=1, help="serve --parallel")
    parser.add_argument("--no-signals", action="store_true", help="a run without signals")
    parser.add_argument("--src", type=Path, help="serve the package of this checkout")
    parser.add_argument("--skip-recommend", action="store_true", help="ingest and start-up only")
    parser.add_argument("--ingest-only", action="store_true", help="the ingest phase alone")
    parser.add_argument("--repeat", type=int, default=1, help="ingests, with --ingest-only")
    args = parser.parse_args()

    work = args.work / f"news{args.news}-dim{args.dim}"
    run = build_run(work, args.news, args.dim, args.model)
    if not args.no_signals:
        run = signals_run(work, run)
    store = Store.load(work / "store")
    bodies = ingest_bodies(store, args.ingest)
    users = np.random.default_rng(0).permutation(store.user_ids).tolist()  # the store's, 2,451
    news = store.news_ids[1:].tolist()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    options = ["--sync", args.sync, "--parallel", str(args.parallel)]
    if args.ingest_only:
        ingest_only(run, work, bodies, args, options)
        return 0
    with tempfile.TemporaryDirectory(dir=work) as state:
        empty_start, server = timed_start(run, port, ["--state", state, *options], args.src)
        try:
            loaded_rss = rss_mb(server.pid)[0]
            seconds, _ = asyncio.run(ingest(f"{base}/events/batch", bodies, args.batch))
            ingest_rss = rss_mb(server.pid)[0]
            tallies, client_cpu = {}, {}
            if args.skip_recommend:
                args.concurrency, args.mixed = [], 0
            # each concurrency level asks users of its own (first visits), after a warm-up
            # on others; the returning users are the first level's, asked again
            levels = [asks(users, args.requests, n + 1) for n in range(len(args.concurrency))]
            if args.concurrency:
                asyncio.run(drive(f"{base}/recommend", asks(users, 50, 0), 1, Tally()))
            for concurrency, asked in zip(args.concurrency, levels, strict=True):
                label = f"concurrency {concurrency}"
                tally = tallies[label] = Tally()
                job = drive(f"{base}/recommend", asked, concurrency, tally)
                client_cpu[label] = client_timed(server, tally, job)
            asked = levels[0] if levels else asks(users, args.requests, 1)
            label = "returning users, concurrency 1"
            tally = tallies[label] = Tally()
            client_cpu[label] = client_timed(
                server, tally, drive(f"{base}/recommend", asked, 1, tally)
            )
            mixed_tally, event_ms = Tally(), []
            if args.mixed:
                stored_ms: list[tuple[int, list[float]]] = []

                async def mixed_load() -> None:
                    stored_ms.append(await mixed(base, users, news, args.mixed, mixed_tally))

                mixed_client = client_timed(server, mixed_tally, mixed_load())
                stored, event_ms = stored_ms[0]
            rss, peak = rss_mb(server.pid)
            size = sum(f.stat().st_size for f in Path(state).iterdir()) / 2**20
            stop(server)
            snapshot = Path(state) / "snapshot.npz"
            starts = {}
            for label in ("with the snapshot", "without it"):
                if label == "without it":
                    snapshot.unlink(missing_ok=True)
                elif not snapshot.is_file():
                    continue  # a version that keeps none
                starts[label], server = timed_start(
                    run, port, ["--state", state, *options], args.src
                )
                stop(server)
        finally:
            stop(server)
    print(
        f"\nlive service at {args.news:,} news x {args.dim}-d, {args.model} (cpu preset"
        f"{', no signals' if args.no_signals else ', every signal'}), "
        f"sync {args.sync}, parallel {args.parallel}; {os.cpu_count()} CPUs, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(
        f"ingest: {args.ingest:,} impressions in batches of {args.batch:,}: {seconds:.1f} s, "
        f"{args.ingest / seconds:,.0f} impressions/s"
    )
    header = ("", "requests", "errors", "p50 ms", "p99 ms", "req/s", "cpu ms/req")
    print("{:>5} {:>9} {:>7} {:>8} {:>8} {:>8} {:>10}  server medians (ms)".format(*header))
    for label, tally in tallies.items():
        per_request = client_cpu[label] * 1000 / len(tally.latencies_ms)
        print(f"{label} (the client's CPU: {per_request:.2f} ms/req)")
        print(tally.row(""))
    if args.mixed:
        rate = stored / mixed_tally.seconds
        print(
            f"mixed (16 clients, one POST /events per /recommend): {rate:,.0f} events/s; "
            f"POST /events p50 {np.percentile(event_ms, 50):.2f} / p99 "
            f"{np.percentile(event_ms, 99):.2f} ms; CPU per pair: server "
            f"{mixed_tally.cpu_seconds * 1000 / args.mixed:.2f} ms, client "
            f"{mixed_client * 1000 / args.mixed:.2f} ms; /recommend (cpu ms/req: a pair's):"
        )
        print(mixed_tally.row(""))
    print(
        f"server RSS: {loaded_rss:,.0f} MB loaded, {ingest_rss:,.0f} MB after the ingest, "
        f"{rss:,.0f} MB at the end (peak {peak:,.0f}); state folder {size:,.0f} MB"
    )
    print(
        f"start-up (to the first /health answer): empty state {empty_start:.1f} s; after the "
        f"ingest, " + ", ".join(f"{label} {s:.1f} s" for label, s in starts.items())
    )
    errors = sum(t.errors for t in tallies.values()) + mixed_tally.errors
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
