"""Storage that grows while it is read: tables of rows that take new rows at the end in
amortised constant time (`GrowingRows`, `append_rows`), and a lock for what cannot be read while
it is written (`SharedLock`).

A served corpus takes news one at a time (`POST /news`) while requests read it. A table here
keeps spare rows: an append writes the new rows into them, past every view handed out so far,
and returns a longer view of the same buffer; when the spare rows run out, the rows are copied
once into a buffer of twice the size. n appends thus copy O(n) rows in all, not O(n) per
append. A view handed out before an append keeps showing exactly its rows, so a reader that
holds it sees neither a new row nor a half-written one; a writer publishes the longer view
only once every table of the item is written.

Unused spare rows are allocated but never written (`empty`), so the operating system maps
no memory to them until they are used.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, TypeVar

import numpy as np
import torch

Rows = TypeVar("Rows", np.ndarray, torch.Tensor)


class GrowingRows:
    """A table of rows (a numpy array or torch tensor, rows on its first axis) that grows at
    the end; `rows` is its latest view."""

    def __init__(self, rows: Any) -> None:
        """Start from `rows`, the table so far, not copied (the first append copies it into a
        buffer with spare rows)."""
        self.buffer, self.rows = rows, rows
        self.reallocations = 0  # buffers allocated by appends so far
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        """Rows the buffer holds, used or spare."""
        return len(self.buffer)

    def append(self, new: Rows) -> Rows:
        """The latest view followed by `new` (rows of the same width and type), as a view of
        the buffer: written into its spare rows, or first copied into a buffer twice as large
        when they run out."""
        with self._lock, writable(self.buffer):
            length = len(self.rows)
            end = length + len(new)
            if end > len(self.buffer):
                buffer = empty_rows(self.buffer, max(end, 2 * len(self.buffer)))
                buffer[:length] = self.rows
                self.buffer = buffer
                self.reallocations += 1
            self.buffer[length:end] = new
            self.rows = self.buffer[:end]
            return self.rows


def writable(table: Any) -> AbstractContextManager[Any]:
    """Inference mode around writes to a tensor (a table made in it takes writes only there)."""
    return torch.inference_mode() if isinstance(table, torch.Tensor) else nullcontext()


def empty_rows(like: Any, rows: int) -> Any:
    """An uninitialised table of `rows` rows of `like`'s width, type and device."""
    if isinstance(like, torch.Tensor):
        return like.new_empty((rows, *like.shape[1:]))
    return np.empty((rows, *like.shape[1:]), dtype=like.dtype)


def append_rows(tables: dict[str, GrowingRows], key: str, rows: Rows, new: Rows) -> Rows:
    """`rows` followed by `new` through the growing table `tables[key]`, made for `rows` when
    they are not its latest view (the first append; a table replaced, or grown from an older
    view, since): an append to the latest view writes only the new rows."""
    table = tables.get(key)
    if table is None or table.rows is not rows:
        table = tables[key] = GrowingRows(rows)
    return table.append(new)


class SharedLock:
    """Readers at once, or one writer alone: for a structure that may be read by several
    threads together but not while it changes (a FAISS index during `add`). A writer that
    waits holds back readers that come after it, so a steady stream of reads cannot starve it.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._readers = self._writers_waiting = 0
        self._writing = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._changed:
            while self._writing or self._writers_waiting:
                self._changed.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._changed:
                self._readers -= 1
                if not self._readers:
                    self._changed.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._changed:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._changed.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._changed:
                self._writing = False
                self._changed.notify_all()
