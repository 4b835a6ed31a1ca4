"""Ranking models on frozen news vectors: transformers, an additive-attention user encoder,
a gradient-boosted ranker over behaviour signals, and baselines, all with one forward contract:

    scores = model(history, candidates, signals=None)
    history:    LongTensor (B, L) news indices, 0 = padding, left-padded, most recent click last
    candidates: LongTensor (B, C) news indices, 0 = padding candidate (its score is 0, ignore it)
    signals:    FloatTensor (B, C, F) the candidates' behaviour signals (`config.signals`, in
                that order), for a model configured with some; ignored by the others
    scores:     FloatTensor (B, C); a candidate's score never depends on the other candidates

A neural ranker with signals combines its content score with the candidate's own signals
(`SignalHead`: content * gate(signals) + bias(signals), gate > 0), so candidates with equal
signals, such as cold items without clicks, still rank by content, and no candidate sees another.

Under autocast the final scores are still computed in fp32 (`fp32_scores`), so that bf16
rounding does not tie candidates that the model tells apart.

Models gather their inputs from a non-persistent buffer `news_vectors` (N+1, D) set at
construction, so checkpoints hold weights only and `model_args` rebuilds the architecture.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmnewsrec.csr import mean_user_vectors, padded_to_csr
from mmnewsrec.growing import GrowingRows, append_rows
from mmnewsrec.recall.space import Part, RecallSpace

logger = logging.getLogger(__name__)

# Named size presets for the neural models (keys a config lacks are ignored).
# cpu:  the default, trains at hundreds of rows/s on 2 cores.
# gpu:  for one data-centre GPU (fp32/bf16), ~4x the width, 4 layers.
# seed: the research notebook's architecture, for comparison on equal terms.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},
    "gpu": {"d_model": 256, "n_layers": 4, "n_heads": 8, "d_ff": 1024, "dropout": 0.1},
    "seed": {"d_model": 768, "n_layers": 4, "n_heads": 8, "d_ff": 1024, "dropout": 0.1},
}

# The image part of [text | image] vectors that training reduces by default (`image_rank`): a
# frozen image encoder's features of news pictures vary mostly in detail that says nothing of a
# click; a few whitened principal directions keep their style (docs/models.md).
IMAGE_RANK = 8


@dataclass
class RecTransformerConfig:
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    dropout: float = 0.1
    max_history: int = 50  # L: the most recent clicks kept
    image_flag: bool = True  # add a learned "no image" vector to news without an image
    signals: list[str] = field(default_factory=list)  # behaviour signals (SignalHead)
    content_rank: int = 0  # > 0: each part of the vectors reduced to its top principal directions
    image_rank: int = 0  # > 0: the image part of [text | image] vectors so, in content_rank's place
    text_dim: int = 0  # the text part's width in [text | image] vectors (content_rank's parts)
    category_names: list[str] = field(default_factory=list)  # sorted; [] = no category input
    subcategory_names: list[str] = field(default_factory=list)  # sorted


@dataclass
class FastRecTransformerConfig(RecTransformerConfig):
    n_cross_layers: int = 1  # candidate -> history cross-attention blocks


@dataclass
class AdditiveAttentionConfig:
    d_model: int = 128
    n_heads: int = 4
    query_dim: int = 128  # hidden size of the additive attention
    dropout: float = 0.1
    max_history: int = 50
    image_flag: bool = True
    signals: list[str] = field(default_factory=list)
    content_rank: int = 0
    image_rank: int = 0
    text_dim: int = 0
    category_names: list[str] = field(default_factory=list)
    subcategory_names: list[str] = field(default_factory=list)


@dataclass
class RandomConfig:
    seed: int = 0


@dataclass
class PopularityConfig:
    pass


@dataclass
class MeanCosineConfig:
    recency_weighting: float | None = None  # g in (0, 1]: r-th most recent click weighs g**r
    text_dim: int = 0  # 0 < text_dim < D: concat vectors [text | image], scored part by part
    image_weight: float = 0.5  # of the image part, as in recall


@dataclass
class GBDTConfig:
    signals: list[str] = field(default_factory=list)  # features besides the content cosine
    num_leaves: int = 31
    learning_rate: float = 0.05
    rounds: int = 500  # at most; early stopping on the selection split
    early_stopping: int = 50
    min_data_in_leaf: int = 50
    booster: str = ""  # the fitted LightGBM model as text (set by `GBDTRanker.fit`)


class Ranker(nn.Module):
    """Holds the frozen news vectors and the config; subclasses implement forward."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    trainable: ClassVar[bool] = True
    news_vectors: Tensor  # buffers, registered in __init__
    has_image: Tensor
    vector_mean: Tensor
    vector_scale: Tensor
    content_basis: Tensor | None
    news_categories: Tensor | None
    category_mean: Tensor | None
    category_scale: Tensor | None

    def __init__(self, config: Any, news_vectors: Any, has_image: Any = None) -> None:
        super().__init__()
        vectors = torch.as_tensor(np.asarray(news_vectors, dtype=np.float32))
        if vectors.ndim != 2 or len(vectors) < 2:
            raise ValueError(f"news_vectors: expected (N+1, D), got {tuple(vectors.shape)}")
        flags = torch.ones(len(vectors), dtype=torch.bool)
        if has_image is not None:
            flags = torch.as_tensor(np.asarray(has_image, dtype=bool))
            if flags.shape != (len(vectors),):
                raise ValueError(f"has_image: expected ({len(vectors)},), got {tuple(flags.shape)}")
        self.config = config
        self.register_buffer("news_vectors", vectors, persistent=False)  # (N+1, D)
        self.register_buffer("has_image", flags, persistent=False)  # (N+1,)
        mean, scale = standardisation(vectors)
        self.register_buffer("vector_mean", mean, persistent=False)  # (D,)
        self.register_buffer("vector_scale", scale, persistent=False)  # (D,)
        self._register_news_inputs(config, len(vectors))
        names = getattr(config, "signals", [])
        self.signal_head = SignalHead(len(names)) if names and self.trainable else None
        self.grown_: dict[str, GrowingRows] = {}  # per-news tables as news are added

    def _register_news_inputs(self, config: Any, rows: int) -> None:
        """The buffers of what `news_features` adds to the vectors, saved with the weights and
        set by `fit_news_features`: the principal directions (D, r) of the reduced parts
        (`content_parts`), and the news' (category, subcategory) ids (N+1, 2) with their
        one-hot columns' standardisation."""
        for key in ("content_rank", "image_rank"):
            if (rank := getattr(config, key, 0)) < 0:
                raise ValueError(f"{key} must be >= 0 (0: the whole part), got {rank}")
        for key in ("category_names", "subcategory_names"):
            names = getattr(config, key, [])
            if list(names) != sorted(set(names)):
                raise ValueError(f"{key} must be sorted and distinct, got {names}")
        reduced = sum(rank for _, _, rank in self.content_parts)
        basis = torch.zeros(self.news_dim, reduced) if reduced else None
        self.register_buffer("content_basis", basis)
        width = sum(self.category_sizes)
        ids = torch.zeros(rows, 2, dtype=torch.long) if width else None
        self.register_buffer("news_categories", ids)
        self.register_buffer("category_mean", torch.zeros(width) if width else None)
        self.register_buffer("category_scale", torch.ones(width) if width else None)

    @property
    def content_parts(self) -> list[tuple[int, int, int]]:
        """The vectors' parts, [text | image] or whole, as (start, stop, rank): each reduced to
        its top `rank` principal directions, `content_rank`, or `image_rank` for an image part
        where that is set; rank 0: the part whole."""
        dim, text_dim = self.news_dim, getattr(self.config, "text_dim", 0)
        rank = getattr(self.config, "content_rank", 0)
        if not 0 < text_dim < dim:
            return [(0, dim, rank)]
        return [(0, text_dim, rank), (text_dim, dim, getattr(self.config, "image_rank", 0) or rank)]

    @property
    def category_sizes(self) -> tuple[int, int]:
        """One-hot widths of the category and subcategory inputs (id 0: unknown); (0, 0) for a
        model that reads no categories."""
        names = getattr(self.config, "category_names", [])
        if not names:
            return (0, 0)
        return (len(names) + 1, len(self.config.subcategory_names) + 1)

    @property
    def feature_dim(self) -> int:
        """Width of `news_features`."""
        widths = (rank or stop - start for start, stop, rank in self.content_parts)
        return sum(widths) + sum(self.category_sizes)

    def news_features(self, indices: Tensor) -> Tensor:
        """(n,) news indices -> (n, feature_dim): the standardised vectors' whole parts, the
        reduced parts' principal components, whitened, then the standardised one-hot category
        and subcategory."""
        vectors = self.news_vectors[indices] - self.vector_mean
        if self.content_basis is None:
            x = vectors * self.vector_scale
        else:
            whole = [
                vectors[:, start:stop] * self.vector_scale[start:stop]
                for start, stop, rank in self.content_parts
                if not rank
            ]
            x = torch.cat([*whole, vectors @ self.content_basis.to(vectors.dtype)], dim=-1)
        if self.news_categories is None:
            return x
        assert self.category_mean is not None and self.category_scale is not None
        onehot = self.category_onehot(self.news_categories[indices]).to(x.dtype)
        return torch.cat([x, (onehot - self.category_mean) * self.category_scale], dim=-1)

    def category_onehot(self, ids: Tensor) -> Tensor:
        """(n, 2) (category, subcategory) ids -> (n, sum(category_sizes)) one-hot floats."""
        first, second = self.category_sizes
        return torch.cat([F.one_hot(ids[:, 0], first), F.one_hot(ids[:, 1], second)], -1).float()

    def category_ids(self, categories: Any, subcategories: Any) -> np.ndarray:
        """(n, 2) ids of n news' category and subcategory names in the model's vocabularies
        (`category_names`, `subcategory_names`); 0 for a name the model never saw, and for
        every news item of a model that reads no categories."""
        columns = []
        for vocabulary, names in (
            (getattr(self.config, "category_names", []), categories),
            (getattr(self.config, "subcategory_names", []), subcategories),
        ):
            if not vocabulary:
                columns.append(np.zeros(len(names), np.int64))
                continue
            known, names = np.asarray(vocabulary, dtype=str), np.asarray(names, dtype=str)
            at = np.minimum(np.searchsorted(known, names), len(known) - 1)
            columns.append(np.where(known[at] == names, at + 1, 0))
        return np.stack(columns, axis=1).astype(np.int64)

    @torch.no_grad()
    def fit_news_features(self, categories: np.ndarray | None = None, block: int = 65_536) -> None:
        """Fit `news_features` on the news table: each reduced part's top principal directions
        (`content_parts`), scaled to unit variance, and the news' category ids (N+1, 2)
        (`category_ids`, row 0 padding) with their one-hot columns' mean and 1 / std (0 for a
        column that never varies, such as the unknown id)."""
        column = 0
        for start, stop, rank in self.content_parts:
            if rank and self.content_basis is not None:
                covariance = torch.zeros(stop - start, stop - start, dtype=torch.float64)
                for rows in self.news_vectors[1:, start:stop].split(block):
                    centred = (rows - self.vector_mean[start:stop]).double().cpu()
                    covariance += centred.T @ centred
                values, directions = torch.linalg.eigh(covariance / (len(self.news_vectors) - 1))
                k = min(rank, stop - start)
                top = directions[:, -k:].flip(1) / values[-k:].flip(0).clamp_min(1e-12).sqrt()
                self.content_basis[start:stop, column : column + k] = top.float()
                column += rank
        if self.news_categories is None:
            return
        assert self.category_mean is not None and self.category_scale is not None
        expected = tuple(self.news_categories.shape)
        if categories is None or categories.shape != expected:
            got = None if categories is None else categories.shape
            raise ValueError(f"{self.name} reads news categories: pass ids {expected}, got {got}")
        self.news_categories.copy_(torch.as_tensor(categories))
        onehot = self.category_onehot(self.news_categories[1:]).double()
        std = onehot.std(dim=0, correction=0)
        self.category_mean.copy_(onehot.mean(dim=0))
        self.category_scale.copy_(torch.where(std > 1e-6, 1.0 / std.clamp_min(1e-6), 0.0))

    @property
    def signal_names(self) -> list[str]:
        """The behaviour signals the model reads, in the order of the signals' last axis."""
        return list(getattr(self.config, "signals", []))

    def encode_history(self, history: Tensor) -> tuple[Tensor, ...]:
        """What the forward computes from the history (B, L) alone, for `score_encoded`: a
        server keeps it per user until their next click. The default: the history itself."""
        return (history,)

    def score_encoded(
        self, encoded: tuple[Tensor, ...], candidates: Tensor, signals: Tensor | None = None
    ) -> Tensor:
        """The forward's scores (B, C) from `encode_history(history)`: equal to
        `self(history, candidates, signals)`."""
        return self(encoded[0], candidates, signals)

    def add_signals(self, scores: Tensor, candidates: Tensor, signals: Tensor | None) -> Tensor:
        """Content scores (B, C) plus the signal head's (fp32); padding candidates score 0."""
        if self.signal_head is not None:
            if signals is None:
                raise ValueError(f"{self.name} reads the signals {self.signal_names}: pass them")
            with fp32_scores(scores):
                scores = self.signal_head(scores.float(), signals.float())
        return scores.masked_fill(candidates == 0, 0.0)

    @property
    def model_args(self) -> dict[str, Any]:
        """Config as a plain dict: `build_model(name, model_args, vectors)` rebuilds the model."""
        return asdict(self.config)

    @property
    def news_dim(self) -> int:
        return self.news_vectors.shape[1]

    def cache_news_tokens(self) -> Ranker:
        """Put the model in eval mode with every news token precomputed (see
        `NewsProjection.cache_tokens`): (N+1) x d_model floats for less work per request."""
        self.eval()
        for module in self.modules():
            if isinstance(module, NewsProjection):
                module.cache_tokens(self)
        return self

    def token_tables(self) -> dict[str, Tensor]:
        """The cached news tokens by attribute path ("embed.news.cached"): the per-news tables
        a forward reads once `cache_news_tokens` ran."""
        return {
            f"{name}.cached": module.cached
            for name, module in self.named_modules()
            if isinstance(module, NewsProjection) and module.cached is not None
        }

    def token_buffers(self) -> dict[str, Tensor]:
        """`token_tables`' buffers, spare rows included, once news were added
        (`mmnewsrec.growing`); the tables themselves before."""
        buffers = {}
        for path, table in self.token_tables().items():
            grown = self.grown_.get(path)
            buffers[path] = grown.buffer if grown is not None and grown.rows is table else table
        return buffers

    def news_tables(self) -> dict[str, Tensor]:
        """Every per-news table (a row per news index) by attribute path."""
        tables = {"news_vectors": self.news_vectors, "has_image": self.has_image}
        if self.news_categories is not None:
            tables["news_categories"] = self.news_categories
        return tables | self.token_tables()

    @torch.inference_mode()
    def add_news(
        self,
        rows: Tensor,
        has_image: Tensor,
        table: Tensor | None = None,
        categories: Tensor | None = None,
    ) -> None:
        """Score n news added after the model's own as well (indices N+1 .. N+n): their vectors
        `rows` (n, D), image flags (n,) and, for a model that reads them, category ids (n, 2)
        (`category_ids`; None: unknown). Each per-news table takes only the new rows, at the
        end of a growing table (`mmnewsrec.growing`: amortised O(n), not O(N)); `table`: the
        news table with `rows` already appended, where the model shares it (with recall).
        In place: a forward running meanwhile reads only news it knew, whose rows do not
        change. The vectors' standardisation stays that of the news the model was built on."""
        first, grown = len(self.news_vectors), self.grown_
        if table is None:
            table = append_rows(grown, "news_vectors", self.news_vectors, rows)
        self.news_vectors = table
        self.has_image = append_rows(grown, "has_image", self.has_image, has_image)
        if self.news_categories is not None:
            if categories is None:
                categories = torch.zeros(len(rows), 2, dtype=torch.long)
            ids = categories.to(self.news_categories.device)
            self.news_categories = append_rows(grown, "news_categories", self.news_categories, ids)
        added = torch.arange(first, first + len(rows), device=rows.device)
        for name, module in self.named_modules():
            if isinstance(module, NewsProjection) and module.cached is not None:
                tokens = module.tokens(self, added)
                module.cached = append_rows(grown, f"{name}.cached", module.cached, tokens)
        self.grow_tables(rows)

    def grow_tables(self, rows: Tensor) -> None:
        """`add_news` for a subclass's own per-news tables, given the new vectors (n, D)."""


