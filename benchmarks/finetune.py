"""Fine-tuning the text encoder's top N layers with the ranker: cost and ablation.

    python benchmarks/finetune.py speed --out /tmp/ft             # cache size, samples/s
    python benchmarks/finetune.py ablation --out /tmp/ft --quick  # AUC mean +- std over seeds

`speed`: the default synthetic data (or --quick), MiniLM text vectors, fast_rec_transformer at
the cpu preset; for N = 0, 1, 2 the token-state cache size and training samples/s over a few
steps (wall and CPU time), after the cache is built.

`ablation`: N = 0 (frozen), 1, 2 on the synthetic data and on ../shared/data/movielens-100k-mind,
the same seeds and step budget for every N; dev AUC mean +- std over the seeds. A fine-tuned N
"beats frozen" when its mean exceeds frozen's by more than the larger of the two stds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from mmnewsrec.config import load_config
from mmnewsrec.data.store import build_store
from mmnewsrec.data.synthetic import SynthConfig, generate
from mmnewsrec.devices import resolve_device
from mmnewsrec.encode.pipeline import EncodeConfig, encode_store
from mmnewsrec.evaluate.experiment import evaluate_run
from mmnewsrec.rank.train import TrainRecipe, run_training

MOVIELENS = Path(__file__).resolve().parents[1].parent / "shared/data/movielens-100k-mind"


def prepare(out: Path, data: Path | None, quick: bool) -> tuple[Path, Path]:
    """(store, MiniLM text vectors) of `data`, or of new synthetic data when it is None."""
    if data is None:
        data = out / "data"
        if not (data / "train").is_dir():
            generate(data, SynthConfig.quick() if quick else SynthConfig())
    store, vectors = out / "store", out / "minilm"
    if not (store / "manifest.json").is_file():
        build_store(data, store)
    encode_store(store, vectors, EncodeConfig(image_encoder="none", fusion="text"))
    return store, vectors


def settings(store: Path, vectors: Path, out: Path, layers: int, args: Any) -> dict:
    return {
        "data.store_dir": store,
        "data.vectors_dir": vectors,
        "data.history_len": args.history_len,
        "run.out_dir": out,
        "run.progress": False,
        "run.max_steps": args.steps,
        "run.eval_each_epoch": False,
        "optim.epochs": 100,
        "optim.batch_size": args.batch_size,
        "model.finetune_layers": layers,
        "model.finetune_lr": args.finetune_lr,
    }


def speed(args: argparse.Namespace) -> None:
    store, vectors = prepare(args.out, None, args.quick)
    for layers in (0, 1, 2):
        values = settings(store, vectors, args.out / f"speed-{layers}", layers, args)
        recipe = TrainRecipe(load_config("train_cpu", values=values), resolve_device("cpu"))
        recipe.setup()
        states = getattr(recipe.model, "states", None)
        cache = states.nbytes / 1e6 if states is not None else 0.0
        batches = iter(recipe.loader)
        recipe._train_step(next(batches))  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.timed_steps):
            recipe._train_step(next(batches))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        samples = args.timed_steps * recipe.batch_size
        print(
            f"N={layers}: cache {cache:8.1f} MB, {samples / wall:7.1f} samples/s "
            f"({samples / cpu:7.1f} per CPU-second), load average {os.getloadavg()[0]:.2f}"
        )


def ablation(args: argparse.Namespace) -> None:
    sets = {"synthetic": None, "movielens-100k-mind": MOVIELENS}
    for name in args.data:
        data = sets[name]
        store, vectors = prepare(args.out / name, data, args.quick)
        aucs: dict[int, list[float]] = {}
        started = time.perf_counter()
        for layers in args.layers:
            for seed in args.seeds:
                run = args.out / name / "runs" / f"n{layers}-seed{seed}"
                values = settings(store, vectors, run, layers, args) | {"run.seed": seed}
                scored = run / "metrics.json"  # written by evaluate_run: a rerun skips the run
                if scored.is_file():
                    metrics = json.loads(scored.read_text())
                else:
                    run_training(load_config("train_cpu", values=values), resume=True)
                    metrics = evaluate_run(run)
                aucs.setdefault(layers, []).append(metrics["auc"])
        report(name, aucs, time.perf_counter() - started)


def report(name: str, aucs: dict[int, list[float]], seconds: float) -> None:
    print(f"\n{name}: dev AUC over seeds ({seconds:.0f} s, load {os.getloadavg()[0]:.2f})")
    print("| finetune_layers | AUC mean +- std | per seed | beats frozen |")
    print("|---|---|---|---|")
    base = aucs.get(0, [])
    for layers, values in aucs.items():
        mean, std = statistics.mean(values), statistics.pstdev(values)
        beats = "-"
        if layers and base:
            spread = max(std, statistics.pstdev(base))
            beats = "yes" if mean - statistics.mean(base) > spread else "no"
        seeds = ", ".join(f"{v:.4f}" for v in values)
        print(f"| {layers} | {mean:.4f} +- {std:.4f} | {seeds} | {beats} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["speed", "ablation"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="synthetic data at quick size")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps per run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--history-len", type=int, default=10)
    parser.add_argument("--finetune-lr", type=float, default=2e-4)
    parser.add_argument("--data", nargs="+", default=["synthetic", "movielens-100k-mind"])
    parser.add_argument("--timed-steps", type=int, default=5, help="speed: steps timed")
    args = parser.parse_args()
    speed(args) if args.what == "speed" else ablation(args)


if __name__ == "__main__":
    main()
