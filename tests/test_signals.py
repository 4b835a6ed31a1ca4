"""Behaviour signals at impression time: values on a hand-checked log, no leakage, storage."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mmnewsrec.csr import csr_offsets
from mmnewsrec.data import signals as signals_module
from mmnewsrec.data.signals import (
    COCLICK_HISTORY,
    COCLICK_PROFILE,
    SIGNALS_VERSION,
    Impressions,
    PairCounts,
    SignalState,
    build_signals,
)
from mmnewsrec.data.store import build_store
from mmnewsrec.data.synthetic import SynthConfig, generate
from mmnewsrec.formats.store import SIGNAL_NAMES, Behaviors, Store, StoreError

POP, EXP, FRESH, CO, HIST = range(5)
DAY = 86_400


def behaviors(split, times, users, histories, candidates, labels) -> Behaviors:
    return Behaviors(
        split=split,
        labelled=True,
        impression_ids=np.arange(1, len(times) + 1),
        user_index=users,
        times=times,
        history_offsets=csr_offsets([len(h) for h in histories]),
        history_items=np.concatenate([np.asarray(h, dtype=np.int32) for h in histories]),
        candidate_offsets=csr_offsets([len(c) for c in candidates]),
        candidate_items=np.concatenate(candidates),
        candidate_labels=np.concatenate(labels),
    )


@pytest.fixture
def signals(tmp_path) -> dict[str, np.ndarray]:
    """Train: users 0, 3, 1, 0 at 100 and 150 s on day 0, 200 s on day 1 (twice); dev: user 2 at
    300 and 400 s on day 2."""
    train = behaviors(
        "train",
        times=[100, 150, DAY + 200, DAY + 200],
        users=[0, 3, 1, 0],
        histories=[[1], [1, 4], [1, 2], [1, 2]],
        candidates=[[2, 3], [3, 2], [2, 3], [2, 3]],
        labels=[[1, 0], [1, 0], [1, 0], [0, 1]],
    )
    dev = behaviors(
        "dev",
        times=[2 * DAY + 300, 2 * DAY + 400],
        users=[2, 2],
        histories=[[1], [1, 2]],
        candidates=[[2, 3, 4], [4, 1]],
        labels=[[1, 0, 0], [1, 0]],
    )
    manifest = build_signals({"train": train, "dev": dev}, 4, tmp_path)
    assert manifest == {
        "names": list(SIGNAL_NAMES),
        "train_split": "train",
        "version": SIGNALS_VERSION,
        "lag": DAY,
        "history": COCLICK_HISTORY,
        "profile": COCLICK_PROFILE,
    }
    return {split: np.load(tmp_path / f"{split}.npy") for split in ("train", "dev")}


def test_train_popularity_counts_only_clicks_of_earlier_days(signals):
    pop = signals["train"][:, POP]
    # day 0: nothing before (the click at 100 s does not count at 150 s, as dev cannot count
    # its own day's clicks); day 1: the clicks on 2 and 3 of day 0, never those of day 1
    expected = [0] * 4 + [math.log(2 / 3)] * 4
    np.testing.assert_allclose(pop, expected, rtol=1e-6, atol=1e-7)


def test_dev_popularity_counts_every_train_click_and_no_dev_label(signals):
    pop = signals["dev"][:, POP]
    # train clicks: item 2 twice, item 3 twice, 4 in all; item 4 clicked in dev does not count
    expected = [math.log(3 / 5)] * 2 + [math.log(1 / 5)] * 3  # 1: never a clicked candidate
    np.testing.assert_allclose(pop, expected, rtol=1e-6)


def test_exposures_count_earlier_impressions_of_all_logs(signals):
    np.testing.assert_allclose(signals["train"][:, EXP], 0.0, atol=1e-7)  # every item each time
    # dev continues the count of train: 4 train impressions showed 2 and 3, none showed 4;
    # then 5 impressions before the second dev impression, one (dev) showed 4, none showed 1
    expected = [0, 0, math.log(1 / 5), math.log(2 / 6), math.log(1 / 6)]
    np.testing.assert_allclose(signals["dev"][:, EXP], expected, rtol=1e-6, atol=1e-7)


def test_exposures_follow_time_across_logs_not_split_order(tmp_path):
    """A train impression counts what any log showed before it, and nothing shown later."""
    train = behaviors("train", [100], [0], [[1]], [[2, 3]], [[1, 0]])
    later = behaviors("dev", [DAY], [1], [[1]], [[3, 4]], [[0, 1]])
    earlier = behaviors("dev", [50], [1], [[1]], [[3, 4]], [[0, 1]])
    # one earlier impression showed 3 but not 2: log(1/2) for 2, log(2/2) for 3
    for name, dev, expected in (("later", later, [0, 0]), ("earlier", earlier, [-math.log(2), 0])):
        build_signals({"train": train, "dev": dev}, 4, tmp_path / name)
        exp = np.load(tmp_path / name / "train.npy")[:, EXP]
        np.testing.assert_allclose(exp, expected, atol=1e-7)


def test_freshness_is_time_since_the_first_appearance_in_any_log(signals):
    hours = np.expm1(signals["dev"][:, FRESH]) * 3600
    # 2 and 3 first shown at 100; 4 first in a history at 150; 1 in a history at 100
    seconds = 2 * DAY + np.array([200, 200, 150, 250, 300])
    np.testing.assert_allclose(hours, seconds, rtol=1e-4)
    assert (signals["train"][:, FRESH] >= 0).all()


def test_coclick_counts_the_profiles_of_earlier_days(signals):
    # day 0: no profile yet; day 1: profiles of day 0, user 0 {1} and user 3 {1, 4}, which
    # hold neither candidate 2 nor 3
    np.testing.assert_allclose(signals["train"][:, CO], 0.0, atol=1e-7)
    # day 2: each user's latest history before it: user 0 {1, 2}, user 3 {1, 4}, user 1 {1, 2}
    dev = signals["dev"][:, CO]
    np.testing.assert_allclose(dev[:3], [2 / math.sqrt(2 * 3), 0, 1 / math.sqrt(3)], rtol=1e-6)
    # the last dev impression: candidate 1 with history {1, 2}: mean of cos(1, 1) and cos(1, 2)
    assert dev[4] == pytest.approx((1 + 2 / math.sqrt(6)) / 2, rel=1e-6)


@pytest.mark.parametrize(
    ("history", "profile", "expected"),
    [(1, 2, [1.0, 0.0]), (1, 3, [1.0, 1 / math.sqrt(2)]), (2, 2, [0.5, 0.0])],
)
def test_coclick_profile_and_history_lengths_act_apart(tmp_path, history, profile, expected):
    """Profiles hold a user's last `profile` clicks; a candidate is compared with the
    impression's last `history` clicks. The state replays to the same values."""
    train = behaviors(
        "train",
        times=[100, 200, DAY + 100],
        users=[0, 1, 2],
        histories=[[1, 2, 3], [2, 3], [5, 2]],
        candidates=[[4, 5], [4, 5], [3, 1]],
        labels=[[1, 0], [1, 0], [1, 0]],
    )
    manifest = build_signals({"train": train}, 5, tmp_path, history=history, profile=profile)
    assert (manifest["history"], manifest["profile"]) == (history, profile)
    got = np.load(tmp_path / "train.npy")
    # day 1 (user 2, last clicks [5, 2]): profiles {2, 3} twice, and 1 in user 0's at length 3
    np.testing.assert_allclose(got[4:, CO], expected, rtol=1e-6, atol=1e-7)
    state, replayed = SignalState.empty(5, history=history, profile=profile), []
    for i in range(train.num_impressions):
        items, labels = train.candidates(i)
        user, at, clicks = int(train.user_index[i]), int(train.times[i]), train.history(i)
        replayed.append(state.signals(user, at, clicks, items))
        state.observe(user, at, clicks, items, items[labels == 1])
    np.testing.assert_allclose(np.concatenate(replayed), got, atol=1e-6, rtol=0)


