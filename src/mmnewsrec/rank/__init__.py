"""Ranking: models on frozen news vectors, training batches, the training recipe, trained runs."""

from mmnewsrec.rank.batches import Batch, ListwiseDataset
from mmnewsrec.rank.model import MODELS, Ranker, build_model, model_config
from mmnewsrec.rank.ranker import CheckpointError, TrainedRanker, load_ranker
from mmnewsrec.rank.train import TrainRecipe, TrainResult, run_training

__all__ = [
    "MODELS",
    "Batch",
    "CheckpointError",
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
