"""Fixed (not learned) fusion of a news item's text part and image part into one vector.

    concat    [text, image]; a news without an image has zeros in the image part
    hadamard  normalise(P_t text * P_i image); without an image: P_t text
    mean      normalise(P_t text + P_i image); without an image: P_t text
    text      the text part alone
    image     the image part alone (zeros without an image)

hadamard and mean first bring both sides to one width (default: the smaller of the two) with a
fixed random orthogonal projection seeded by (seed, in, out), each projected side L2-normalised.
A side already of that width is not projected, so the aligned spaces of a joint encoder (CLIP,
BLIP) stay aligned. A missing image never enters the product or the mean as a fake vector: the
news keeps its projected text part, and `has_image` tells the ranker the difference.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

FUSIONS = ("concat", "hadamard", "mean", "text", "image")
NEEDS_TEXT = ("concat", "hadamard", "mean", "text")
NEEDS_IMAGE = ("concat", "hadamard", "mean", "image")
MISSING_IMAGE = {
    "concat": "image part zeros",
    "hadamard": "projected text part alone",
    "mean": "projected text part alone",
    "text": "not used",
    "image": "zeros",
}


@functools.cache
def projection(d_in: int, d_out: int, seed: int = 0) -> np.ndarray:
    """(d_in, d_out) float32 with orthonormal columns (d_in >= d_out) or rows (d_in < d_out)."""
    rng = np.random.default_rng([seed, d_in, d_out])
    q, r = np.linalg.qr(rng.standard_normal((max(d_in, d_out), min(d_in, d_out))))
    q *= np.sign(np.diag(r))  # unique, uniformly distributed orthogonal factor
    matrix = (q if d_in >= d_out else q.T).astype(np.float32)
    matrix.flags.writeable = False
    return matrix


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


@dataclass(frozen=True)
class Fusion:
    """How text parts (n, text_dim) and image parts (n, image_dim) become (n, out_dim)."""

    method: str = "concat"
    text_dim: int = 0
    image_dim: int = 0
    dim: int | None = None  # common width for hadamard / mean; default min(text_dim, image_dim)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in FUSIONS:
            raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, not {self.method!r}")
        if self.method in NEEDS_TEXT and not self.text_dim:
            raise ValueError(f"fusion {self.method!r} needs a text encoder")
        if self.method in NEEDS_IMAGE and not self.image_dim:
            raise ValueError(f"fusion {self.method!r} needs an image encoder")
        if self.dim is not None and self.method not in ("hadamard", "mean"):
            raise ValueError("a fusion dimension applies to hadamard and mean only")

    @classmethod
    def from_manifest(cls, entry: dict, source: str) -> Fusion:
        """The fusion a vectors manifest's "fusion" entry describes (`describe`'s inverse);
        a missing or malformed field is a ValueError naming `source` (the file) and the field."""
        try:
            method = entry["method"]
            dim = int(entry["dim"]) if method in ("hadamard", "mean") else None
            seed = int((entry.get("projection") or {}).get("seed", 0))
            return cls(method, int(entry["text_dim"]), int(entry.get("image_dim") or 0), dim, seed)
        except KeyError as err:
            raise ValueError(f'{source}: the "fusion" entry has no field {err}') from None
        except (TypeError, ValueError) as err:
            raise ValueError(f'{source}: the "fusion" entry {entry!r}: {err}') from None

    @property
    def common_dim(self) -> int:
        return self.dim or min(self.text_dim, self.image_dim)

    @property
    def out_dim(self) -> int:
        return {
            "concat": self.text_dim + self.image_dim,
            "text": self.text_dim,
            "image": self.image_dim,
        }.get(self.method, self.common_dim)

    def describe(self) -> dict:
        """The manifest entry: method, widths, projection, what a missing image does."""
        entry = {
            "method": self.method,
            "dim": self.out_dim,
            "text_dim": self.text_dim,
            "image_dim": self.image_dim,
            "missing_image": MISSING_IMAGE[self.method],
        }
        if self.method in ("hadamard", "mean"):
            entry["projection"] = {
                "kind": "fixed random orthogonal (QR of a Gaussian), then L2-normalised",
                "seed": self.seed,
                "text": self.text_dim != self.common_dim,
                "image": self.image_dim != self.common_dim,
            }
        return entry

    def project(self, x: np.ndarray) -> np.ndarray:
        """One side to the common width, L2-normalised."""
        d_in = x.shape[1]
        if d_in != self.common_dim:
            x = x @ projection(d_in, self.common_dim, self.seed)
        return normalize(x)

    def __call__(
        self, text: np.ndarray | None, image: np.ndarray | None, has_image: np.ndarray
    ) -> np.ndarray:
        """(n, out_dim) float32; `text` / `image` may be None when the method does not use them."""
        mask = has_image[:, None]  # (n, 1)
        if self.method == "text":
            assert text is not None
            return text.astype(np.float32, copy=False)
        assert image is not None
        if self.method == "image":
            return np.where(mask, image, 0).astype(np.float32)
        assert text is not None
        if self.method == "concat":
            return np.concatenate([text, np.where(mask, image, 0)], axis=1).astype(np.float32)
        t, i = self.project(text), self.project(image)
        if self.method == "mean":
            return normalize(t + np.where(mask, i, 0)).astype(np.float32)
        return np.where(mask, normalize(t * i), t).astype(np.float32)