def test_profiles_are_as_long_as_their_pairs_allow(tmp_path, monkeypatch):
    """prepare's profiles hold up to COCLICK_PROFILE clicks, fewer where the pairs that the
    users' longest histories could make pass PROFILE_PAIRS, never fewer than the minimum; the
    manifest records the length taken, and the values are those of that length."""
    longest = np.array([0, 1, 3, 40, 12])  # clicks of each user's longest history
    assert signals_module.profile_capacity(longest, 10) == 0 + 0 + 3 + 45 + 45
    assert signals_module.profile_length(longest) == COCLICK_PROFILE
    monkeypatch.setattr(signals_module, "PROFILE_PAIRS", 3 + 105 + 66)  # 15 clicks: 3 + 105 + 66
    assert signals_module.profile_length(longest) == 15
    monkeypatch.setattr(signals_module, "PROFILE_PAIRS", 0)
    assert signals_module.profile_length(longest) == signals_module.COCLICK_PROFILE_MIN

    rng = np.random.default_rng(0)
    clicks = [rng.choice(np.arange(1, 31), 14, replace=False) for _ in range(6)]
    train = behaviors(
        "train",
        times=[100, 200, 300, DAY + 100, DAY + 200, DAY + 300],
        users=[0, 1, 2, 0, 1, 2],
        histories=clicks,
        candidates=[c[[0, 5, 13]] for c in clicks[::-1]],
        labels=[[1, 0, 0]] * 6,
    )
    monkeypatch.setattr(signals_module, "COCLICK_PROFILE_MIN", 4)
    monkeypatch.setattr(signals_module, "PROFILE_PAIRS", 3 * 78)  # three profiles of 13 clicks
    manifest = build_signals({"train": train}, 30, tmp_path / "auto")
    assert manifest["profile"] == 13
    build_signals({"train": train}, 30, tmp_path / "set", profile=13)
    auto, set_ = (np.load(tmp_path / name / "train.npy") for name in ("auto", "set"))
    np.testing.assert_array_equal(auto, set_)
    assert auto[9:, CO].any()  # day 1 reads day 0's profiles


