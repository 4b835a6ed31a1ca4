"""Training the text encoder's top layers with a ranker (`model.finetune_layers = N`).

`FineTunedRanker` wraps any trainable ranker: per batch, each distinct news item goes through
the trainable top layers once (from cached token states, see `mmnewsrec.encode.finetune`), its
text vector replaces the text slice of its frozen news vector (the image part stays frozen),
and the ranker runs on that small table. In eval mode the table of every news item is computed
once and reused until training resumes.

After training, `export_run` makes the run self-contained for evaluate, predict and serve:

    RUN_DIR/vectors/        the news vectors of the fine-tuned encoder (the `encode` format)
    RUN_DIR/text_encoder/   the fine-tuned text encoder, a sentence-transformers folder; its
                            manifest.json lists the dimensions kept constant and their values
    RUN_DIR/checkpoint.pt   the ranker alone, on RUN_DIR/vectors (its config says so)

Fusions: the text part must be a slice of the news vector, so `text` and `concat` are
supported; `hadamard` and `mean` (a projection mixes text and image) and joint encoders are
refused.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from mmnewsrec.config import ConfigError, TrainConfig
from mmnewsrec.files import atomic_file
from mmnewsrec.formats.runs import read_checkpoint
from mmnewsrec.formats.vectors import NewsVectors
from mmnewsrec.rank.model import Ranker, standardisation

if TYPE_CHECKING:
    from mmnewsrec.encode.finetune import TextTower, TokenStates
    from mmnewsrec.formats.store import Store

logger = logging.getLogger(__name__)

STATES_DIR = "token_states"  # under the vectors folder
EXPORT_BLOCK = 1024  # news encoded per forward when the whole table is computed
CONSTANT_STD = 1e-4  # a text dimension this flat over the frozen vectors stays as it is


@dataclass(frozen=True)
class FineTuneSpec:
    """What a fine-tuned run's tower is: base model, trainable layers, tokens, text slice."""

    text_encoder: str
    layers: int
    max_tokens: int
    text_dim: int
    states_key: str

    def describe(self) -> dict[str, Any]:
        return dict(vars(self))


