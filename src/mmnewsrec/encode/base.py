"""What every encoder shares: the protocols, dedupe, sorted batching, model identity.

Every encoder returns float32 rows, L2-normalised, one per input. Text encoders take strings;
image encoders take image file paths (None = no image) and also return `has_image` and `blank`
flags: a missing or unreadable image, or a blank crop, gives a zero row and False, never a
blank picture.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

    from mmnewsrec.encode.image_files import ImageCrop

logger = logging.getLogger(__name__)


@runtime_checkable
class NewsEncoder(Protocol):
    """A frozen encoder of one modality: `name`, output `dim` and `encode`."""

    name: str
    dim: int

    def encode(
        self, items: Sequence, batch_size: int = 64, device: str = "cpu", precision: str = "auto"
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]: ...


class TextEncoder(NewsEncoder, Protocol):
    def encode(
        self,
        items: Sequence[str],
        batch_size: int = 64,
        device: str = "cpu",
        precision: str = "auto",
    ) -> np.ndarray: ...


class ImageEncoder(NewsEncoder, Protocol):
    def encode(
        self,
        items: Sequence[str | None],
        batch_size: int = 64,
        device: str = "cpu",
        precision: str = "auto",
        crop: ImageCrop | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """L2-normalise rows and return them as float32 numpy."""
    import torch

    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy()


Item = TypeVar("Item", str, str | None)


def dedupe(items: Sequence[Item]) -> tuple[list[Item], np.ndarray]:
    """Unique items in first-seen order and, per input, its position among them."""
    import polars as pl

    frame = pl.DataFrame({"item": list(items)}, schema={"item": pl.String})
    unique = frame.unique(maintain_order=True).with_row_index("u")
    inverse = frame.join(unique, on="item", how="left", nulls_equal=True, maintain_order="left")
    return unique["item"].to_list(), inverse["u"].to_numpy().astype(np.int64)


def encode_sorted(
    texts: Sequence[str],
    embed: Callable[[list[str]], torch.Tensor],
    dim: int,
    batch_size: int,
    desc: str = "texts",
) -> np.ndarray:
    """Embed texts longest first (less padding per batch); rows come back in input order."""
    from tqdm.auto import tqdm

    if not texts:
        return np.zeros((0, dim), dtype=np.float32)
    order = np.argsort([-len(t) for t in texts], kind="stable")
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    parts = [
        to_numpy(embed([texts[i] for i in batch]))
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False, disable=len(batches) < 4)
    ]
    out = np.concatenate(parts)
    out[order] = out.copy()
    return out


def model_identity(name: str, path: str | None = None) -> dict:
    """What identifies a model's weights: sha256 of its local file(s), or its hub revision.

    `path` is where `name` lives on disk when the name is not itself a path.
    """
    local = Path(path or name).expanduser()
    if local.exists():
        return {"id": name if path else local.resolve().name, "sha256": path_digest(local)}
    return {"id": name, "revision": cached_revision(name)}


def path_digest(path: Path) -> str:
    """sha256 over a file, or over the relative names and contents of a folder's files."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        name = file.name if file == path else file.relative_to(path).as_posix()
        if name.startswith(".") or "/." in name:  # caches, VCS folders
            continue
        digest.update(name.encode() + b"\0")
        with file.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def cached_revision(repo_id: str) -> str | None:
    """Commit of a hub model in the local Hugging Face cache, or None if it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent.name if isinstance(found, str) else None