def test_coclick_profiles_start_after_their_day_and_end_at_the_next(tmp_path):
    """A history counts from the next day on (never the same day) until the user's next one."""
    train = behaviors(
        "train",
        times=[100, 200, DAY + 100, DAY + 200, 2 * DAY],
        users=[0, 1, 1, 0, 1],
        histories=[[1, 2], [1], [1], [5], [1]],
        candidates=[[3], [2], [2], [3], [2]],
        labels=[[1], [1], [1], [1], [1]],
    )
    build_signals({"train": train}, 5, tmp_path)
    # day 1 sees user 0 {1, 2} and user 1 {1}: cos(2, 1) = 1 / sqrt(1 * 2); day 2 (from
    # exactly 00:00 UTC) sees user 0's new profile {5} instead: no profile holds 2
    expected = [0, 0, 1 / math.sqrt(2), 0, 0]
    np.testing.assert_allclose(np.load(tmp_path / "train.npy")[:, CO], expected, atol=1e-7)


def test_popularity_cutoff_is_midnight_utc_of_the_impressions_day(tmp_path):
    """A click at exactly 00:00 UTC belongs to its day: impressions of that day do not count it,
    in the batch and in the incremental face; a click one second earlier counts."""
    train = behaviors(
        "train",
        times=[DAY - 1, DAY, DAY + 5],
        users=[0, 1, 2],
        histories=[[1], [1], [1]],
        candidates=[[2, 3], [3, 2], [2, 3]],
        labels=[[1, 0], [1, 0], [0, 0]],
    )
    build_signals({"train": train}, 4, tmp_path)
    expected = [0, 0, -math.log(2), 0, 0, -math.log(2)]  # 2 clicked at DAY - 1, 3 at DAY
    np.testing.assert_allclose(np.load(tmp_path / "train.npy")[:, POP], expected, atol=1e-7)
    state = SignalState.empty(4)
    for i in range(train.num_impressions):
        items, labels = train.candidates(i)
        at = int(train.times[i])
        pop = state.signals(i, at, train.history(i), items)[:, POP]
        np.testing.assert_allclose(pop, expected[2 * i : 2 * i + 2], atol=1e-7)
        state.observe(i, at, train.history(i), items, items[labels == 1])


def test_state_coclick_follows_the_profiles_of_each_new_period():
    """Asked in every period, the state reads the pair counts the latest profiles give."""
    state, no_click = SignalState.empty(4), np.zeros(0, np.int64)
    one, candidates = np.array([1]), np.array([2, 3])
    assert state.signals(0, 0, one, candidates)[:, CO].tolist() == [0, 0]
    state.observe(0, 0, np.array([1, 2]), candidates, no_click)
    state.observe(1, 0, np.array([1, 3]), candidates, no_click)
    half = 1 / math.sqrt(2)  # n(c, 1) = 1 of n(c) = 1 and n(1) = 2 profiles
    np.testing.assert_allclose(state.signals(0, DAY, one, candidates)[:, CO], [half, half])
    state.observe(0, DAY, np.array([2, 3]), candidates, no_click)  # user 0 drops item 1
    np.testing.assert_allclose(state.signals(0, 2 * DAY, one, candidates)[:, CO], [0, half])


def test_history_length(signals):
    np.testing.assert_allclose(np.expm1(signals["dev"][:, HIST]), [1, 1, 1, 2, 2], rtol=1e-6)


