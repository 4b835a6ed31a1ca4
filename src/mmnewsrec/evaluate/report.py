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
        rows.append(row)
    return sorted(rows, key=lambda row: row["auc"], reverse=True)


def results_table(rows: Sequence[dict], oracle_auc: float | None = None) -> str:
    """Markdown table of summarised rows, best AUC first."""
    lines = [
        "| encoder | ranker | AUC | MRR | nDCG@5 | nDCG@10 | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [_mean_std(row, metric) for metric in METRICS]
        name = f"| {row['encoder']} | {row['ranker']} |"
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
    bars = plot_bars(rows, out_dir / "auc.png", inputs.oracle_auc)
    curves = plot_curves(results, out_dir / "curves.png")
    table = results_table(rows, inputs.oracle_auc)
    parts = [f"# {inputs.title}", "", "## Results (dev)", "", selection_line(rows), "", table]
    parts += ["", f"![dev AUC]({bars.name})"]
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
    line = (
        f"Reported on: **{', '.join(reported)}**. Checkpoints selected on: "
        f"**{', '.join(selected)}** (`valid`: impressions held out of train by data.valid_split)."
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
