"""Per-impression metrics computed one impression at a time in the style of the official MIND
scorer (msnews/MIND evaluate.py, sklearn's roc_auc_score): the reference the vectorised metrics
are checked against."""

import numpy as np
from sklearn.metrics import roc_auc_score


def official_order(y_score):
    """The official np.argsort(y_score)[::-1], with the stable sort that fixes ties."""
    return np.argsort(y_score, kind="stable")[::-1]


def dcg_score(y_true, y_score, k):
    y_true = np.take(y_true, official_order(y_score)[:k])
    return np.sum((2**y_true - 1) / np.log2(np.arange(len(y_true)) + 2))


def mrr_score(y_true, y_score):
    y_true = np.take(y_true, official_order(y_score))
    return np.sum(y_true / (np.arange(len(y_true)) + 1)) / np.sum(y_true)


def reference(scores, labels, offsets):
    """Per impression: (auc, mrr, ndcg5, ndcg10), or None where the impression is skipped."""
    out = []
    for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
        y_true, y_score = labels[lo:hi].astype(np.float32), scores[lo:hi]
        if y_true.sum() in (0, len(y_true)):
            out.append(None)
            continue
        out.append(
            (
                roc_auc_score(y_true, y_score),
                mrr_score(y_true, y_score),
                dcg_score(y_true, y_score, 5) / dcg_score(y_true, y_true, 5),
                dcg_score(y_true, y_score, 10) / dcg_score(y_true, y_true, 10),
            )
        )
    return out


def reference_means(scores, labels, offsets) -> dict[str, float]:
    """Means of the reference metrics over the impressions that are not skipped."""
    rows = np.array([r for r in reference(scores, labels, offsets) if r is not None])
    return dict(zip(("auc", "mrr", "ndcg5", "ndcg10"), rows.mean(axis=0), strict=True))
