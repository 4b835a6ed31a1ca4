"""Latency and throughput of POST /recommend at 100k news, one server process.

Builds (once, cached in --work) a synthetic corpus of 100k news, random 384-d news vectors
(one random centre per subcategory plus noise, so they cluster by topic as text embeddings do) and
a fast_rec_transformer at the "cpu" preset trained for a few steps (its weights do not change
the cost of a request), starts `mmnewsrec serve` on 127.0.0.1 in a subprocess, then drives it
with an asyncio + httpx client at each concurrency: a fixed number of requests, each with the
click history of a real dev impression of the corpus. Prints p50/p99 latency, requests/s and
errors (and exits 1 on any error), the GET /health round trip (the floor under any request) and
the server's resident memory.

    python benchmarks/serve.py [--news 100000] [--requests 1000] [--concurrency 1 16]
        [--recall-backend auto|exact|faiss_flat|faiss_hnsw] [--threads 1] [--parallel 1]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np


def build_run(work: Path, news: int, dim: int) -> Path:
    """Synthetic store, random vectors and a briefly trained ranker under `work` (cached)."""
    from mmnewsrec.config import load_config
    from mmnewsrec.data.store import build_store
    from mmnewsrec.data.synthetic import SynthConfig, generate
    from mmnewsrec.formats.vectors import NewsVectors
    from mmnewsrec.rank.train import run_training

    run = work / "run"
    if (run / "checkpoint.pt").is_file():
        return run
    config = SynthConfig(news=news, users=5000, impressions=5000, image_share=0.0)
    generate(work / "data", config)
    store = build_store(work / "data", work / "store")
    rng = np.random.default_rng(0)
    _, topic = np.unique(store.news["subcategory"].to_numpy(), return_inverse=True)
    centres = rng.normal(size=(topic.max() + 1, dim))
    vectors = np.zeros((news + 1, dim), dtype=np.float16)
    vectors[1:] = centres[topic] + rng.normal(size=(news, dim))
    manifest = {
        "hash": hashlib.sha256(vectors.tobytes()).hexdigest(),
        "store": {"content_hash": store.content_hash},
        "fusion": {"method": "random (benchmark)"},
    }
    NewsVectors(vectors, np.zeros(news + 1, dtype=bool), manifest).save(work / "emb")
    values = {
        "data.store_dir": work / "store",
        "data.vectors_dir": work / "emb",
        "data.dev_impressions": 100,
        "run.out_dir": run,
        "run.max_steps": 5,
        "run.progress": False,
    }
    run_training(load_config("train_cpu", values=values))
    return run


def request_bodies(work: Path, count: int, k: int) -> list[dict]:
    """`count` bodies cycling over the non-empty histories of the dev impressions."""
    from mmnewsrec.formats.store import Store

    store = Store.load(work / "store")
    dev = store.behaviors("dev")
    bodies = [
        {"history": store.news_ids[dev.history(i)].tolist(), "k": k}
        for i in range(dev.num_impressions)
        if len(dev.history(i))
    ]
    return [bodies[i % len(bodies)] for i in range(count)]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used: a figure that other load on
    the machine does not inflate the way it inflates wall-clock latency."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(run: Path, port: int, options: list[str]) -> subprocess.Popen:
    """`mmnewsrec serve` in a subprocess; returns once /health answers."""
    command = [sys.executable, "-c", "from mmnewsrec.cli import app; app()", "serve", str(run)]
    command += ["--port", str(port), "--no-access-log", *options]
    server = subprocess.Popen(command)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with status {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.5)
    server.terminate()
    raise RuntimeError("server did not answer /health in 300 s")


def rss_mb(pid: int) -> tuple[float, float]:
    """Resident and peak resident memory of a process, MB."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return tuple(int(status[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM"))


async def health_floor(url: str, requests: int) -> tuple[float, float]:
    """p50 and p99 ms of GET /health: the HTTP round trip with no recommendation work."""
    latencies = []
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(requests):
            start = time.perf_counter()
            (await client.get(url)).raise_for_status()
            latencies.append((time.perf_counter() - start) * 1000)
    return np.percentile(latencies, 50), np.percentile(latencies, 99)


async def drive(url: str, bodies: list[dict], concurrency: int) -> dict:
    """POST every body with `concurrency` requests in flight; latency and error figures."""
    queue = iter(bodies)
    latencies: list[float] = []
    server_ms: list[dict] = []
    errors = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for body in queue:
            start = time.perf_counter()
            try:
                response = await client.post(url, json=body)
                ok = response.status_code == 200 and len(response.json()["items"]) == body["k"]
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok
            if ok:
                server_ms.append(response.json()["timings_ms"])

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": np.percentile(ms, 50),
        "p99_ms": np.percentile(ms, 99),
        "rps": len(latencies) / elapsed,
        "server": {key: np.median([t[key] for t in server_ms]) for key in server_ms[0]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mmnewsrec-bench-serve"))
    parser.add_argument("--news", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--requests", type=int, default=1000, help="per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--recall-k", type=int, default=200)
    parser.add_argument("--recall-backend", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="serve --threads")
    parser.add_argument("--parallel", type=int, default=1, help="serve --parallel")
    parser.add_argument("--device", default="cpu", help="serve --device (the model's)")
    args = parser.parse_args()

    run = build_run(args.work / f"news{args.news}-dim{args.dim}", args.news, args.dim)
    bodies = request_bodies(run.parent, args.requests, args.k)
    port = free_port()
    options = ["--recall-k", str(args.recall_k), "--recall-backend", args.recall_backend]
    options += ["--threads", str(args.threads), "--parallel", str(args.parallel)]
    options += ["--device", args.device]
    server = start_server(run, port, options)
    health = httpx.get(f"http://127.0.0.1:{port}/health").json()
    url = f"http://127.0.0.1:{port}/recommend"
    try:
        asyncio.run(drive(url, bodies[:50], 1))  # warm-up
        floor = asyncio.run(health_floor(f"http://127.0.0.1:{port}/health", len(bodies)))
        results = []
        for concurrency in args.concurrency:
            cpu = cpu_seconds(server.pid)
            results.append(asyncio.run(drive(url, bodies, concurrency)))
            results[-1]["cpu_ms"] = (cpu_seconds(server.pid) - cpu) * 1000 / len(bodies)
        rss, peak = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    lengths = [len(b["history"]) for b in bodies]
    print(
        f"\n/recommend at {args.news:,} news x {args.dim}-d, {health['model']} (cpu preset) on "
        f"{health['device']}, recall {args.recall_k} ({health['recall_backend']}), k {args.k}, "
        f"history median {int(np.median(lengths))} clicks, {args.threads} thread(s), "
        f"{args.parallel} at once; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    header = ("conc", "requests", "errors", "p50 ms", "p99 ms", "req/s", "cpu ms/req")
    print("{:>5} {:>9} {:>7} {:>8} {:>8} {:>8} {:>10}  server medians (ms)".format(*header))
    for r in results:
        server_part = " ".join(f"{k} {v:.2f}" for k, v in r["server"].items())
        print(
            f"{r['concurrency']:>5} {r['requests']:>9} {r['errors']:>7} {r['p50_ms']:>8.2f} "
            f"{r['p99_ms']:>8.2f} {r['rps']:>8.1f} {r['cpu_ms']:>10.2f}  {server_part}"
        )
    print(f"GET /health (the HTTP floor): p50 {floor[0]:.2f} ms, p99 {floor[1]:.2f} ms")
    print(f"server memory: RSS {rss:,.0f} MB, peak {peak:,.0f} MB")
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