class FineTunedRanker(nn.Module):
    """A ranker whose news vectors' text part comes from a trainable `TextTower`.

    The ranker standardises its inputs per dimension; here by `mean` and `scale`, the statistics
    of the table at the last evaluation (saved in checkpoints, for exact resumes), so that an
    evaluation sees what the plain ranker on the exported vectors sees."""

    flat: Tensor  # buffers, registered in __init__
    flat_value: Tensor
    mean: Tensor
    scale: Tensor

    def __init__(self, ranker: Ranker, tower: TextTower, states: TokenStates, spec: FineTuneSpec):
        super().__init__()
        self.ranker = ranker
        self.text = tower
        self.states = states  # TokenStates: (N+1, T, H) float16, memory-mapped
        self.spec = spec
        self.table: Tensor | None = None  # eval mode: every news item's vector
        text = ranker.news_vectors[1:, : spec.text_dim]
        flat = text.std(dim=0, correction=0) < CONSTANT_STD  # (text_dim,)
        self.register_buffer("flat", flat, persistent=False)
        self.register_buffer("flat_value", text.mean(dim=0), persistent=False)
        self.register_buffer("mean", ranker.vector_mean.clone())  # (D,)
        self.register_buffer("scale", ranker.vector_scale.clone())  # (D,)

    @property
    def model_args(self) -> dict[str, Any]:
        return self.ranker.model_args

    def news_rows(self, indices: Tensor) -> Tensor:
        """(n,) news indices (> 0) -> (n, D) vectors: tuned text part, frozen rest."""
        states, lengths = self.states.rows(indices)
        text = self.text(states, lengths)  # (n, text_dim)
        # the ranker divides by each dimension's std: one the frozen encoder leaves constant
        # (std ~0) must stay constant, or the slightest change there is blown up a millionfold
        text = torch.where(self.flat, self.flat_value.to(text.dtype), text)
        frozen = self.ranker.news_vectors[indices, self.spec.text_dim :]
        return torch.cat([text.to(frozen.dtype), frozen], dim=1)

    def forward(self, history: Tensor, candidates: Tensor, signals: Tensor | None = None) -> Tensor:
        if not self.training:
            if self.table is None:
                self.refresh()
            assert self.table is not None
            table, flags = self.table, self.ranker.has_image
            return self.with_table(table, flags, history, candidates, signals)
        ids = torch.cat([history.new_zeros(1), history.flatten(), candidates.flatten()])
        unique, inverse = torch.unique(ids, return_inverse=True)  # unique[0] = 0 (padding)
        rows = self.news_rows(unique[1:])  # (n, D)
        table = torch.cat([rows.new_zeros(1, rows.shape[1]), rows])  # (1+n, D)
        n_hist = history.numel()
        local_history = inverse[1 : 1 + n_hist].view_as(history)
        local_candidates = inverse[1 + n_hist :].view_as(candidates)
        flags = self.ranker.has_image[unique]
        categories = self.ranker.news_categories
        categories = None if categories is None else categories[unique]
        return self.with_table(table, flags, local_history, local_candidates, signals, categories)

    def with_table(
        self,
        table: Tensor,
        flags: Tensor,
        history: Tensor,
        cand: Tensor,
        signals: Tensor | None,
        categories: Tensor | None = None,
    ) -> Tensor:
        """The ranker's forward on another news table (rows addressed by history / cand), with
        its image flags and, where the ranker reads them, category ids."""
        ranker = self.ranker
        names = ("news_vectors", "has_image", "vector_mean", "vector_scale", "news_categories")
        saved = [getattr(ranker, name) for name in names]
        if categories is None:
            categories = ranker.news_categories
        values = (table, flags, self.mean, self.scale, categories)
        for name, value in zip(names, values, strict=True):
            setattr(ranker, name, value)
        try:
            return ranker(history, cand, signals)
        finally:
            for name, value in zip(names, saved, strict=True):
                setattr(ranker, name, value)

    @torch.no_grad()
    def full_table(self) -> Tensor:
        """(N+1, D) float32: every news item through the tower, row 0 zeros; computed in fp32
        under any autocast, as the export computes it, so that selection sees those vectors."""
        vectors = self.ranker.news_vectors
        index = torch.arange(1, len(vectors), device=vectors.device)
        with torch.autocast(vectors.device.type, enabled=False):
            rows = [self.news_rows(part).float() for part in index.split(EXPORT_BLOCK)]
        return torch.cat([vectors.new_zeros(1, vectors.shape[1]), *rows])

    def refresh(self) -> None:
        """Compute every news item's vector, and standardise the ranker's inputs by their
        statistics from now on: those the plain ranker on the run's exported vectors uses."""
        self.table = self.full_table()
        mean, scale = standardisation(self.table)
        self.mean.copy_(mean)
        self.scale.copy_(scale)

    def train(self, mode: bool = True) -> FineTunedRanker:
        self.table = None
        return super().train(mode)


def fine_tuned(
    ranker: Ranker, config: TrainConfig, store: Store, vectors: NewsVectors, device: torch.device
) -> FineTunedRanker:
    """Wrap `ranker` for `model.finetune_layers` (the token states cached under the vectors)."""
    from mmnewsrec.encode.finetune import FineTuneError, TextTower, load_sentence_model

    name, text_dim = text_source(vectors, config)
    identity = check_same_model(name, vectors)
    try:
        base = load_sentence_model(name)
        states = news_states(base, identity, store, vectors, config, device)
        tower = TextTower(base, config.model.finetune_layers)
    except FineTuneError as err:
        raise ConfigError(f"model.finetune_layers: {err}") from None
    spec = FineTuneSpec(
        name, config.model.finetune_layers, config.model.finetune_max_tokens, text_dim,
        states.manifest["key"],
    )  # fmt: skip
    n_params = sum(p.numel() for p in tower.parameters())
    logger.info("fine-tuning %d layers of %s (%.2fM parameters)", spec.layers, name, n_params / 1e6)
    return FineTunedRanker(ranker, tower, states, spec)


