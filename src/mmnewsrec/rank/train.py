"""The training recipe: setup / train / save_checkpoint / cleanup.

One process, or one per device under `torchrun` (DistributedDataParallel, see
`rank.distributed`). Every rank scores its share of the selection impressions and the scores
are gathered, so no rank waits for a whole pass. Rank 0 alone logs, computes the selection
metrics and writes RUN_DIR/{config.json, log.csv, checkpoint.pt (best), last.pt (resumable)}.

Selection (best checkpoint, early stopping) uses a validation split held out of the train
impressions by `data.valid_split` (by default their last day, MIND's convention), so the dev
split that `evaluate` reports stays unseen. `data.valid_split = "dev"` selects on dev instead;
the checkpoint then says so (`selection`), and so do the reports.

last.pt is written at every evaluation, at least every `run.checkpoint_minutes` and when
SIGTERM or SIGINT stops the run after a step (`rank.interrupt`); a run stopped or killed after
step s and resumed ends with the same weights as one that never stopped (`rank.checkpoints`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mmnewsrec.config import ConfigError, TrainConfig, valid_cut
from mmnewsrec.devices import amp_dtype, autocast, resolve_device
from mmnewsrec.files import write_text
from mmnewsrec.formats.runs import CHECKPOINT_FORMAT, check_vectors_hash, read_checkpoint
from mmnewsrec.formats.store import DAY
from mmnewsrec.rank.batches import Batch, ClickDataset, ResumableSampler, collate
from mmnewsrec.rank.checkpoints import (
    atomic_save,
    check_resumable,
    check_same_store,
    rng_state,
    seed_everything,
    set_rng_state,
)
from mmnewsrec.rank.distributed import (
    DistInfo,
    any_rank,
    gather_scores,
    init_distributed,
    shard,
)
from mmnewsrec.rank.interrupt import StopSignals, TrainingInterrupted
from mmnewsrec.rank.ranker import score_behaviors
from mmnewsrec.rank.run_log import Window, append_log, reset_log, truncate_log

if TYPE_CHECKING:
    from mmnewsrec.formats.store import Behaviors

logger = logging.getLogger(__name__)


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine / linear decay to `min_ratio`, or flat."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * decay


def ranking_loss(scores: torch.Tensor, batch: Batch, kind: str) -> torch.Tensor:
    """Listwise: softmax cross-entropy of the clicked candidate over its row. Pointwise: BCE per
    candidate. Padding candidates (index 0) never count."""
    scores = scores.float()
    real = batch.candidates > 0
    if kind == "listwise":
        logits = scores.masked_fill(~real, -torch.inf)
        return F.cross_entropy(logits, batch.labels.argmax(dim=1))
    loss = F.binary_cross_entropy_with_logits(scores, batch.labels, reduction="none")
    return (loss * real).sum() / real.sum()


AUTO_MIN_LAST_DAY = 0.05  # 'auto' holds out the last day if it has this share of train
AUTO_FRACTION = "0.1"  # otherwise the latest tenth
MIN_VALID_IMPRESSIONS = 200  # fewer select a checkpoint by noise: a warning


def resolve_valid_rule(times: np.ndarray, rule: str) -> str:
    """The rule that `rule` stands for on impressions at `times`: 'auto' is 'last-day' when
    the last UTC day holds at least AUTO_MIN_LAST_DAY of them, else AUTO_FRACTION."""
    if rule != "auto":
        return rule
    thin = len(times) == 0 or valid_mask(times, "last-day").mean() < AUTO_MIN_LAST_DAY
    return AUTO_FRACTION if thin else "last-day"


def valid_mask(times: np.ndarray, rule: str) -> np.ndarray:
    """(I,) bool: the impressions at `times` (unix seconds) that a held-out `data.valid_split`
    rule ('auto', 'last-day', 'YYYY-MM-DD' or a fraction) puts in the validation split."""
    cut = valid_cut(resolve_valid_rule(times, rule))
    times = np.asarray(times)
    if cut == "last-day":
        last_day = times.max() // DAY * DAY if len(times) else 0
        return times >= last_day
    if isinstance(cut, float):
        n_valid = math.ceil(cut * len(times))
        latest = np.argsort(times, kind="stable")[len(times) - n_valid :]
        mask = np.zeros(len(times), dtype=bool)
        mask[latest] = True
        return mask
    if isinstance(cut, date):
        start = datetime(cut.year, cut.month, cut.day, tzinfo=UTC).timestamp()
        return times >= start
    raise ValueError(f"valid_split {rule!r} holds nothing out of the train split")


@dataclass
class Progress:
    """Where the run stands; saved in last.pt."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already done
    best_auc: float = -math.inf
    best_step: int = -1
    bad_evals: int = 0
    last_eval_step: int = -1
    finished: bool = False
    best_metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What a call of `TrainRecipe.train` achieved."""

    out_dir: Path
    step: int
    epoch: int
    # ran to the end (all epochs, max_steps or early stop), not stopped by stop_after
    finished: bool
    stopped_early: bool
    best_metrics: dict[str, float]
    is_main: bool = True  # rank 0 (the process that logs and saves)
    selected_on: str = "valid"  # the split whose metrics best_metrics are

    def summary(self) -> str:
        """One line for the command line."""
        best = self.best_metrics
        keys = [k for k in ("auc", "mrr", "ndcg5", "ndcg10") if k in best]
        line = " ".join(f"{k} {best[k]:.4f}" for k in keys)
        state = "finished" if self.finished else "stopped (continue with --resume)"
        return (
            f"{state} at step {self.step}; best {self.selected_on}: {line or '-'}; "
            f"run in {self.out_dir}"
        )


class TrainRecipe:
    """Train one ranker from a config on a given device (see module docstring)."""

    def __init__(
        self, config: TrainConfig, device: torch.device, dist_info: DistInfo | None = None
    ):
        self.config = config.resolved()
        self.device = device
        self.dist = dist_info or DistInfo()
        self.out_dir = self.config.run.out_dir
        self.progress = Progress()
        self.stopped_early = False
        self.window = Window()  # the losses since the last log row, kept in last.pt
        self.signals = StopSignals()
        self.last_saved = time.monotonic()
        self.bar_label: str | None = None  # the progress bar's description, by default the model
        self.bar_position = 0  # its line: runs at once in several processes keep their own

    # ------------------------------------------------------------------ setup

    def setup(self, resume: bool = False) -> None:
        """Load the data and vectors, build the model, optimiser and schedule; resume if asked."""
        cfg = self.config
        last = self.out_dir / "last.pt"
        if last.exists() and not resume:
            raise ConfigError(f"{self.out_dir} already holds a run; pass --resume or another --out")
        seed_everything(cfg.run.seed)
        self._load_data()
        self._build_model()
        self.amp_dtype = amp_dtype(cfg.optim.precision, self.device)
        if self.trainable:
            self._build_loader()
            self._build_optimizer()
        if resume and last.exists():
            self._resume(last)
        else:
            if resume:
                logger.info("no %s to resume; starting a new run", last)
            if self.dist.is_main:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                reset_log(self.out_dir / "log.csv")
            torch.manual_seed(cfg.run.seed + self.dist.rank)  # per-rank dropout streams
        if self.dist.is_main:
            config_text = json.dumps(cfg.to_dict(), indent=2) + "\n"
            write_text(self.out_dir / "config.json", config_text)

    def _load_data(self) -> None:
        from mmnewsrec.formats.store import Store
        from mmnewsrec.formats.vectors import NewsVectors

        cfg = self.config.data
        store = Store.load(cfg.store_dir)
        self.vectors = NewsVectors.load(cfg.vectors_dir)
        if self.vectors.vectors.shape[0] != store.num_news + 1:
            raise ConfigError(
                f"{cfg.vectors_dir}: {self.vectors.vectors.shape[0]} vector rows, but the store "
                f"{cfg.store_dir} has {store.num_news} news (+1 padding row); encode this store"
            )
        encoded_from = self.vectors.manifest.get("store", {}).get("content_hash")
        if encoded_from not in (None, store.content_hash):
            raise ConfigError(
                f"{cfg.vectors_dir} was encoded from another store than {cfg.store_dir}"
            )
        for split in (cfg.train_split, cfg.dev_split):
            if split and split not in store.splits:
                raise ConfigError(f"{cfg.store_dir}: no split {split!r} (has {store.splits})")
        self.store = store
        self.num_news = store.num_news
        self.store_hash = store.content_hash
        self.train_behaviors = store.behaviors(cfg.train_split)
        self.signal_names = self._signal_names()
        self.train_signals = self._signals(store, cfg.train_split)
        self.select_signals: np.ndarray | None = None
        self.select_behaviors: Behaviors | None = None
        self.selection: dict[str, Any] = {"split": None, "rule": cfg.valid_split}
        if cfg.valid_split == "dev":
            if not cfg.dev_split:
                raise ConfigError("data.valid_split = 'dev' needs a data.dev_split")
            self.select_behaviors = store.behaviors(cfg.dev_split)
            self.select_signals = self._signals(store, cfg.dev_split)
            self.selection["split"] = cfg.dev_split
        elif cfg.valid_split:
            self._hold_out_valid()
        if self.select_behaviors is not None:
            if not self.select_behaviors.labelled:
                raise ConfigError(
                    f"selection split {self.selection['split']!r} has no labels; "
                    "choose a labelled split"
                )
            self.selection["impressions"] = self.select_behaviors.num_impressions

    def _signal_names(self) -> list[str]:
        """model.signals; "all": every signal of the store for a model that reads signals,
        none for one that does not (popularity, random, mean_cosine)."""
        from mmnewsrec.formats.store import SIGNAL_NAMES
        from mmnewsrec.rank.model import reads_signals

        model = self.config.model
        if model.signals != "all":
            return list(model.signals)
        try:
            return list(SIGNAL_NAMES) if reads_signals(model.name) else []
        except ValueError as err:
            raise ConfigError(f"model: {err}") from None

    def _signals(self, store: Any, split: str) -> np.ndarray | None:
        """The candidates' signals of `split` that the model reads (None for none)."""
        from mmnewsrec.formats.store import StoreError

        if not self.signal_names:
            return None
        try:
            return store.signals(split, self.signal_names)
        except StoreError as err:
            raise ConfigError(str(err)) from None

    def _hold_out_valid(self) -> None:
        """Split the train impressions into training and validation by `data.valid_split`."""
        cfg = self.config.data
        train = self.train_behaviors
        rule = resolve_valid_rule(train.times, cfg.valid_split)
        is_valid = valid_mask(train.times, rule)
        n_valid = int(is_valid.sum())
        if n_valid in (0, train.num_impressions):
            raise ConfigError(
                f"data.valid_split {cfg.valid_split!r} puts {n_valid} of the "
                f"{train.num_impressions} {cfg.train_split!r} impressions in validation; "
                "choose a cut that leaves some on each side (or valid_split = 'dev' / '')"
            )
        self.select_behaviors = train.subset(is_valid, "valid")
        self.train_behaviors = train.subset(~is_valid, cfg.train_split)
        if self.train_signals is not None:
            in_valid = np.repeat(is_valid, np.diff(train.candidate_offsets))
            self.select_signals = self.train_signals[in_valid]
            self.train_signals = self.train_signals[~in_valid]
        clicks = int(np.asarray(self.select_behaviors.candidate_labels).sum())
        self.selection |= {"split": "valid", "held_out_of": cfg.train_split}
        self.selection |= {"applied": rule, "clicks": clicks}
        logger.info(
            "validation (valid_split %r: %s): %d of %d %s impressions, %d clicks",
            cfg.valid_split, rule, n_valid, train.num_impressions, cfg.train_split, clicks,
        )  # fmt: skip
        if n_valid < MIN_VALID_IMPRESSIONS:
            logger.warning(
                "validation holds only %d impressions (%d clicks): the checkpoint it selects is "
                "a noisy choice; hold out more with data.valid_split (e.g. '0.2')",
                n_valid, clicks,
            )  # fmt: skip

    def _build_model(self) -> None:
        from mmnewsrec.rank.model import (
            IMAGE_RANK,
            MODELS,
            GBDTRanker,
            PopularityRanker,
            build_model,
            canonical_name,
            click_counts,
        )
        from mmnewsrec.recall.space import vector_parts

        cfg = self.config
        args = dict(cfg.model.args)
        if cfg.model.preset is not None:
            args["preset"] = cfg.model.preset
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        try:
            self.model_name = canonical_name(cfg.model.name)
            keys = {f.name for f in fields(MODELS[self.model_name].config_class)}
            if "max_history" in keys:
                args.setdefault("max_history", cfg.data.history_len)
            if "text_dim" in keys:  # scores in the recall space: the vectors' text part
                args.setdefault(
                    "text_dim", vector_parts(self.vectors.manifest, self.vectors.dim)[0].stop
                )
            if "image_rank" in keys:
                args.setdefault("image_rank", IMAGE_RANK)
            if self.signal_names and "signals" not in keys:
                raise ValueError(f"{self.model_name} reads no signals; unset model.signals")
            if "signals" in keys:
                args["signals"] = self.signal_names
            news = self.store.news
            if cfg.model.categories and "category_names" in keys:
                for name in ("category", "subcategory"):
                    args[f"{name}_names"] = news[name].unique().sort().to_list()
            model = build_model(
                self.model_name, args, self.vectors.vectors, np.array(self.vectors.has_image)
            )
            if model.trainable:
                names = model.category_ids(news["category"], news["subcategory"])
                model.fit_news_features(np.concatenate([np.zeros((1, 2), np.int64), names]))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model: {err}") from None
        history_cap = getattr(model.config, "max_history", cfg.data.history_len)
        if history_cap != cfg.data.history_len:
            raise ConfigError(
                f"model.args.max_history ({history_cap}) differs from data.history_len "
                f"({cfg.data.history_len}); set data.history_len only"
            )
        if cfg.model.finetune_layers and not model.trainable:  # before any fit is paid for
            raise ConfigError(f"model.finetune_layers: {model.name} has no weights to train")
        if isinstance(model, PopularityRanker):
            model.fit_counts(click_counts(self.train_behaviors, self.num_news))
        if model.signal_head is not None and self.train_signals is not None:
            model.signal_head.fit(self.train_signals)
        if isinstance(model, GBDTRanker):
            self._fit_gbdt(model)
        self.model_args = model.model_args
        self.model: nn.Module = model
        if cfg.model.finetune_layers:
            self.model = self._fine_tuned(model)
        self.model.to(self.device)
        self.trainable = any(p.requires_grad for p in self.model.parameters())
        self.ddp: nn.Module = self.model
        if self.trainable and self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # buffers (news vectors, counts) are frozen and equal on every rank: never broadcast
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids, forward_sync_buffers=False
            )

    def _fine_tuned(self, ranker: Any) -> nn.Module:
        """`ranker` with a trainable text tower. Under DDP rank 0 builds the token-state cache
        while the other ranks wait, then they read it: one writer per cache folder."""
        from mmnewsrec.rank.news_encoder import fine_tuned

        if self.dist.distributed and not self.dist.is_main:
            dist.barrier()
        model = fine_tuned(ranker, self.config, self.store, self.vectors, self.device)
        if self.dist.distributed and self.dist.is_main:
            dist.barrier()
        return model

    def _fit_gbdt(self, model: Any) -> None:
        """Fit a GBDT ranker on the training impressions (early stopping on the selection
        split), its content cosine computed by the mean-cosine ranker."""
        from mmnewsrec.rank.model import MeanCosineConfig, MeanCosineRanker, RankingTable

        cosine = MeanCosineRanker(MeanCosineConfig(), self.vectors.vectors)

        def table(behaviors: Behaviors, signals: np.ndarray | None) -> RankingTable:
            content = score_behaviors(
                cosine, behaviors, self.config.data.history_len, self.device,
                self.config.run.eval_batch_size,
            )  # fmt: skip
            columns = [content[:, None]] if signals is None else [signals, content[:, None]]
            labels = np.asarray(behaviors.candidate_labels)
            return RankingTable(np.hstack(columns), labels, np.asarray(behaviors.candidate_offsets))

        valid = self.select_behaviors
        valid_table = table(valid, self.select_signals) if valid is not None else None
        model.fit(
            table(self.train_behaviors, self.train_signals), valid_table, self.config.run.seed
        )

    def _build_loader(self) -> None:
        cfg = self.config
        world = self.dist.world_size
        if cfg.optim.batch_size % world:
            raise ConfigError(
                f"optim.batch_size {cfg.optim.batch_size} is not divisible by {world} processes"
            )
        self.batch_size = cfg.optim.batch_size // world
        self.dataset = ClickDataset(
            self.train_behaviors,
            negatives=cfg.data.negatives,
            history_len=cfg.data.history_len,
            seed=cfg.run.seed,
            require_negative=cfg.data.loss == "listwise",
            signals=self.train_signals,
        )
        if len(self.dataset) == 0:
            raise ConfigError(f"split {cfg.data.train_split!r} yields no training samples")
        self.sampler = ResumableSampler(
            self.dataset, num_replicas=world, rank=self.dist.rank, shuffle=True, seed=cfg.run.seed
        )
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            collate_fn=collate,
            num_workers=cfg.run.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.run.seed),  # keeps the global RNG untouched
        )
        self.steps_per_epoch = math.ceil(self.sampler.num_samples / self.batch_size)
        self.total_steps = self.steps_per_epoch * cfg.optim.epochs
        if cfg.run.max_steps:
            self.total_steps = min(self.total_steps, cfg.run.max_steps)

    def _build_optimizer(self) -> None:
        opt = self.config.optim
        tuned = getattr(self.model, "text", None)  # a fine-tuned text tower: its own lr
        own = {id(p) for p in tuned.parameters()} if tuned is not None else set()
        params = [p for p in self.model.parameters() if p.requires_grad and id(p) not in own]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": opt.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.clip_groups = [params]  # gradient norms clipped apart: the tower's are far larger
        if tuned is not None:
            lr = self.config.model.finetune_lr
            groups.append({"params": list(tuned.parameters()), "weight_decay": 0.0, "lr": lr})
            self.clip_groups.append(list(tuned.parameters()))
        self.optimizer = torch.optim.AdamW(
            groups, lr=opt.lr, betas=opt.betas, fused=self.device.type == "cuda" or None
        )
        warmup = round(opt.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, warmup, self.total_steps, opt.schedule, opt.min_lr_ratio),
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def _resume(self, path: Path) -> None:
        state = read_checkpoint(path)
        check_vectors_hash(path, state["vectors_hash"], self.vectors.hash)
        check_resumable(state["config"], self.config, path)
        check_same_store(path, state.get("store_hash"), self.store_hash)
        if state["world_size"] != self.dist.world_size:
            raise ConfigError(
                f"{path} was written by {state['world_size']} processes; resume with as many"
            )
        self.model.load_state_dict(state["model"])
        if self.trainable:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])
        set_rng_state(state["rng"][self.dist.rank])
        if "window" in state:  # absent from runs saved before it was kept
            self.window.restore(state["window"][self.dist.rank], self.device)
        if self.dist.is_main:
            truncate_log(self.out_dir / "log.csv", self.progress.step)
        logger.info(
            "resumed %s at step %d (epoch %d)", path, self.progress.step, self.progress.epoch
        )

    # ------------------------------------------------------------------ train

    def train(self) -> TrainResult:
        """Run to the end of the schedule (or early stop, `run.stop_after`, or SIGTERM / SIGINT:
        see `rank.interrupt`)."""
        p = self.progress
        if not self.trainable:
            return self._finish()
        bar = tqdm(
            total=self.total_steps,
            initial=p.step,
            desc=f"train {self.bar_label or self.model_name}",
            position=self.bar_position,
            disable=not (self.dist.is_main and self.config.run.progress),
            dynamic_ncols=True,
        )
        stopped_by = 0
        with bar, self.signals:
            while not (p.finished or p.step >= self.total_steps or stopped_by):
                self.dataset.set_epoch(p.epoch)
                self.sampler.set_epoch(p.epoch)
                self.sampler.set_start(p.batch_in_epoch * self.batch_size)
                for batch in self.loader:
                    self.window.add(self._train_step(batch), len(batch) * self.dist.world_size)
                    p.step += 1
                    p.batch_in_epoch += 1
                    bar.update(1)
                    if p.step % self.config.run.log_every == 0:
                        self._log_window(bar)
                    stopped_by = self._end_of_step()
                    if stopped_by or p.finished or p.step >= self.total_steps:
                        break
        if stopped_by > 0:
            raise TrainingInterrupted(stopped_by, p.step, self.out_dir)
        if stopped_by:
            logger.info("stopped after step %d as asked; resume with --resume", p.step)
            return self._result(finished=False)
        return self._finish()

    def _end_of_step(self) -> int:
        """Evaluate and end the epoch when due; write last.pt at every evaluation, every
        `run.checkpoint_minutes` and before a stop. Returns why the run stops here: the number
        of a signal one of the ranks received, -1 for `run.stop_after`, 0 to go on."""
        p, run = self.progress, self.config.run
        evaluated = bool(run.eval_every) and p.step % run.eval_every == 0
        if evaluated:
            self._evaluate_and_track()
        if p.batch_in_epoch >= self.steps_per_epoch:
            p.epoch += 1
            p.batch_in_epoch = 0
            if run.eval_each_epoch and not (p.finished or evaluated):
                self._evaluate_and_track()
                evaluated = True
        if p.finished or p.step >= self.total_steps:
            return 0  # _finish writes last.pt
        minutes = run.checkpoint_minutes
        timed = bool(minutes) and time.monotonic() - self.last_saved >= 60 * minutes
        signum, due = any_rank([self.signals.received, timed], self.dist, self.device)
        stop = int(signum) or (-1 if p.step == run.stop_after else 0)
        if evaluated or due or stop:
            self.save_last()
        return stop

    def _train_step(self, batch: Batch) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True)
        self.ddp.train()
        with autocast(self.device, self.amp_dtype):
            scores = self.ddp(batch.history, batch.candidates, batch.signals)  # (B, 1+K)
        loss = ranking_loss(scores, batch, self.config.data.loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.config.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            for params in self.clip_groups:
                nn.utils.clip_grad_norm_(params, self.config.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()

    def _finish(self) -> TrainResult:
        """Final evaluation unless the current weights were just evaluated; save and report."""
        p = self.progress
        if p.last_eval_step != p.step:
            self._evaluate_and_track()
        p.finished = True
        best = self.out_dir / "checkpoint.pt"
        if self.dist.is_main and not best.exists():  # no selection split, or no AUC on it
            self.save_checkpoint(best, {})
        self.save_last()
        if self.dist.is_main and self.config.model.finetune_layers:
            from mmnewsrec.rank.news_encoder import export_run

            export_run(self.out_dir, self.vectors, self.model)
        return self._result(finished=True)

    def _result(self, finished: bool) -> TrainResult:
        p = self.progress
        return TrainResult(
            self.out_dir,
            p.step,
            p.epoch,
            finished,
            self.stopped_early,
            p.best_metrics,
            self.dist.is_main,
            self.selection["split"] or "-",
        )

    # ------------------------------------------------------------------ evaluate

    def evaluate(self) -> dict[str, float]:
        """Selection metrics of the current weights on rank 0 ({} on the other ranks). Each
        rank scores its share of the impressions; rank 0 gathers the scores."""
        from mmnewsrec.metrics import evaluate_scores

        dev = self.select_behaviors
        assert dev is not None, "evaluate() needs a selection split"
        n = self.config.data.dev_impressions or dev.num_impressions
        n = min(n, dev.num_impressions)
        lo, hi = shard(n, self.dist.rank, self.dist.world_size)
        scores = score_behaviors(
            self.model,
            dev,
            self.config.data.history_len,
            self.device,
            self.config.run.eval_batch_size,
            num_impressions=hi,
            amp_dtype=self.amp_dtype,
            progress=self.config.run.progress,
            first_impression=lo,
            signals=self.select_signals,
        )
        offsets = np.asarray(dev.candidate_offsets[: n + 1])
        if self.dist.distributed:
            scores = gather_scores(scores, offsets, self.dist, self.device)
        if not self.dist.is_main:
            return {}
        labels = np.asarray(dev.candidate_labels[: offsets[-1]])
        return evaluate_scores(scores, labels, offsets)

    def _evaluate_and_track(self) -> None:
        """Evaluate (all ranks), keep the best checkpoint (rank 0), decide early stopping on
        rank 0 and tell every rank."""
        p = self.progress
        p.last_eval_step = p.step
        if self.select_behaviors is None:
            return
        metrics = self.evaluate()
        stop = torch.zeros(1, device=self.device)
        if self.dist.is_main:
            self._write_log(loss=None, samples_per_s=None, metrics=metrics)
            logger.info(
                "step %d: %s auc %.4f mrr %.4f ndcg5 %.4f ndcg10 %.4f",
                p.step, self.selection["split"],
                metrics["auc"], metrics["mrr"], metrics["ndcg5"], metrics["ndcg10"],
            )  # fmt: skip
            if metrics["auc"] > p.best_auc:
                p.best_auc, p.best_step, p.bad_evals = metrics["auc"], p.step, 0
                p.best_metrics = {k: float(v) for k, v in metrics.items()}
                self.save_checkpoint(self.out_dir / "checkpoint.pt", p.best_metrics)
            else:
                p.bad_evals += 1
            stop[0] = float(
                bool(self.config.run.patience) and p.bad_evals >= self.config.run.patience
            )
        if self.dist.distributed:
            dist.broadcast(stop, src=0)
        if stop.item():
            logger.info(
                "early stop: no better %s AUC in %d evaluations",
                self.selection["split"], self.config.run.patience,
            )  # fmt: skip
            p.finished = True
            self.stopped_early = True

    # ------------------------------------------------------------------ checkpoints

    def _meta(self) -> dict[str, Any]:
        spec = getattr(self.model, "spec", None)  # a fine-tuned text tower's description
        return {
            "format": CHECKPOINT_FORMAT,
            "model_name": self.model_name,
            "model_args": self.model_args,
            "model": self.model.state_dict(),
            "vectors_hash": self.vectors.hash,
            "store_hash": self.store_hash,
            "config": self.config.to_dict(),
            "selection": self.selection,
            "step": self.progress.step,
            "epoch": self.progress.epoch,
        } | ({"finetune": spec.describe()} if spec is not None else {})

    def save_checkpoint(self, path: Path, metrics: dict[str, float]) -> None:
        """The model alone (what evaluation and serving load), atomically (rank 0)."""
        atomic_save(self._meta() | {"metrics": metrics}, path)

    def save_last(self) -> None:
        """Everything a resume needs to continue exactly: the RNG states and the losses not yet
        logged of every rank (rank 0 writes it)."""
        self.last_saved = time.monotonic()
        mine = (rng_state(), self.window.state())
        ranks: list[Any] = [mine]
        if self.dist.distributed:
            ranks = [None] * self.dist.world_size
            dist.all_gather_object(ranks, mine)
        if not self.dist.is_main:
            return
        state = self._meta() | {
            "progress": vars(self.progress).copy(),
            "rng": [rng for rng, _ in ranks],
            "window": [losses for _, losses in ranks],
            "world_size": self.dist.world_size,
        }
        if self.trainable:
            state |= {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
            }
        atomic_save(state, self.out_dir / "last.pt")

    # ------------------------------------------------------------------ log

    def _write_log(
        self, loss: float | None, samples_per_s: float | None, metrics: dict[str, float] | None
    ) -> None:
        p = self.progress
        lr = self.scheduler.get_last_lr()[0] if self.trainable else None
        row = {
            "step": p.step,
            "epoch": p.epoch,
            "loss": loss,
            "lr": lr,
            "samples_per_s": samples_per_s,
        }
        row |= {k: (metrics or {}).get(k) for k in ("auc", "mrr", "ndcg5", "ndcg10")}
        append_log(self.out_dir / "log.csv", row)

    def _log_window(self, bar: tqdm) -> None:
        window = self.window
        loss = window.mean_loss()
        if self.dist.distributed:
            t = torch.tensor([loss], device=self.device)
            dist.all_reduce(t)
            loss = t.item() / self.dist.world_size
        rate = window.rate()
        window.reset()
        if self.dist.is_main:
            bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.0f}")
            self._write_log(loss, rate, None)

    def cleanup(self) -> None:
        """Release the process group if this recipe's run created one."""
        if self.dist.distributed and dist.is_initialized():
            dist.destroy_process_group()


def run_training(
    config: TrainConfig, resume: bool = False, bar_label: str | None = None, bar_position: int = 0
) -> TrainResult:
    """Train a run: what `mmnewsrec train` does.

    The device comes from `config.run.device` and, under torchrun, the process group and
    local rank from the environment.

    Args:
        config: The training configuration (see `load_config`).
        resume: Continue the run in `config.run.out_dir` from its `last.pt`.
        bar_label: The progress bar's description (default: the model's name).
        bar_position: The progress bar's line: runs at once in several processes keep their own.

    Returns:
        The run's outcome: best metrics on the selection split, steps, the run folder.

    Raises:
        ConfigError: A bad device, a folder already holding a run (without `resume`), or a
            resume under a changed configuration.
    """
    dist_info = DistInfo.from_env()
    try:
        device = resolve_device(config.run.device, dist_info.local_rank)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    init_distributed(device, dist_info)
    recipe = TrainRecipe(config, device, dist_info)
    recipe.bar_label, recipe.bar_position = bar_label, bar_position
    try:
        recipe.setup(resume=resume)
        return recipe.train()
    finally:
        recipe.cleanup()
