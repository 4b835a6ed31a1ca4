"""The space recall scores in: the fused news vectors compared part by part.

A concat vector [text, image] holds two parts. A plain cosine over the whole row favours news
with images: image features share a large common component (any two images have a high
baseline cosine) and dominate the row, while a news without an image has zeros there. Here each
part is centred on its mean over the news that have it, scaled to unit length and weighted; a
missing part stays zero, which after centring is the average image: it neither helps nor hurts.
The score of a news item is then the weighted sum of its per-part similarities to the user.

The means and per-row scales are derived once from the vectors (`fit`); rows are transformed on
use, so the float32 news matrix is never copied.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mmnewsrec.growing import GrowingRows, append_rows

logger = logging.getLogger(__name__)

NORM_BLOCK = 65_536  # rows whose centred norms are computed at a time


@dataclass(frozen=True)
class Part:
    """Columns start:stop of the news vectors, one encoder's output."""

    name: str
    start: int
    stop: int


def vector_parts(manifest: dict, dim: int) -> tuple[Part, ...]:
    """The parts of news vectors from their manifest: text and image for a concat fusion, else
    one part over all `dim` columns."""
    fusion = manifest.get("fusion") or {}
    if fusion.get("method") == "concat" and fusion.get("text_dim"):
        text_dim = int(fusion["text_dim"])
        return (Part("text", 0, text_dim), Part("image", text_dim, dim))
    return (Part("all", 0, dim),)


class RecallSpace:
    """Per-part centring and unit scaling of news vectors (see the module docstring).

    centre=False with one part over all columns is the plain cosine. weights: per part name
    (default 1). Learned: `means_` (one (width,) mean per part, over the rows that have it) and
    `scales_` (N+1, P): weight / norm of the centred part, 0 where the part is missing.
    """

    def __init__(
        self, parts: tuple[Part, ...], centre: bool = True, weights: dict[str, float] | None = None
    ) -> None:
        self.parts = parts
        self.centre = centre
        self.weights = weights or {}

    @property
    def key(self) -> str:
        """Names the space in cache file names: the same key, the same transformed rows."""
        parts = "+".join(f"{p.name}{self.weights.get(p.name, 1.0):g}" for p in self.parts)
        return f"{'centred' if self.centre else 'raw'}-{parts}"

    def fit(self, matrix: Tensor) -> RecallSpace:
        """Derive the part means and row scales of `matrix` (N+1, D); row 0 is padding."""
        self.means_: list[Tensor] = []
        scales = []
        for p, part in enumerate(self.parts):
            block = matrix[:, part.start : part.stop]
            norms = torch.linalg.vector_norm(block, dim=1)
            present = norms > 0
            present[0] = False
            mean = block[present].sum(0) / max(int(present.sum()), 1) if self.centre else None
            self.means_.append(torch.zeros(block.shape[1]) if mean is None else mean)
            scales.append(self._scales(p, block, present, norms))
        self.scales_ = torch.stack(scales, dim=1)  # (N+1, P)
        self.grown_: dict[str, GrowingRows] = {}  # scales_ as it grows (`append_rows`)
        logger.info("recall space %s over %d rows", self.key, len(matrix))
        return self

    def _scales(self, p: int, block: Tensor, present: Tensor, norms: Tensor) -> Tensor:
        """(n,) weight / norm of each row's centred part p (`block`); 0 where absent."""
        if self.centre:
            norms = centred_norms(block, self.means_[p])
        weight = self.weights.get(self.parts[p].name, 1.0)
        return torch.where(present, weight / norms.clamp_min(1e-12), 0.0)

    def row_scales(self, rows: Tensor) -> Tensor:
        """(n, P) scales of new rows `rows` (n, D) by the fitted means."""
        scales = []
        for p, part in enumerate(self.parts):
            block = rows[:, part.start : part.stop]
            norms = torch.linalg.vector_norm(block, dim=1)
            scales.append(self._scales(p, block, norms > 0, norms))
        return torch.stack(scales, dim=1)

    def appended(self, rows: Tensor) -> RecallSpace:
        """A copy of this fitted space that also covers `rows` (n, D), new rows after the
        fitted ones: their scales by the fitted means (which stay as they are), written after
        this space's scales in a growing table (`mmnewsrec.growing`): O(n), not O(N + n)."""
        space = copy.copy(self)
        space.grown_ = dict(self.grown_)  # a copy's own: one grown from this later starts anew
        space.scales_ = append_rows(space.grown_, "scales", self.scales_, self.row_scales(rows))
        return space

    def rows(self, matrix: Tensor, ids: Tensor) -> Tensor:
        """Transformed rows `ids` (any shape) of `matrix`: (*ids.shape, D) float32."""
        out = gather_rows(matrix, ids).float()
        scales = gather_rows(self.scales_, ids)
        for p, part in enumerate(self.parts):
            sl = slice(part.start, part.stop)
            out[..., sl] = (out[..., sl] - self.means_[p]) * scales[..., p, None]
        return out

    def score_rows(self, users: Tensor, matrix: Tensor, ids: Tensor) -> Tensor:
        """(b, n): each user's inner product with the transformed rows `ids` (b, n) of
        `matrix`, from the plain rows: one gather and one batched product, no transformed copy.
        """
        rows = gather_rows(matrix, ids).float()  # (b, n, D)
        split = torch.zeros(len(users), users.shape[1], len(self.parts))  # (b, D, P)
        offsets = torch.zeros(len(users), len(self.parts))  # (b, P): user . part mean
        for p, part in enumerate(self.parts):
            u = users[:, part.start : part.stop]
            split[:, part.start : part.stop, p] = u
            offsets[:, p] = u @ self.means_[p]
        raw = torch.bmm(rows, split) - offsets[:, None]  # (b, n, P)
        return (raw * gather_rows(self.scales_, ids)).sum(-1)

    def score_one(self, user: np.ndarray, matrix: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """`score_rows` for one user (D,) and news `ids` (n,) in numpy: the few hundred rows of
        a serving request, without torch's per-operation cost."""
        split = np.zeros((len(user), len(self.parts)), np.float32)  # (D, P)
        offsets = np.zeros(len(self.parts), np.float32)  # user . part mean
        for p, part in enumerate(self.parts):
            split[part.start : part.stop, p] = u = user[part.start : part.stop]
            offsets[p] = u @ self.means_[p].numpy()
        raw = matrix[ids] @ split - offsets  # (n, P)
        return (raw * self.scales_.numpy()[ids]).sum(1)

    def scores(self, users: Tensor, matrix: Tensor) -> Tensor:
        """(b, N+1): each user's inner product with every transformed row of `matrix`."""
        total = torch.zeros(len(users), len(matrix))
        for p, part in enumerate(self.parts):
            u = users[:, part.start : part.stop]
            raw = u @ matrix[:, part.start : part.stop].T - (u @ self.means_[p])[:, None]
            total += raw * self.scales_[:, p]
        return total


def gather_rows(matrix: Tensor, ids: Tensor) -> Tensor:
    """matrix[ids] for ids of any shape: (*ids.shape, D). index_select on the flat ids is
    several times faster than advanced indexing with a 2-D index."""
    return matrix.index_select(0, ids.reshape(-1)).view(*ids.shape, matrix.shape[1])


def centred_norms(block: Tensor, mean: Tensor) -> Tensor:
    """Row norms of `block - mean`, computed in blocks of rows (bounded extra memory)."""
    return torch.cat(
        [
            torch.linalg.vector_norm(block[s : s + NORM_BLOCK] - mean, dim=1)
            for s in range(0, len(block), NORM_BLOCK)
        ]
    )