class SignalHead(nn.Module):
    """score = content * gate(s) + bias(s) from the candidate's standardised signals s, with
    gate > 0: candidates with equal signals (cold items, say) keep their content order. (gate
    logit, bias) = MLP(s) + a linear map of s, both starting at zero (the content score)."""

    mean: Tensor
    scale: Tensor
    GATE_SHIFT = math.log(math.e - 1)  # softplus(GATE_SHIFT) = 1
    # Adam moves each weight by about lr per step: scaled up, the freshly zeroed output layers
    # reach effects of order 1 within a few hundred steps, as the signals' effects need.
    OUTPUT_SCALE = 10.0

    def __init__(self, n_signals: int, hidden: int = 32) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_signals))  # (F,), saved with the weights
        self.register_buffer("scale", torch.ones(n_signals))  # (F,)
        self.hidden = nn.Sequential(nn.Linear(n_signals, hidden), nn.GELU())
        self.out = nn.Linear(hidden, 2)  # gate logit, bias
        self.linear = nn.Linear(n_signals, 2, bias=False)  # a wide path: main effects, fast
        for weight in (self.out.weight, self.out.bias, self.linear.weight):
            nn.init.zeros_(weight)

    def fit(self, signals: np.ndarray) -> SignalHead:
        """Standardise by the mean and deviation of the training rows (C, F)."""
        values = torch.as_tensor(np.asarray(signals, dtype=np.float32))
        self.mean.copy_(values.mean(dim=0))
        self.scale.copy_(1.0 / values.std(dim=0, correction=0).clamp_min(1e-6))
        return self

    def forward(self, content: Tensor, signals: Tensor) -> Tensor:
        """content (B, C), signals (B, C, F) -> (B, C)."""
        x = (signals - self.mean) * self.scale
        gate, bias = (self.OUTPUT_SCALE * (self.out(self.hidden(x)) + self.linear(x))).unbind(-1)
        return content * F.softplus(gate + self.GATE_SHIFT) + bias


