"""Growing tables: appends write only the new rows, capacity doubles, earlier views keep their
rows; the shared/exclusive lock."""

import threading
import time

import numpy as np
import pytest
import torch

from mmnewsrec.growing import GrowingRows, SharedLock, append_rows


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_appends_reallocate_only_when_the_capacity_doubles(kind):
    start = np.arange(30, dtype=np.float32).reshape(10, 3)
    table = GrowingRows(start if kind == "numpy" else torch.from_numpy(start))
    views, capacities = [table.rows], []
    for i in range(300):
        row = np.full((1, 3), 100.0 + i, dtype=np.float32)
        views.append(table.append(row if kind == "numpy" else torch.from_numpy(row)))
        capacities.append(table.capacity)
    # 10 rows, then 20, 40, ..., 320: five copies for 300 appends
    assert sorted(set(capacities)) == [20, 40, 80, 160, 320] and table.reallocations == 5
    assert [len(v) for v in views] == list(range(10, 311))
    for i, view in enumerate(views):  # every view still shows exactly its rows
        expected = np.concatenate([start, 100.0 + np.repeat(np.arange(i), 3).reshape(i, 3)])
        np.testing.assert_array_equal(np.asarray(view), expected)


def test_a_tensor_made_in_inference_mode_takes_appends_outside_it():
    with torch.inference_mode():
        rows = torch.zeros(2, 4)
    grown: dict[str, GrowingRows] = {}
    first = append_rows(grown, "t", rows, torch.ones(1, 4))
    second = append_rows(grown, "t", first, torch.full((1, 4), 2.0))
    assert second[:, 0].tolist() == [0, 0, 1, 2] and grown["t"].reallocations == 1


def test_appending_to_an_older_view_copies_it_and_leaves_the_latest_alone():
    grown: dict[str, GrowingRows] = {}
    old = append_rows(grown, "t", np.zeros(4), np.ones(1))
    latest = append_rows(grown, "t", old, np.full(1, 2.0))
    other = append_rows(grown, "t", old, np.full(1, 3.0))  # from `old`, not the latest
    assert latest.tolist() == [0, 0, 0, 0, 1, 2] and other.tolist() == [0, 0, 0, 0, 1, 3]
    assert not np.shares_memory(latest, other)


def test_a_writer_waits_for_the_readers_and_readers_for_the_writer():
    lock, events = SharedLock(), []
    reading = threading.Event()

    def read(name: str) -> None:
        with lock.shared():
            events.append(f"{name} in")
            reading.set()
            time.sleep(0.1)
            events.append(f"{name} out")

    def write() -> None:
        reading.wait()
        with lock.exclusive():
            events.append("write")

    threads = [threading.Thread(target=read, args=("a",)), threading.Thread(target=write)]
    for thread in threads:
        thread.start()
    reading.wait()
    deadline = time.monotonic() + 5
    while not lock._writers_waiting and time.monotonic() < deadline:  # the writer waits for a
        time.sleep(0.001)
    late = threading.Thread(target=read, args=("b",))
    late.start()
    for thread in [*threads, late]:
        thread.join(5)
    assert events == ["a in", "a out", "write", "b in", "b out"]
