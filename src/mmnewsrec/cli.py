"""The `mmnewsrec` command line. Each command is a thin shell over a library function.

Heavy modules (torch, transformers, polars) are imported inside the commands so that
`mmnewsrec --help` stays fast.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:
    from mmnewsrec.serve import Recommender

app = typer.Typer(
    help="Multimodal news recommendation on MIND-format data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

Dir = Annotated[Path, typer.Argument(help="A directory.")]
RunDir = Annotated[Path, typer.Argument(help="Run directory written by `train`.")]
Device = Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Multimodal news recommendation on MIND-format data."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )


def fail(message: str) -> NoReturn:
    """Print a user-facing error and exit with status 2."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


# ---------------------------------------------------------------------------- data


ImageLayout = Annotated[
    str,
    typer.Option(
        help="plain (images/<news_id>.jpg) or im-mind (610 x 195 cards named by index, "
        "projector.csv).",
    ),
]


@app.command()
def synth(
    out: Annotated[Path, typer.Option(help="Output directory (train/, dev/, images/).")],
    news: Annotated[int, typer.Option(help="Number of news items.")] = 3000,
    users: Annotated[int, typer.Option(help="Number of users.")] = 2500,
    impressions: Annotated[int, typer.Option(help="Impressions, train and dev together.")] = 15000,
    seed: Annotated[int, typer.Option(help="Random seed; output is byte-identical per seed.")] = 0,
    quick: Annotated[bool, typer.Option(help="Small set: 500 news, 300 users.")] = False,
    image_layout: ImageLayout = "plain",
) -> None:
    """Write a deterministic synthetic MIND-format data set with images and an oracle."""
    from mmnewsrec.data.synthetic import SynthConfig, generate

    try:
        config = (
            SynthConfig.quick(seed)
            if quick
            else SynthConfig(news=news, users=users, impressions=impressions, seed=seed)
        )
        summary = generate(out, config, image_layout)
    except (ValueError, FileExistsError) as err:
        fail(str(err))
    typer.echo(summary)


@app.command()
def download(
    name: Annotated[str, typer.Argument(help="demo, small or large.")],
    out: Annotated[Path, typer.Option(help="Output directory (train/, dev/[, test/]).")],
    base_url: Annotated[
        str | None, typer.Option(help="Mirror of the MIND archives, instead of the public hosts.")
    ] = None,
) -> None:
    """Download and extract an official MIND archive set (resumable, verified)."""
    from mmnewsrec.data.download import DownloadError, download_mind

    try:
        path = download_mind(name, out, base_url=base_url)
    except DownloadError as err:
        fail(str(err))
    typer.echo(f"MIND {name} ready in {path}")


@app.command()
def prepare(
    data_dir: Dir,
    out: Annotated[Path, typer.Option(help="Store directory to write.")],
    images: Annotated[
        Path | None,
        typer.Option(help="Folder of <news_id>.jpg/png, or of the files --image-map names."),
    ] = None,
    image_map: Annotated[
        Path | None,
        typer.Option(help="CSV giving each news id its image file stem (IM-MIND's projector.csv)."),
    ] = None,
    image_map_columns: Annotated[
        str, typer.Option(help="NID,IMAGE: the image map's news id and file stem columns.")
    ] = "nid,IM-MIND-INDEX",
    strict: Annotated[bool, typer.Option(help="Unknown news ids in behaviors are errors.")] = False,
    split: Annotated[
        str | None, typer.Option(help="Split name of a single-split DATA_DIR (default train).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if the store is up to date.")] = False,
    allow_drops: Annotated[
        bool,
        typer.Option(
            help="Drop unknown candidate ids of an unlabelled (test) split instead of failing; "
            "`predict` then refuses that split unless also given --allow-drops."
        ),
    ] = False,
) -> None:
    """Parse and validate MIND tsv files into a compact, memory-mapped store."""
    from mmnewsrec.data.mind import MindFormatError
    from mmnewsrec.data.store import build_store
    from mmnewsrec.formats.store import StoreError

    columns = [column.strip() for column in image_map_columns.split(",")]
    if len(columns) != 2 or not all(columns):
        fail(f"--image-map-columns: expected NID,IMAGE, got {image_map_columns!r}")
    map_columns = (columns[0], columns[1])
    try:
        store = build_store(
            data_dir,
            out,
            images=images,
            strict=strict,
            split=split,
            force=force,
            allow_drops=allow_drops,
            image_map=image_map,
            image_map_columns=map_columns,
        )
    except (MindFormatError, StoreError) as err:
        fail(str(err))
    typer.echo(store.summary())


