"""Time `prepare` (build_store) on MIND-small-sized raw files and print wall time, peak RSS, size.

Writes random MIND-format news.tsv and behaviors.tsv (157k impressions, ~5.8M candidate rows,
mean history 32, 65k news by default) into a temporary folder, then runs `build_store` in a
child process so that its peak RSS is measured alone.

    python benchmarks/prepare.py [--impressions 156965] [--news 65238] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

# Peak RSS is read in the child as VmHWM: ru_maxrss of a child also counts the parent's pages
# it shared between fork and exec, and the parent holds the generated data.
CHILD = """
import sys, time
from mmnewsrec.data.store import build_store
start, cpu = time.perf_counter(), time.process_time()
store = build_store(sys.argv[1], sys.argv[2])
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
status = open("/proc/self/status").read()
hwm_kib = int(status.split("VmHWM:")[1].split()[0])
print(seconds, cpu, hwm_kib)
print(store.summary(), file=sys.stderr)
"""


def write_news(path: Path, n: int, rng: np.random.Generator) -> None:
    """n news rows with ids N1..Nn, a category, a short title and abstract, no entities."""
    words = np.array(
        ["market", "storm", "league", "vote", "film", "recipe", "court", "rally", "travel", "study"]
    )
    frame = pl.DataFrame(
        {
            "news_id": [f"N{i}" for i in range(1, n + 1)],
            "category": words[rng.integers(0, 10, n)],
            "subcategory": words[rng.integers(0, 10, n)],
            "w1": words[rng.integers(0, 10, n)],
            "w2": words[rng.integers(0, 10, n)],
        }
    )
    frame.select(
        "news_id",
        "category",
        "subcategory",
        pl.format('The "{}" of {} today', "w1", "w2").alias("title"),
        pl.format("A long abstract about the {} and the {}.", "w1", "w2").alias("abstract"),
        pl.format("https://assets.msn.com/labs/mind/{}.html", "news_id").alias("url"),
        pl.lit("[]").alias("title_entities"),
        pl.lit("[]").alias("abstract_entities"),
    ).write_csv(path, separator="\t", include_header=False, quote_style="never")


def joined_tokens(counts: np.ndarray, tokens: pl.Expr, frame: pl.DataFrame) -> pl.Series:
    """One space-joined string per row from a flat token frame and per-row counts."""
    rows = np.repeat(np.arange(len(counts)), counts)
    joined = (
        frame.with_columns(row=rows).group_by("row", maintain_order=True).agg(tokens.str.join(" "))
    )
    out = pl.DataFrame({"row": np.arange(len(counts))}).join(joined, on="row", how="left")
    return out.to_series(1).fill_null("")


def distinct_candidates(counts: np.ndarray, n_news: int, rng: np.random.Generator) -> np.ndarray:
    """News ids 1..n_news, distinct within each impression: start + j * step (mod n_news),
    with a random start and a step small enough that no impression wraps onto itself."""
    start = np.repeat(rng.integers(0, n_news, len(counts)), counts)
    step = np.repeat(rng.integers(1, n_news // counts.max() + 1, len(counts)), counts)
    position = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return (start + position * step) % n_news + 1


def write_behaviors(path: Path, impressions: int, n_news: int, rng: np.random.Generator) -> int:
    """MIND-small-like behaviors; returns the number of candidate rows."""
    cand_counts = np.clip(rng.lognormal(3.31, 0.8, impressions), 2, 300).astype(np.int64)
    hist_counts = np.clip(rng.exponential(32.4, impressions), 0, 500).astype(np.int64)
    total = int(cand_counts.sum())
    labels = (rng.random(total) < 0.04).astype(np.int8)
    ids = distinct_candidates(cand_counts, n_news, rng)
    cands = pl.DataFrame({"id": ids, "label": labels})
    hists = pl.DataFrame({"id": rng.integers(1, n_news + 1, int(hist_counts.sum()))})
    seconds = rng.integers(1573257600, 1573776000, impressions)  # 2019-11-09 .. 2019-11-15
    pl.DataFrame(
        {
            "impression_id": np.arange(1, impressions + 1),
            "user_id": pl.Series(rng.integers(1, 50000, impressions)).cast(pl.String),
            "time": pl.from_epoch(pl.Series(seconds), time_unit="s").dt.to_string(
                "%-m/%-d/%Y %-I:%M:%S %p"
            ),
            "history": joined_tokens(hist_counts, pl.format("N{}", "id"), hists),
            "impressions": joined_tokens(cand_counts, pl.format("N{}-{}", "id", "label"), cands),
        }
    ).with_columns(pl.format("U{}", "user_id").alias("user_id")).write_csv(
        path, separator="\t", include_header=False, quote_style="never"
    )
    return total


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=156965)
    parser.add_argument("--news", type=int, default=65238)
    parser.add_argument("--keep", type=Path, help="write the raw files and store here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        data = root / "raw"
        data.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        write_news(data / "news.tsv", args.news, rng)
        candidates = write_behaviors(data / "behaviors.tsv", args.impressions, args.news, rng)
        raw_mb = folder_size(data) / 2**20
        print(
            f"raw files: {raw_mb:.0f} MiB, {args.impressions:,} impressions, {candidates:,} "
            f"candidates, {args.news:,} news (written in {time.perf_counter() - start:.1f} s)"
        )
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(data), str(root / "store")],
            check=True,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        seconds, cpu, hwm_kib = done.stdout.split()
        print(done.stderr.strip())
        print(
            f"build_store: {float(seconds):.2f} s wall, {float(cpu):.2f} s CPU (process incl. "
            f"imports {wall:.2f} s); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        print(f"peak RSS: {int(hwm_kib) / 2**10:.0f} MiB (whole process, incl. imports)")
        print(f"store size: {folder_size(root / 'store') / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