def test_prepare_stores_signals_memory_mapped(tmp_path):
    root = tmp_path / "mind"
    news = "".join(f"N{i}\tnews\tworld\tt{i}\ta\tu\t[]\t[]\n" for i in (1, 2, 3))
    rows = {"train": "1\tU1\t11/15/2019 8:55:22 AM\tN1\tN2-1 N3-0\n",
            "dev": "2\tU2\t11/16/2019 8:55:22 AM\tN1\tN2-0 N3-1\n"}  # fmt: skip
    for split, text in rows.items():
        (root / split).mkdir(parents=True)
        (root / split / "news.tsv").write_text(news)
        (root / split / "behaviors.tsv").write_text(text)
    store = build_store(root, tmp_path / "store")
    table = store.signals("dev")
    assert isinstance(table, np.memmap) and table.dtype == np.float32
    assert table.shape == (2, len(SIGNAL_NAMES))
    assert table[0, POP] > table[1, POP]  # N2 was clicked in train, N3 was not
    assert store.manifest["signals"]["train_split"] == "train"
    with pytest.raises(KeyError, match="split 'test' not in store"):
        store.signals("test")

    manifest = json.loads((store.path / "manifest.json").read_text())
    del manifest["signals"]  # as written before signals existed
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="no behaviour signals.*prepare"):
        Store.load(store.path).signals("dev")
    rebuilt = build_store(root, tmp_path / "store")  # an old store is not "up to date"
    assert rebuilt.signals("dev").shape == (2, len(SIGNAL_NAMES))

    manifest = json.loads((store.path / "manifest.json").read_text())
    manifest["signals"].pop("version")  # signals of the first rules (exposures per split)
    (store.path / "manifest.json").write_text(json.dumps(manifest))
    assert build_store(root, tmp_path / "store").manifest["signals"]["version"] == SIGNALS_VERSION


MOVIELENS = Path(__file__).resolve().parents[2] / "shared/data/movielens-100k-mind"


def replay(store: Store) -> tuple[dict[str, np.ndarray], SignalState]:
    """Every split's signals from a SignalState fed the store's logs in time order: train with
    its clicks, the other splits without theirs (the labels being scored); and the state."""
    logs = {split: store.behaviors(split) for split in store.splits}
    rows = [(split, i) for split, b in logs.items() for i in range(b.num_impressions)]
    times = np.concatenate([np.asarray(b.times) for b in logs.values()])
    state = SignalState.for_store(store, store.num_news)
    out = {
        split: np.zeros((len(b.candidate_items), len(SIGNAL_NAMES))) for split, b in logs.items()
    }
    for k in np.argsort(times, kind="stable"):
        split, i = rows[k]
        b = logs[split]
        user, at, history = int(b.user_index[i]), int(b.times[i]), b.history(i)
        items, labels = b.candidates(i)
        out[split][b.candidate_offsets[i] : b.candidate_offsets[i + 1]] = state.signals(
            user, at, history, items
        )
        clicked = items[labels == 1] if split == "train" else items[:0]
        state.observe(user, at, history, items, clicked)
    return out, state


def assert_replay_matches(store: Store) -> None:
    replayed, _ = replay(store)
    for split in store.splits:
        batch = np.asarray(store.signals(split))
        for column, name in enumerate(SIGNAL_NAMES):
            np.testing.assert_allclose(
                replayed[split][:, column], batch[:, column], atol=1e-6, rtol=0, err_msg=name
            )


def test_replay_through_the_state_gives_the_batch_values_synthetic(tmp_path):
    generate(tmp_path / "data", SynthConfig.quick())
    assert_replay_matches(build_store(tmp_path / "data", tmp_path / "store"))


def test_signals_written_a_few_impressions_at_a_time_give_the_replay_values(tmp_path, monkeypatch):
    """The periods' rows, spilled as computed, come back in each split's log order whatever
    the number of impressions written at once; only the split files are left."""
    generate(tmp_path / "data", SynthConfig.quick())
    monkeypatch.setattr(signals_module, "SAVE_ROWS", 7)
    store = build_store(tmp_path / "data", tmp_path / "store")
    assert_replay_matches(store)
    files = sorted(path.name for path in (store.path / "signals").iterdir())
    assert files == sorted(f"{split}.npy" for split in store.splits)


