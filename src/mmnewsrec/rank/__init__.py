"""Ranking: models on frozen news vectors, training batches, the training recipe, trained runs."""

from mmnewsrec.formats.runs import CheckpointError
from mmnewsrec.rank.batches import Batch, ClickDataset
from mmnewsrec.rank.model import MODELS, Ranker, build_model, model_config
from mmnewsrec.rank.ranker import TrainedRanker, load_ranker
from mmnewsrec.rank.train import TrainRecipe, TrainResult, run_training

ListwiseDataset = ClickDataset  # its former name, still exported

__all__ = [
    "MODELS",
    "Batch",
    "CheckpointError",
    "ClickDataset",
    "ListwiseDataset",
    "Ranker",
    "TrainRecipe",
    "TrainResult",
    "TrainedRanker",
    "build_model",
    "load_ranker",
    "model_config",
    "run_training",
]
