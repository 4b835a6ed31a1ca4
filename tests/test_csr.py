import numpy as np
import torch

from mmnewsrec.csr import (
    csr_offsets,
    isin_small,
    isin_sorted,
    mean_user_vectors,
    pad_rows,
    padded_to_csr,
    pair_keys,
    segment_ids,
    slice_csr,
    tensor_segment_ids,
)

ROWS = [[5, 1], [], [7], [2, 2, 9]]  # ragged rows, one empty


def ragged():
    offsets = csr_offsets(np.array([len(r) for r in ROWS]))
    items = np.array([x for r in ROWS for x in r])
    return offsets, items


def test_offsets_and_segment_ids():
    offsets, items = ragged()
    np.testing.assert_array_equal(offsets, [0, 2, 2, 3, 6])
    assert offsets.dtype == np.int64
    np.testing.assert_array_equal(segment_ids(offsets), [0, 0, 2, 3, 3, 3])
    np.testing.assert_array_equal(tensor_segment_ids(torch.from_numpy(offsets)), [0, 0, 2, 3, 3, 3])
    assert len(segment_ids(csr_offsets(np.zeros(0, dtype=np.int64)))) == 0
    unbased = torch.from_numpy(offsets[1:])  # rows 1..3 of the same arrays, not rebased to 0
    np.testing.assert_array_equal(tensor_segment_ids(unbased), [1, 2, 2, 2])
    assert len(tensor_segment_ids(torch.zeros(1, dtype=torch.int64))) == 0


def test_isin_sorted_is_isin():
    generator = torch.Generator().manual_seed(0)
    elements = torch.randint(0, 50, (4, 30), generator=generator)
    for size in (0, 1, 7, 200):
        pool = torch.randint(0, 50, (size,), generator=generator)  # unsorted, with repeats
        assert torch.equal(isin_sorted(elements, pool), torch.isin(elements, pool))


def test_pad_rows_places_every_value_and_fills_the_rest():
    offsets, items = ragged()
    dense, (row, col) = pad_rows(items.astype(float), offsets, -1.0)
    expected = [[5, 1, -1], [-1, -1, -1], [7, -1, -1], [2, 2, 9]]
    np.testing.assert_array_equal(dense, expected)
    np.testing.assert_array_equal(dense[row, col], items)
    # offsets need not start at 0 (a slice of a larger CSR array)
    part, _ = pad_rows(items[2:].astype(float), offsets[2:], 0.0)
    np.testing.assert_array_equal(part, [[7, 0, 0], [2, 2, 9]])


def test_padded_to_csr_keeps_order_and_drops_padding():
    padded = torch.tensor([[0, 5, 1], [0, 0, 0], [7, 0, 3]])
    offsets, items = padded_to_csr(padded)
    assert offsets.tolist() == [0, 2, 2, 4] and items.tolist() == [5, 1, 7, 3]


def test_slice_and_pair_keys():
    offsets, items = (torch.from_numpy(a) for a in ragged())
    sub_offsets, sub_items = slice_csr(offsets, items, 2, 4)
    assert sub_offsets.tolist() == [0, 1, 4] and sub_items.tolist() == [7, 2, 2, 9]
    keys = pair_keys(offsets, items, width=10)
    assert keys.tolist() == [5, 1, 27, 32, 32, 39]


def test_mean_user_vectors_against_a_loop():
    rng = np.random.default_rng(0)
    offsets, items = ragged()
    clicked = torch.from_numpy(rng.normal(size=(len(items), 3)))
    users = mean_user_vectors(clicked, torch.from_numpy(offsets), recency_weighting=0.5)
    for u, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        weights = 0.5 ** np.arange(hi - lo)[::-1]  # the latest click weighs 1
        mean = (clicked[lo:hi].numpy() * weights[:, None]).sum(axis=0)
        norm = np.linalg.norm(mean)
        expected = mean / norm if hi > lo else np.zeros(3)
        np.testing.assert_allclose(users[u].numpy(), expected, atol=1e-12)


def test_isin_small_is_np_isin():
    rng = np.random.default_rng(0)
    for size in (0, 1, 7, 40):
        elements, pool = rng.integers(0, 60, 250), rng.integers(1, 60, size)
        np.testing.assert_array_equal(isin_small(elements, pool), np.isin(elements, pool))
