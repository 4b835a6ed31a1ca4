"""Where one /recommend request's CPU goes, in process (no HTTP): recall and rerank per request,
the reranker's forward part by part, and the HNSW graph's M against the exact top-K.

Uses the run `benchmarks/serve.py` builds (run it once first; the same --work, --news, --dim).
Times are CPU time on one thread, the best of 3 repeats: figures the machine's load inflates less
than wall-clock latency. Last, the pause of a full garbage collection, before and after the
loaded objects are frozen out of the collector's sight as `mmnewsrec serve` does.

    python benchmarks/serve_profile.py [--work /tmp/mmnewsrec-bench-serve] [--model M]
        [--requests 300] [--hnsw-m 32 16]
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from serve import request_bodies

from mmnewsrec.csr import csr_offsets
from mmnewsrec.recall import Recaller
from mmnewsrec.serve.recommender import Recommender


def cpu_ms(job: Callable[[], object], calls: int, repeats: int = 3) -> float:
    """Best of `repeats` of the mean CPU milliseconds per call of `job`."""
    job()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            job()
        best = min(best, (time.process_time() - start) / calls * 1000)
    return best


def request_split(rec: Recommender, histories: list[np.ndarray], bodies: list[dict]) -> None:
    recaller = rec.recaller

    def recall_all() -> None:
        for history in histories:
            recaller.search_one(history, rec.recall_k, np.unique(history))

    def recommend_all() -> None:
        for body in bodies:
            rec.recommend(body["history"], body["k"])

    def returning_all() -> None:  # a user per history, asking again: recall and encoding kept
        for n, history in enumerate(histories):
            rec.recommend_known(history, 10, user=f"user{n}")

    recall = cpu_ms(recall_all, 1) / len(histories)
    total = cpu_ms(recommend_all, 1) / len(bodies)
    returning = cpu_ms(returning_all, 1) / len(histories)
    print(
        f"per request: recall {recall:.2f} ms, whole recommend {total:.2f} ms CPU, "
        f"{returning:.2f} ms for a returning user"
    )


def forward_parts(rec: Recommender, history: np.ndarray, width: int) -> None:
    """CPU ms of each part of a fast_rec_transformer forward over `width` candidates."""
    model = rec.ranker.model
    if not hasattr(model, "cross"):
        return
    generator = torch.Generator().manual_seed(0)
    hist = torch.from_numpy(history[-rec.ranker.history_len :])[None]
    cand = torch.randint(1, len(model.news_vectors), (1, width), generator=generator)
    with torch.inference_mode():
        tokens, mask = model.embed.history(model, hist)
        memory = model.encoder(tokens, src_key_padding_mask=mask)
        queries = model.embed.candidates(model, cand)
        user = model.norm(model.cross[0](queries, memory, mask))
        head_input = torch.cat([user, queries, user * queries], dim=-1)
        encoded = rec.ranker.encode_history(history)
        parts = {
            "history encoder": lambda: model.encoder(tokens, src_key_padding_mask=mask),
            "cross-attention block": lambda: model.cross[0](queries, memory, mask),
            "head": lambda: model.head(head_input),
            "whole forward (traced)": lambda: rec.ranker.score_batch(hist, cand),
            "history encoding (traced)": lambda: rec.ranker.encode_history(history),
            "candidates from a kept encoding (traced)": lambda: rec.ranker.score_encoded(
                encoded, cand[0].numpy(), width
            ),
        }
        times = {name: cpu_ms(job, 100) for name, job in parts.items()}
    print(f"forward over {width} candidates, history {hist.shape[1]}: " + ", ".join(
        f"{name} {ms:.2f} ms" for name, ms in times.items()
    ))  # fmt: skip


def hnsw_overlap(rec: Recommender, histories: list[np.ndarray], k: int, ms: list[int]) -> None:
    """Per HNSW M: CPU ms per user (batched search + exact rescoring) and the share of the
    exact top-k it finds."""
    base = rec.recaller
    offsets = csr_offsets(np.array([len(h) for h in histories]))
    users = base.user_vectors((offsets, np.concatenate(histories)))
    exact = Recaller(k, "exact").fit(base.vectors_, parts=base.space_.parts)
    _, truth = exact.search(users, k=k)
    for m in ms:
        recaller = Recaller(k, "faiss_hnsw", hnsw_m=m).fit(base.vectors_, parts=base.space_.parts)
        start = time.process_time()
        _, found = recaller.search(users, k=k)
        per_user = (time.process_time() - start) / len(users) * 1000
        pairs = zip(found, truth, strict=True)
        overlap = np.mean([len(np.intersect1d(a, b)) / k for a, b in pairs])
        print(f"HNSW M {m}: {per_user:.2f} ms per user, {overlap:.4f} of the exact top-{k}")


def collection_pause(rec: Recommender) -> None:
    """Wall ms of a full garbage collection with the run loaded, before and after
    `gc.freeze()` (what `mmnewsrec serve` does once loaded): a request that meets one waits."""
    times = []
    for freeze in (False, True):
        if freeze:
            gc.freeze()
        start = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - start) * 1000)
    gc.unfreeze()
    print(f"a full garbage collection: {times[0]:.1f} ms, {times[1]:.1f} ms after gc.freeze()")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mmnewsrec-bench-serve"))
    parser.add_argument("--news", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--model", default="fast_rec_transformer")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--recall-k", type=int, default=200)
    parser.add_argument("--widths", type=int, nargs="+", default=[200, 50])
    parser.add_argument("--hnsw-m", type=int, nargs="*", default=[32, 16])
    args = parser.parse_args()

    torch.set_num_threads(1)
    work = args.work / f"news{args.news}-dim{args.dim}"
    run = work / ("run" if args.model == "fast_rec_transformer" else f"run-{args.model}")
    if not (run / "checkpoint.pt").is_file():
        raise SystemExit(f"no run at {run}: run benchmarks/serve.py with the same options first")
    rec = Recommender.from_run(run, recall_k=args.recall_k)
    bodies = request_bodies(work, args.requests, 10)
    histories = [np.array([rec.index_of(i) for i in body["history"]]) for body in bodies]
    print(f"{args.model}, {args.news:,} news x {args.dim}, load average {os.getloadavg()[0]:.1f}")
    request_split(rec, histories, bodies)
    median = histories[int(np.argsort([len(h) for h in histories])[len(histories) // 2])]
    for width in args.widths:
        forward_parts(rec, median, width)
    hnsw_overlap(rec, histories, args.recall_k, args.hnsw_m)
    gc.collect()
    collection_pause(rec)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
