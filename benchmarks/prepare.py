"""Time `prepare` (build_store) on MIND-sized raw files and print wall time, peak RSS, size.

Writes random MIND-format news.tsv and behaviors.tsv (ids as in MIND: N<number>, U<number>;
lognormal impression sizes, exponential history lengths) into a temporary folder, then runs
`build_store` in a child process so that its peak RSS is measured alone. `--baseline` also times a
per-line Python parse of the same files into the same arrays, as a whole process like prepare.
`--bad-line` appends a line with a missing column: prepare must then stream the line-by-line
fallback and stop with an error naming that line.

As in MIND, each user has one click history, the same in all of their impressions (MIND's
histories are the clicks before the logged weeks, not updated between impressions), so a user's
co-click profile is set once. `--fresh-histories` gives every impression a history of its own
instead: every user's profile then changes in each period, the worst case for the co-click counts.

    python benchmarks/prepare.py --size small --baseline   # MIND-small: 156,965 impressions
    python benchmarks/prepare.py --size large              # MIND-large train: 2,232,748
    python benchmarks/prepare.py --size large --fresh-histories
    python benchmarks/prepare.py --size large --bad-line
    python benchmarks/prepare.py --impressions 50000 --news 20000 [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

SIZES = {  # (impressions, news, users) of the MIND train splits
    "small": (156_965, 65_238, 50_000),
    "large": (2_232_748, 101_527, 711_222),
}
WRITE_ROWS = 200_000  # impressions generated and written at once

# Peak RSS is read in the child as VmHWM: ru_maxrss of a child also counts the parent's pages
# it shared between fork and exec, and the parent holds the generated data. The peak is reset
# (/proc/self/clear_refs) when the signals start, to read theirs apart from the parse's.
CHILD = """
import sys, time
import mmnewsrec.data.store as store_module
from mmnewsrec.data.mind import MindFormatError
from mmnewsrec.data.store import build_store
def hwm_kib():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
signals = [0.0, 0.0, 0, 0]  # wall and CPU seconds in build_signals; peak RSS before, in it
compute = store_module.build_signals
def timed(*args, **kwargs):
    signals[2] = hwm_kib()
    open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from the RSS now
    wall, cpu = time.perf_counter(), time.process_time()
    out = compute(*args, **kwargs)
    signals[0] += time.perf_counter() - wall
    signals[1] += time.process_time() - cpu
    signals[3] = hwm_kib()
    return out
store_module.build_signals = timed
start, start_cpu = time.perf_counter(), time.process_time()
try:
    store = build_store(sys.argv[1], sys.argv[2])
    print(store.summary(), file=sys.stderr)
except MindFormatError as err:
    print(f"error: {err}", file=sys.stderr)
seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
print(seconds, max(hwm_kib(), signals[2]), cpu, *signals)
"""

# The same arrays as the store's behaviors, parsed line by line in plain Python.
BASELINE = """
import sys, time
from datetime import UTC, datetime
import numpy as np
start = time.perf_counter()
index, users = {}, {}
with open(sys.argv[1] + "/news.tsv", encoding="utf-8") as f:
    for line in f:
        fields = line.rstrip("\\n").split("\\t")
        if len(fields) != 8:
            raise ValueError(f"news.tsv: {len(fields)} columns")
        index.setdefault(fields[0], len(index) + 1)
ids, user_index, times, hist_len, hist, cand_len, cand, labels = ([] for _ in range(8))
with open(sys.argv[1] + "/behaviors.tsv", encoding="utf-8") as f:
    for line in f:
        imp, user, when, history, impressions = line.rstrip("\\n").split("\\t")
        ids.append(int(imp))
        user_index.append(users.setdefault(user, len(users)))
        t = datetime.strptime(when, "%m/%d/%Y %I:%M:%S %p").replace(tzinfo=UTC)
        times.append(int(t.timestamp()))
        clicked = [index.get(n, 0) for n in history.split(" ") if n]
        hist_len.append(len(clicked))
        hist.extend(clicked)
        tokens = impressions.split(" ")
        cand_len.append(len(tokens))
        for token in tokens:
            news, label = token.rsplit("-", 1)
            cand.append(index.get(news, 0))
            labels.append(int(label))