def standardisation(vectors: Tensor) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and 1 / std of a news table (N+1, D), row 0 (padding) left out."""
    mean, std = vectors[1:].mean(dim=0), vectors[1:].std(dim=0, correction=0)
    return mean, 1.0 / std.clamp_min(1e-6)


class NewsProjection(nn.Module):
    """News indices -> d_model tokens: the ranker's `news_features` (the frozen vector
    standardised per dimension by the news table's mean and scale, so neither part of a
    text+image concatenation dominates by its scale; the news' categories), a projection, a
    "no image" vector and a LayerNorm. Each distinct news item of a
    batch is projected once."""

    def __init__(self, feature_dim: int, d_model: int, image_flag: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(feature_dim, d_model)
        self.no_image = nn.Parameter(torch.zeros(d_model)) if image_flag else None
        self.norm = nn.LayerNorm(d_model)
        # every news item's token (`cache_tokens`): a buffer, so a trace reads it as an
        # attribute that can take a longer table (`TrainedRanker.add_news`)
        self.cached: Tensor | None
        self.register_buffer("cached", None, persistent=False)

    def forward(self, ranker: Ranker, indices: Tensor) -> Tensor:
        """(...) news indices -> (..., d) tokens."""
        if self.cached is not None:  # a lookup (embedding: faster than cached[indices])
            return F.embedding(indices, self.cached)
        unique, inverse = torch.unique(indices, return_inverse=True)
        return self.tokens(ranker, unique)[inverse]

    def tokens(self, ranker: Ranker, indices: Tensor) -> Tensor:
        """(n,) news indices -> (n, d) tokens, computed."""
        x = self.proj(ranker.news_features(indices))  # (n, d)
        if self.no_image is not None:
            x = x + (~ranker.has_image[indices]).unsqueeze(-1).to(x.dtype) * self.no_image
        return self.norm(x)

    @torch.inference_mode()
    def cache_tokens(self, ranker: Ranker, block: int = 65_536) -> None:
        """Compute the token of every news item once, for a model whose weights no longer
        change (serving): lookups then replace the projection. `train()` drops the cache."""
        rows = torch.arange(len(ranker.news_vectors), device=ranker.news_vectors.device)
        self.cached = torch.cat([self.tokens(ranker, part) for part in rows.split(block)])

    def train(self, mode: bool = True) -> NewsProjection:
        if mode:
            self.cached = None
        return super().train(mode)


def fp32_scores(x: Tensor) -> torch.autocast:
    """Autocast off on x's device: the final scores are computed in fp32."""
    return torch.autocast(x.device.type, enabled=False)