def test_profiles_kept_across_periods_count_as_the_state_counts_them(tmp_path):
    """A user whose history stays the same keeps its profile; one whose history changes, or
    changes back, has it replaced: the batch values equal a replay through the state."""
    same, other = [1, 2, 3], [[1, 4], [2, 4], [1, 4], [1, 4]]
    train = behaviors(
        "train",
        times=[d * DAY + t for d in range(4) for t in (100, 200)],
        users=[0, 1] * 4,
        histories=[h for d in range(4) for h in (same, other[d])],
        candidates=[[1, 2, 4], [3, 4]] * 4,
        labels=[[1, 0, 0], [0, 1]] * 4,
    )
    build_signals({"train": train}, 4, tmp_path)
    state, expected = SignalState.empty(4), []
    for i in range(train.num_impressions):
        items, labels = train.candidates(i)
        user, at, history = int(train.user_index[i]), int(train.times[i]), train.history(i)
        expected.append(state.signals(user, at, history, items))
        state.observe(user, at, history, items, items[labels == 1])
    got = np.load(tmp_path / "train.npy")
    np.testing.assert_allclose(got, np.concatenate(expected), atol=1e-6, rtol=0)
    assert got[:, CO].max() > 0  # the profiles were read


def test_replay_through_the_state_gives_the_batch_values_movielens(tmp_path, monkeypatch):
    """With a pair budget that shortens the profiles: the state takes the store's length."""
    if not MOVIELENS.is_dir():
        pytest.skip(f"{MOVIELENS} not found")
    monkeypatch.setattr(signals_module, "PROFILE_PAIRS", 100_000)
    store = build_store(MOVIELENS, tmp_path / "store")
    assert 10 < store.manifest["signals"]["profile"] < COCLICK_PROFILE
    assert_replay_matches(store)


def store_impressions(store: Store) -> Impressions:
    """Every log of the store in time order, the train split's clicks counted."""
    logs = [store.behaviors(split) for split in store.splits]
    imps = Impressions.concat(logs, [split == "train" for split in store.splits])
    return imps.take(np.argsort(imps.times, kind="stable"))


def test_a_batch_gives_the_state_of_one_impression_at_a_time_movielens(tmp_path):
    """Fed in batches of random sizes (cut within times and periods), the state equals the
    one fed one impression at a time, array for array, and answers the batch face's values at
    the start of every batch."""
    if not MOVIELENS.is_dir():
        pytest.skip(f"{MOVIELENS} not found")
    store = build_store(MOVIELENS, tmp_path / "store")
    _, one_by_one = replay(store)
    imps = store_impressions(store)
    logs = [store.behaviors(split) for split in store.splits]
    batch_values = np.concatenate([np.asarray(store.signals(split)) for split in store.splits])
    order = np.argsort(np.concatenate([np.asarray(b.times) for b in logs]), kind="stable")
    sizes = np.concatenate([np.diff(b.candidate_offsets) for b in logs])
    starts = csr_offsets(sizes)[:-1]
    state = SignalState.for_store(store, store.num_news)
    rng = np.random.default_rng(0)
    cuts = np.unique(np.r_[0, np.cumsum(rng.integers(1, 400, len(order))), len(order)])
    cuts = cuts[cuts <= len(order)]
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        first = imps.take(np.array([lo]))
        asked = state.signals(0, int(first.times[0]), first.history_items, first.candidate_items)
        row = starts[order[lo]]
        np.testing.assert_allclose(asked, batch_values[row : row + len(asked)], atol=1e-6, rtol=0)
        state.observe_batch(imps.take(np.arange(lo, hi)))
    assert len(cuts) > 50
    expected, got = one_by_one.to_arrays(), state.to_arrays()
    assert expected.keys() == got.keys()
    for name, values in expected.items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)
    whole = SignalState.for_store(store, store.num_news)
    whole.observe_batch(imps)
    for name, values in whole.to_arrays().items():
        np.testing.assert_array_equal(got[name], values, err_msg=name)
    with pytest.raises(ValueError, match="must not decrease"):
        whole.observe_batch(imps.take(np.arange(2)))


def test_state_arrays_give_the_state_back():
    state, no_click = SignalState.empty(5, history=2, profile=3), np.zeros(0, np.int64)
    state.observe(0, 10, np.array([1, 2, 3]), np.array([4, 5]), np.array([4]))
    state.observe(1, DAY + 5, np.array([1, 2]), np.array([3]), no_click)
    state.observe(1, DAY + 6, np.array([4, 2]), np.array([3, 5]), np.array([5]))
    back = SignalState.from_arrays(state.to_arrays())
    for name, values in state.to_arrays().items():
        np.testing.assert_array_equal(back.to_arrays()[name], values, err_msg=name)
    for s in (state, back):
        s.observe(2, 2 * DAY, np.array([2]), np.array([1, 3]), no_click)
    history, candidates = np.array([1, 2]), np.array([1, 2, 3, 4, 5])
    np.testing.assert_array_equal(
        back.signals(0, 3 * DAY, history, candidates),
        state.signals(0, 3 * DAY, history, candidates),
    )


