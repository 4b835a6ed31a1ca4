"""Recall@K and the image share of recalled news against the share among clicks, per recall
setting (plain cosine, centred parts, image weight, popularity share) on a store and vectors.

    python benchmarks/recall.py --store STORE --vectors EMB [EMB ...] [--split dev]
    python benchmarks/recall.py --latency-news 50000    # CPU ms per one-user search
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch

from mmnewsrec.evaluate.experiment import clicked_image_share, news_with_image
from mmnewsrec.formats.store import Store
from mmnewsrec.formats.vectors import NewsVectors
from mmnewsrec.recall import ItemStats, Recaller

KS = [10, 50, 200]


def settings(args: argparse.Namespace) -> list[dict]:
    rows = [{"centre_parts": False, "popular_share": 0.0}]
    for weight, share in itertools.product(args.image_weights, args.popular_shares):
        rows.append({"centre_parts": True, "image_weight": weight, "popular_share": share})
    return rows


def latency(num_news: int, requests: int = 200, dim: int = 384) -> None:
    """CPU time of one-user searches (k 200, 30 clicks, one thread) on random vectors: the plain
    cosine, the centred space, and the centred space with the popularity channel."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((num_news + 1, dim)).astype(np.float32)
    vectors[0] = 0
    stats = ItemStats(rng.random(num_news + 1) * 10, rng.integers(0, 10**6, num_news + 1), 10**6, 1)
    history = rng.integers(1, num_news + 1, size=(requests, 30))
    setups = {
        "plain cosine": {"centre_parts": False},
        "centred": {},
        "centred, popularity 0.1": {"popular_share": 0.1},
    }
    for (name, setup), backend in itertools.product(setups.items(), ("exact", "faiss_hnsw")):
        channel = stats if setup.get("popular_share") else None
        recaller = Recaller(k=200, backend=backend, **setup).fit(vectors, stats=channel)
        start = time.process_time()
        for row in history:
            recaller.search(recaller.user_vectors(row[None]), exclude=row[None])
        ms = 1000 * (time.process_time() - start) / requests
        print(f"{num_news:,} news, {backend}, {name}: {ms:.2f} ms CPU per request")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path)
    parser.add_argument("--vectors", type=Path, nargs="+")
    parser.add_argument("--latency-news", type=int, help="Time searches on random vectors.")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--image-weights", type=float, nargs="+", default=[0.5])
    parser.add_argument("--popular-shares", type=float, nargs="+", default=[0.0, 0.1])
    args = parser.parse_args()
    if args.latency_news:
        latency(args.latency_news)
        return
    if args.store is None or args.vectors is None:
        parser.error("--store and --vectors are needed (or --latency-news)")
    store = Store.load(args.store)
    behaviors, has_image = store.behaviors(args.split), news_with_image(store)
    print(
        f"{args.split}: clicked image share {clicked_image_share(store, args.split):.3f}, "
        f"news image share {has_image[1:].mean():.3f}"
    )
    header = " | ".join(f"recall@{k} | image@{k}" for k in KS)
    print(f"| vectors | setting | {header} | s |")
    for path in args.vectors:
        vectors = NewsVectors.load(path)
        for setting in settings(args):
            start = time.process_time()
            recaller = Recaller(k=max(KS), **setting)
            recaller.fit_store(vectors, store, args.train_split)
            stats = recaller.recall_stats(behaviors, KS, has_image)
            cells = " | ".join(
                f"{stats[k]['recall']:.4f} | {stats[k]['image_share']:.3f}" for k in KS
            )
            name = ", ".join(f"{key}={value}" for key, value in setting.items())
            print(f"| {path.name} | {name} | {cells} | {time.process_time() - start:.1f} |")


if __name__ == "__main__":
    main()