def text_source(vectors: NewsVectors, config: TrainConfig) -> tuple[str, int]:
    """(text model name, width of the text slice) of vectors whose text part can be tuned."""
    manifest = vectors.manifest
    fusion = manifest.get("fusion", {})
    text = manifest.get("text") or {}
    encoder = text.get("encoder") or {}
    where = f"{config.data.vectors_dir}: vectors"
    if fusion.get("method") not in ("text", "concat"):
        raise ConfigError(
            f"model.finetune_layers: {where} fused by {fusion.get('method')!r}; fine-tuning "
            "needs the text part as a slice of the vector (fusion 'text' or 'concat')"
        )
    if not text or encoder.get("joint"):
        raise ConfigError(f"model.finetune_layers: {where} have no separate text encoder part")
    return config.model.text_encoder or encoder["id"], int(fusion["text_dim"])


def check_same_model(name: str, vectors: NewsVectors) -> dict:
    """The identity of text model `name` (`encode.base.model_identity`); refuse one with other
    weights than the model the vectors were encoded with."""
    from mmnewsrec.encode.base import model_identity
    from mmnewsrec.encode.text import text_model_path

    recorded = vectors.manifest["text"]["encoder"]
    actual = model_identity(name, text_model_path(name))
    if recorded.get("sha256") != actual.get("sha256") or recorded.get("revision") != actual.get(
        "revision"
    ):
        raise ConfigError(
            f"model.text_encoder {name!r} is not the model the vectors' text part was encoded "
            f"with ({recorded}); give that model (a local path: model.text_encoder=PATH)"
        )
    return actual


def news_states(
    base: Any, identity: dict, store: Store, vectors: NewsVectors, config: TrainConfig, device: Any
) -> TokenStates:
    """The cached token states of the texts the vectors were encoded from."""
    from mmnewsrec.encode.finetune import token_states
    from mmnewsrec.encode.pipeline import news_texts

    texts = news_texts(store.news, vectors.manifest["text"]["fields"]).to_list()
    return token_states(
        base, identity, texts, store.content_hash, config.model.finetune_layers,
        config.model.finetune_max_tokens, Path(config.data.vectors_dir) / STATES_DIR, device,
    )  # fmt: skip


def export_run(out_dir: Path, source: NewsVectors, model: nn.Module) -> None:
    """Write RUN_DIR/vectors and RUN_DIR/text_encoder from the best checkpoint and make
    checkpoint.pt a plain ranker checkpoint on them (nothing to do if that was done)."""
    from mmnewsrec.encode.finetune import load_sentence_model

    path = out_dir / "checkpoint.pt"
    state = read_checkpoint(path)
    if "finetune" not in state or state["finetune"].get("exported"):
        return
    assert isinstance(model, FineTunedRanker)
    model.load_state_dict(state["model"])
    model.eval()
    table = model.full_table().cpu().numpy().astype(np.float16)
    vectors_dir = out_dir / "vectors"
    run_vectors = NewsVectors(table, np.array(source.has_image), run_manifest(source, table, state))
    run_vectors.save(vectors_dir)
    spec = model.spec
    flat = model.flat.nonzero().flatten()
    constant = {"dims": flat.tolist(), "values": model.flat_value[flat].tolist()}
    model.text.save_model(
        load_sentence_model(spec.text_encoder), out_dir / "text_encoder", spec.max_tokens,
        {"constant_dims": constant},
    )  # fmt: skip
    config = state["config"]
    config["data"]["vectors_dir"] = str(vectors_dir)
    ranker_state = {
        k.removeprefix("ranker."): v for k, v in state["model"].items() if k.startswith("ranker.")
    }
    state |= {
        "model": ranker_state,
        "vectors_hash": run_vectors.hash,
        "config": config,
        "finetune": state["finetune"] | {"exported": True, "source_vectors_hash": source.hash},
    }
    with atomic_file(path) as tmp:
        torch.save(state, tmp)
    logger.info("wrote the fine-tuned news vectors %s and text encoder", vectors_dir)


def run_manifest(source: NewsVectors, table: np.ndarray, state: dict) -> dict:
    """The run's vectors manifest: the source's, with a hash of these vectors and their origin."""
    digest = hashlib.sha256(table.tobytes()).hexdigest()
    origin = {
        "source_vectors_hash": source.hash,
        "step": state["step"],
        **state["finetune"],
    }
    return {**source.manifest, "hash": digest, "finetuned": origin}
