import numpy as np
import pytest
import torch

from mmnewsrec.formats.store import Behaviors
from mmnewsrec.rank.batches import (
    Batch,
    ClickDataset,
    ResumableSampler,
    collate,
    gather_history,
    iter_eval_batches,
    sample_negatives,
)
from mmnewsrec.rank.train import ranking_loss


def make_behaviors(histories, candidates, labels) -> Behaviors:
    """Behaviors from per-impression lists (CSR built here)."""
    n = len(histories)

    def csr(rows):
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        flat = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]) if n else []
        return offsets, np.asarray(flat)

    h_off, h_items = csr(histories)
    c_off, c_items = csr(candidates)
    _, c_labels = csr(labels)
    return Behaviors(
        split="train",
        labelled=True,
        impression_ids=np.arange(1, n + 1),
        user_index=np.zeros(n),
        times=np.zeros(n),
        history_offsets=h_off,
        history_items=h_items,
        candidate_offsets=c_off,
        candidate_items=c_items,
        candidate_labels=c_labels,
    )


@pytest.fixture
def behaviors() -> Behaviors:
    return make_behaviors(
        histories=[[1, 2, 3, 4, 5, 6], [7], [], [8, 9]],
        candidates=[
            [10, 11, 12, 13, 14, 15, 16, 17],  # 2 clicks, 6 negatives (>= K: distinct)
            [20, 21, 22],  # 1 click, 2 negatives (< K: both, then padding)
            [30, 31],  # no click: skipped
            [40, 41],  # only clicks: skipped for listwise
        ],
        labels=[[1, 0, 0, 1, 0, 0, 0, 0], [0, 1, 0], [0, 0], [1, 1]],
    )


def test_samples_one_per_click_with_negatives_from_the_same_impression(behaviors):
    ds = ClickDataset(behaviors, negatives=4, history_len=3, seed=1)
    assert len(ds) == 3
    batch = ds.__getitems__([0, 1, 2])
    assert batch.candidates.shape == (3, 5)
    assert batch.candidates[:, 0].tolist() == [10, 13, 21]
    assert batch.labels[:, 0].tolist() == [1, 1, 1] and batch.labels[:, 1:].sum() == 0
    for row in batch.candidates[:2, 1:].tolist():
        assert set(row) <= {11, 12, 14, 15, 16, 17}
        assert len(set(row)) == 4, "enough negatives: drawn without replacement"
    few = sorted(batch.candidates[2, 1:].tolist())
    assert few == [0, 0, 20, 22], "few negatives: each once, the rest padding"
    assert batch.candidates.dtype == torch.int64
    assert ds.skipped_impressions == 2


def test_history_is_left_padded_last_clicks(behaviors):
    ds = ClickDataset(behaviors, negatives=2, history_len=3)
    hist = ds.__getitems__([0, 2]).history
    assert hist.dtype == torch.int64
    assert hist.tolist() == [[4, 5, 6], [0, 0, 7]]
    padded = gather_history(behaviors.history_offsets, behaviors.history_items, np.array([2, 3]), 4)
    assert padded.tolist() == [[0, 0, 0, 0], [0, 0, 8, 9]]


def test_negatives_are_resampled_per_epoch_and_reproducible(behaviors):
    ds = ClickDataset(behaviors, negatives=3, seed=5)
    draws = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        draws.append(ds.negative.copy())
    assert any(not np.array_equal(draws[0], d) for d in draws[1:])
    again = ClickDataset(behaviors, negatives=3, seed=5)
    again.set_epoch(4)
    assert np.array_equal(again.negative, draws[4])


def test_sample_negatives_is_uniform_and_distinct():
    rng = np.random.default_rng(0)
    count = np.full(20000, 6)
    slots = sample_negatives(np.zeros(20000, dtype=np.int64), count, 4, rng)
    assert all(len(set(r)) == 4 for r in slots[:500].tolist())
    freq = np.bincount(slots.ravel(), minlength=6) / slots.size
    np.testing.assert_allclose(freq, 1 / 6, atol=0.01)
    rare = sample_negatives(np.array([10, 0, 20]), np.array([1, 0, 3]), 3, rng)
    assert rare[:2].tolist() == [[-1, -1, 10], [-1, -1, -1]]
    assert sorted(rare[2].tolist()) == [20, 21, 22]