def with_no_history(tokens: Tensor, history: Tensor, no_history: Tensor) -> tuple[Tensor, Tensor]:
    """Prepend the learned no-history token, which is never masked, so no row is all padding.

    tokens (B, L, d), history (B, L) -> tokens (B, 1+L, d), key padding mask (B, 1+L), True = pad.
    """
    first = no_history.expand(tokens.shape[0], 1, -1)  # shape, not len(): traceable
    mask = F.pad(history == 0, (1, 0), value=False)
    return torch.cat([first, tokens], dim=1), mask


class SequenceEmbedding(nn.Module):
    """Tokens for the transformers: news token + type (history/candidate) + recency position."""

    def __init__(self, feature_dim: int, cfg: RecTransformerConfig) -> None:
        super().__init__()
        self.news = NewsProjection(feature_dim, cfg.d_model, cfg.image_flag)
        self.type_emb = nn.Parameter(torch.randn(2, cfg.d_model) * 0.02)  # 0 history, 1 candidate
        self.recency = nn.Parameter(torch.randn(cfg.max_history, cfg.d_model) * 0.02)
        self.no_history = nn.Parameter(torch.randn(cfg.d_model) * 0.02)
        self.dropout = nn.Dropout(cfg.dropout)

    def history(self, ranker: Ranker, history: Tensor) -> tuple[Tensor, Tensor]:
        """(B, L) -> tokens (B, 1+L, d) and key padding mask (B, 1+L)."""
        length = history.shape[1]
        recency = torch.arange(length - 1, -1, -1, device=history.device)  # 0 = latest click
        x = self.news(ranker, history) + self.type_emb[0] + self.recency[recency]
        tokens, mask = with_no_history(x, history, self.no_history)
        return self.dropout(tokens), mask

    def candidates(self, ranker: Ranker, candidates: Tensor) -> Tensor:
        """(...) candidate indices -> (..., d) tokens."""
        return self.dropout(self.news(ranker, candidates) + self.type_emb[1])