# ---------------------------------------------------------------------------- encode


@app.command()
def encode(
    store_dir: Dir,
    out: Annotated[
        Path, typer.Option(help="Folder for vectors.npy, has_image.npy, manifest.json.")
    ],
    text_encoder: Annotated[
        str | None,
        typer.Option(
            help="sentence-transformers or Hugging Face text model, hub id or path; 'none' = "
            "off (default: all-MiniLM-L6-v2, shipped)."
        ),
    ] = None,
    text_fields: Annotated[
        str, typer.Option(help="Comma-separated, in order: title, abstract, category, subcategory.")
    ] = "category,subcategory,title",
    image_encoder: Annotated[
        str | None,
        typer.Option(
            help="efficientnet-lite0 or a Hugging Face vision model (DINOv2, ViT, CLIP); 'none' "
            "= off (default: efficientnet-lite0 if the store has images)."
        ),
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Input size of efficientnet-lite0 (default: 224).")
    ] = None,
    joint_encoder: Annotated[
        str | None, typer.Option(help="CLIP or BLIP model giving both the text and image vectors.")
    ] = None,
    fusion: Annotated[
        str | None,
        typer.Option(
            help="concat, hadamard, mean, text or image (default: concat, or the one side)."
        ),
    ] = None,
    fusion_dim: Annotated[
        int | None, typer.Option(help="Width for hadamard/mean (default: the smaller side).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the hadamard/mean projection.")] = 0,
    batch_size: Annotated[
        int | None, typer.Option(help="Inputs per model call (default: 64 on CPU, 256 on GPU).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    precision: Annotated[
        str, typer.Option(help="auto (bf16/fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16.")
    ] = "auto",
    image_crop: Annotated[
        str | None,
        typer.Option(
            help="LEFT,TOP,RIGHT,BOTTOM box cut from each image first (IM-MIND cover photo: "
            "15,15,215,180); default: the whole image."
        ),
    ] = None,
    image_blank_std: Annotated[
        float,
        typer.Option(help="A crop whose grey levels (0-255) vary by at most this std is no image."),
    ] = 2.0,
    force: Annotated[bool, typer.Option(help="Encode even if the vectors are up to date.")] = False,
    parts_dir: Annotated[
        Path | None,
        typer.Option(
            help="Cache of text and image parts, shareable by several --out folders (each part "
            "is keyed by its model and inputs); default: OUT/parts."
        ),
    ] = None,
) -> None:
    """Embed every news item of a store with frozen encoders (no work if up to date)."""
    from mmnewsrec.encode.pipeline import EncodeConfig, EncodeError, encode_store
    from mmnewsrec.formats.store import StoreError
    from mmnewsrec.formats.vectors import VectorsError

    try:
        config = EncodeConfig(
            text_encoder=text_encoder,
            text_fields=tuple(f.strip() for f in text_fields.split(",") if f.strip()),
            image_encoder=image_encoder,
            image_size=image_size,
            joint_encoder=joint_encoder,
            fusion=fusion,
            fusion_dim=fusion_dim,
            seed=seed,
            batch_size=batch_size,
            device=device,
            precision=precision,
            image_crop=parse_crop(image_crop) if image_crop else None,
            image_blank_std=image_blank_std,
        )
        vectors = encode_store(store_dir, out, config, force=force, parts_dir=parts_dir)
    except (EncodeError, VectorsError, StoreError, OSError) as err:
        fail(str(err))
    typer.echo(f"news vectors in {out}: {vectors.summary()}")


def parse_crop(text: str) -> tuple[int, int, int, int]:
    """LEFT,TOP,RIGHT,BOTTOM as four integers."""
    try:
        left, top, right, bottom = (int(value) for value in text.split(","))
    except ValueError:
        fail(f"--image-crop: expected LEFT,TOP,RIGHT,BOTTOM (integers), got {text!r}")
    return left, top, right, bottom


# ---------------------------------------------------------------------------- train


# The `train` options that set a config key of their own (the others: --set section.key=value).
TRAIN_OPTIONS = {
    "store": "data.store_dir",
    "vectors": "data.vectors_dir",
    "out": "run.out_dir",
    "model": "model.name",
    "epochs": "optim.epochs",
    "device": "run.device",
    "seed": "run.seed",
}


@app.command()
def train(
    config: Annotated[
        str, typer.Option("--config", "-c", help="TOML file, or a shipped config name.")
    ] = "train_cpu",
    store: Annotated[Path | None, typer.Option(help="Store directory (data.store_dir).")] = None,
    vectors: Annotated[Path | None, typer.Option(help="News vectors (data.vectors_dir).")] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (run.out_dir).")] = None,
    model: Annotated[str | None, typer.Option(help="Model name (model.name).")] = None,
    epochs: Annotated[int | None, typer.Option(help="optim.epochs")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    seed: Annotated[int | None, typer.Option(help="run.seed")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from last.pt.")] = False,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="section.key=value (repeatable).")
    ] = None,
) -> None:
    """Train a ranker (or fit a baseline); keep the best checkpoint by validation AUC.

    Several processes: torchrun --nproc-per-node N --no-python mmnewsrec train ...
    """
    from mmnewsrec.config import ConfigError, load_config
    from mmnewsrec.formats.runs import CheckpointError
    from mmnewsrec.formats.store import StoreError
    from mmnewsrec.formats.vectors import VectorsError
    from mmnewsrec.rank.interrupt import TrainingInterrupted
    from mmnewsrec.rank.train import run_training

    options = {
        "store": store,
        "vectors": vectors,
        "out": out,
        "model": model,
        "epochs": epochs,
        "device": device,
        "seed": seed,
    }
    values = {TRAIN_OPTIONS[name]: value for name, value in options.items()}
    try:
        cfg = load_config(config, overrides or [], values)
        result = run_training(cfg, resume=resume)
    except (ConfigError, CheckpointError, StoreError, VectorsError) as err:
        fail(str(err))
    except TrainingInterrupted as stop:
        typer.secho(str(stop), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(stop.exit_code) from None
    if result.is_main:
        typer.echo(result.summary())


# ---------------------------------------------------------------------------- evaluate


@app.command()
def score(
    truth_path: Annotated[Path, typer.Argument(help="Truth file: `impression_id [0,1,...]`.")],
    prediction_paths: Annotated[
        list[Path],
        typer.Argument(
            help="Prediction files or zips: `impression_id [3,1,2,...]`. Several: compared "
            "pairwise (paired bootstrap interval, paired t-test, Holm's correction)."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
    baseline: Annotated[
        int | None,
        typer.Option(help="Several predictions: the one (0 = first) every file is compared with."),
    ] = None,
    per_impression: Annotated[
        Path | None, typer.Option(help="Write the per-impression metrics to this parquet file.")
    ] = None,
) -> None:
    """Score prediction files against a truth file, as the MIND leaderboard does."""
    import json

    from mmnewsrec.evaluate.leaderboard import ScoreFileError, compare_files
    from mmnewsrec.files import write_columns

    if baseline is not None and not 0 <= baseline < len(prediction_paths):
        fail(f"--baseline must index one of the {len(prediction_paths)} prediction files")
    try:
        rows, columns = compare_files(truth_path, prediction_paths, baseline)
    except ScoreFileError as err:
        fail(str(err))
    if per_impression is not None:
        write_columns(per_impression, columns)
    if len(rows) > 1:
        from mmnewsrec.evaluate.report import significance_table

        typer.echo(json.dumps(rows) if as_json else significance_table(rows, ("prediction",)))
        return
    metrics = {key: value for key, value in rows[0].items() if key != "prediction"}
    if as_json:
        typer.echo(json.dumps(metrics))
        return
    for label, key in (("AUC", "auc"), ("MRR", "mrr"), ("nDCG@5", "ndcg5"), ("nDCG@10", "ndcg10")):
        typer.echo(f"{label}: {metrics[key]:.4f}")
    typer.echo(f"impressions: {metrics['impressions']} scored, {metrics['skipped']} skipped")


@app.command()
def truth(
    store_dir: Dir,
    out: Annotated[Path, typer.Option(help="Truth file to write.")],
    split: Annotated[str, typer.Option(help="A labelled split of the store.")] = "dev",
) -> None:
    """Write the truth file (`impression_id [0,1,...]` lines) of a labelled split."""
    from mmnewsrec.evaluate.leaderboard import ScoreFileError, write_truth
    from mmnewsrec.formats.store import Store, StoreError

    try:
        path = write_truth(out, Store.load(store_dir).behaviors(split))
    except KeyError as err:
        fail(err.args[0])
    except (StoreError, ScoreFileError) as err:
        fail(str(err))
    typer.echo(f"truth of split {split!r} written to {path}")


StoreOpt = Annotated[
    Path | None, typer.Argument(help="Store to score (default: the run's own store).")
]


@app.command()
def evaluate(
    run_dir: RunDir,
    store_dir: StoreOpt = None,
    split: Annotated[str, typer.Option(help="A labelled split of the store.")] = "dev",
    device: Device = "cpu",
) -> None:
    """Score a split with a trained run; write RUN_DIR/metrics.json (AUC, MRR, nDCG@5/10)."""
    import json

    from mmnewsrec.evaluate.experiment import evaluate_run
    from mmnewsrec.formats.runs import CheckpointError
    from mmnewsrec.formats.store import StoreError

    try:
        metrics = evaluate_run(run_dir, store_dir, split, device)
    except (OSError, ValueError, KeyError, CheckpointError, StoreError) as err:
        fail(str(err))
    typer.echo(json.dumps(metrics, indent=2))


@app.command()
def predict(
    run_dir: RunDir,
    store_dir: StoreOpt = None,
    out: Annotated[Path, typer.Option(help="Prediction file to write.")] = Path("prediction.txt"),
    split: Annotated[
        str | None, typer.Option(help="Split to rank (default: test, else dev).")
    ] = None,
    zip: Annotated[
        bool, typer.Option("--zip", help="Write prediction.zip (holding prediction.txt) instead.")
    ] = False,
    allow_drops: Annotated[
        bool,
        typer.Option(
            help="Write the file even if prepare dropped impressions or candidates of the split "
            "(the leaderboard rejects such a file)."
        ),
    ] = False,
    device: Device = "cpu",
) -> None:
    """Write `impression_id [3,1,2,...]` lines (leaderboard format) for a split."""
    from mmnewsrec.evaluate.experiment import predict_run, run_store
    from mmnewsrec.formats.runs import CheckpointError
    from mmnewsrec.formats.store import StoreError

    try:
        if split is None:  # the run's own store unless another is given; the model loads once
            split = "test" if "test" in run_store(run_dir, store_dir).splits else "dev"
        path = predict_run(
            run_dir, store_dir, out, split, zip=zip, device=device, allow_drops=allow_drops
        )
    except (OSError, ValueError, KeyError, CheckpointError, StoreError) as err:
        fail(str(err.args[0]) if isinstance(err, KeyError) else str(err))
    typer.echo(f"ranks of split {split!r} written to {path}")


@app.command()
def experiment(
    config: Annotated[Path, typer.Argument(help="Experiment TOML (encoders x rankers x seeds).")],
) -> None:
    """Run an experiment grid with cached vectors and runs; write report.md with plots."""
    from mmnewsrec.evaluate.experiment import ExperimentError, load_experiment, run_experiment
    from mmnewsrec.rank.interrupt import TrainingInterrupted

    try:
        report = run_experiment(load_experiment(config), config)
    except ExperimentError as err:
        fail(str(err))
    except TrainingInterrupted as stop:
        typer.secho(
            f"stopped by {signal.Signals(stop.signum).name} after step {stop.step} of "
            f"{stop.out_dir}; run the same command again to continue (finished runs are reused, "
            "this one resumes from its last.pt)",
            fg=typer.colors.YELLOW,
            err=True,
        )
        raise typer.Exit(stop.exit_code) from None
    typer.echo(f"report: {report}")


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option(help="Folder for data, store, vectors, runs, report.")
    ] = Path("demo_out"),
    quick: Annotated[bool, typer.Option(help="A small data set: about two minutes.")] = False,
    image_layout: ImageLayout = "plain",
) -> None:
    """Run everything offline on synthetic data: synth, prepare, encode, train, evaluate, report."""
    from mmnewsrec.data.synthetic.images import IMAGE_LAYOUTS
    from mmnewsrec.demo import run_demo

    if image_layout not in IMAGE_LAYOUTS:
        fail(f"image layout must be one of {', '.join(IMAGE_LAYOUTS)}")
    report = run_demo(out, quick=quick, image_layout=image_layout)
    table = report.read_text().split("## Results (dev)", 1)[1].split("![", 1)[0]
    typer.echo(table.strip())
    typer.echo(f"\nreport: {report}")
    from mmnewsrec.demo import best_run

    if (best := best_run(out)) is not None:
        typer.echo(f"serve the best run (dev AUC {best[1]:.4f}): mmnewsrec serve {best[0]}")


# ---------------------------------------------------------------------------- serve


def load_recommender(
    run_dir: Path,
    device: str,
    recall_k: int,
    backend: str,
    popular_share: float | None,
    trace: bool = True,
) -> Recommender:
    """A Recommender over RUN_DIR, or a user-facing error."""
    from mmnewsrec.formats.runs import CheckpointError
    from mmnewsrec.formats.store import StoreError
    from mmnewsrec.serve import Recommender

    try:  # ValueError covers ConfigError, EncodeError and mismatched vectors
        return Recommender.from_run(
            run_dir, device, recall_k, backend, trace=trace, popular_share=popular_share
        )
    except (OSError, ValueError, StoreError, CheckpointError) as err:
        fail(str(err))


RecallK = Annotated[int, typer.Option(min=1, help="Candidates recalled, then reranked.")]
RecallBackend = Annotated[
    str,
    typer.Option(
        help="auto (exact up to 20,000 news, faiss_hnsw beyond), exact, faiss_hnsw (approximate,"
        " rescored exactly) or faiss_flat."
    ),
]
RecallPopularShare = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        max=1.0,
        help="Share of --recall-k given to the popularity/freshness channel; 0: content only."
        " [default: 0.1, the best recall@200 on the demo data]",
    ),
]


@app.command()
def recommend(
    run_dir: RunDir,
    history: Annotated[str, typer.Option(help="Clicked news ids, oldest first: N1,N2,...")] = "",
    k: Annotated[int, typer.Option(min=1, max=100, help="How many news to return.")] = 10,
    exclude_history: Annotated[bool, typer.Option(help="Leave clicked news out.")] = True,
    recall_k: RecallK = 200,
    recall_backend: RecallBackend = "auto",
    recall_popular_share: RecallPopularShare = None,
    device: Device = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Recommend news for a click history with a trained run (recall, then rerank)."""
    import json
    from dataclasses import asdict

    # One request: tracing the model for faster forwards would not pay for itself.
    recommender = load_recommender(
        run_dir, device, recall_k, recall_backend, recall_popular_share, trace=False
    )
    ids = [news_id.strip() for news_id in history.split(",") if news_id.strip()]
    result = recommender.recommend(ids, k=k, exclude_history=exclude_history)
    if as_json:
        typer.echo(json.dumps(asdict(result), indent=2))
        return
    if result.unknown:
        typer.secho(f"unknown ids ignored: {', '.join(result.unknown)}", fg="yellow", err=True)
    for rank, item in enumerate(result.items, 1):
        typer.echo(
            f"{rank:3d}  {item.news_id:<10} {item.stage:<10} {item.score:9.4f}  "
            f"{item.category}/{item.subcategory}  {item.title}"
        )
    typer.echo(f"{len(result.history_used)} clicks used, {result.timings_ms['total']:.1f} ms")


@app.command("export-events")
def export_events(
    state: Annotated[
        str, typer.Argument(help="A server's --state: its folder, or its postgresql:// URL.")
    ],
    out: Annotated[Path, typer.Option(help="Folder to write behaviors.tsv and news.tsv to.")],
    store: Annotated[
        Path | None, typer.Option(help="The served store [default: the one the state records].")
    ] = None,
) -> None:
    """Write a server's logged impressions (and its news) as MIND tsv files for `prepare`."""
    from mmnewsrec.formats.store import StoreError
    from mmnewsrec.serve.backends import is_database_url
    from mmnewsrec.serve.export import export_events as export
    from mmnewsrec.serve.state import StateError

    if not is_database_url(state) and not (Path(state) / "state.sqlite").is_file():
        fail(f"{state}: no state.sqlite here (a folder given to `serve --state`)")
    try:
        counts = export(state, out, store)
    except (OSError, ValueError, StoreError, StateError) as err:
        fail(str(err))
    typer.echo(f"{counts['impressions']} impressions, {counts['news']} news -> {out}")


@app.command("copy-state")
def copy_state(
    source: Annotated[str, typer.Argument(help="A server's --state: folder or postgresql:// URL.")],
    target: Annotated[str, typer.Argument(help="The state to copy into (created if new).")],
) -> None:
    """Copy a server's state (logged events, added news with their vectors) into another, e.g.
    a state folder into the PostgreSQL database of replicas. Run it while no server writes to
    SOURCE; what TARGET holds already is skipped."""
    from mmnewsrec.serve.backends import copy_state, is_database_url
    from mmnewsrec.serve.state import StateError

    if not is_database_url(source) and not (Path(source) / "state.sqlite").is_file():
        fail(f"{source}: no state.sqlite here (a folder given to `serve --state`)")
    try:
        counts = copy_state(source, target)
    except (OSError, ValueError, StateError) as err:
        fail(str(err))
    typer.echo(f"{counts['impressions']} impressions, {counts['news']} added news copied")


@app.command()
def serve(
    run_dir: RunDir,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    recall_k: RecallK = 200,
    recall_backend: RecallBackend = "auto",
    recall_popular_share: RecallPopularShare = None,
    device: Device = "cpu",
    threads: Annotated[int, typer.Option(min=1, help="CPU threads per request.")] = 1,
    parallel: Annotated[
        int,
        typer.Option(
            min=1, help="Requests computed at once, in worker threads; 1: on the event loop."
        ),
    ] = 1,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = True,
    state: Annotated[
        str | None,
        typer.Option(
            help="Folder of the service's durable state (logged events, added news), or a "
            "postgresql:// URL: a database that several replicas share and follow; "
            "[default: RUN_DIR.state, beside the run]"
        ),
    ] = None,
    sync: Annotated[
        str,
        typer.Option(
            help="SQLite synchronous level: full (a 2xx survives a power loss) or normal "
            "(survives a crash of the server; one fsync less per commit)."
        ),
    ] = "full",
) -> None:
    """Serve recommendations over HTTP (POST /recommend) with a web page at /; log events
    (POST /events) and learn users' histories and popularity from them."""
    import gc

    import torch
    import uvicorn

    from mmnewsrec.serve import ServeSettings, create_app

    settings = ServeSettings(host=host, port=port, parallel=parallel)
    from mmnewsrec.serve.backends import describe
    from mmnewsrec.serve.live import open_live
    from mmnewsrec.serve.state import StateError

    recommender = load_recommender(run_dir, device, recall_k, recall_backend, recall_popular_share)
    state_dir = state or str(run_dir.parent / f"{run_dir.name}.state")
    try:
        recommender, live = open_live(recommender, state_dir, sync)
    except (StateError, ValueError) as err:
        fail(str(err))
    torch.set_num_threads(threads)  # after loading, which may use every core
    if recommender.recaller.index_ is not None:
        import faiss

        faiss.omp_set_num_threads(threads)
    service = create_app(recommender, settings, live)
    # What is loaded lives as long as the process: frozen out of the garbage collector's
    # sight, so that a full collection no longer walks it (over 100 ms at 100k news).
    gc.collect()
    gc.freeze()
    where = f"http://{settings.host}:{settings.port}/ (state {describe(state_dir)})"
    typer.echo(f"serving {run_dir} on {where}")
    try:
        uvicorn.run(service, host=settings.host, port=settings.port, access_log=access_log)
    finally:
        live.state.close()
