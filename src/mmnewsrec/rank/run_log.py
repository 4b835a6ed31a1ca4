"""RUN_DIR/log.csv (one row per log window or evaluation, columns `LOG_FIELDS`) and the loss and
throughput window its rows summarise."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import torch

from mmnewsrec.formats.runs import LOG_FIELDS


def reset_log(path: Path) -> None:
    """A log with its header alone."""
    with path.open("w", newline="") as f:
        csv.writer(f).writerow(LOG_FIELDS)


def truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after `step` (the checkpoint a run resumes from)."""
    if not path.exists():
        return reset_log(path)
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def append_log(path: Path, row: dict[str, Any]) -> None:
    """Append one row (missing fields empty)."""
    with path.open("a", newline="") as f:
        csv.DictWriter(f, LOG_FIELDS).writerow({k: fmt(v) for k, v in row.items()})


def fmt(value: Any) -> Any:
    """CSV cell: floats to 6 significant digits, None to empty."""
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


class Window:
    """Loss and throughput since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.samples = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.losses.append(loss)
        self.samples += samples

    def state(self) -> torch.Tensor:
        """(n,) the losses added since the last reset, on the CPU (for last.pt)."""
        return torch.stack(self.losses).float().cpu() if self.losses else torch.zeros(0)

    def restore(self, losses: torch.Tensor, device: torch.device) -> None:
        """Continue from what `state` returned: the next row averages them too."""
        self.losses = [loss.to(device) for loss in losses]

    def mean_loss(self) -> float:
        return torch.stack(self.losses).mean().item() if self.losses else float("nan")

    def rate(self) -> float:
        return self.samples / max(time.perf_counter() - self.start, 1e-9)
