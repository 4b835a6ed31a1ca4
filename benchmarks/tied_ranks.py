"""How much the order of tied ranks moves MRR and nDCG: `score` against the official formula.

The official scorer (msnews/MIND evaluate.py) scores a prediction by `y_score = [1. / rank ...]`
and orders candidates by `np.argsort(y_score)[::-1]`: numpy's default sort, which is not stable,
so the order of tied candidates is whatever that sort leaves on this numpy build and CPU. `score`
(`leaderboard.score_files`) orders them by the stable sort, reversed: the later candidate first.
AUC does not depend on the order (ties get half credit either way). This script draws random
impressions, gives a share of them tied ranks, and prints both MRR and nDCG figures.

    python benchmarks/tied_ranks.py                       # 3,000 impressions, a third tied
    python benchmarks/tied_ranks.py --impressions 20000 --tied-share 0.5
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import numpy as np

from mmnewsrec.evaluate.leaderboard import score_files


def official(labels: list[np.ndarray], ranks: list[np.ndarray]) -> dict[str, float]:
    """Mean MRR, nDCG@5, nDCG@10 by the official formulas and order, one impression at a time."""

    def dcg(y_true: np.ndarray, y_score: np.ndarray, k: int) -> float:
        y_true = np.take(y_true, np.argsort(y_score)[::-1][:k])
        return float(np.sum((2**y_true - 1) / np.log2(np.arange(len(y_true)) + 2)))

    rows = []
    for y_true, rank in zip(labels, ranks, strict=True):
        y_score = np.array([1.0 / r for r in rank])
        ordered = np.take(y_true, np.argsort(y_score)[::-1])
        mrr = np.sum(ordered / (np.arange(len(ordered)) + 1)) / np.sum(ordered)
        ndcg = [dcg(y_true, y_score, k) / dcg(y_true, y_true, k) for k in (5, 10)]
        rows.append((mrr, *ndcg))
    return dict(zip(("mrr", "ndcg5", "ndcg10"), np.mean(rows, axis=0).tolist(), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=3000)
    parser.add_argument("--tied-share", type=float, default=1 / 3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    labels, ranks = [], []
    for _ in range(args.impressions):
        n = int(rng.integers(2, 60))
        y = np.zeros(n, dtype=np.int64)
        y[rng.choice(n, int(rng.integers(1, n)), replace=False)] = 1
        tied = rng.random() < args.tied_share
        rank = rng.integers(1, max(2, n // 3), n) if tied else rng.permutation(n) + 1
        labels.append(y)
        ranks.append(rank)
    with tempfile.TemporaryDirectory() as tmp:
        truth, pred = Path(tmp, "truth.txt"), Path(tmp, "prediction.txt")
        truth.write_text("".join(f"{i} [{','.join(map(str, y))}]\n" for i, y in enumerate(labels)))
        pred.write_text("".join(f"{i} [{','.join(map(str, r))}]\n" for i, r in enumerate(ranks)))
        ours = score_files(truth, pred)
    theirs = official(labels, ranks)
    print(f"numpy {np.__version__}, {platform.machine()}, load {os.getloadavg()[0]:.2f}")
    scored = ours["impressions"]
    print(f"{args.impressions} impressions, {scored} scored, tied share {args.tied_share:.2f}")
    for name in ("mrr", "ndcg5", "ndcg10"):
        print(
            f"{name:7s} score {ours[name]:.6f}  official order {theirs[name]:.6f}  "
            f"difference {ours[name] - theirs[name]:+.6f}"
        )


if __name__ == "__main__":
    main()
