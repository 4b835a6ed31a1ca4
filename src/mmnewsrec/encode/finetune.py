"""A text encoder split for fine-tuning: frozen bottom layers whose token states are cached,
and trainable top layers with the pooling (`TextTower`).

A sentence-transformers model over a BERT-style transformer (`encoder.layer`, as BERT, MiniLM,
RoBERTa, BGE have), followed by mean or CLS pooling and optionally Normalize, splits at layer
L - N: the token states after the bottom L - N layers are computed once per news item and kept
on disk (`TokenStates`), the top N layers and the pooling run per training batch. At the start
the tower gives the vectors of the frozen model (L2-normalised, as `encode` writes them).

Layout of a token-state cache folder (written atomically; manifest.json marks it complete):
    states.npy      float16 (N+1, T, hidden): row i = news index i, row 0 padding (zeros)
    lengths.npy     int32 (N+1,): tokens of each row (a prefix of T; row 0: 0)
    manifest.json   model identity, split layer, max tokens, store content hash, "key"
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from mmnewsrec.encode.text import text_model_path
from mmnewsrec.files import atomic_dir, sha256_json, write_json

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "cls")
MODULES = ("Transformer", "Pooling", "Normalize")


class FineTuneError(ValueError):
    """A text model or option that cannot be fine-tuned this way."""


def load_sentence_model(name: str) -> SentenceTransformer:
    """The sentence-transformers model of `name` (hub id, local path or shipped MiniLM), on the
    CPU in eval mode, checked to be transformer + mean/CLS pooling (+ Normalize)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(text_model_path(name), device="cpu").eval()
    kinds = [type(module).__name__ for module in model]
    if kinds[:2] != list(MODULES[:2]) or not set(kinds[2:]) <= {"Normalize"}:
        raise FineTuneError(f"{name}: modules {kinds}; fine-tuning needs {' + '.join(MODULES)}")
    if pooling_mode(model) not in POOLINGS:
        raise FineTuneError(f"{name}: pooling {pooling_mode(model)!r}; supported: {POOLINGS}")
    layers(model)
    return model


def pooling_mode(model: SentenceTransformer) -> str:
    return str(model[1].pooling_mode)


def transformer(model: SentenceTransformer) -> Any:
    """The Hugging Face model inside a sentence-transformers model."""
    return model[0].auto_model


def layers(model: SentenceTransformer) -> nn.ModuleList:
    """The transformer layers of a BERT-style model (`encoder.layer`)."""
    found = getattr(getattr(transformer(model), "encoder", None), "layer", None)
    if not isinstance(found, nn.ModuleList):
        raise FineTuneError(
            f"{type(transformer(model)).__name__}: not a BERT-style model (no encoder.layer)"
        )
    return found


def check_split(model: SentenceTransformer, trainable: int) -> int:
    """The number of frozen layers, L - trainable, for 1 <= trainable <= L."""
    total = len(layers(model))
    if not 1 <= trainable <= total:
        raise FineTuneError(f"model.finetune_layers {trainable}: the model has {total} layers")
    return total - trainable


