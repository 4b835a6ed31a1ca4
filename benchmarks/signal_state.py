"""CPU time of the server's behaviour signals (`SignalState`), after a replay of a store.

Builds a store of MovieLens 100K in MIND format (or the quick synthetic set where it is absent,
or with `--synthetic`), replays its logs through a `SignalState` as the server does at start
(`replay_store`, one `observe_batch`; and one `observe` an impression, for comparison; the
two states are checked equal), then asks `signals` for `--candidates` items (drawn among the
items of some user profile, so that every co-click pair is looked up) and a history of
`--history` clicks,
`--calls` times. Prints the CPU time (time.process_time) of the replay, per `signals` call
(least and median of 10 blocks of calls),
and of the first call of a new period (which takes the period's profiles, and rebuilds what
`signals` reads of them), with the load average.

    python benchmarks/signal_state.py [--calls 2000] [--candidates 200] [--history 10]
        [--synthetic]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from mmnewsrec.data.signals import SignalState, replay_store
from mmnewsrec.data.store import build_store
from mmnewsrec.data.synthetic import SynthConfig, generate
from mmnewsrec.formats.store import Store

MOVIELENS = Path(__file__).resolve().parents[1].parent / "shared/data/movielens-100k-mind"


def replay_one_at_a_time(signals: SignalState, store: Store, train_split: str) -> None:
    """`replay_store` through `observe`, one impression at a time."""
    logs = [store.behaviors(split) for split in store.splits]
    which = np.concatenate([np.full(b.num_impressions, k) for k, b in enumerate(logs)])
    row = np.concatenate([np.arange(b.num_impressions) for b in logs])
    times = np.concatenate([np.asarray(b.times) for b in logs])
    for j in np.argsort(times, kind="stable").tolist():
        b, i = logs[which[j]], int(row[j])
        items, labels = b.candidates(i)
        clicked = items[labels == 1] if b.split == train_split and b.labelled else items[:0]
        signals.observe(int(b.user_index[i]), int(b.times[i]), b.history(i), items, clicked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--history", type=int, default=10)
    parser.add_argument("--synthetic", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = MOVIELENS
        if args.synthetic or not MOVIELENS.is_dir():
            data = Path(tmp) / "data"
            generate(data, SynthConfig.quick())
        store = build_store(data, Path(tmp) / "store")
        state = SignalState.for_store(store, store.num_news)
        started = time.process_time()
        replay_store(state, store, "train")
        replay_s = time.process_time() - started
        one_by_one = SignalState.for_store(store, store.num_news)
        started = time.process_time()
        replay_one_at_a_time(one_by_one, store, "train")
        one_s = time.process_time() - started
        for name, values in state.to_arrays().items():
            np.testing.assert_array_equal(one_by_one.to_arrays()[name], values, err_msg=name)
        now = int(state.time or 0)
        state.signals(0, now, np.zeros(0, np.int64), np.zeros(1, np.int64))  # take the profiles
    rng = np.random.default_rng(0)
    held = np.flatnonzero(state.holders > 0)
    candidates = rng.choice(held, args.candidates, replace=len(held) < args.candidates)
    history = rng.choice(held, args.history)
    state.signals(0, now, history, candidates)  # warm
    per_call_ms = []  # in blocks of `--calls` / 10: the least loaded block is the steadiest
    for _ in range(10):
        started = time.process_time()
        for _ in range(args.calls // 10):
            state.signals(0, now, history, candidates)
        per_call_ms.append((time.process_time() - started) * 1000 / (args.calls // 10))
    # a new period: one impression observed in it, then the first call of the next one
    state.observe(0, now + state.lag, history, candidates[:5], candidates[:1])
    started = time.process_time()
    state.signals(0, now + 2 * state.lag, history, candidates)
    first_ms = (time.process_time() - started) * 1000
    print(f"data: {data.name}, {store.num_news:,} news, {len(state.profiles):,} profiles")
    held_pairs = len(state.pairs)
    print(f"co-click pairs held: {held_pairs:,}")
    looked = (candidates[:, None] != history[None, :]).sum()  # both held by some profile
    print(f"pairs looked up per call: {looked:,}")
    print(
        f"replay of {sum(store.behaviors(s).num_impressions for s in store.splits):,} "
        f"impressions: observe_batch {replay_s:.2f} s CPU, observe one at a time {one_s:.2f} s"
    )
    print(
        f"signals, {args.candidates} candidates x {args.history} history clicks: "
        f"{min(per_call_ms):.3f} ms CPU per call (least of 10 blocks; median "
        f"{np.median(per_call_ms):.3f}) over {args.calls:,} calls"
    )
    print(f"first call of a new period: {first_ms:.2f} ms CPU")
    print("load average (1, 5, 15 min):", " ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
