"""Evaluate trained runs, write leaderboard predictions, and run experiment grids.

An experiment file (TOML) declares encoders x rankers x seeds over one data set:

    title = "text vs text+image"
    data_dir = "data/synth"        # raw MIND folder (prepared into OUT/store), or store_dir = ...
    out_dir = "experiments/synth"
    train_config = "train_cpu"     # base training config: a shipped name or a path
    train_overrides = ["optim.epochs=2"]
    seeds = [0, 1]
    recall_k = [10, 50, 200]
    jobs = 2                       # training runs at a time (processes sharing the CPU threads)
    baseline = "popularity"        # a ranker ("ranker/encoder" if per encoder): compared with
    recall_popular_share = 0.1     # of K, for the popularity/freshness channel (0: content only)

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
    [rankers.transformer_content]  # content only, on the text_image vectors only
    model = "fast_rec_transformer"
    overrides = ["model.signals=[]"]
    encoders = ["text_image"]

Vectors are cached by `encode_store` (their text and image parts in OUT/parts, shared by the
encoders, so a text model is run once for all the encoders that use it), and a run whose config
and metrics already exist is reused, so re-running a grid only does the new cells.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import tomllib
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mmnewsrec.evaluate.report import ReportInputs, RunResult, summarise, write_report
from mmnewsrec.files import write_columns, write_json
from mmnewsrec.metrics import METRICS

if TYPE_CHECKING:
    from mmnewsrec.formats.store import Behaviors, Store
    from mmnewsrec.formats.vectors import NewsVectors
    from mmnewsrec.rank.ranker import TrainedRanker

logger = logging.getLogger(__name__)

IMPRESSIONS_FILE = "impressions.parquet"  # per-impression metrics of a run, beside metrics.json


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
    encoders: list[str] | None = Field(None, description="the encoders it runs on; None: all")


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
    recall_popular_share: float | None = Field(None, ge=0.0, le=1.0)  # None: the default
    oracle: Path | None = None
    device: str = "auto"
    jobs: int = Field(1, ge=1, description="training runs at a time, each in its own process")
    baseline: str | None = Field(
        None, description="row every row is compared with: RANKER[/ENCODER]"
    )
    encoders: dict[str, EncoderSpec]
    rankers: dict[str, RankerSpec]

    @model_validator(mode="after")
    def _one_source(self) -> ExperimentConfig:
        if (self.data_dir is None) == (self.store_dir is None):
            raise ValueError("give exactly one of data_dir (raw MIND) and store_dir (a store)")
        if not self.encoders or not self.rankers or not self.seeds:
            raise ValueError("encoders, rankers and seeds must not be empty")
        for name, ranker_spec in self.rankers.items():
            unknown = sorted(set(ranker_spec.encoders or []) - set(self.encoders))
            if unknown or ranker_spec.encoders == []:
                raise ValueError(f"rankers.{name}.encoders: {unknown or '[]'} names no encoder")
            if ranker_spec.encoders is not None and not ranker_spec.per_encoder:
                raise ValueError(f"rankers.{name}: per_encoder = false runs once, name no encoders")
        if self.baseline is not None:
            ranker, _, encoder = self.baseline.partition("/")
            spec = self.rankers.get(ranker)
            runs_on = (spec.encoders or list(self.encoders)) if spec is not None else []
            if spec is None or (encoder and encoder not in runs_on):
                raise ValueError(
                    f"baseline {self.baseline!r} names no ranker[/encoder] of the grid"
                )
            if spec.per_encoder and len(runs_on) > 1 and not encoder:
                raise ValueError(f"baseline {self.baseline!r}: name its encoder, RANKER/ENCODER")
            if encoder and not spec.per_encoder:
                raise ValueError(f"baseline {self.baseline!r}: {ranker} runs once, name no encoder")
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
    """Score a labelled split with a run: what `mmnewsrec evaluate` does.

    Args:
        run_dir: A run folder written by `train`.
        store_dir: The store to score (default: the run's own).
        split: A labelled split of the store.
        device: Where the model scores.

    Returns:
        The metrics of [`evaluate_scores`][mmnewsrec.metrics.evaluate_scores] with `split`
            (reported), `selected_on` (the split that chose the checkpoint), `selection`,
            `selected_on_reported_split`, and the beyond-accuracy metrics and breakdowns of
            its top-10 lists (`beyond_accuracy.describe_rankings`); also written to
            RUN_DIR/metrics.json, the per-impression metrics to RUN_DIR/impressions.parquet
            (for paired comparisons of runs).
    """
    ranker, behaviors, scores = score_run(run_dir, store_dir, split, device)
    if not behaviors.labelled:
        raise ExperimentError(f"split {split!r} has no labels: use `predict` for it")
    described, per_impression = _describe(ranker, run_store(run_dir, store_dir), split, scores)
    selection = ranker.selection
    peeked = selection["split"] == split
    if peeked:
        logger.warning(
            "%s: the checkpoint was selected on %r, the split reported: these metrics are "
            "optimistic (train with data.valid_split = 'auto' for an unseen report)",
            run_dir, split,
        )  # fmt: skip
    scored = ~np.isnan(per_impression["auc"])
    metrics = {
        **{name: float(per_impression[name][scored].mean()) for name in METRICS},
        "impressions": int(scored.sum()),
        "skipped": int((~scored).sum()),
        "split": split,
        "selected_on": selection["split"],
        "selection": selection,
        "selected_on_reported_split": peeked,
        **described,
    }
    write_columns(Path(run_dir) / IMPRESSIONS_FILE, per_impression)
    write_json(Path(run_dir) / "metrics.json", metrics)
    return metrics


def _describe(
    ranker: TrainedRanker, store: Store, split: str, scores: np.ndarray
) -> tuple[dict, dict[str, np.ndarray]]:
    """`describe_rankings` of a run's scores on a split of `store`; diversity over the first
    part of the run's news vectors (the text part of a concat fusion), so that rows with and
    without an image part are measured in the same space."""
    from mmnewsrec.evaluate.beyond_accuracy import describe_rankings, store_arrays
    from mmnewsrec.formats.vectors import NewsVectors
    from mmnewsrec.recall.space import vector_parts

    vectors = NewsVectors.load(ranker.config.data.vectors_dir)
    first = vector_parts(vectors.manifest, vectors.dim)[0]
    return describe_rankings(
        scores,
        store.behaviors(split),
        vectors.vectors[:, first.start : first.stop],
        news_with_image(store, [vectors]),
        *store_arrays(store, split, ranker.config.data.train_split),
    )


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
    """Write a leaderboard prediction file for a split: what `mmnewsrec predict` does.

    Each line is `impression_id [r1,r2,...]`, the ranks of the impression's candidates in
    their order. The text is checked (one line per impression, in order, each a permutation
    of 1..n) before it is written.

    Args:
        run_dir: A run folder written by `train`.
        store_dir: The store to rank (default: the run's own).
        out: The file to write.
        split: The split to rank, labelled or not.
        zip: Write a zip holding `prediction.txt` instead.
        device: Where the model scores.
        allow_drops: Write the file even if `prepare` dropped impressions or candidates of the
            split (the leaderboard rejects such a file).

    Returns:
        The written file.

    Raises:
        ExperimentError: The split lost impressions or candidates in `prepare`.
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


@dataclass(frozen=True)
class Cell:
    """One training run of the grid."""

    label: str  # the encoder, or "-" for a ranker independent of the vectors
    ranker_name: str
    ranker: RankerSpec
    encoder: str
    seed: int
    run_dir: Path

    def describe(self) -> str:
        """Encoder, ranker and seed, as a progress bar names the run."""
        return f"{self.label} {self.ranker_name} seed{self.seed}"


def grid_cells(config: ExperimentConfig) -> list[Cell]:
    """The runs of the grid in the file's order: rankers, then encoders, then seeds."""
    cells = []
    for ranker_name, ranker in config.rankers.items():
        encoders = list(ranker.encoders or config.encoders)
        if not ranker.per_encoder:
            encoders = encoders[:1]
        for encoder in encoders:
            folder = (
                config.out_dir / "runs" / ranker_name / (encoder if ranker.per_encoder else "any")
            )
            label = encoder if ranker.per_encoder else "-"
            cells += [
                Cell(label, ranker_name, ranker, encoder, seed, folder / f"seed{seed}")
                for seed in config.seeds
            ]
    return cells


class Stopwatch:
    """Wall and CPU seconds (this process) of named phases, in order."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.add(name, time.perf_counter() - wall, time.process_time() - cpu)

    def add(self, name: str, wall_s: float, cpu_s: float) -> None:
        self.phases[name] = {"wall_s": round(wall_s, 3), "cpu_s": round(cpu_s, 3)}

    def summary(self) -> str:
        """'prepare 1.2 s, encode minilm 6.3 s, ...' (wall clock)."""
        return ", ".join(f"{name} {t['wall_s']:.1f} s" for name, t in self.phases.items())


def run_experiment(
    config: ExperimentConfig, config_path: Path | None = None, watch: Stopwatch | None = None
) -> Path:
    """Run the grid, reuse what is done, and write OUT/report.md, OUT/results.json and
    OUT/timings.json (wall and CPU seconds per phase, after those already in `watch`); return
    the report's path."""
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    watch = watch or Stopwatch()
    started = time.perf_counter()
    with watch.phase("prepare"):
        store_dir, summary = _prepare(config)
    vectors_dirs = {}
    for name in config.encoders:
        with watch.phase(f"encode {name}"):
            vectors_dirs[name] = _encode(config, store_dir, name)
    with watch.phase("recall"):
        from mmnewsrec.formats.store import Store
        from mmnewsrec.formats.vectors import NewsVectors

        store = Store.load(store_dir)
        vectors = {name: NewsVectors.load(path) for name, path in vectors_dirs.items()}
        has_image = news_with_image(store, vectors.values())
        recall = {name: _recall(store, v, config, has_image) for name, v in vectors.items()}
        clicked_share = clicked_image_share(store, config.dev_split, has_image)
    cells = grid_cells(config)
    with watch.phase("train"):
        trained = _train_cells(config, cells, store_dir, vectors_dirs)
    results = []
    for cell, (metrics, wall_s, cpu_s) in zip(cells, trained, strict=True):
        watch.add(f"train {cell.ranker_name} {cell.label} seed{cell.seed}", wall_s, cpu_s)
        results.append(
            RunResult(cell.label, cell.ranker_name, cell.seed, metrics, cell.run_dir / "log.csv")
        )
    with watch.phase("report"):
        oracle = _oracle(config, store_dir)
        inputs = ReportInputs(
            title=config.title,
            data_summary=summary,
            commands=_commands(config, config_path, store_dir, vectors_dirs, cells),
            oracle_auc=oracle,
            recall_at_k={
                name: {k: s["recall"] for k, s in r.items()} for name, r in recall.items()
            },
            recall_image_share={
                name: {k: s["image_share"] for k, s in r.items()} for name, r in recall.items()
            },
            clicked_image_share=clicked_share,
            recall_note=_recall_note(config),
        )
        inputs.significance, inputs.significance_note = significance(config, cells, results)
        rows = [
            {**row, **inputs.significance.get((row["encoder"], row["ranker"]), {})}
            for row in summarise(results)
        ]
        write_json(out / "results.json", [_row(r) for r in rows])
        minutes = (time.perf_counter() - started) / 60
        inputs.notes.append(
            f"Grid run in {minutes:.1f} min (cached stages are not re-run; {config.jobs} "
            f"training job(s) at a time): {watch.summary()}."
        )
        report = write_report(out, results, inputs)
    write_json(out / "timings.json", {"jobs": config.jobs, "phases": watch.phases})
    return report


def significance(
    config: ExperimentConfig, cells: list[Cell], results: list[RunResult]
) -> tuple[dict[tuple[str, str], dict], str]:
    """Paired comparisons of the table's rows (`significance.compare_table`) from the runs'
    per-impression metrics (seed means), keyed by (encoder, ranker), and a note saying how."""
    from mmnewsrec.evaluate.significance import ALPHA, RESAMPLES, compare_table

    rows = summarise(results)
    runs: dict[tuple[str, str], list[Path]] = {}
    for cell in cells:
        runs.setdefault((cell.label, cell.ranker_name), []).append(cell.run_dir)
    per_row = [seed_means(runs[row["encoder"], row["ranker"]]) for row in rows]
    values = {m: np.stack([table[m] for table in per_row], axis=1) for m in METRICS}
    scored = ~np.isnan(values["auc"]).any(axis=1)
    values = {m: v[scored] for m, v in values.items()}
    std = {m: np.array([row[f"{m}_std"] for row in rows]) for m in METRICS}
    seeds = np.array([row["seeds"] for row in rows])
    baseline = _baseline_row(config.baseline, rows)
    table = compare_table(values, std, seeds, baseline)
    for entry in table[1:]:
        entry["tied_with_best"] = not entry["auc_vs_best"]["significant"]
    comparisons = len(table[0]) + sum(len(entry) - 1 for entry in table[1:])
    against = f" and the baseline ({config.baseline})" if baseline is not None else ""
    note = (
        f"Each row against the best row{against}: mean difference over {int(scored.sum()):,} "
        f"scored impressions (seed means), 95% paired-bootstrap interval ({RESAMPLES:,} "
        f"resamples), paired t-test p-value with Holm's correction over the table's "
        f"{comparisons} comparisons (AUC, MRR, nDCG@5, nDCG@10 in results.json). ≈ and n.s.: "
        f"not significant at {ALPHA:g}. Larger noise: whether the spread over seeds or over "
        "impressions gives the difference the larger standard error (- : one seed)."
    )
    return {(row["encoder"], row["ranker"]): e for row, e in zip(rows, table, strict=True)}, note


def seed_means(run_dirs: list[Path]) -> dict[str, np.ndarray]:
    """Per-impression metrics of one row: the mean over its runs (seeds) of their
    impressions.parquet, which must list the same impressions."""
    import polars as pl

    tables = [
        pl.read_parquet(d / IMPRESSIONS_FILE, columns=["impression_id", *METRICS]) for d in run_dirs
    ]
    ids = tables[0]["impression_id"].to_numpy()
    for run_dir, table in zip(run_dirs, tables, strict=True):
        if not np.array_equal(table["impression_id"].to_numpy(), ids):
            raise ExperimentError(
                f"{run_dir / IMPRESSIONS_FILE}: other impressions than {run_dirs[0]}"
            )
    return {m: np.mean([t[m].to_numpy() for t in tables], axis=0) for m in METRICS}


def _baseline_row(baseline: str | None, rows: list[dict]) -> int | None:
    """Index of the row the baseline names (RANKER or RANKER/ENCODER)."""
    if baseline is None:
        return None
    ranker, _, encoder = baseline.partition("/")
    return next(
        i
        for i, row in enumerate(rows)
        if row["ranker"] == ranker and (not encoder or row["encoder"] == encoder)
    )


def _train_cells(
    config: ExperimentConfig, cells: list[Cell], store_dir: Path, vectors_dirs: dict[str, Path]
) -> list[tuple[dict[str, float], float, float]]:
    """(metrics, wall s, CPU s) of every cell, in order; `config.jobs` processes at a time, each
    with an equal share of torch's threads (one process: in this one)."""
    args = [
        (config, c.ranker, store_dir, vectors_dirs[c.encoder], c.run_dir, c.seed, c.describe())
        for c in cells
    ]
    if config.jobs == 1:
        return [_timed_train(*a) for a in args]
    import multiprocessing

    import torch

    threads = max(1, torch.get_num_threads() // config.jobs)
    level = logging.getLogger().getEffectiveLevel()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        config.jobs,
        mp_context=context,
        initializer=_init_worker,
        initargs=(threads, level, context.Value("i", 0)),
    ) as pool:
        futures = [pool.submit(_timed_train, *a) for a in args]
        return [future.result() for future in futures]


_worker_slot = 0  # this training process's number among the experiment's jobs: its bar's line


def _init_worker(threads: int, log_level: int, slots: Any) -> None:
    """Set up a training process: its share of threads, logging, and a slot of its own."""
    import torch

    global _worker_slot
    with slots.get_lock():
        _worker_slot, slots.value = slots.value, slots.value + 1
    torch.set_num_threads(threads)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")


def _timed_train(*args: Any) -> tuple[dict[str, float], float, float]:
    """`_train` with its wall and CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    metrics = _train(*args)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    logger.info("%s: AUC %.4f (%.1f s)", args[4], metrics["auc"], wall)
    return metrics, wall, cpu


def _prepare(config: ExperimentConfig) -> tuple[Path, str]:
    from mmnewsrec.data.store import build_store
    from mmnewsrec.formats.store import Store

    if config.store_dir is not None:
        return config.store_dir, Store.load(config.store_dir).summary()
    params = prepare_params(config)
    store = build_store(**params)
    return params["out"], store.summary()


# Each stage's parameters are named as `mmnewsrec <stage>` names them: the stage runs with
# them and the report prints them (`reproduce.command_line`), so the two cannot differ.


def prepare_params(config: ExperimentConfig) -> dict[str, Any]:
    """`build_store`'s arguments, as `mmnewsrec prepare`'s parameters."""
    return {
        "data_dir": config.data_dir,
        "out": config.out_dir / "store",
        "images": config.images,
        "image_map": config.image_map,
        "image_map_columns": config.image_map_columns,
    }


def encode_params(config: ExperimentConfig, store_dir: Path, name: str) -> dict[str, Any]:
    """`encode_store`'s arguments and EncodeConfig fields, as `mmnewsrec encode`'s
    parameters; the parts folder is shared: encoders with the same text model encode it once."""
    spec = config.encoders[name].model_dump()
    return {
        "store_dir": store_dir,
        "out": config.out_dir / "vectors" / name,
        "parts_dir": config.out_dir / "parts",
        "device": config.device,
        **spec,
        "text_fields": tuple(spec["text_fields"]),
    }


def _encode(config: ExperimentConfig, store_dir: Path, name: str) -> Path:
    from mmnewsrec.encode.pipeline import EncodeConfig, encode_store

    options = encode_params(config, store_dir, name)
    store, out, parts = (options.pop(key) for key in ("store_dir", "out", "parts_dir"))
    encode_store(store, out, EncodeConfig(**options), parts_dir=parts)
    return out


def _recall(
    store: Store, vectors: NewsVectors, config: ExperimentConfig, has_image: np.ndarray
) -> dict[int, dict[str, float]]:
    """Per K: recall@K on the dev split and the share of recalled news with an image
    (`has_image`), with the recaller fitted as serving fits it."""
    from mmnewsrec.recall import DEFAULT_POPULAR_SHARE, Recaller

    share = config.recall_popular_share
    recaller = Recaller(
        k=max(config.recall_k),
        popular_share=DEFAULT_POPULAR_SHARE if share is None else share,
    )
    recaller.fit_store(vectors, store, config.train_split)
    behaviors = store.behaviors(config.dev_split)
    return recaller.recall_stats(behaviors, config.recall_k, has_image)


def _recall_note(config: ExperimentConfig) -> str:
    from mmnewsrec.recall import DEFAULT_POPULAR_SHARE, EXACT_MAX_NEWS, Recaller

    share = config.recall_popular_share
    share = DEFAULT_POPULAR_SHARE if share is None else share
    return (
        "Each part of the news vectors (text, image) centred on its mean and unit-scaled, the"
        f" image part weighted {Recaller().image_weight:g}; {100 * share:g}% of K from the"
        " popularity/freshness channel. Searched as `serve` searches: exactly up to"
        f" {EXACT_MAX_NEWS:,} news, in an HNSW graph (approximate) beyond. Image share: news"
        " with an image among all recalled news."
    )


def news_with_image(store: Store, vectors: Iterable[NewsVectors] = ()) -> np.ndarray:
    """(N+1,) bool (row 0, padding: False): the news with an image as the image encoders of
    `vectors` found it (an IM-MIND card whose photo box is blank has none), or, when none of
    them read images, the news the store has an image file for."""
    found = [np.asarray(v.has_image, dtype=bool) for v in vectors if v.manifest.get("image")]
    if found:
        return np.logical_or.reduce(found)
    return np.concatenate([[False], store.news["image_path"].is_not_null().to_numpy()])


def clicked_image_share(store: Store, split: str, has_image: np.ndarray | None = None) -> float:
    """Share of the clicked candidates of `split` that have an image (`has_image`, by default
    the store's image files)."""
    has_image = news_with_image(store) if has_image is None else has_image
    behaviors = store.behaviors(split)
    clicked = np.asarray(behaviors.candidate_items)[np.asarray(behaviors.candidate_labels) == 1]
    return float(has_image[clicked].mean()) if len(clicked) else float("nan")


def _train(
    config: ExperimentConfig,
    ranker: RankerSpec,
    store_dir: Path,
    vectors_dir: Path,
    run_dir: Path,
    seed: int,
    label: str | None = None,
) -> dict[str, float]:
    """Train one cell (or reuse its run) and evaluate it; `label` names its progress bar."""
    from mmnewsrec.config import load_config
    from mmnewsrec.rank.train import run_training

    values, overrides = train_inputs(config, ranker, store_dir, vectors_dir, run_dir, seed)
    train_config = load_config(config.train_config, overrides, values).resolved()
    metrics_path, config_path = run_dir / "metrics.json", run_dir / "config.json"
    same = config_path.exists() and json.loads(config_path.read_text()) == train_config.to_dict()
    if same and metrics_path.exists():
        logger.info("reusing %s", run_dir)
        if not (run_dir / IMPRESSIONS_FILE).exists():  # trained before they were kept
            return evaluate_run(**evaluate_params(config, run_dir))
        return json.loads(metrics_path.read_text())
    if run_dir.exists() and not same:
        logger.warning("%s holds a run of another configuration: starting it again", run_dir)
        shutil.rmtree(run_dir)
    run_training(train_config, same, bar_label=label, bar_position=_worker_slot)
    return evaluate_run(**evaluate_params(config, run_dir))


def train_inputs(
    config: ExperimentConfig,
    ranker: RankerSpec,
    store_dir: Path,
    vectors_dir: Path,
    run_dir: Path,
    seed: int,
) -> tuple[dict[str, Any], list[str]]:
    """The values and the overrides of `load_config(config.train_config, overrides, values)`
    for one cell (see `reproduce.train_command`)."""
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
    return values, [*config.train_overrides, *ranker.overrides]


def evaluate_params(config: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """`evaluate_run`'s arguments, as `mmnewsrec evaluate`'s parameters."""
    return {"run_dir": run_dir, "split": config.dev_split, "device": str(config.device)}


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
    cells: list[Cell],
) -> list[str]:
    """The Reproduce block: the whole grid, then every stage with the values it ran with."""
    from mmnewsrec.evaluate.reproduce import command_line, train_command

    lines = []
    if config_path is not None:
        lines += ["# the whole grid:", command_line("experiment", config=config_path), ""]
    lines.append("# or stage by stage, with the values the grid ran with:")
    if config.data_dir is not None:
        lines.append(command_line("prepare", **prepare_params(config)))
    lines += [command_line("encode", **encode_params(config, store_dir, n)) for n in vectors_dirs]
    for cell in cells:
        vectors = vectors_dirs[cell.encoder]
        values, overrides = train_inputs(
            config, cell.ranker, store_dir, vectors, cell.run_dir, cell.seed
        )
        lines.append(train_command(config.train_config, values, overrides))
        lines.append(command_line("evaluate", **evaluate_params(config, cell.run_dir)))
    return lines


def _row(row: dict) -> dict:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