class TextTower(nn.Module):
    """The top layers and the pooling: token states (n, T, H) + lengths (n,) -> (n, H) rows,
    L2-normalised."""

    def __init__(self, model: SentenceTransformer, trainable: int) -> None:
        super().__init__()
        frozen = check_split(model, trainable)
        self.config = transformer(model).config
        self.layers = nn.ModuleList(layers(model)[frozen:])
        self.pooling = pooling_mode(model)

    def forward(self, states: Tensor, lengths: Tensor) -> Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        width = int(lengths.max())
        h = states[:, :width].float()  # (n, T, H): the batch's longest text sets T
        keep = torch.arange(width, device=h.device) < lengths.unsqueeze(1)  # (n, T)
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=h, attention_mask=keep.long()
        )
        for layer in self.layers:
            out = layer(h, mask)
            h = out[0] if isinstance(out, tuple) else out
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            weights = keep.unsqueeze(-1).to(h.dtype)  # (n, T, 1)
            pooled = (h * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return nn.functional.normalize(pooled.float(), dim=-1)  # (n, H)

    def save_model(
        self, base: SentenceTransformer, out: Path, max_tokens: int, extra: dict | None = None
    ) -> None:
        """Write `base` with these top layers as a sentence-transformers folder (atomically):
        the fine-tuned text encoder, usable as `encode --text-encoder OUT`; `extra` goes into
        its manifest.json."""
        model_layers = layers(base)
        frozen = len(model_layers) - len(self.layers)
        for i, layer in enumerate(self.layers):
            model_layers[frozen + i].load_state_dict(layer.state_dict())
        base.max_seq_length = max_tokens
        with atomic_dir(out, "a text encoder folder") as tmp:
            base.save(str(tmp))
            manifest = {"max_tokens": max_tokens, "frozen_layers": frozen, **(extra or {})}
            write_json(tmp / "manifest.json", manifest)


@dataclass
class TokenStates:
    """Cached token states of every news item after the frozen layers (memory-mapped)."""

    states: np.ndarray  # (N+1, T, H) float16
    lengths: np.ndarray  # (N+1,) int32
    manifest: dict

    @classmethod
    def load(cls, path: Path) -> TokenStates:
        manifest = json.loads((path / "manifest.json").read_text())
        states = np.load(path / "states.npy", mmap_mode="r")
        lengths = np.load(path / "lengths.npy")
        return cls(states, lengths, manifest)

    @property
    def nbytes(self) -> int:
        return int(self.states.nbytes + self.lengths.nbytes)

    def rows(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """States (n, T, H) float16, cut to the longest of these rows, and lengths (n,), on the
        indices' device."""
        picked = indices.cpu().numpy()
        lengths = self.lengths[picked]
        width = max(int(lengths.max()), 1)
        states = torch.from_numpy(np.ascontiguousarray(self.states[picked, :width]))
        device = indices.device
        return states.to(device, non_blocking=True), torch.from_numpy(lengths).to(device)


def cache_key(
    store_hash: str, texts: Sequence[str], identity: dict, frozen: int, max_tokens: int
) -> str:
    """What determines the cached states: store content, texts, model, split layer, length."""
    import hashlib

    inputs = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    key = [store_hash, inputs, identity, frozen, max_tokens]
    return f"states-{sha256_json(key)[:20]}"


def token_states(
    model: SentenceTransformer,
    identity: dict,
    texts: Sequence[str],
    store_hash: str,
    trainable: int,
    max_tokens: int,
    cache_dir: Path,
    device: torch.device,
    batch_size: int = 64,
) -> TokenStates:
    """The states of `texts` (news 1..N) after the frozen layers, from `cache_dir` or computed
    and written there (atomically). `model` (of `identity`, `encode.base.model_identity`) is
    not changed."""
    frozen = check_split(model, trainable)
    key = cache_key(store_hash, texts, identity, frozen, max_tokens)
    path = cache_dir / key
    if (path / "manifest.json").is_file():
        logger.info("reusing cached token states %s", path)
        return TokenStates.load(path)
    manifest = {"key": key, "model": identity, "frozen_layers": frozen, "max_tokens": max_tokens}
    manifest |= {"store": {"content_hash": store_hash}, "num_news": len(texts)}
    with atomic_dir(path, "a token-state cache") as tmp:
        write_states(model, texts, frozen, max_tokens, tmp, device, batch_size)
        write_json(tmp / "manifest.json", manifest)
    states = TokenStates.load(path)
    logger.info("cached token states %s: %.1f MB", path, states.nbytes / 1e6)
    return states


def write_states(
    model: SentenceTransformer,
    texts: Sequence[str],
    frozen: int,
    max_tokens: int,
    out: Path,
    device: torch.device,
    batch_size: int,
) -> None:
    """Run the bottom `frozen` layers over every text (longest first) into out/states.npy."""
    from tqdm.auto import tqdm

    tokens = model.tokenizer(list(texts), truncation=True, max_length=max_tokens)["input_ids"]
    lengths = np.array([0] + [len(t) for t in tokens], dtype=np.int32)
    np.save(out / "lengths.npy", lengths)
    bottom = bottom_model(model, frozen).to(device)
    hidden = bottom.config.hidden_size
    shape = (len(lengths), int(lengths.max(initial=1)), hidden)
    # a new file, zero-filled: padding and the tail of each row beyond its text stay zero
    states = np.lib.format.open_memmap(out / "states.npy", "w+", np.float16, shape)
    order = np.argsort(-lengths[1:], kind="stable")
    for start in tqdm(range(0, len(order), batch_size), desc="token states", leave=False):
        rows = order[start : start + batch_size]
        batch = model.tokenizer.pad({"input_ids": [tokens[i] for i in rows]}, return_tensors="pt")
        with torch.inference_mode():
            out_states = bottom(**{k: v.to(device) for k, v in batch.items()}).last_hidden_state
        width = out_states.shape[1]
        states[1 + rows, :width] = out_states.float().cpu().numpy()
    states.flush()


def bottom_model(model: SentenceTransformer, frozen: int) -> Any:
    """A copy of the transformer holding its bottom `frozen` layers only."""
    import copy

    auto = transformer(model)
    kept = layers(model)
    auto.encoder.layer = nn.ModuleList(kept[:frozen])
    try:
        bottom = copy.deepcopy(auto).eval()
    finally:
        auto.encoder.layer = kept
    return bottom