arrays = {
    "impression_ids": np.array(ids, dtype=np.int64),
    "user_index": np.array(user_index, dtype=np.int32),
    "times": np.array(times, dtype=np.int64),
    "history_offsets": np.cumsum([0, *hist_len]),
    "history_items": np.array(hist, dtype=np.int32),
    "candidate_offsets": np.cumsum([0, *cand_len]),
    "candidate_items": np.array(cand, dtype=np.int32),
    "candidate_labels": np.array(labels, dtype=np.int8),
}
for name, array in arrays.items():
    np.save(sys.argv[2] + f"/{name}.npy", array)
print(time.perf_counter() - start)
"""


def news_ids(n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct MIND-style news ids: N followed by a random number (as N55528 in MIND)."""
    numbers = rng.choice(np.arange(1, max(2 * n, 130_000)), n, replace=False)
    return ("N" + pl.Series(numbers).cast(pl.String)).to_numpy()


def write_news(path: Path, ids: np.ndarray, rng: np.random.Generator) -> None:
    """One news row per id, a category, a short title and abstract, no entities."""
    n = len(ids)
    words = np.array(
        ["market", "storm", "league", "vote", "film", "recipe", "court", "rally", "travel", "study"]
    )
    frame = pl.DataFrame(
        {
            "news_id": ids,
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


def joined_tokens(counts: np.ndarray, tokens: pl.Series) -> pl.Series:
    """One space-joined string per row from a flat token Series and per-row counts."""
    rows = np.repeat(np.arange(len(counts)), counts)
    joined = (
        pl.DataFrame({"row": rows, "token": tokens})
        .group_by("row", maintain_order=True)
        .agg(pl.col("token").str.join(" "))
    )
    out = pl.DataFrame({"row": np.arange(len(counts))}).join(joined, on="row", how="left")
    return out.to_series(1).fill_null("")


def distinct_positions(counts: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Positions 0..n-1, distinct within each impression (a news id appears once among an
    impression's candidates): start + j * step (mod n), with a random start and a step small
    enough that no impression wraps onto itself."""
    start = np.repeat(rng.integers(0, n, len(counts)), counts)
    step = np.repeat(rng.integers(1, n // counts.max() + 1, len(counts)), counts)
    position = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return (start + position * step) % n


def random_histories(count: int, ids: np.ndarray, rng: np.random.Generator) -> pl.Series:
    """`count` space-joined click histories of MIND-like lengths (mean 32.4, at most 500)."""
    lengths = np.clip(rng.exponential(32.4, count), 0, 500).astype(np.int64)
    return joined_tokens(lengths, pl.Series(ids[rng.integers(0, len(ids), int(lengths.sum()))]))


def behaviors_rows(
    first: int,
    count: int,
    ids: np.ndarray,
    users: int | pl.Series,
    rng: np.random.Generator,
):
    """`count` MIND-small-like impressions numbered from `first`; returns (frame, candidates).
    `users`: each user's history (a Series, U<i> has histories[i - 1]), or the number of users,
    each impression then getting a history of its own."""
    cand_counts = np.clip(rng.lognormal(3.31, 0.8, count), 2, 300).astype(np.int64)
    fresh = isinstance(users, int)
    hists = random_histories(count, ids, rng) if fresh else None
    total = int(cand_counts.sum())
    labels = pl.Series((rng.random(total) < 0.04).astype(np.int8)).cast(pl.String)
    cands = pl.Series(ids[distinct_positions(cand_counts, len(ids), rng)]) + "-" + labels
    seconds = rng.integers(1573257600, 1573776000, count)  # 2019-11-09 .. 2019-11-15
    user = rng.integers(1, users if fresh else len(users) + 1, count)
    frame = pl.DataFrame(
        {
            "impression_id": np.arange(first, first + count),
            "user_id": "U" + pl.Series(user).cast(pl.String),
            "time": pl.from_epoch(pl.Series(seconds), time_unit="s").dt.to_string(
                "%-m/%-d/%Y %-I:%M:%S %p"
            ),
            "history": hists if fresh else users.gather(user - 1),
            "impressions": joined_tokens(cand_counts, cands),
        }
    )
    return frame, total


def write_behaviors(
    path: Path, impressions: int, ids: np.ndarray, users: int | pl.Series, rng, bad_line: bool
) -> int:
    """Behaviors written in parts of WRITE_ROWS impressions; returns the number of candidates.
    `users` as in `behaviors_rows`; `bad_line` appends a line without its impressions column."""
    total = 0
    with open(path, "wb") as f:
        for first in range(1, impressions + 1, WRITE_ROWS):
            frame, candidates = behaviors_rows(
                first, min(WRITE_ROWS, impressions + 1 - first), ids, users, rng
            )
            frame.write_csv(f, separator="\t", include_header=False, quote_style="never")
            total += candidates
        if bad_line:
            f.write(f"{impressions + 1}\tU1\t11/15/2019 8:55:22 AM\tN1\n".encode())
    return total


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_child(code: str, *args: str) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run `code` in a fresh Python; wall and CPU (user + system, all threads) seconds of the
    whole process, imports included. CPU time depends less on other work on the machine."""
    cpu = child_cpu()
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, *args], check=True, capture_output=True, text=True
    )
    return time.perf_counter() - start, child_cpu() - cpu, done


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def load() -> str:
    return f"load average {os.getloadavg()[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--impressions", type=int, help="default: the size's train split")
    parser.add_argument("--news", type=int, help="default: the size's news count")
    parser.add_argument("--users", type=int, help="default: the size's user count")
    parser.add_argument(
        "--fresh-histories", action="store_true", help="a new history in every impression"
    )
    parser.add_argument("--baseline", action="store_true", help="also time a per-line parse")
    parser.add_argument("--bad-line", action="store_true", help="append a line missing a column")
    parser.add_argument("--keep", type=Path, help="write the raw files and store here")
    args = parser.parse_args()
    impressions = args.impressions or SIZES[args.size][0]
    n_news = args.news or SIZES[args.size][1]
    n_users = args.users or SIZES[args.size][2]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        data = root / "raw"
        data.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        ids = news_ids(n_news, rng)
        write_news(data / "news.tsv", ids, rng)
        users = n_users if args.fresh_histories else random_histories(n_users, ids, rng)
        candidates = write_behaviors(
            data / "behaviors.tsv", impressions, ids, users, rng, args.bad_line
        )
        kind = "a new history per impression" if args.fresh_histories else "one history per user"
        print(
            f"raw files: {folder_size(data) / 2**20:.0f} MiB, {impressions:,} impressions, "
            f"{candidates:,} candidates, {n_news:,} news, {n_users:,} users ({kind}; written in "
            f"{time.perf_counter() - start:.1f} s)"
        )
        print(f"before prepare: {load()}")
        wall, cpu, done = run_child(CHILD, str(data), str(root / "store"))
        figures = map(float, done.stdout.split())
        seconds, hwm_kib, store_cpu, signals_wall, signals_cpu, before_kib, in_kib = figures
        print(done.stderr.strip())
        print(
            f"build_store: {seconds:.2f} s wall, {store_cpu:.2f} s CPU; whole process incl. "
            f"imports {wall:.2f} s wall, {cpu:.2f} s CPU"
        )
        print(
            f"behaviour signals: {signals_wall:.2f} s wall ({signals_wall / seconds:.0%} of "
            f"build_store), {signals_cpu:.2f} s CPU ({signals_cpu / store_cpu:.0%})"
        )
        print(
            f"peak RSS: {hwm_kib / 2**10:.0f} MiB (whole process, incl. imports); before the "
            f"signals {before_kib / 2**10:.0f} MiB, during them {in_kib / 2**10:.0f} MiB"
        )
        if (root / "store").is_dir():
            print(f"store size: {folder_size(root / 'store') / 2**20:.0f} MiB")
        print(f"after prepare: {load()}")
        if args.baseline:
            arrays = root / "baseline"
            arrays.mkdir(exist_ok=True)
            base_wall, base_cpu, _ = run_child(BASELINE, str(data), str(arrays))
            print(
                f"per-line Python parse: whole process {base_wall:.2f} s wall, {base_cpu:.2f} s "
                f"CPU; prepare is {base_wall / wall:.1f}x faster in wall time, "
                f"{base_cpu / cpu:.1f}x in CPU time ({load()})"
            )


if __name__ == "__main__":
    main()