def test_padded_negatives_do_not_enter_the_listwise_softmax(behaviors):
    ds = ClickDataset(behaviors, negatives=4, history_len=3, seed=1)
    batch = ds.__getitems__([2])  # the impression with 2 negatives: 2 padding columns
    real = batch.candidates[0] > 0
    assert real.sum() == 3
    scores = torch.tensor([[1.5, -0.3, 2.0, 0.7, 4.0]])
    scores = scores.masked_fill(~real, 0.0)  # what every model gives a padding candidate
    expected = -torch.log_softmax(scores[0, real], dim=0)[0]
    loss = ranking_loss(scores, batch, "listwise")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_pointwise_keeps_clicks_without_negatives_as_padding(behaviors):
    ds = ClickDataset(behaviors, negatives=2, require_negative=False)
    assert len(ds) == 5
    batch = ds.__getitems__([3, 4])
    assert batch.candidates[:, 0].tolist() == [40, 41]
    assert batch.candidates[:, 1:].sum() == 0


def test_unlabelled_behaviors_are_refused(behaviors):
    behaviors.candidate_labels[:] = -1
    with pytest.raises(ValueError, match="unlabelled"):
        ClickDataset(behaviors)


def test_dataloader_and_distributed_sampler_cover_the_samples(behaviors):
    ds = ClickDataset(behaviors, negatives=2)
    seen = []
    for rank in range(2):
        sampler = ResumableSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate)
        for batch in loader:
            assert isinstance(batch, Batch)
            seen += batch.candidates[:, 0].tolist()
    # 3 samples over 2 ranks: DistributedSampler pads to 4 by repeating one
    assert set(seen) == {10, 13, 21} and len(seen) == 4
    single = collate([ds[0], ds[1]])
    assert single.candidates.shape == (2, 3)


def test_resumable_sampler_skips_consumed_indices(behaviors):
    ds = ClickDataset(behaviors)
    sampler = ResumableSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=3)
    full = list(sampler)
    sampler.set_start(2)
    assert len(sampler) == 1
    assert list(sampler) == full[2:]
    assert list(sampler) == full, "the skip applies once"


def test_eval_batches_cover_candidates_in_order(behaviors):
    scores = []
    for batch, mask in iter_eval_batches(behaviors, history_len=2, batch_candidates=6, width=3):
        assert batch.candidates.shape[1] == 3
        assert (batch.candidates[~mask] == 0).all()
        scores.append(batch.candidates[mask])
    assert torch.cat(scores).tolist() == behaviors.candidate_items.tolist()
    first = next(iter_eval_batches(behaviors, history_len=2, width=3))[0]
    assert first.history[:3].tolist() == [[5, 6]] * 3, "each chunk of an impression: its history"
    part = torch.cat([m.flatten() for _, m in iter_eval_batches(behaviors, 2, num_impressions=2)])
    assert int(part.sum()) == 11


def item_signals(behaviors: Behaviors) -> np.ndarray:
    """(C, 2) signals that name their candidate: (item, 100 + item)."""
    items = behaviors.candidate_items.astype(np.float32)
    return np.stack([items, 100 + items], axis=1)


def test_training_batches_carry_each_candidates_signals(behaviors):
    ds = ClickDataset(behaviors, negatives=4, seed=1, signals=item_signals(behaviors))
    batch = collate([ds[0], ds.__getitems__([1, 2])])
    assert batch.signals.shape == (3, 5, 2) and batch.signals.dtype == torch.float32
    real = batch.candidates > 0
    torch.testing.assert_close(batch.signals[..., 0][real], batch.candidates[real].float())
    torch.testing.assert_close(batch.signals[..., 1][real], 100 + batch.candidates[real].float())
    assert (batch.signals[~real] == 0).all(), "padding negatives get zeros"
    assert batch.to("cpu").signals is not None
    with pytest.raises(ValueError, match="one row per candidate"):
        ClickDataset(behaviors, signals=item_signals(behaviors)[:-1])


def test_eval_batches_carry_each_candidates_signals(behaviors):
    signals = item_signals(behaviors)
    for batch, mask in iter_eval_batches(
        behaviors, 2, batch_candidates=6, width=3, signals=signals
    ):
        torch.testing.assert_close(batch.signals[..., 0][mask], batch.candidates[mask].float())
        assert (batch.signals[~mask] == 0).all()
    assert all(b.signals is None for b, _ in iter_eval_batches(behaviors, 2))
