"""Time the significance table and the beyond-accuracy description at MIND-large dev size.

Significance: a 10-row table (per-impression AUC, MRR, nDCG@5, nDCG@10 of 376k impressions),
every row against the best row and a baseline, 1,000 paired-bootstrap resamples, paired t-tests,
Holm's correction (`significance.compare_table`). Describe: the top-10 lists, diversity over
384-d float16 news vectors, category entropy, novelty, coverage, personalisation, image share
and the history and candidate-age breakdowns of one run (`beyond_accuracy.describe_rankings`)
over the same impressions with 37 candidates each. Prints wall and CPU seconds and the load
average before and after (the machine may be shared).

    python benchmarks/significance.py [--impressions 376000] [--rows 10] [--resamples 1000]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from mmnewsrec.evaluate.beyond_accuracy import describe_rankings
from mmnewsrec.evaluate.significance import compare_table
from mmnewsrec.formats.store import Behaviors
from mmnewsrec.metrics import METRICS


def timed(label: str, run) -> object:
    wall, cpu = time.perf_counter(), time.process_time()
    out = run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{label}: {wall:.1f} s wall, {cpu:.1f} s CPU")
    return out


def table_values(impressions: int, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-impression metrics of `rows` rankers: a shared impression effect plus row gains."""
    rng = np.random.default_rng(seed)
    base = rng.random((impressions, 1))
    gains = np.linspace(0.0, 0.02, rows)
    return {
        m: np.clip(base + gains + 0.1 * rng.normal(size=(impressions, rows)), 0, 1) for m in METRICS
    }


def behaviors(impressions: int, candidates: int, news: int, seed: int = 0) -> Behaviors:
    rng = np.random.default_rng(seed)
    history = rng.integers(0, 60, impressions)
    n = impressions * candidates
    labels = (rng.integers(0, 25, n) == 0).astype(np.int8)
    offsets = np.arange(impressions + 1, dtype=np.int64) * candidates
    labels[offsets[:-1]] = 1
    return Behaviors(
        split="dev",
        labelled=True,
        impression_ids=np.arange(1, impressions + 1),
        user_index=rng.integers(0, impressions // 3, impressions),
        times=np.zeros(impressions),
        history_offsets=np.concatenate([[0], np.cumsum(history)]),
        history_items=rng.integers(1, news + 1, int(history.sum())),
        candidate_offsets=offsets,
        candidate_items=rng.integers(1, news + 1, n),
        candidate_labels=labels,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=376_000)
    parser.add_argument("--rows", type=int, default=10)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--candidates", type=int, default=37)
    parser.add_argument("--news", type=int, default=104_000)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}, {os.cpu_count()} CPUs")
    values = table_values(args.impressions, args.rows)
    rows = args.rows
    table = timed(
        f"significance: {rows} rows x {len(METRICS)} metrics x {args.impressions:,} impressions,"
        f" {args.resamples:,} resamples",
        lambda: compare_table(
            values,
            {m: np.zeros(rows) for m in METRICS},
            np.ones(rows),
            baseline=0,
            best=rows - 1,
            resamples=args.resamples,
        ),
    )
    entry = table[0]["auc_vs_best"]
    print(f"  row 0 vs best: {entry['diff']:+.4f} [{entry['low']:+.4f}, {entry['high']:+.4f}]")
    rng = np.random.default_rng(1)
    logs = behaviors(args.impressions, args.candidates, args.news)
    vectors = rng.normal(size=(args.news + 1, 384)).astype(np.float16)
    vectors[0] = 0
    scores = rng.random(len(logs.candidate_items), dtype=np.float32)
    summary, _ = timed(
        f"describe: {args.impressions:,} impressions x {args.candidates} candidates",
        lambda: describe_rankings(
            scores,
            logs,
            vectors,
            rng.random(args.news + 1) < 0.5,
            rng.integers(0, 18, args.news + 1),
            np.full(args.news + 1, 1e-3),
            rng.random(len(scores)) * 48,
        ),
    )
    print(f"  diversity {summary['beyond_accuracy']['diversity']:.3f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
