"""Ablation of the behaviour signals: content only, all signals, each signal left out, gbdt.

For each data set (the default synthetic set of `mmnewsrec demo`, and MovieLens 100K in MIND
format) writes an experiment file and runs it with `run_experiment` (prepare, MiniLM text
vectors, one run per row, dev metrics, report.md), then prints one table of dev AUC per row
and data set. Checkpoints are selected on the latest tenth of train (`data.valid_split=0.1`,
as MovieLens' last train day holds 65 impressions); dev is never seen in training.

    python benchmarks/signals_ablation.py --out /tmp/signals [--data synthetic movielens]
        [--ranker additive_attention] [--combined fast_rec_transformer] [--epochs 2]
        [--threads 1] [--jobs 2]

`--jobs N` trains the rows in N processes (the experiment's `jobs`), which share the
`--threads` (at least one each).
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

HEADER = """title = "behaviour signals ablation: {name}"
data_dir = "{data}"
out_dir = "."
train_config = "train_cpu"
train_overrides = ["optim.epochs={epochs}", "data.valid_split=0.1", "run.progress=false"]
seeds = [0]
recall_k = [10]
jobs = {jobs}

[encoders.minilm]
image_encoder = "none"
fusion = "text"

[rankers.popularity]
model = "popularity"
per_encoder = false

[rankers.mean_cosine]
model = "mean_cosine"

[rankers.gbdt]
model = "gbdt"
"""

RANKER = """
[rankers.{key}]
model = "{model}"
overrides = ['model.signals={signals}']
"""


def rows(ranker: str, combined: list[str]) -> list[tuple[str, str, list[str]]]:
    """Neural rows (key, model, signals read): the ablation of `ranker`, then each model of
    `combined` with all signals."""
    out = [("content_only", ranker, []), ("all_signals", ranker, list(SIGNAL_NAMES))]
    for name in SIGNAL_NAMES:
        out.append((f"without_{name}", ranker, [s for s in SIGNAL_NAMES if s != name]))
    return out + [(f"{model}_all_signals", model, list(SIGNAL_NAMES)) for model in combined]


def experiment_text(name: str, data: Path, args: argparse.Namespace) -> str:
    """The grid: the baselines, the ablation rows and the combined models."""
    text = HEADER.format(name=name, data=data, epochs=args.epochs, jobs=args.jobs)
    for key, model, signals in rows(args.ranker, args.combined):
        text += RANKER.format(key=key, model=model, signals=json.dumps(signals))
    return text


def run_data_set(name: str, data: Path, out: Path, args: argparse.Namespace) -> dict:
    """Run one data set's grid; dev AUC per row, the oracle AUC and the time taken."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "experiment.toml"
    path.write_text(experiment_text(name, data, args))
    started = time.perf_counter()
    report = run_experiment(load_experiment(path), path)
    auc = {r["ranker"]: r["auc"] for r in json.loads((out / "results.json").read_text())}
    oracle = data / "dev" / "oracle.tsv"
    if oracle.is_file():
        auc["(oracle)"] = oracle_auc(oracle, out / "store", "dev")
    return {
        "auc": auc,
        "report": report,
        "minutes": (time.perf_counter() - started) / 60,
        "load": os.getloadavg()[0],
    }


def print_table(results: dict[str, dict], ranker: str) -> None:
    names = list(results)
    print(f"\n| row ({ranker} unless named) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    keys = dict.fromkeys(key for r in results.values() for key in r["auc"])
    for key in keys:
        cells = [f"{results[n]['auc'].get(key, float('nan')):.4f}" for n in names]
        print(f"| {key} | " + " | ".join(cells) + " |")
    for name, r in results.items():
        print(f"{name}: {r['minutes']:.1f} min, load average {r['load']:.1f}, {r['report']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", nargs="+", default=["synthetic", "movielens"])
    parser.add_argument("--movielens", type=Path, default=MOVIELENS)
    parser.add_argument("--ranker", default="additive_attention")
    parser.add_argument("--combined", nargs="*", default=[], help="more models, all signals")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (busy machines)")
    parser.add_argument("--jobs", type=int, default=1, help="processes training the rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for name in args.data:
        out = args.out / name
        if name == "synthetic":
            generate(out / "data", SynthConfig())
            data = (out / "data").resolve()
        else:
            data = args.movielens.resolve()
        results[name] = run_data_set(name, data, out, args)
    print_table(results, args.ranker)


if __name__ == "__main__":
    main()