@pytest.mark.parametrize("bucket_bits", [signals_module.PAIR_BUCKET_BITS, 6])
def test_pair_counts_count_like_a_dict_through_merges_and_removals(monkeypatch, bucket_bits):
    """In one bucket of keys, and in 157 of 64 keys each."""
    monkeypatch.setattr(signals_module, "PAIR_BUCKET_BITS", bucket_bits)
    monkeypatch.setattr(signals_module, "PAIR_LOW_MASK", (1 << bucket_bits) - 1)
    rng = np.random.default_rng(0)
    width = 100
    counts, expected = PairCounts(width), {}
    for _ in range(8):  # pairs repeat within and across updates; many counts return to 0
        x, y = np.sort(rng.choice(width, (2_000, 2)), axis=1).T  # some x == y: not pairs
        keys = (x * width + y)[x < y]
        deltas = rng.choice([-1, 1, 2], len(keys)).astype(np.int32)
        counts.stage(keys[:500], deltas[:500])  # two updates merged at once, as one
        counts.add(keys[500:], deltas[500:])
        for key, delta in zip(keys.tolist(), deltas.tolist(), strict=True):
            expected[key] = expected.get(key, 0) + delta
        live = {key: n for key, n in expected.items() if n}
        held, held_counts = counts.items()
        assert held.tolist() == sorted(live)  # sorted, unique, no zero count held
        assert held_counts.tolist() == [live[key] for key in sorted(live)]
        assert len(counts) == len(live)
        held_x, held_y = np.divmod(held, width)
        assert counts.may_hold(held_y, held_x).all()  # no held pair ruled out, either order
    queries = np.arange(width * width)
    want = np.array([expected.get(key, 0) for key in queries.tolist()])
    np.testing.assert_array_equal(counts.get(queries), want)
    np.testing.assert_array_equal(PairCounts(width).get(queries), np.zeros(len(queries)))
    absent_x, absent_y = np.divmod(queries[want == 0], width)
    pairs = absent_x < absent_y
    assert counts.may_hold(absent_x[pairs], absent_y[pairs]).mean() < 0.2  # most ruled out


def test_sort_order_sorts_like_argsort_packed_or_not():
    """Positions packed beside the keys where both fit in 63 bits, argsort where they do not:
    either way a permutation that sorts the keys."""
    rng = np.random.default_rng(0)
    for keys in (
        rng.integers(0, 1_000, 5_000),  # packed, many equal keys
        rng.integers(0, 2**62, 5_000),  # too large to pack
        np.array([3], np.int32),
        np.zeros(0, np.int64),
    ):
        order = signals_module.sort_order(keys)
        np.testing.assert_array_equal(np.sort(order), np.arange(len(keys)))
        np.testing.assert_array_equal(keys[order], np.sort(keys))


@pytest.mark.parametrize("capacity", [0, 100_000])
def test_pair_filters_keep_every_pair_added_without_removals(capacity):
    """Pairs only added (the filters are then updated in place, and built again when they
    grow past `capacity`): no held pair is ruled out, nearly every absent one is."""
    rng = np.random.default_rng(1)
    width = 3_000
    counts, held = PairCounts(width, capacity), np.zeros(0, np.int64)
    filter_sizes = set()
    for _ in range(6):
        x, y = np.sort(rng.choice(width, (5_000, 2)), axis=1).T
        keys = (x * width + y)[x < y]
        counts.add(keys, np.ones(len(keys), np.int32))
        held = np.union1d(held, keys)
        held_x, held_y = np.divmod(held, width)
        assert counts.may_hold(held_y, held_x).all()
        filter_sizes.add(counts._filters.nbytes)  # the filters as last built
    # sized once for a capacity above the pairs held, else built again as they grew
    assert len(held) < capacity and len(filter_sizes) == 1 or not capacity and len(filter_sizes) > 1
    x, y = np.sort(rng.choice(width, (200_000, 2)), axis=1).T
    absent = ~np.isin(x * width + y, held) & (x < y)
    assert counts.may_hold(x[absent], y[absent]).mean() < 0.02
