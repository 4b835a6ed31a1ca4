"""Cost of holding the validation split out of the train impressions, at MIND size.

Random train behaviors of MIND-small or MIND-large size (as benchmarks/train.py makes them) with
impression times spread over 6 days are saved as store arrays and memory-mapped, as training
reads a store. It times `valid_mask` + the two `Behaviors.subset` calls that training makes
(data.valid_split = 'last-day'), against a baseline measured in the same run: one plain copy of
every array of the split (a single pass over the data). Each timing prints the load average.

    python benchmarks/valid_split.py                 # MIND-small size
    python benchmarks/valid_split.py --size large    # MIND-large size (~83M candidates)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from train import SIZES, RandomBehaviors

from mmnewsrec.formats.store import ARRAY_DTYPES, Behaviors
from mmnewsrec.rank.train import DAY, valid_mask

FIRST_DAY = 1_573_257_600  # 2019-11-09 00:00 UTC, MIND's first train day


def timed(label: str, work) -> float:
    """Best of 3 wall times of `work()`, printed with the load average."""
    best = np.inf
    for _ in range(3):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    print(f"{label}: {best:.3f} s (load average {os.getloadavg()[0]:.2f})")
    return best


def hold_out(train: Behaviors) -> tuple[Behaviors, Behaviors]:
    """What training does with data.valid_split = 'last-day'."""
    is_valid = valid_mask(train.times, "last-day")
    return train.subset(~is_valid, "train"), train.subset(is_valid, "valid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    args = parser.parse_args()
    impressions, _, news = SIZES[args.size]
    rng = np.random.default_rng(0)
    random = RandomBehaviors.make(impressions, news, rng)
    arrays = {k: getattr(random, k) for k in random.__dataclass_fields__}
    meta = {
        "impression_ids": np.arange(impressions),
        "user_index": np.zeros(impressions),
        "times": np.sort(FIRST_DAY + rng.integers(0, 6 * DAY, impressions)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        Behaviors(split="train", labelled=True, **arrays, **meta).save(Path(tmp))
        del random, arrays
        train = Behaviors.load(Path(tmp), "train", True)
        print(
            f"train ({args.size}): {impressions:,} impressions, "
            f"{len(train.candidate_items):,} candidates, {len(train.history_items):,} history"
        )
        baseline = timed(
            "baseline: copy every array once",
            lambda: [np.array(getattr(train, k)) for k in ARRAY_DTYPES],
        )
        _, valid = hold_out(train)
        print(f"valid (last day): {valid.num_impressions:,} of {impressions:,} impressions")
        held = timed("valid_mask + two subsets", lambda: hold_out(train))
        print(f"ratio hold-out / baseline: {held / baseline:.2f}")


if __name__ == "__main__":
    main()
