"""Experiment report: a markdown results table (mean and spread over seeds) and matplotlib plots."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmnewsrec.files import write_text
from mmnewsrec.formats.runs import read_selection_curve
from mmnewsrec.metrics import METRICS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """Dev metrics of one trained ranker on one set of news vectors with one seed."""

    encoder: str
    ranker: str
    seed: int
    metrics: dict[str, float]
    log_csv: Path | None = None


@dataclass
class ReportInputs:
    """Everything the report shows besides the per-run results."""

    title: str
    data_summary: str
    commands: list[str]
    oracle_auc: float | None = None
    recall_at_k: dict[str, dict[int, float]] = field(default_factory=dict)
    recall_image_share: dict[str, dict[int, float]] = field(default_factory=dict)
    clicked_image_share: float | None = None  # among the dev clicks
    recall_note: str = ""  # how recall was set up
    notes: list[str] = field(default_factory=list)
    # per (encoder, ranker): paired comparisons (`significance.compare_table`), tied_with_best
    significance: dict[tuple[str, str], dict] = field(default_factory=dict)
    significance_note: str = ""  # impressions, resamples, test, correction, baseline


def summarise(results: Sequence[RunResult]) -> list[dict]:
    """One row per (encoder, ranker): mean and standard deviation of each metric over seeds."""
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for result in results:
        groups.setdefault((result.encoder, result.ranker), []).append(result)
    rows = []
    for (encoder, ranker), runs in groups.items():
        row: dict = {"encoder": encoder, "ranker": ranker, "seeds": len(runs)}
        for key in ("split", "selected_on"):  # which split reported, which selected
            splits = sorted({str(run.metrics[key]) for run in runs if key in run.metrics})
            if splits:
                row["reported_on" if key == "split" else key] = ",".join(splits)
        for metric in METRICS:
            values = np.array([run.metrics[metric] for run in runs], dtype=np.float64)
            row[metric] = float(values.mean())
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        for key in DESCRIBED:  # beyond accuracy and breakdowns: means over seeds
            if all(key in run.metrics for run in runs):
                row[key] = mean_nested([run.metrics[key] for run in runs])
        rows.append(row)
    return sorted(rows, key=lambda row: row["auc"], reverse=True)


METRIC_LABELS = {"auc": "AUC", "mrr": "MRR", "ndcg5": "nDCG@5", "ndcg10": "nDCG@10"}
DESCRIBED = ("beyond_accuracy", "by_history", "by_candidate_age")  # see `beyond_accuracy`


def mean_nested(values: Sequence) -> object:
    """Element-wise mean of equally shaped nested dicts of numbers (None if any is None; a
    value the same in all, such as a count, kept as it is)."""
    first = values[0]
    if isinstance(first, dict):
        return {key: mean_nested([v[key] for v in values]) for key in first}
    if any(v is None for v in values):
        return None
    if all(v == first for v in values):
        return first
    return float(np.mean(values))


def results_table(rows: Sequence[dict], oracle_auc: float | None = None) -> str:
    """Markdown table of summarised rows, best AUC first; ≈ marks a row not significantly
    different from the best (where the rows carry `tied_with_best`)."""
    lines = [
        "| encoder | ranker | AUC | MRR | nDCG@5 | nDCG@10 | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [_mean_std(row, metric) for metric in METRICS]
        tied = " ≈" if row.get("tied_with_best") and row is not rows[0] else ""
        name = f"| {row['encoder']} | {row['ranker']}{tied} |"
        lines.append(f"{name} {' | '.join(cells)} | {row['seeds']} |")
    if oracle_auc is not None:
        lines.append(f"| (oracle) | true click probabilities | {oracle_auc:.4f} | | | | |")
    return "\n".join(lines)


def _mean_std(row: dict, metric: str) -> str:
    if row["seeds"] > 1:
        return f"{row[metric]:.4f} ± {row[metric + '_std']:.4f}"
    return f"{row[metric]:.4f}"


def plot_bars(rows: Sequence[dict], path: Path, oracle_auc: float | None = None) -> Path:
    """Horizontal bar chart of dev AUC per (encoder, ranker) with seed spread as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{row['ranker']} | {row['encoder']}" for row in rows][::-1]
    means = [row["auc"] for row in rows][::-1]
    stds = [row["auc_std"] for row in rows][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.5))
    ax.barh(labels, means, xerr=stds, color="#4c72b0")
    ax.axvline(0.5, color="grey", linestyle=":", label="random")
    if oracle_auc is not None:
        ax.axvline(oracle_auc, color="#c44e52", linestyle="--", label="oracle")
    ax.set_xlim(min([0.45, *means]), 1.0)
    ax.set_xlabel("dev AUC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(results: Sequence[RunResult], path: Path) -> Path | None:
    """Dev AUC against training step for every run that logged evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    plotted = 0
    for result in results:
        steps, aucs = read_selection_curve(result.log_csv) if result.log_csv else ([], [])
        if len(steps) > 1:
            label = f"{result.ranker} | {result.encoder} | s{result.seed}"
            ax.plot(steps, aucs, marker=".", label=label)
            plotted += 1
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("training step")
    ax.set_ylabel("AUC on the selection split")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out_dir: Path, results: Sequence[RunResult], inputs: ReportInputs) -> Path:
    """Write report.md, auc.png and curves.png into out_dir; return the report path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarise(results)
    rows = [{**row, **inputs.significance.get((row["encoder"], row["ranker"]), {})} for row in rows]
    bars = plot_bars(rows, out_dir / "auc.png", inputs.oracle_auc)
    curves = plot_curves(results, out_dir / "curves.png")
    table = results_table(rows, inputs.oracle_auc)
    parts = [f"# {inputs.title}", "", "## Results (dev)", "", selection_line(rows), "", table]
    parts += ["", f"![dev AUC]({bars.name})"]
    if inputs.significance:
        parts += ["", "## Significance (dev AUC)", "", inputs.significance_note, ""]
        parts += [significance_table(rows)]
    parts += described_sections(rows)
    if curves:
        curve = f"![AUC on the selection split during training]({curves.name})"
        parts += ["", "## Training curves (selection split)", "", curve]
    if inputs.recall_at_k:
        heading = "## Recall (mean user vector, top-K over all news)"
        note = [inputs.recall_note, ""] if inputs.recall_note else []
        parts += ["", heading, "", *note, _recall_table(inputs)]
        if inputs.clicked_image_share is not None:
            share = f"{100 * inputs.clicked_image_share:.1f}%"
            parts += ["", f"News with an image among the dev clicks: {share}."]
    parts += ["", "## Data", "", "```", inputs.data_summary.strip(), "```"]
    if inputs.notes:
        parts += ["", "## Notes", "", *[f"- {note}" for note in inputs.notes]]
    parts += ["", "## Reproduce", "", "```", *inputs.commands, "```", ""]
    path = out_dir / "report.md"
    write_text(path, "\n".join(parts))
    logger.info("report written to %s", path)
    return path


def selection_line(rows: Sequence[dict]) -> str:
    """Which split reported the rows and which selected their checkpoints (best step, early
    stop), with a warning where they are the same."""
    reported = sorted({row["reported_on"] for row in rows if "reported_on" in row})
    selected = sorted({row["selected_on"] for row in rows if "selected_on" in row})
    if not reported or not selected:
        return "Selection split not recorded."
    named = {
        "None": "none (the last weights, trained on every train impression)",
        "valid": "valid (impressions held out of train by data.valid_split)",
    }
    line = (
        f"Reported on: **{', '.join(reported)}**. Checkpoints selected on: "
        f"**{', '.join(named.get(split, split) for split in selected)}**."
    )
    if set(reported) & set(selected):
        line += " Selected on the reported split: these figures are optimistic."
    return line


def _recall_table(inputs: ReportInputs) -> str:
    """recall@K per encoder and, where measured, the share of recalled news with an image."""
    ks = sorted({k for by_k in inputs.recall_at_k.values() for k in by_k})
    columns = [f"recall@{k}" for k in ks]
    if inputs.recall_image_share:
        columns += [f"image share@{k}" for k in ks]
    lines = ["| encoder | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for encoder, by_k in inputs.recall_at_k.items():
        cells = [f"{by_k.get(k, float('nan')):.4f}" for k in ks]
        if inputs.recall_image_share:
            shares = inputs.recall_image_share.get(encoder, {})
            cells += [f"{100 * shares.get(k, float('nan')):.1f}%" for k in ks]
        lines.append(f"| {encoder} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _interval(entry: dict | None) -> str:
    if not entry:
        return ""
    return f"{entry['diff']:+.4f} [{entry['low']:+.4f}, {entry['high']:+.4f}]"


def _p(entry: dict | None) -> str:
    if not entry:
        return ""
    mark = "" if entry["significant"] else " (n.s.)"
    return f"{entry['p_holm']:.2g}{mark}"


def significance_table(
    rows: Sequence[dict], keys: Sequence[str] = ("encoder", "ranker"), metric: str = "auc"
) -> str:
    """Per row: `metric`, its difference to the best row (the first) and to the baseline with
    the 95% bootstrap interval and Holm-adjusted p-value, and which noise (seeds or
    impressions) dominates; ≈ marks a row not significantly different from the best."""
    columns = [
        *keys,
        METRIC_LABELS[metric],
        "Δ vs best [95% CI]",
        "p (Holm)",
        "Δ vs baseline [95% CI]",
    ]
    lines = ["| " + " | ".join([*columns, "p (Holm)", "larger noise"]) + " |"]
    lines.append("|" + "---|" * (len(columns) + 2))
    has_baseline = any(f"{metric}_vs_baseline" in row for row in rows)
    for row in rows:
        best, base = row.get(f"{metric}_vs_best"), row.get(f"{metric}_vs_baseline")
        noise = (best or base or {}).get("noise", "-")
        tied = " ≈" if row.get("tied_with_best") else ""
        cells = [str(row[key]) for key in keys] + [f"{row[metric]:.4f}{tied}"]
        cells += [_interval(best) or "(best)", _p(best)]
        is_baseline = has_baseline and base is None
        cells += [_interval(base) or ("(baseline)" if is_baseline else ""), _p(base)]
        lines.append("| " + " | ".join([*cells, noise]) + " |")
    return "\n".join(lines)


def _number(value: float | None, digits: int = 3, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.{digits}f}"


def beyond_accuracy_table(rows: Sequence[dict]) -> str:
    """Diversity, category entropy, coverage, novelty, personalisation and image share of the
    top-k lists, per row (means over seeds)."""
    lines = [
        "| encoder | ranker | diversity | category entropy (bits) | coverage | novelty (bits) "
        "| personalisation | image share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        b = row.get("beyond_accuracy")
        if not b:
            continue
        cells = [
            _number(b["diversity"]),
            _number(b["category_entropy"]),
            _number(b["coverage"], percent=True),
            _number(b["novelty"], 2),
            _number(b["personalisation"]),
            _number(b["image_share"], percent=True),
        ]
        lines.append(f"| {row['encoder']} | {row['ranker']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def breakdown_table(rows: Sequence[dict], key: str, metric: str = "auc") -> str:
    """`metric` per bucket of the breakdown `key` (by_history, by_candidate_age) per row; the
    header gives each bucket's scored impressions (of the first row)."""
    first = next(row[key] for row in rows if row.get(key))
    names = list(first)
    header = [f"{name} ({first[name]['impressions']:,.0f})" for name in names]
    lines = ["| encoder | ranker | " + " | ".join(header) + " |", "|---|---|" + "---|" * len(names)]
    for row in rows:
        if row.get(key):
            cells = [_number(row[key][name][metric], 4) for name in names]
            lines.append(f"| {row['encoder']} | {row['ranker']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def described_sections(rows: Sequence[dict]) -> list[str]:
    """The beyond-accuracy and breakdown sections of the report (where the rows carry them)."""
    parts: list[str] = []
    with_beyond = [row for row in rows if row.get("beyond_accuracy")]
    if with_beyond:
        b = with_beyond[0]["beyond_accuracy"]
        clicked = _number(b.get("clicked_image_share"), percent=True)
        parts += ["", f"## Beyond accuracy (top-{b['k']} of each dev ranking)", ""]
        parts += [
            "Diversity: mean pairwise cosine distance of the news vectors of a list; coverage: "
            "share of the dev candidates in some list; novelty: mean -log2 of the share of train "
            "users who clicked the news; personalisation: 1 - mean overlap of two lists; image "
            f"share: among the listed news (among the dev clicks: {clicked}). Definitions and "
            "references: docs/evaluation.md.",
            "",
            beyond_accuracy_table(rows),
        ]
    headings = {
        "by_history": "## Dev AUC by user history length (clicks; scored impressions)",
        "by_candidate_age": "## Dev AUC by candidate age (hours since first seen; impressions "
        "restricted to those candidates)",
    }
    for key, heading in headings.items():
        if any(row.get(key) for row in rows):
            parts += ["", heading, "", breakdown_table(rows, key)]
    return parts
