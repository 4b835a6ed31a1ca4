"""The run folder format, written by `train` and read by evaluation and serving.

Layout of RUN_DIR:
    config.json     the resolved `TrainConfig`
    checkpoint.pt   the best model: format, model name and args, weights, vectors hash, metrics
                    on the selection split and `selection` (that split and its rule)
    last.pt         the same plus optimiser, schedule, progress and RNG states (for --resume)
    log.csv         one row per log or evaluation step (`LOG_FIELDS`; metrics: selection split)
    metrics.json    written by `evaluate`: metrics on the reported `split`, `selected_on`
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from mmnewsrec.config import TrainConfig, validate_config

CHECKPOINT_FORMAT = 1
LOG_FIELDS = ["step", "epoch", "loss", "lr", "samples_per_s", "auc", "mrr", "ndcg5", "ndcg10"]


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, malformed, or made with other news vectors."""


def read_run_config(run_dir: Path | str) -> TrainConfig:
    """RUN_DIR/config.json, validated."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a run directory of `train`")
    return validate_config(json.loads(path.read_text()), str(path))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU (tensors and plain data only)."""
    import torch

    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an mmnewsrec checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def check_vectors_hash(path: Path, expected: str, actual: str) -> None:
    """Refuse news vectors other than those the checkpoint was trained on."""
    if expected != actual:
        raise CheckpointError(
            f"{path} was trained on news vectors with hash {expected[:12]}..., but the vectors "
            f"given have hash {actual[:12]}...; use the vectors of that run (or retrain)"
        )


def read_selection_curve(log_csv: Path) -> tuple[list[int], list[float]]:
    """(steps, AUCs on the selection split) from a training log, skipping rows without an
    evaluation."""
    if not log_csv.exists():
        return [], []
    steps, aucs = [], []
    with open(log_csv, newline="") as file:
        for row in csv.DictReader(file):
            if row.get("auc"):
                steps.append(int(row["step"]))
                aucs.append(float(row["auc"]))
    return steps, aucs
