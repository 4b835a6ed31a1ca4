"""Evaluate trained runs, write leaderboard predictions, and run experiment grids.

An experiment file (TOML) declares encoders x rankers x seeds over one data set:

    title = "text vs text+image"
    data_dir = "data/synth"        # raw MIND folder (prepared into OUT/store), or store_dir = ...
    out_dir = "experiments/synth"
    train_config = "train_cpu"     # base training config: a shipped name or a path
    train_overrides = ["optim.epochs=2"]
    seeds = [0, 1]
    recall_k = [10, 50, 200]

    [encoders.text]                # options of `mmnewsrec encode`
    image_encoder = "none"
    [encoders.text_image]
    fusion = "concat"

    [rankers.popularity]           # a registry model; per_encoder = false: run once
    model = "popularity"
    per_encoder = false
    [rankers.transformer]
    model = "fast_rec_transformer"
    overrides = ["optim.epochs=3"]

Vectors are cached by `encode_store`, and a run whose config and metrics already exist is
reused, so re-running a grid only does the new cells.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mmnewsrec.evaluate.report import ReportInputs, RunResult, summarise, write_report
from mmnewsrec.files import write_json

if TYPE_CHECKING:
    from mmnewsrec.formats.store import Behaviors, Store
    from mmnewsrec.rank.ranker import TrainedRanker

logger = logging.getLogger(__name__)


class ExperimentError(ValueError):
    """An experiment file or a run that cannot be used."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EncoderSpec(_Strict):
    """Options of `encode_store` (see `mmnewsrec encode --help`)."""

    text_encoder: str | None = None
    text_fields: list[str] = ["category", "subcategory", "title"]
    image_encoder: str | None = None
    image_size: int | None = None
    joint_encoder: str | None = None
    fusion: str | None = None
    fusion_dim: int | None = None
    batch_size: int | None = None
    image_crop: tuple[int, int, int, int] | None = None  # left, top, right, bottom
    image_blank_std: float = 2.0


class RankerSpec(_Strict):
    """A ranker of the grid: a registry model, a preset and training overrides."""

    model: str
    preset: str | None = None
    overrides: list[str] = []
    per_encoder: bool = Field(True, description="false: independent of the vectors, run once")


class ExperimentConfig(_Strict):
    """A grid of encoders x rankers x seeds over one data set."""

    title: str = "mmnewsrec experiment"
    data_dir: Path | None = None
    store_dir: Path | None = None
    images: Path | None = None
    image_map: Path | None = None  # CSV news id -> image file stem (IM-MIND's projector.csv)
    image_map_columns: tuple[str, str] = ("nid", "IM-MIND-INDEX")
    out_dir: Path
    train_config: str = "train_cpu"
    train_overrides: list[str] = []
    seeds: list[int] = [0]
    train_split: str = "train"
    dev_split: str = "dev"
    recall_k: list[int] = [10, 50, 200]
    oracle: Path | None = None
    device: str = "auto"
    encoders: dict[str, EncoderSpec]
    rankers: dict[str, RankerSpec]

    @model_validator(mode="after")
    def _one_source(self) -> ExperimentConfig:
        if (self.data_dir is None) == (self.store_dir is None):
            raise ValueError("give exactly one of data_dir (raw MIND) and store_dir (a store)")
        if not self.encoders or not self.rankers or not self.seeds:
            raise ValueError("encoders, rankers and seeds must not be empty")
        return self


