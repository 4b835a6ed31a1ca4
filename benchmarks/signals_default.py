"""Content only vs content + behaviour signals, per ranker, over seeds: should signals be on?

For each data set (the default synthetic set of `mmnewsrec demo`, and MovieLens 100K in MIND
format) writes an experiment file and runs it with `run_experiment` (prepare; MiniLM +
EfficientNet-Lite0 vectors for the synthetic set, whose news have images, MiniLM text vectors
for MovieLens; `train_cpu` with its defaults, dev metrics): fast_rec_transformer and
additive_attention, each without and with all signals, over `--seeds`. Prints dev AUC mean +-
std per row and data set, the synthetic generator's oracle and visible AUC, the time taken and
the load average.

    python benchmarks/signals_default.py --out /tmp/signals_default [--data synthetic movielens]
        [--seeds 0 1 2] [--epochs 3] [--threads 1] [--jobs 2] [--override optim.lr=1e-3]
        [--rows fast_rec_transformer_signals]  (some rows only; default: all four)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from mmnewsrec.data.synthetic import SynthConfig, generate
from mmnewsrec.evaluate.experiment import load_experiment, oracle_auc, run_experiment
from mmnewsrec.formats.store import SIGNAL_NAMES

MOVIELENS = Path(__file__).resolve().parents[1].parent / "shared/data/movielens-100k-mind"
RANKERS = ("fast_rec_transformer", "additive_attention")

HEADER = """title = "content only vs content + signals: {name}"
data_dir = "{data}"
out_dir = "."
train_config = "train_cpu"
train_overrides = {overrides}
seeds = {seeds}
recall_k = [10]
jobs = {jobs}

"""

# The synthetic news have images: the demo's best vectors, MiniLM + EfficientNet-Lite0.
ENCODERS = {
    "synthetic": """
[encoders."minilm+effnet"]
image_encoder = "efficientnet-lite0"
image_size = 128
fusion = "concat"
""",
    "movielens": """
[encoders.minilm]
image_encoder = "none"
fusion = "text"
""",
}

RANKER = """
[rankers.{key}]
model = "{model}"
overrides = ['model.signals={signals}']
"""


def experiment_text(name: str, data: Path, args: argparse.Namespace) -> str:
    """Each ranker without and with every signal."""
    overrides = [f"optim.epochs={args.epochs}", "run.progress=false", *args.override]
    text = HEADER.format(
        name=name, data=data, overrides=json.dumps(overrides), seeds=args.seeds, jobs=args.jobs
    )
    text += ENCODERS[name]
    for model in RANKERS:
        for suffix, signals in (("content", []), ("signals", list(SIGNAL_NAMES))):
            key = f"{model}_{suffix}"
            if args.rows and key not in args.rows:
                continue
            text += RANKER.format(key=key, model=model, signals=json.dumps(signals))
    return text


def run_data_set(name: str, data: Path, out: Path, args: argparse.Namespace) -> dict:
    """Run one data set's grid; AUC mean and std per row, and the time taken."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "experiment.toml"
    path.write_text(experiment_text(name, data, args))
    started = time.perf_counter()
    run_experiment(load_experiment(path), path)
    rows = json.loads((out / "results.json").read_text())
    auc = {r["ranker"]: (r["auc"], r["auc_std"]) for r in rows}
    oracle = data / "dev" / "oracle.tsv"
    if oracle.is_file():
        auc["(oracle)"] = (oracle_auc(oracle, out / "store", "dev"), 0.0)
    return {"auc": auc, "minutes": (time.perf_counter() - started) / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", nargs="+", default=["synthetic", "movielens"])
    parser.add_argument("--movielens", type=Path, default=MOVIELENS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rows", nargs="*", default=[], help="rankers to run (default: all)")
    parser.add_argument("--override", nargs="*", default=[], help="more train overrides")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (busy machines)")
    parser.add_argument("--jobs", type=int, default=1, help="processes training the rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"start: load average {os.getloadavg()[0]:.2f}")
    results, visible = {}, None
    for name in args.data:
        out = args.out / name
        if name == "synthetic":
            visible = generate(out / "data", SynthConfig()).visible_auc
            data = (out / "data").resolve()
        else:
            data = args.movielens.resolve()
        results[name] = run_data_set(name, data, out, args)
        print(f"{name}: {results[name]['minutes']:.1f} min, load {os.getloadavg()[0]:.2f}")
    names = list(results)
    print("\n| row | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key in dict.fromkeys(k for r in results.values() for k in r["auc"]):
        cells = []
        for n in names:
            mean, std = results[n]["auc"].get(key, (float("nan"), 0.0))
            cells.append(f"{mean:.4f} +- {std:.4f}")
        print(f"| {key} | " + " | ".join(cells) + " |")
    if visible is not None:
        print(f"synthetic visible_auc (content alone could reach): {visible:.4f}")
    print(f"end: load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