def transformer_encoder(cfg: RecTransformerConfig) -> nn.TransformerEncoder:
    """Pre-norm encoder with a final LayerNorm."""
    layer = nn.TransformerEncoderLayer(
        cfg.d_model,
        cfg.n_heads,
        cfg.d_ff,
        cfg.dropout,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    norm = nn.LayerNorm(cfg.d_model)
    return nn.TransformerEncoder(layer, cfg.n_layers, norm=norm, enable_nested_tensor=False)


class RecTransformer(Ranker):
    """Per-candidate reference: one encoder pass over [no-history | history | candidate] for
    every candidate; the score is read at the candidate position by a linear head."""

    name = "rec_transformer"
    config_class = RecTransformerConfig

    def __init__(self, config: RecTransformerConfig, news_vectors: Any, has_image: Any = None):
        super().__init__(config, news_vectors, has_image)
        self.embed = SequenceEmbedding(self.feature_dim, config)
        self.encoder = transformer_encoder(config)
        self.head = nn.Linear(config.d_model, 1)

    def forward(self, history: Tensor, candidates: Tensor, signals: Tensor | None = None) -> Tensor:
        return self.score_encoded(self.encode_history(history), candidates, signals)

    def encode_history(self, history: Tensor) -> tuple[Tensor, ...]:
        """(B, L) -> tokens (B, 1+L, d) and key padding mask (B, 1+L)."""
        return self.embed.history(self, history[:, -self.config.max_history :])

    def score_encoded(
        self, encoded: tuple[Tensor, ...], candidates: Tensor, signals: Tensor | None = None
    ) -> Tensor:
        hist, mask = encoded  # (B, 1+L, d), (B, 1+L)
        rows, cols = (candidates > 0).nonzero(as_tuple=True)  # only real candidates: P pairs
        cand = self.embed.candidates(self, candidates[rows, cols])  # (P, d)
        x = torch.cat([hist[rows], cand.unsqueeze(1)], dim=1)  # (P, 2+L, d)
        pad = F.pad(mask[rows], (0, 1), value=False)  # (P, 2+L)
        out = self.encoder(x, src_key_padding_mask=pad)[:, -1]  # (P, d)
        with fp32_scores(out):
            scores = self.head(out.float()).squeeze(-1)  # (P,)
        scores = torch.zeros(candidates.shape, dtype=scores.dtype, device=scores.device).index_put(
            (rows, cols), scores
        )
        return self.add_signals(scores, candidates, signals)


class CrossAttentionBlock(nn.Module):
    """Pre-norm block: candidate queries attend to the encoded history, then an MLP.
    Candidates never attend to each other."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(
            nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, q: Tensor, memory: Tensor, mask: Tensor) -> Tensor:
        a, _ = self.attn(self.norm_q(q), memory, memory, key_padding_mask=mask, need_weights=False)
        q = q + self.dropout(a)  # (B, C, d)
        return q + self.dropout(self.ff(self.norm_ff(q)))


class FastRecTransformer(Ranker):
    """Encodes the history once per row; each candidate cross-attends to it; the score is an MLP
    over [user, candidate, user * candidate] (user: the history as seen from the candidate) plus
    the scaled dot product of the candidate and an additive-attention pooling of the encoded
    history (a direct matching path, as in the additive-attention model)."""

    name = "fast_rec_transformer"
    config_class = FastRecTransformerConfig

    def __init__(self, config: FastRecTransformerConfig, news_vectors: Any, has_image: Any = None):
        super().__init__(config, news_vectors, has_image)
        d = config.d_model
        self.embed = SequenceEmbedding(self.feature_dim, config)
        self.encoder = transformer_encoder(config)
        self.cross = nn.ModuleList(
            CrossAttentionBlock(d, config.n_heads, config.d_ff, config.dropout)
            for _ in range(config.n_cross_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.pool = AdditivePooling(d, d)
        self.head = nn.Sequential(
            nn.Linear(3 * d, d), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(d, 1)
        )

    def forward(self, history: Tensor, candidates: Tensor, signals: Tensor | None = None) -> Tensor:
        return self.score_encoded(self.encode_history(history), candidates, signals)

    def encode_history(self, history: Tensor) -> tuple[Tensor, ...]:
        """(B, L) -> the encoded history (B, 1+L, d), its key padding mask (B, 1+L) and its
        pooling (B, d)."""
        history = history[:, -self.config.max_history :]
        hist, mask = self.embed.history(self, history)  # (B, 1+L, d), (B, 1+L)
        memory = self.encoder(hist, src_key_padding_mask=mask)  # (B, 1+L, d)
        return memory, mask, self.pool(memory, mask)

    def score_encoded(
        self, encoded: tuple[Tensor, ...], candidates: Tensor, signals: Tensor | None = None
    ) -> Tensor:
        memory, mask, pooled = encoded
        cand = self.embed.candidates(self, candidates)  # (B, C, d)
        q = cand
        for block in self.cross:
            q = block(q, memory, mask)
        user = self.norm(q)  # (B, C, d): the history as seen from each candidate
        with fp32_scores(cand):
            user, cand, pooled = user.float(), cand.float(), pooled.float()
            scores = self.head(torch.cat([user, cand, user * cand], dim=-1)).squeeze(-1)
            scores = scores + torch.einsum("bd,bcd->bc", pooled, cand) / math.sqrt(cand.shape[-1])
        return self.add_signals(scores, candidates, signals)


class AdditivePooling(nn.Module):
    """Additive attention pooling: softmax_i(q . tanh(W h_i + b)) weighted sum of h_i."""

    def __init__(self, d_model: int, query_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, query_dim)
        self.query = nn.Parameter(torch.randn(query_dim) * 0.02)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        logits = torch.tanh(self.proj(h)) @ self.query  # (B, T)
        weights = logits.masked_fill(mask, -torch.inf).softmax(dim=1)
        return (weights.unsqueeze(-1) * h).sum(dim=1)  # (B, d)


class AdditiveAttentionUser(Ranker):
    """NRMS-style user encoder on frozen vectors: projected history, multi-head self-attention,
    additive attention pooling -> user vector; score = dot(user, candidate) / sqrt(d)."""

    name = "additive_attention"
    config_class = AdditiveAttentionConfig

    def __init__(self, config: AdditiveAttentionConfig, news_vectors: Any, has_image: Any = None):
        super().__init__(config, news_vectors, has_image)
        d = config.d_model
        self.news = NewsProjection(self.feature_dim, d, config.image_flag)
        self.no_history = nn.Parameter(torch.randn(d) * 0.02)
        self.attn = nn.MultiheadAttention(d, config.n_heads, config.dropout, batch_first=True)
        self.pool = AdditivePooling(d, config.query_dim)
        self.dropout = nn.Dropout(config.dropout)

    def user(self, history: Tensor) -> Tensor:
        """(B, L) history -> (B, d) user vector."""
        history = history[:, -self.config.max_history :]
        x = self.news(self, history)
        tokens, mask = with_no_history(self.dropout(x), history, self.no_history)
        h, _ = self.attn(tokens, tokens, tokens, key_padding_mask=mask, need_weights=False)
        return self.pool(self.dropout(h), mask)

    def forward(self, history: Tensor, candidates: Tensor, signals: Tensor | None = None) -> Tensor:
        return self.score_encoded(self.encode_history(history), candidates, signals)

    def encode_history(self, history: Tensor) -> tuple[Tensor, ...]:
        return (self.user(history),)  # (B, d)

    def score_encoded(
        self, encoded: tuple[Tensor, ...], candidates: Tensor, signals: Tensor | None = None
    ) -> Tensor:
        (user,) = encoded  # (B, d)
        cand = self.news(self, candidates)  # (B, C, d)
        with fp32_scores(cand):
            scores = torch.einsum("bd,bcd->bc", user.float(), cand.float()) / math.sqrt(
                cand.shape[-1]
            )
        return self.add_signals(scores, candidates, signals)


MASK31 = (1 << 31) - 1


def mix31(x: Tensor) -> Tensor:
    """Integer hash of non-negative int64 values to [0, 2**31), exact (no overflow)."""
    x = x & MASK31
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & MASK31
    return (x >> 16) ^ x


class RandomRanker(Ranker):
    """Deterministic pseudo-random scores hashed from (seed, history, candidate)."""

    name = "random"
    config_class = RandomConfig
    trainable = False

    def forward(self, history: Tensor, candidates: Tensor, signals: Tensor | None = None) -> Tensor:
        row_key = mix31(history).sum(dim=1, keepdim=True) & MASK31  # (B, 1); mix31(0) = 0
        key = mix31(candidates) + mix31(row_key + self.config.seed * 0x9E3779B1)
        scores = mix31(key).float() / float(MASK31)
        return scores.masked_fill(candidates == 0, 0.0)


class PopularityRanker(Ranker):
    """Score = log(1 + clicks of the candidate in the train split), held in buffer `counts`."""

    name = "popularity"
    config_class = PopularityConfig
    trainable = False
    counts: Tensor  # buffer

    def __init__(
        self, config: PopularityConfig, news_vectors: Any, has_image: Any = None, counts: Any = None
    ):
        super().__init__(config, news_vectors, has_image)
        self.register_buffer("counts", torch.zeros(len(self.news_vectors)))  # (N+1,)
        if counts is not None:
            self.fit_counts(counts)

    def fit_counts(self, counts: Any) -> PopularityRanker:
        """Set click counts per news index (N+1,)."""
        counts = torch.as_tensor(np.asarray(counts), dtype=torch.float32)
        if counts.shape != self.counts.shape:
            raise ValueError(f"counts: expected {tuple(self.counts.shape)}, got {counts.shape}")
        self.counts.copy_(counts)
        return self

    def grow_tables(self, rows: Tensor) -> None:
        """New news have no train clicks."""
        self.counts = append_rows(
            self.grown_, "counts", self.counts, self.counts.new_zeros(len(rows))
        )

    def news_tables(self) -> dict[str, Tensor]:
        return super().news_tables() | {"counts": self.counts}

    def forward(self, history: Tensor, candidates: Tensor, signals: Tensor | None = None) -> Tensor:
        return torch.log1p(self.counts[candidates]).masked_fill(candidates == 0, 0.0)


def click_counts(behaviors: Any, num_news: int) -> np.ndarray:
    """Clicks per news index (N+1,) int64 from a labelled `Behaviors`."""
    clicked = np.asarray(behaviors.candidate_items)[np.asarray(behaviors.candidate_labels) == 1]
    return np.bincount(clicked, minlength=num_news + 1)


class MeanCosineRanker(Ranker):
    """The recaller as a ranker: the (recency-weighted) mean history vector against each
    candidate vector, in the recall space (`recall.space`): each part of concat vectors
    centred, unit-scaled and weighted, so that the image part does not outweigh the text."""

    name = "mean_cosine"
    config_class = MeanCosineConfig
    trainable = False
    space_mean: Tensor  # buffers, registered in __init__
    space_scale: Tensor
    space_part: Tensor

    def __init__(self, config: MeanCosineConfig, news_vectors: Any, has_image: Any = None) -> None:
        super().__init__(config, news_vectors, has_image)
        dim, text_dim = self.news_dim, config.text_dim
        parts: tuple[Part, ...] = (Part("all", 0, dim),)
        if 0 < text_dim < dim:
            parts = (Part("text", 0, text_dim), Part("image", text_dim, dim))
        space = RecallSpace(parts, weights={"image": config.image_weight}).fit(self.news_vectors)
        self.space = space  # fitted on the news at hand; scales new rows (`add_news`)
        part_of = torch.cat([torch.full((p.stop - p.start,), i) for i, p in enumerate(parts)])
        self.register_buffer("space_mean", torch.cat(space.means_), persistent=False)  # (D,)
        self.register_buffer("space_scale", space.scales_, persistent=False)  # (N+1, P)
        self.register_buffer("space_part", part_of, persistent=False)  # (D,) part of a column

    def grow_tables(self, rows: Tensor) -> None:
        """The new rows' recall-space scales, by the fitted means (`RecallSpace.row_scales`)."""
        scales = self.space.row_scales(rows)
        self.space_scale = append_rows(self.grown_, "space_scale", self.space_scale, scales)

    def news_tables(self) -> dict[str, Tensor]:
        return super().news_tables() | {"space_scale": self.space_scale}

    def space_rows(self, ids: Tensor) -> Tensor:
        """(*ids.shape, D): news rows `ids` in the recall space (`RecallSpace.rows`)."""
        scale = self.space_scale[ids][..., self.space_part]
        return (self.news_vectors[ids] - self.space_mean) * scale

    def forward(self, history: Tensor, candidates: Tensor, signals: Tensor | None = None) -> Tensor:
        offsets, items = padded_to_csr(history)
        user = mean_user_vectors(self.space_rows(items), offsets, self.config.recency_weighting)
        cand = self.space_rows(candidates)  # (B, C, D)
        with fp32_scores(cand):
            scores = torch.einsum("bd,bcd->bc", user.float(), cand.float())
        return scores.masked_fill(candidates == 0, 0.0)


def content_cosine(
    news_vectors: Tensor, history: Tensor, candidates: Tensor, recency: float | None = None
) -> Tensor:
    """(B, C) cosine of the (recency-weighted) mean history vector and each candidate vector."""
    offsets, items = padded_to_csr(history)
    clicked = F.normalize(news_vectors[items], dim=1)
    user = mean_user_vectors(clicked, offsets, recency)  # (B, D)
    cand = F.normalize(news_vectors[candidates], dim=-1)  # (B, C, D)
    with fp32_scores(cand):
        return torch.einsum("bd,bcd->bc", user.float(), cand.float())


class GBDTRanker(Ranker):
    """LightGBM lambdarank over [behaviour signals, content cosine] of each candidate.

    Fitted once by `fit` (per-impression groups, early stopping on the selection split); the
    booster is kept as text in the config (`model_args`), so a checkpoint holds no pickle."""

    name = "gbdt"
    config_class = GBDTConfig
    trainable = False

    def __init__(self, config: GBDTConfig, news_vectors: Any, has_image: Any = None) -> None:
        super().__init__(config, news_vectors, has_image)
        self.booster: Any = None
        if config.booster:
            import lightgbm as lgb

            self.booster = lgb.Booster(model_str=config.booster)

    def fit(self, train: RankingTable, valid: RankingTable | None, seed: int = 0) -> GBDTRanker:
        """Fit the booster; `valid` (if any) stops it early by nDCG@10."""
        import lightgbm as lgb

        cfg = self.config
        params = {
            "objective": "lambdarank",
            "metric": "ndcg",
            "eval_at": [10],
            "num_leaves": cfg.num_leaves,
            "learning_rate": cfg.learning_rate,
            "min_data_in_leaf": cfg.min_data_in_leaf,
            "seed": seed,
            "deterministic": True,
            "num_threads": torch.get_num_threads(),
            "verbose": -1,
        }
        sets = [train.dataset()] + ([valid.dataset()] if valid is not None else [])
        callbacks: list[Any] = (
            [lgb.early_stopping(cfg.early_stopping, verbose=False)] if valid is not None else []
        )
        booster = lgb.train(params, sets[0], cfg.rounds, valid_sets=sets[1:], callbacks=callbacks)
        text = booster.model_to_string(num_iteration=booster.best_iteration or None)
        self.config = replace(cfg, booster=text)
        self.booster = lgb.Booster(model_str=text)
        logger.info("gbdt: %d trees", self.booster.num_trees())
        return self

    def forward(self, history: Tensor, candidates: Tensor, signals: Tensor | None = None) -> Tensor:
        if self.booster is None:
            raise ValueError("gbdt: not fitted")
        if self.signal_names and signals is None:
            raise ValueError(f"gbdt reads the signals {self.signal_names}: pass them")
        content = content_cosine(self.news_vectors, history, candidates)  # (B, C)
        parts = (
            [content.unsqueeze(-1)] if signals is None else [signals.float(), content[..., None]]
        )
        features = torch.cat(parts, dim=-1)[candidates > 0]  # (P, F + 1)
        scores = torch.zeros(candidates.shape, dtype=torch.float32, device=candidates.device)
        if len(features):
            predicted = self.booster.predict(features.cpu().double().numpy())
            scores[candidates > 0] = torch.as_tensor(predicted, dtype=torch.float32).to(
                scores.device
            )
        return scores


@dataclass
class RankingTable:
    """GBDT rows: features (R, F) of every candidate, labels (R,), CSR impression offsets."""

    features: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray

    def dataset(self) -> Any:
        """A LightGBM dataset grouped by impression."""
        import lightgbm as lgb

        group = np.diff(self.offsets)
        return lgb.Dataset(self.features, self.labels.astype(np.int32), group=group[group > 0])


MODELS: dict[str, type[Ranker]] = {
    cls.name: cls
    for cls in (
        RecTransformer,
        FastRecTransformer,
        AdditiveAttentionUser,
        RandomRanker,
        PopularityRanker,
        MeanCosineRanker,
        GBDTRanker,
    )
}


def model_config(name: str, config: Any = None) -> Any:
    """Resolve a model's config from None, a dataclass, or a dict with an optional "preset"."""
    cls = MODELS[canonical_name(name)].config_class
    if is_dataclass(config):
        if type(config) is not cls:
            raise TypeError(f"{name}: expected {cls.__name__}, got {type(config).__name__}")
        return config
    values = dict(config or {})
    preset = values.pop("preset", "cpu")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{name}: unknown config keys {unknown}; known: {sorted(known)}")
    base = {k: v for k, v in PRESETS[preset].items() if k in known}
    return cls(**(base | values))


def reads_signals(name: str) -> bool:
    """Whether the registered model `name` can read behaviour signals."""
    return "signals" in {f.name for f in fields(MODELS[canonical_name(name)].config_class)}


def canonical_name(name: str) -> str:
    """Registry key for a model name ("mean-cosine" and "mean_cosine" are the same)."""
    key = name.replace("-", "_").lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return key


def build_model(
    name: str, config: Any = None, news_vectors: Any = None, has_image: Any = None
) -> Ranker:
    """Build a registered model on frozen news vectors (N+1, D), row 0 = padding."""
    if news_vectors is None:
        raise ValueError("build_model needs news_vectors (N+1, D)")
    cls = MODELS[canonical_name(name)]
    model = cls(model_config(name, config), news_vectors, has_image)
    n_params = sum(p.numel() for p in model.parameters())
    shown = {k: f"<{len(v):,} chars>" if isinstance(v, str) and len(v) > 80 else v
             for k, v in model.model_args.items()}  # fmt: skip
    logger.info("%s: %s, %.2fM parameters", cls.name, shown, n_params / 1e6)
    return model