def load_experiment(path: Path) -> ExperimentConfig:
    """Read an experiment TOML file; relative paths are taken from the file's folder."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        config = ExperimentConfig.model_validate(raw)
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ExperimentError(f"{path}: {err}") from err
    except ValidationError as err:
        raise ExperimentError(f"{path}: invalid experiment\n{err}") from None
    base = path.parent.resolve()
    updates = {
        key: base / value
        for key in ("data_dir", "store_dir", "images", "image_map", "out_dir", "oracle")
        if (value := getattr(config, key)) is not None
    }
    return config.model_copy(update=updates)


# ------------------------------------------------------------------ single runs


def score_run(
    run_dir: Path, store_dir: Path | None, split: str, device: str = "cpu"
) -> tuple[TrainedRanker, Behaviors, np.ndarray]:
    """(ranker, behaviors, scores) of a trained run on one split of a store (default: the
    run's store)."""
    from mmnewsrec.formats.store import Store
    from mmnewsrec.formats.vectors import NewsVectors
    from mmnewsrec.rank.ranker import load_ranker

    ranker = load_ranker(run_dir, device)
    store = Store.load(store_dir or ranker.config.data.store_dir)
    vectors = NewsVectors.load(ranker.config.data.vectors_dir)
    trained_on = vectors.manifest["store"]["content_hash"]
    if store.content_hash != trained_on:
        raise ExperimentError(
            f"{store.path} is not the store the vectors of {run_dir} were encoded from "
            f"(store hash {store.content_hash[:12]}, vectors made from {trained_on[:12]}); "
            "news indices would not match"
        )
    behaviors = store.behaviors(split)
    signals = store.signals(split, ranker.signal_names) if ranker.signal_names else None
    return ranker, behaviors, ranker.score(behaviors, vectors, progress=True, signals=signals)


def evaluate_run(
    run_dir: Path, store_dir: Path | None = None, split: str = "dev", device: str = "cpu"
) -> dict[str, Any]:
    """Metrics of a run on a labelled split, also written to RUN_DIR/metrics.json with the
    split they report and the one that selected the checkpoint."""
    from mmnewsrec.metrics import evaluate_scores

    ranker, behaviors, scores = score_run(run_dir, store_dir, split, device)
    if not behaviors.labelled:
        raise ExperimentError(f"split {split!r} has no labels: use `predict` for it")
    labels, offsets = behaviors.candidate_labels, behaviors.candidate_offsets
    selection = ranker.selection
    peeked = selection["split"] == split
    if peeked:
        logger.warning(
            "%s: the checkpoint was selected on %r, the split reported: these metrics are "
            "optimistic (train with data.valid_split = 'last-day' for an unseen report)",
            run_dir, split,
        )  # fmt: skip
    metrics = {
        **evaluate_scores(scores, labels, offsets),
        "split": split,
        "selected_on": selection["split"],
        "selection": selection,
        "selected_on_reported_split": peeked,
    }
    write_json(Path(run_dir) / "metrics.json", metrics)
    return metrics


def run_store(run_dir: Path, store_dir: Path | None = None) -> Store:
    """The store at `store_dir`, else the one the run was trained on (from its config.json)."""
    from mmnewsrec.formats.runs import read_run_config
    from mmnewsrec.formats.store import Store

    return Store.load(store_dir or read_run_config(run_dir).data.store_dir)


def check_complete(store: Store, split: str, allow_drops: bool = False) -> None:
    """Refuse a split that lost impressions or candidates in `prepare` (news ids in no news.tsv):
    its prediction file would not rank every candidate, and the leaderboard rejects it."""
    store.behaviors(split)  # a KeyError naming the splits if there is no such split
    dropped = store.manifest["splits"][split]["dropped"]
    lost = f"{dropped['impressions']:,} impressions and {dropped['candidates']:,} candidates"
    if dropped["impressions"] or dropped["candidates"]:
        message = (
            f"split {split!r} of {store.path} lost {lost} in prepare ({dropped['unknown_ids']:,} "
            "news ids in no news.tsv), so a prediction file would not rank every candidate and "
            "the leaderboard would reject it"
        )
        if not allow_drops:
            raise ExperimentError(
                f"{message}; add the missing news and prepare again, or pass --allow-drops"
            )
        logger.warning("%s; writing it anyway (--allow-drops)", message)
    if dropped["history"]:
        logger.warning(
            "split %r: %d history clicks on unknown news were dropped", split, dropped["history"]
        )


def predict_run(
    run_dir: Path,
    store_dir: Path | None,
    out: Path,
    split: str,
    zip: bool = False,
    device: str = "cpu",
    allow_drops: bool = False,
) -> Path:
    """Write a leaderboard prediction file (ranks per impression) for a split.

    A split with dropped impressions or candidates is refused unless `allow_drops`
    (see `check_complete`); the file is checked before it is written (see `write_prediction`).
    """
    from mmnewsrec.evaluate.leaderboard import write_prediction
    from mmnewsrec.metrics import ranks_from_scores

    check_complete(run_store(run_dir, store_dir), split, allow_drops)
    _, behaviors, scores = score_run(run_dir, store_dir, split, device)
    ranks = ranks_from_scores(scores, behaviors.candidate_offsets)
    return write_prediction(
        out, behaviors.impression_ids, ranks, behaviors.candidate_offsets, zip=zip
    )


def oracle_auc(oracle: Path, store_dir: Path, split: str) -> float:
    """Dev AUC of the true click probabilities of a synthetic data set (oracle.tsv)."""
    import polars as pl

    from mmnewsrec.formats.store import Store
    from mmnewsrec.metrics import evaluate_scores

    store = Store.load(store_dir)
    behaviors = store.behaviors(split)
    table = pl.read_csv(oracle, separator="\t", schema_overrides={"news_id": pl.String})
    sizes = np.diff(behaviors.candidate_offsets)
    candidates = pl.DataFrame(
        {
            "impression_id": np.repeat(np.asarray(behaviors.impression_ids), sizes),
            "news_id": store.news_ids[np.asarray(behaviors.candidate_items)],
        }
    )
    joined = candidates.join(
        table, on=["impression_id", "news_id"], how="left", maintain_order="left"
    )
    probability = joined["probability"]
    if probability.null_count():
        raise ExperimentError(
            f"{oracle}: {probability.null_count()} candidates have no probability"
        )
    return evaluate_scores(
        probability.to_numpy(), behaviors.candidate_labels, behaviors.candidate_offsets
    )["auc"]


# ------------------------------------------------------------------ the grid


def run_experiment(config: ExperimentConfig, config_path: Path | None = None) -> Path:
    """Run the grid, reuse what is done, and write OUT/report.md; return its path."""
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    store_dir, summary = _prepare(config)
    vectors_dirs = {name: _encode(config, store_dir, name) for name in config.encoders}
    recall = {name: _recall(store_dir, path, config) for name, path in vectors_dirs.items()}
    results = []
    for ranker_name, ranker in config.rankers.items():
        encoders = list(config.encoders) if ranker.per_encoder else [next(iter(config.encoders))]
        for encoder in encoders:
            for seed in config.seeds:
                label = encoder if ranker.per_encoder else "-"
                run_dir = out / "runs" / ranker_name / (encoder if ranker.per_encoder else "any")
                run_dir = run_dir / f"seed{seed}"
                metrics = _train(config, ranker, store_dir, vectors_dirs[encoder], run_dir, seed)
                results.append(RunResult(label, ranker_name, seed, metrics, run_dir / "log.csv"))
    oracle = _oracle(config, store_dir)
    minutes = (time.perf_counter() - started) / 60
    inputs = ReportInputs(
        title=config.title,
        data_summary=summary,
        commands=_commands(config, config_path, store_dir, vectors_dirs),
        oracle_auc=oracle,
        recall_at_k=recall,
        notes=[f"Grid run in {minutes:.1f} min (cached stages are not re-run)."],
    )
    write_json(out / "results.json", [_row(r) for r in summarise(results)])
    return write_report(out, results, inputs)


def _prepare(config: ExperimentConfig) -> tuple[Path, str]:
    from mmnewsrec.data.store import build_store
    from mmnewsrec.formats.store import Store

    if config.store_dir is not None:
        return config.store_dir, Store.load(config.store_dir).summary()
    assert config.data_dir is not None  # the config holds exactly one of the two
    store_dir = config.out_dir / "store"
    store = build_store(
        config.data_dir,
        store_dir,
        images=config.images,
        image_map=config.image_map,
        image_map_columns=config.image_map_columns,
    )
    return store_dir, store.summary()


def _encode(config: ExperimentConfig, store_dir: Path, name: str) -> Path:
    from mmnewsrec.encode.pipeline import EncodeConfig, encode_store

    spec = config.encoders[name].model_dump()
    spec["text_fields"] = tuple(spec["text_fields"])
    out = config.out_dir / "vectors" / name
    encode_store(store_dir, out, EncodeConfig(device=config.device, **spec))
    return out


def _recall(store_dir: Path, vectors_dir: Path, config: ExperimentConfig) -> dict[int, float]:
    from mmnewsrec.formats.store import Store
    from mmnewsrec.formats.vectors import NewsVectors
    from mmnewsrec.recall import Recaller

    behaviors = Store.load(store_dir).behaviors(config.dev_split)
    recaller = Recaller(k=max(config.recall_k)).fit(NewsVectors.load(vectors_dir).vectors)
    return {k: recaller.recall_at_k(behaviors, k) for k in config.recall_k}


def _train(
    config: ExperimentConfig,
    ranker: RankerSpec,
    store_dir: Path,
    vectors_dir: Path,
    run_dir: Path,
    seed: int,
) -> dict[str, float]:
    from mmnewsrec.config import load_config
    from mmnewsrec.rank.train import run_training

    values = {
        "data.store_dir": store_dir,
        "data.vectors_dir": vectors_dir,
        "data.train_split": config.train_split,
        "data.dev_split": config.dev_split,
        "model.name": ranker.model,
        "model.preset": ranker.preset,
        "run.out_dir": run_dir,
        "run.seed": seed,
        "run.device": config.device,
    }
    overrides = [*config.train_overrides, *ranker.overrides]
    train_config = load_config(config.train_config, overrides, values).resolved()
    metrics_path, config_path = run_dir / "metrics.json", run_dir / "config.json"
    same = config_path.exists() and json.loads(config_path.read_text()) == train_config.to_dict()
    if same and metrics_path.exists():
        logger.info("reusing %s", run_dir)
        return json.loads(metrics_path.read_text())
    if run_dir.exists() and not same:
        logger.warning("%s holds a run of another configuration: starting it again", run_dir)
        shutil.rmtree(run_dir)
    run_training(train_config, resume=same)
    return evaluate_run(run_dir, split=config.dev_split, device=str(config.device))


def _oracle(config: ExperimentConfig, store_dir: Path) -> float | None:
    path = config.oracle
    if path is None and config.data_dir is not None:
        path = config.data_dir / config.dev_split / "oracle.tsv"
    if path is None or not path.exists():
        return None
    return oracle_auc(path, store_dir, config.dev_split)


def _commands(
    config: ExperimentConfig,
    config_path: Path | None,
    store_dir: Path,
    vectors_dirs: dict[str, Path],
) -> list[str]:
    q = shlex.quote
    lines = []
    if config_path is not None:
        lines += ["# the whole grid:", f"mmnewsrec experiment {q(str(config_path))}", ""]
    lines.append("# or stage by stage, e.g.:")
    if config.data_dir is not None:
        lines.append(f"mmnewsrec prepare {q(str(config.data_dir))} --out {q(str(store_dir))}")
    for name, path in vectors_dirs.items():
        spec = config.encoders[name]
        flags = " ".join(
            f"--{key.replace('_', '-')} {q(','.join(v) if isinstance(v, list) else str(v))}"
            for key, v in spec.model_dump(exclude_defaults=True).items()
        )
        lines.append(f"mmnewsrec encode {q(str(store_dir))} --out {q(str(path))} {flags}".rstrip())
    first_ranker, first = next(iter(config.rankers.items()))
    run = config.out_dir / "runs" / first_ranker
    vectors = next(iter(vectors_dirs.values()))
    preset = [f"model.preset={first.preset}"] if first.preset else []
    overrides = [*config.train_overrides, *first.overrides, *preset]
    sets = " ".join(f"--set {q(o)}" for o in overrides)
    lines.append(
        f"mmnewsrec train --config {q(config.train_config)} --store {q(str(store_dir))} "
        f"--vectors {q(str(vectors))} --model {first.model} --out {q(str(run))} {sets}".rstrip()
    )
    lines.append(f"mmnewsrec evaluate {q(str(run))}")
    return lines


def _row(row: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
