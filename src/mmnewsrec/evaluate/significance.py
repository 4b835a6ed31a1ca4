"""Paired comparisons of rankers scored on the same impressions.

Each row of a results table has one value per impression (its per-impression AUC, say, averaged
over its seeds). A comparison of row `a` with a reference row `b` reports:

- the mean difference mean(a - b) over the impressions;
- its 95% interval from a paired bootstrap (Efron & Tibshirani 1993, ch. 13, percentile
  interval): the impressions are resampled with replacement `resamples` times, each resample
  shared by every row, so every difference is paired. The resamples are drawn as multinomial
  counts (one `bincount` per block of resamples) and all row means of a block are one matrix
  product: no loop over impressions or comparisons;
- a paired test's two-sided p-value over the impressions: Student's paired t-test
  (`scipy.stats.ttest_rel`) or the Wilcoxon signed-rank test (`scipy.stats.wilcoxon`);
- the p-value after Holm's step-down correction (Holm 1979) over all comparisons of the table,
  which bounds the chance of any false "significant" in the table by `alpha`.

With several seeds a row also has a spread over seeds. `noise_source` compares the standard error
the seeds give a difference of seed means, sqrt(s_a^2 / n_a + s_b^2 / n_b), with the bootstrap
standard error over impressions, and names the larger.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000
ALPHA = 0.05
BLOCK_ELEMENTS = 1 << 24  # resample counts held at once (int64): 128 MB


def bootstrap_means(values: np.ndarray, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, R) means of the columns of the (I, R) `values` over impressions resampled
    with replacement; one resample is shared by all columns (a paired bootstrap)."""
    values = np.asarray(values, dtype=np.float64)
    count = values.shape[0]
    if count == 0:
        raise ValueError("no impressions to resample")
    if np.isnan(values).any():
        raise ValueError("values hold NaN: keep only the impressions every row scores")
    rng = np.random.default_rng(seed)
    block = max(1, BLOCK_ELEMENTS // count)
    out = np.empty((resamples, values.shape[1]))
    for start in range(0, resamples, block):
        rows = min(block, resamples - start)
        drawn = rng.integers(0, count, size=(rows, count))
        drawn += np.arange(rows)[:, None] * count  # one bincount for the whole block
        weights = np.bincount(drawn.ravel(), minlength=rows * count).reshape(rows, count)
        out[start : start + rows] = weights @ values / count
    return out


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (same order as the input; NaN stays NaN)."""
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    stepped = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def paired_p_values(values: np.ndarray, pairs: np.ndarray, test: str = "t") -> np.ndarray:
    """Two-sided p-value of each (row, reference) pair over the impressions (I, R) `values`;
    1.0 where the two rows agree on every impression."""
    from scipy import stats

    if test not in ("t", "wilcoxon"):
        raise ValueError(f"test must be 't' or 'wilcoxon', got {test!r}")
    a, b = values[:, pairs[:, 0]], values[:, pairs[:, 1]]
    differ = ~np.all(a == b, axis=0)
    p = np.ones(len(pairs))
    if not differ.any():
        return p
    a, b = a[:, differ], b[:, differ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy on near-constant differences
        if test == "t":
            p[differ] = stats.ttest_rel(a, b, axis=0).pvalue
        else:
            p[differ] = stats.wilcoxon(a - b, axis=0, zero_method="zsplit").pvalue
    return p


@dataclass(frozen=True)
class Comparisons:
    """Paired comparisons (row vs reference) over the same impressions, one entry per pair."""

    pairs: np.ndarray  # (P, 2) int: row, reference
    diff: np.ndarray  # (P,) mean of row - reference over impressions
    low: np.ndarray  # (P,) 2.5% bootstrap percentile of the difference
    high: np.ndarray  # (P,) 97.5% percentile
    se: np.ndarray  # (P,) bootstrap standard error of the difference
    p: np.ndarray  # (P,) paired test p-value
    p_holm: np.ndarray  # (P,) Holm-adjusted over the P comparisons

    def significant(self, alpha: float = ALPHA) -> np.ndarray:
        """(P,) bool: the Holm-adjusted p-value is below `alpha`."""
        return self.p_holm < alpha


def compare(
    values: np.ndarray,
    pairs: np.ndarray,
    resamples: int = RESAMPLES,
    seed: int = 0,
    test: str = "t",
) -> Comparisons:
    """Mean difference, 95% paired-bootstrap interval and p-values (raw and Holm-adjusted over
    all `pairs`) of each (row, reference) column pair of the (I, R) per-impression `values`."""
    values = np.asarray(values, dtype=np.float64)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    means = bootstrap_means(values, resamples, seed)
    boot = means[:, pairs[:, 0]] - means[:, pairs[:, 1]]  # (B, P)
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    diff = values[:, pairs[:, 0]].mean(axis=0) - values[:, pairs[:, 1]].mean(axis=0)
    p = paired_p_values(values, pairs, test)
    return Comparisons(pairs, diff, low, high, boot.std(axis=0, ddof=1), p, holm(p))


def seed_se(std: np.ndarray, seeds: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """(P,) standard error over seeds of each pair's difference of seed means,
    sqrt(s_a^2 / n_a + s_b^2 / n_b), from the per-row std over seeds and seed counts; NaN where
    both rows have one seed (no spread measured)."""
    std, seeds = np.asarray(std, dtype=np.float64), np.asarray(seeds, dtype=np.float64)
    a, b = pairs[:, 0], pairs[:, 1]
    se = np.sqrt(std[a] ** 2 / seeds[a] + std[b] ** 2 / seeds[b])
    return np.where((seeds[a] > 1) | (seeds[b] > 1), se, np.nan)


def noise_source(seed_error: np.ndarray, impression_error: np.ndarray) -> list[str]:
    """Per pair, "seeds" or "impressions": the larger of the two standard errors ("-" where
    the seed error is NaN: not measured)."""
    return [
        "-" if np.isnan(s) else ("seeds" if s > i else "impressions")
        for s, i in zip(np.asarray(seed_error), np.asarray(impression_error), strict=True)
    ]


def compare_table(
    values: dict[str, np.ndarray],
    std: dict[str, np.ndarray],
    seeds: np.ndarray,
    baseline: int | None = None,
    best: int = 0,
    resamples: int = RESAMPLES,
    seed: int = 0,
    test: str = "t",
) -> list[dict]:
    """Every row of a table against the `best` row and the `baseline` row, for every metric.

    `values[metric]` is (I, R): per-impression values of the R rows (seed means) on the same
    impressions; `std[metric]` (R,) their spread over seeds, `seeds` (R,) their seed counts.
    One bootstrap serves all metrics; Holm's correction runs over all the table's comparisons.
    Returns per row {"<metric>_vs_<best|baseline>": {diff, low, high, p, p_holm, significant,
    seed_se, impression_se, noise}} (the reference row itself gets no entry against itself).
    """
    metrics = list(values)
    rows = next(iter(values.values())).shape[1]
    references = {"best": best, **({"baseline": baseline} if baseline is not None else {})}
    named = [
        (metric, ref_name, row, ref)
        for metric in metrics
        for ref_name, ref in references.items()
        for row in range(rows)
        if row != ref
    ]
    out: list[dict] = [{} for _ in range(rows)]
    if not named:
        return out
    column = {metric: m * rows for m, metric in enumerate(metrics)}
    pairs = np.array([(column[m] + row, column[m] + ref) for m, _, row, ref in named])
    stacked = np.concatenate([values[m] for m in metrics], axis=1)
    result = compare(stacked, pairs, resamples, seed, test)
    seed_error = seed_se(
        np.concatenate([std[m] for m in metrics]), np.tile(seeds, len(metrics)), pairs
    )
    noise = noise_source(seed_error, result.se)
    significant = result.significant()
    for i, (metric, ref_name, row, _) in enumerate(named):
        out[row][f"{metric}_vs_{ref_name}"] = {
            "diff": float(result.diff[i]),
            "low": float(result.low[i]),
            "high": float(result.high[i]),
            "p": float(result.p[i]),
            "p_holm": float(result.p_holm[i]),
            "significant": bool(significant[i]),
            "seed_se": None if np.isnan(seed_error[i]) else float(seed_error[i]),
            "impression_se": float(result.se[i]),
            "noise": noise[i],
        }
    return out
