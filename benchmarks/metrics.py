"""Time the vectorised MIND metrics against a per-impression loop in the official style.

Random float32 scores and int8 labels (~4% clicks, at least one per impression) for 2.37M
impressions of 37 candidates (the size of MIND-large test). Times `evaluate_scores` on all of
them and the official-style loop (np.argsort + sklearn roc_auc_score per impression) on a subset,
extrapolated, and prints the ratio, the peak memory and the largest difference between the two
on the subset. With --files, also times writing and reading the leaderboard prediction file.

    python benchmarks/metrics.py [--impressions 2370000] [--candidates 37] [--loop 50000] [--files]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from mmnewsrec.evaluate.leaderboard import read_prediction, write_prediction
from mmnewsrec.evaluate.metrics import METRICS, evaluate_scores, ranks_from_scores


def make_data(impressions: int, candidates: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = impressions * candidates
    scores = rng.random(n, dtype=np.float32)
    labels = (rng.integers(0, 25, n, dtype=np.int8) == 0).astype(np.int8)
    offsets = np.arange(impressions + 1, dtype=np.int64) * candidates
    labels[offsets[:-1] + rng.integers(0, candidates, impressions)] = 1
    return scores, labels, offsets


def dcg_score(y_true, y_score, k):
    order = np.argsort(y_score)[::-1]
    y_true = np.take(y_true, order[:k])
    return np.sum((2**y_true - 1) / np.log2(np.arange(len(y_true)) + 2))


def official_loop(scores, labels, offsets) -> dict:
    """Per impression, as msnews/MIND evaluate.py (skipping impressions it cannot score)."""
    rows = []
    for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
        y_true, y_score = labels[lo:hi].astype(np.float32), scores[lo:hi]
        if y_true.sum() in (0, len(y_true)):
            continue
        order = np.argsort(y_score)[::-1]
        mrr = np.sum(np.take(y_true, order) / (np.arange(len(y_true)) + 1)) / np.sum(y_true)
        ndcg = [dcg_score(y_true, y_score, k) / dcg_score(y_true, y_true, k) for k in (5, 10)]
        rows.append((roc_auc_score(y_true, y_score), mrr, *ndcg))
    return dict(zip(METRICS, np.mean(rows, axis=0), strict=True))


def peak_rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 2**10


class Clock:
    """Wall and CPU seconds of a block (CPU time is steadier on a shared machine)."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def __str__(self) -> str:
        return f"{self.wall:.1f} s wall, {self.cpu:.1f} s CPU"


def timed(fn, *args):
    """(result, Clock, peak MiB allocated by numpy/Python during the call)."""
    tracemalloc.start()
    with Clock() as clock:
        result = fn(*args)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return result, clock, peak


def time_files(ranks: np.ndarray, offsets: np.ndarray) -> None:
    ids = np.arange(1, len(offsets))
    with tempfile.TemporaryDirectory() as tmp:
        path, clock, peak = timed(write_prediction, Path(tmp) / "p.txt", ids, ranks, offsets)
        size = path.stat().st_size / 2**20
        load = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        print(
            f"write_prediction (text read back and checked): {clock}, {size:.0f} MiB file, "
            f"peak +{peak:.0f} MiB; {load}"
        )
        _, clock, peak = timed(read_prediction, path)
        load = f"load average {os.getloadavg()[0]:.1f}"
        print(f"read_prediction (with permutation check): {clock}, peak +{peak:.0f} MiB; {load}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=2_370_000)
    parser.add_argument("--candidates", type=int, default=37)
    parser.add_argument("--loop", type=int, default=50_000, help="impressions for the loop")
    parser.add_argument("--files", action="store_true", help="also time the prediction file")
    args = parser.parse_args()
    scores, labels, offsets = make_data(args.impressions, args.candidates)
    inputs_mib = (scores.nbytes + labels.nbytes + offsets.nbytes) / 2**20
    print(f"{args.impressions:,} impressions x {args.candidates} = {len(scores):,} candidates")
    print(f"inputs: float32 scores + int8 labels + offsets = {inputs_mib:.0f} MiB")

    metrics, vec, vec_peak = timed(evaluate_scores, scores, labels, offsets)
    print(f"vectorised evaluate_scores: {vec}, peak +{vec_peak:.0f} MiB over the inputs")
    print(
        "  "
        + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
        )
    )
    ranks, clock, rank_peak = timed(ranks_from_scores, scores, offsets)
    print(f"ranks_from_scores: {clock}, peak +{rank_peak:.0f} MiB")

    sub = args.loop
    head = (scores[: offsets[sub]], labels[: offsets[sub]], offsets[: sub + 1])
    with Clock() as loop_clock:
        loop = official_loop(*head)
    scale = args.impressions / sub
    print(
        f"official-style loop: {loop_clock} for {sub:,} impressions -> "
        f"{loop_clock.wall * scale:.0f} s wall, {loop_clock.cpu * scale:.0f} s CPU for all"
    )
    wall_ratio, cpu_ratio = loop_clock.wall * scale / vec.wall, loop_clock.cpu * scale / vec.cpu
    print(f"speed-up: {wall_ratio:.0f}x wall, {cpu_ratio:.0f}x CPU")
    sub_metrics = evaluate_scores(*head)
    diff = max(abs(sub_metrics[m] - loop[m]) for m in METRICS)
    print(f"largest difference on the {sub:,} impressions: {diff:.2e}")
    if args.files:
        time_files(ranks, offsets)
    print(f"peak RSS of the process: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
