"""Latency and throughput of POST /recommend at 100k news, one server process.

Builds (once, cached in --work) a synthetic corpus of 100k news, random 384-d news vectors
(one random centre per subcategory plus noise, so they cluster by topic as text embeddings do) and
a reranker at the "cpu" preset (--model, default fast_rec_transformer) trained for a few steps
(its weights do not change the cost of a request), starts `mmnewsrec serve` on 127.0.0.1 in a
subprocess, then drives it with an asyncio + httpx client at each concurrency: a fixed number of
requests, each with the click history of a real dev impression of the corpus. Prints p50/p99
latency, requests/s and errors (and exits 1 on any error), the server's CPU time per request, the
GET /health round trip and CPU time (the floor under any request) and the server's resident memory.

--compare-src DIR serves a second checkout of the package (DIR/src first on its PYTHONPATH, e.g.
the main branch) beside this one and drives the two in alternation, in --rounds slices of the
requests, so that both meet the same load on a shared machine.

    python benchmarks/serve.py [--news 100000] [--requests 1000] [--concurrency 1 16] [--model M]
        [--recall-backend auto|exact|faiss_flat|faiss_hnsw] [--threads 1] [--parallel 1]
        [--compare-src DIR] [--rounds 5]
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
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np


def build_run(work: Path, news: int, dim: int, model: str) -> Path:
    """Synthetic store, random vectors and a briefly trained `model` under `work` (cached)."""
    from mmnewsrec.data.store import build_store
    from mmnewsrec.data.synthetic import SynthConfig, generate
    from mmnewsrec.formats.vectors import NewsVectors

    run = work / ("run" if model == "fast_rec_transformer" else f"run-{model}")
    if (run / "checkpoint.pt").is_file():
        return run
    if (work / "emb" / "manifest.json").is_file():  # the corpus of another model's run
        return train_run(work, run, model)
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
    return train_run(work, run, model)


def train_run(work: Path, run: Path, model: str) -> Path:
    """`model` at its "cpu" preset trained for a few steps on the store and vectors in `work`."""
    from mmnewsrec.config import load_config
    from mmnewsrec.rank.train import run_training

    values = {
        "data.store_dir": work / "store",
        "data.vectors_dir": work / "emb",
        "data.dev_impressions": 100,
        "run.out_dir": run,
        "run.max_steps": 5,
        "run.progress": False,
        "model.name": model,
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


def start_server(run: Path, port: int, options: list[str], src: Path | None) -> subprocess.Popen:
    """`mmnewsrec serve` in a subprocess (the package from `src`/src when given); returns once
    /health answers."""
    command = [sys.executable, "-c", "from mmnewsrec.cli import app; app()", "serve", str(run)]
    command += ["--port", str(port), "--no-access-log", *options]
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src.resolve() / "src"), env.get("PYTHONPATH", "")])
    server = subprocess.Popen(command, env=env)
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


@dataclass
class Tally:
    """What one server answered at one concurrency, summed over rounds."""

    latencies_ms: list[float] = field(default_factory=list)
    server_ms: list[dict] = field(default_factory=list)  # each response's timings_ms
    errors: int = 0
    seconds: float = 0.0  # wall time spent driving it
    cpu_seconds: float = 0.0  # the server's CPU time meanwhile

    def row(self, label: str) -> str:
        ms = np.array(self.latencies_ms)
        keys = self.server_ms[0] if self.server_ms else {}
        server = {key: np.median([t[key] for t in self.server_ms]) for key in keys}
        return (
            f"{label:>5} {len(ms):>9} {self.errors:>7} {np.percentile(ms, 50):>8.2f} "
            f"{np.percentile(ms, 99):>8.2f} {len(ms) / self.seconds:>8.1f} "
            f"{self.cpu_seconds * 1000 / len(ms):>10.2f}  "
            + " ".join(f"{k} {v:.2f}" for k, v in server.items())
        )


async def health(url: str, requests: int, tally: Tally) -> None:
    """GET /health `requests` times, one at a time: the HTTP round trip with no work."""
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(requests):
            start = time.perf_counter()
            (await client.get(url)).raise_for_status()
            tally.latencies_ms.append((time.perf_counter() - start) * 1000)
            tally.server_ms.append({})


async def drive(url: str, bodies: list[dict], concurrency: int, tally: Tally) -> None:
    """POST every body with `concurrency` requests in flight; latencies and errors to `tally`."""
    queue = iter(bodies)

    async def worker(client: httpx.AsyncClient) -> None:
        for body in queue:
            start = time.perf_counter()
            try:
                response = await client.post(url, json=body)
                ok = response.status_code == 200 and len(response.json()["items"]) == body["k"]
            except httpx.HTTPError:
                ok = False
            tally.latencies_ms.append((time.perf_counter() - start) * 1000)
            tally.errors += not ok
            if ok:
                tally.server_ms.append(response.json()["timings_ms"])

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))


def timed(server: subprocess.Popen, tally: Tally, job) -> None:
    """Run the coroutine `job`, adding its wall time and the server's CPU time to `tally`."""
    cpu, start = cpu_seconds(server.pid), time.perf_counter()
    asyncio.run(job)
    tally.seconds += time.perf_counter() - start
    tally.cpu_seconds += cpu_seconds(server.pid) - cpu


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
    parser.add_argument("--model", default="fast_rec_transformer", help="the reranker trained")
    parser.add_argument("--compare-src", type=Path, help="another checkout, served beside")
    parser.add_argument("--rounds", type=int, default=5, help="slices driven in alternation")
    args = parser.parse_args()

    work = args.work / f"news{args.news}-dim{args.dim}"
    run = build_run(work, args.news, args.dim, args.model)
    bodies = request_bodies(run.parent, args.requests, args.k)
    options = ["--recall-k", str(args.recall_k), "--recall-backend", args.recall_backend]
    options += ["--threads", str(args.threads), "--parallel", str(args.parallel)]
    options += ["--device", args.device]
    sources = {"this": None} | ({"other": args.compare_src} if args.compare_src else {})
    ports = {label: free_port() for label in sources}
    servers: dict[str, subprocess.Popen] = {}
    try:
        for label, src in sources.items():
            servers[label] = start_server(run, ports[label], options, src)
        info = httpx.get(f"http://127.0.0.1:{ports['this']}/health").json()
        tallies = drive_all(servers, ports, bodies, args)
        memory = {label: rss_mb(server.pid) for label, server in servers.items()}
    finally:
        for server in servers.values():
            server.terminate()
            server.wait(30)
    lengths = [len(b["history"]) for b in bodies]
    print(
        f"\n/recommend at {args.news:,} news x {args.dim}-d, {info['model']} (cpu preset) on "
        f"{info['device']}, recall {args.recall_k} ({info['recall_backend']}), k {args.k}, "
        f"history median {int(np.median(lengths))} clicks, {args.threads} thread(s), "
        f"{args.parallel} at once; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f}; this: {Path.cwd()}"
        + (f", other: {args.compare_src}" if args.compare_src else "")
    )
    header = ("", "requests", "errors", "p50 ms", "p99 ms", "req/s", "cpu ms/req")
    print("{:>5} {:>9} {:>7} {:>8} {:>8} {:>8} {:>10}  server medians (ms)".format(*header))
    for key, by_label in tallies.items():
        print(f"{key}:")
        for label, tally in by_label.items():
            print(tally.row(label))
    for label, (rss, peak) in memory.items():
        print(f"{label} server memory: RSS {rss:,.0f} MB, peak {peak:,.0f} MB")
    errors = sum(t.errors for by_label in tallies.values() for t in by_label.values())
    return 1 if errors else 0


def drive_all(
    servers: dict[str, subprocess.Popen], ports: dict[str, int], bodies: list[dict], args
) -> dict[str, dict[str, Tally]]:
    """Warm every server, then per concurrency (and for GET /health, the floor) drive the
    servers in alternation, one slice of the requests each per round."""
    tallies: dict[str, dict[str, Tally]] = {}
    slices = [bodies[i :: args.rounds] for i in range(args.rounds)]
    for port in ports.values():
        asyncio.run(drive(f"http://127.0.0.1:{port}/recommend", bodies[:50], 1, Tally()))  # warm
    levels = [("GET /health", 1), *((f"concurrency {c}", c) for c in args.concurrency)]
    for key, concurrency in levels:
        tallies[key] = {label: Tally() for label in servers}
        for part in slices:
            for label, server in servers.items():
                url, tally = f"http://127.0.0.1:{ports[label]}", tallies[key][label]
                job = (
                    health(f"{url}/health", len(part), tally)
                    if key == "GET /health"
                    else drive(f"{url}/recommend", part, concurrency, tally)
                )
                timed(server, tally, job)
    return tallies


if __name__ == "__main__":
    sys.exit(main())
