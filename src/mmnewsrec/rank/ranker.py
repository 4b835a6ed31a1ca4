"""A trained run loaded for scoring: evaluation of whole splits and serving of single users."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import reduce
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.jit import TracerWarning, optimized_execution  # type: ignore[attr-defined]
from tqdm.auto import tqdm

from mmnewsrec.config import TrainConfig, validate_config
from mmnewsrec.devices import autocast, resolve_device
from mmnewsrec.formats.runs import CheckpointError, check_vectors_hash, read_checkpoint
from mmnewsrec.growing import SharedLock
from mmnewsrec.rank.batches import BehaviorArrays, gather_history, iter_eval_batches

if TYPE_CHECKING:
    from mmnewsrec.rank.model import Ranker

logger = logging.getLogger(__name__)


@torch.inference_mode()
def score_behaviors(
    model: nn.Module,
    behaviors: BehaviorArrays,
    history_len: int,
    device: torch.device,
    batch_candidates: int = 2048,
    num_impressions: int | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    first_impression: int = 0,
    signals: np.ndarray | None = None,
) -> np.ndarray:
    """Scores of every candidate (or of impressions `first_impression` .. `num_impressions` - 1),
    float32, aligned with `candidate_items`; `signals` (C, F): the candidates' behaviour signals
    for a model that reads them. The model is put in eval mode and its mode restored."""
    was_training = model.training
    model.eval()
    out = []
    batches = iter_eval_batches(
        behaviors,
        history_len,
        batch_candidates,
        num_impressions=num_impressions,
        first_impression=first_impression,
        signals=signals,
    )
    for batch, mask in tqdm(batches, desc="score", disable=not progress, leave=False):
        batch = batch.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            scores = model(batch.history, batch.candidates, batch.signals)  # (R, W)
        out.append(scores.float()[mask.to(device)].cpu())
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


@dataclass
class TrainedRanker:
    """A trained model from a run folder, ready to score on `device`; made by
    [`load_ranker`][mmnewsrec.rank.ranker.load_ranker].

    Attributes:
        path: The checkpoint file.
        model: The model, in eval mode, holding the news vectors it scores with.
        config: The run's training configuration.
        device: Where the model scores.
        vectors_hash: The hash of the news vectors the model was trained on.
        checkpoint: The checkpoint's metadata (no tensors): model name and arguments,
            metrics on the selection split, `selection`.
        traced: The TorchScript trace that scores in the model's place, once `trace` made it.
    """

    path: Path  # the checkpoint file
    model: nn.Module
    config: TrainConfig
    device: torch.device
    vectors_hash: str
    checkpoint: dict[str, Any]  # the checkpoint's metadata (no tensors)
    traced: torch.jit.ScriptModule | None = field(default=None, repr=False)  # see `trace`
    # the trace's forwards, or one change of the tables it reads (`add_news`)
    trace_lock: SharedLock = field(default_factory=SharedLock, repr=False, compare=False)

    @property
    def selection(self) -> dict[str, Any]:
        """What selected this checkpoint: {"split", "rule", ...} as training recorded it
        (checkpoints older than `data.valid_split` were selected on dev)."""
        dev_split = self.config.data.dev_split or None
        return self.checkpoint.get("selection", {"split": dev_split, "rule": "dev"})

    @property
    def history_len(self) -> int:
        """L, the number of last clicks the model reads."""
        return self.config.data.history_len

    @property
    def signal_names(self) -> list[str]:
        """The behaviour signals the model reads ([] for none)."""
        return list(self.checkpoint["model_args"].get("signals", []))

    def score(
        self,
        behaviors: BehaviorArrays,
        vectors: Any = None,
        batch_candidates: int | None = None,
        progress: bool = False,
        signals: np.ndarray | None = None,
    ) -> np.ndarray:
        """Score every candidate of a split's impressions.

        Args:
            behaviors: The impressions, e.g. `Store.behaviors("dev")`.
            vectors: The NewsVectors the model was trained on, checked by hash when given.
            batch_candidates: Candidates per forward (default `run.eval_batch_size`).
            progress: Show a progress bar.
            signals: (C, len(signal_names)) behaviour signals of the candidates, for a model
                that reads them.

        Returns:
            (C,) float32 scores aligned with `behaviors.candidate_items`.
        """
        if vectors is not None:
            check_vectors_hash(self.path, self.vectors_hash, vectors.hash)
        size = batch_candidates or self.config.run.eval_batch_size
        return score_behaviors(
            self.model,
            behaviors,
            self.history_len,
            self.device,
            size,
            progress=progress,
            signals=signals,
        )

    def trace(self) -> bool:
        """Let `score_batch`, `encode_history`, `score_encoded` and `score_items` run a
        TorchScript trace of the model, frozen with its weights: the same operations without
        Python between them (on CPU, about a third less time per forward of the cpu-preset
        transformers). For a model whose weights no longer change, e.g. in a server. Only the
        neural models are traced, and the trace is used only if it scores example inputs of two
        shapes as the model does, whole and in its two parts. Returns whether it is used. The
        cached news tokens stay attributes of the trace, not constants, so that news added later
        reach it (`add_news`) without a new trace."""
        from mmnewsrec.rank.model import Ranker

        model = self.model
        if not (isinstance(model, Ranker) and model.trainable) or model.training:
            return False
        num_news, features = len(model.news_vectors) - 1, len(self.signal_names)
        examples = [
            example_inputs(num_news, 1, 7, 9, True, self.device, features),
            example_inputs(num_news, 3, self.history_len, 20, False, self.device, features),
        ]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", TracerWarning)  # the check below stands for them
            history, *rest = examples[0]
            methods = {
                "forward": examples[0],
                "encode_history": (history,),
                "score_encoded": (model.encode_history(history), *rest),
            }
            # check_trace=False: its own check traces again (seconds at 100k news); ours is below
            tables = list(model.token_tables())
            traced = torch.jit.trace_module(model, methods, check_trace=False)
            traced = torch.jit.freeze(traced, preserved_attrs=[*methods, *tables])
        with torch.inference_mode(), optimized_execution(False):
            same = all(
                torch.allclose(scores, model(h, *rest), 1e-5, 1e-6)
                for h, *rest in examples
                for scores in (
                    traced(h, *rest),
                    traced.score_encoded(traced.encode_history(h), *rest),
                )
            )
        if not same:
            logger.warning("the TorchScript trace of %s scores otherwise: not used", self.path)
            return False
        self.traced = traced
        return True

    def news_model(self) -> Ranker:
        """The model, if it can score news added after its own (a ValueError if not)."""
        from mmnewsrec.rank.model import Ranker

        if not isinstance(self.model, Ranker):
            raise ValueError(f"{self.path}: a {type(self.model).__name__} cannot take new news")
        return self.model

    def add_news(
        self,
        rows: torch.Tensor,
        has_image: torch.Tensor,
        table: Any = None,
        categories: torch.Tensor | None = None,
    ) -> None:
        """Score n news added after the model's own as well: their vectors (n, D), image flags
        (n,), where the model shares it the news table with the rows already appended, and for
        a model that reads them their category ids (n, 2) (`Ranker.category_ids`).
        In place, in amortised O(n) (`Ranker.add_news`); a trace reads the grown token tables
        as the model does, and is not made again."""
        model = self.news_model()
        model.add_news(rows.to(self.device), has_image.to(self.device), table, categories)
        if self.traced is None:
            return
        # The trace reads each token table's whole buffer, spare rows too (never indexed):
        # it takes the new buffer when the table moved to a larger one, not one per news item.
        for path, buffer in model.token_buffers().items():
            *modules, name = path.split(".")
            owner = reduce(getattr, modules, self.traced)  # no get_submodule on a trace
            held = getattr(owner, name)
            if held.data_ptr() != buffer.data_ptr() or held.shape != buffer.shape:
                with self.trace_lock.exclusive():  # a trace is not changed while it runs
                    setattr(owner, name, buffer)

    def forked(self, num_news: int) -> TrainedRanker:
        """A copy for adding other news than those added to this ranker's model since it
        scored news 0..`num_news`: the weights shared, the per-news tables cut to those news
        (they grow apart from here), the trace made again."""
        model = self.news_model()
        memo: dict[int, Any] = {id(p): p for p in model.parameters()}  # shared, not copied
        memo |= {id(t): t[: num_news + 1] for t in model.news_tables().values()}
        memo[id(model.grown_)] = {}
        copied = copy.deepcopy(model, memo)
        new = replace(self, model=copied, traced=None, trace_lock=SharedLock())
        if self.traced is not None:
            new.trace()
        return new

    @torch.inference_mode()
    def score_batch(
        self, history: torch.Tensor, candidates: torch.Tensor, signals: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The forward on index tensors: history (B, L) and candidates (B, C), news indices
        with 0 as padding, and for a model that reads them signals (B, C, F), give scores
        (B, C)."""
        model = self.model if self.traced is None else self.traced
        inputs = [history.to(self.device), candidates.to(self.device)]
        if signals is not None:
            inputs.append(signals.to(self.device))
        # The plain interpreter: the optimising one re-profiles at each new input shape.
        with optimized_execution(False), self.trace_lock.shared():  # this thread's setting
            return model(*inputs).float()

    def score_items(
        self,
        history: Sequence[int] | np.ndarray,
        candidates: Sequence[int] | np.ndarray,
        width: int = 256,
        signals: np.ndarray | None = None,
    ) -> np.ndarray:
        """Scores of any number of candidates for one user.

        Args:
            history: News indices the user clicked, oldest first; the last L are read.
            candidates: News indices to score.
            width: Candidates per row of the forward.
            signals: (len(candidates), len(signal_names)) behaviour signals, for a model that
                reads them.

        Returns:
            (len(candidates),) float32 scores.
        """
        return self.score_encoded(self.encode_history(history), candidates, width, signals)

    @torch.inference_mode()
    def encode_history(self, history: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, ...]:
        """What the model computes from one user's history alone (news indices, oldest first;
        the last L are read), for `score_encoded`: the same until the user's next click.

        The history is padded to its own length (at most L), not to L: padding changes no
        score, only the work."""
        hist = np.asarray(history, dtype=np.int64)
        length = max(1, min(len(hist), self.history_len))
        h = gather_history(np.array([0, len(hist)]), hist, np.zeros(1, dtype=np.int64), length)
        model: Any = self.model if self.traced is None else self.traced
        with optimized_execution(False):
            return tuple(model.encode_history(torch.from_numpy(h).to(self.device)))

    @torch.inference_mode()
    def score_encoded(
        self,
        encoded: tuple[torch.Tensor, ...],
        candidates: Sequence[int] | np.ndarray,
        width: int = 256,
        signals: np.ndarray | None = None,
    ) -> np.ndarray:
        """`score_items` for the history `encode_history` encoded: (len(candidates),) float32
        scores."""
        cand = np.asarray(candidates, dtype=np.int64)
        if cand.size == 0:
            return np.zeros(0, dtype=np.float32)
        rows = -(-len(cand) // width)
        grid = np.zeros(rows * width, dtype=np.int64)
        grid[: len(cand)] = cand
        inputs: list[Any] = [
            tuple(x.expand(rows, *x.shape[1:]) for x in encoded),  # one user's, on every row
            torch.from_numpy(grid.reshape(rows, width)).to(self.device),
        ]
        if signals is not None:
            padded = np.zeros((rows * width, signals.shape[1]), dtype=np.float32)
            padded[: len(cand)] = signals
            inputs.append(torch.from_numpy(padded.reshape(rows, width, -1)).to(self.device))
        model: Any = self.model if self.traced is None else self.traced
        with optimized_execution(False):
            scores = model.score_encoded(*inputs).float()
        return scores.flatten()[: len(cand)].cpu().numpy()


def example_inputs(
    num_news: int,
    rows: int,
    length: int,
    width: int,
    padded: bool,
    device: torch.device,
    signals: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Random history (rows, length) and candidates (rows, width) over news 1..num_news, and
    given `signals` > 0, random signals (rows, width, signals); `padded`: with a padding click
    and a padding candidate in each row."""
    generator = torch.Generator().manual_seed(0)
    history = torch.randint(1, num_news + 1, (rows, length), generator=generator)
    candidates = torch.randint(1, num_news + 1, (rows, width), generator=generator)
    if padded:
        history[:, 0], candidates[:, -1] = 0, 0
    inputs = [history, candidates]
    if signals:
        inputs.append(torch.randn(rows, width, signals, generator=generator))
    return tuple(x.to(device) for x in inputs)


def load_ranker(
    run_dir: str | Path,
    device: str | torch.device = "cpu",
    vectors: Any = None,
    checkpoint: str = "checkpoint.pt",
) -> TrainedRanker:
    """Load a run's best model with the news vectors it was trained on.

    Args:
        run_dir: A run folder written by `mmnewsrec train`.
        device: Where to score: `cpu`, `cuda` or `cuda:N`.
        vectors: NewsVectors to use instead of reading the run's `data.vectors_dir`; either
            way their hash must match the checkpoint's.
        checkpoint: The checkpoint file in `run_dir` (`last.pt`: the latest weights).

    Returns:
        The model, in eval mode, on `device`.

    Raises:
        CheckpointError: No readable checkpoint, or vectors other than the trained-on ones.
    """
    from mmnewsrec.formats.vectors import NewsVectors
    from mmnewsrec.rank.model import build_model

    run_dir = Path(run_dir)
    path = run_dir / checkpoint
    state = read_checkpoint(path)
    config = validate_config(state["config"], str(path))
    if not state.get("finetune", {"exported": True}).get("exported"):
        raise CheckpointError(
            f"{path} was saved while fine-tuning the text encoder, before the run's news vectors "
            "were exported: the run is still training, or it stopped before its end "
            "(run.stop_after, an interruption). Finish it with the same `mmnewsrec train` "
            f"command and --resume; its end writes {run_dir / 'vectors'} and "
            f"{run_dir / 'text_encoder'} and the checkpoint that evaluate, predict and serve read"
        )
    if vectors is None:
        vectors = NewsVectors.load(config.data.vectors_dir)
    check_vectors_hash(path, state["vectors_hash"], vectors.hash)
    has_image = np.array(vectors.has_image)  # a writable copy of the memory-mapped flags
    model = build_model(state["model_name"], state["model_args"], vectors.vectors, has_image)
    model.load_state_dict(state["model"])
    device = resolve_device(device)
    model.to(device).eval()
    meta = {k: v for k, v in state.items() if k not in ("model", "optimizer", "scheduler", "rng")}
    logger.info("loaded %s (step %s) from %s", state["model_name"], state.get("step"), path)
    return TrainedRanker(path, model, config, device, state["vectors_hash"], meta)
