"""What a run saves to continue exactly, and the checks that a resume continues the same run.

A run is reproducible from (config, seed): negatives come from (seed, epoch), the order from the
sampler's (seed, epoch), dropout from the saved RNG states, so a run stopped after step s and
resumed ends with the same weights as one that never stopped, provided nothing that changes
what it computes differs (`check_resumable`, `check_same_store`).
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmnewsrec.config import ConfigError, TrainConfig
from mmnewsrec.files import atomic_file

# The settings a resumed run may change: where it writes, how it reports progress, where the
# data lies (the store and vectors are compared by content hash instead) and, upwards only,
# optim.epochs. Any other change would alter what the run computes.
RESUME_FREE = {
    "run.out_dir",
    "run.log_every",
    "run.progress",
    "run.stop_after",
    "run.checkpoint_minutes",
    "data.store_dir",
    "data.vectors_dir",
}


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA generator states, in checkpoint-safe types."""
    state: Any = np.random.get_state()
    name, keys, pos, has_gauss, gauss = state
    return {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside `path`, flushed to disk, then renamed into place:
    a crash at any moment leaves the previous file or the new one."""
    with atomic_file(path) as tmp, tmp.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) and v else {key: v})
    return out


def check_resumable(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    """Refuse to resume under settings that change what the run computes (see RESUME_FREE)."""
    old, new = flatten(saved), flatten(config.to_dict())
    more_epochs = new["optim.epochs"] >= old.get("optim.epochs", math.inf)
    keys = sorted(k for k in old.keys() | new.keys() if k not in RESUME_FREE)
    diff = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in keys
        if old.get(k) != new.get(k) and not (k == "optim.epochs" and more_epochs)
    ]
    if diff:
        free = ", ".join(sorted(RESUME_FREE))
        raise ConfigError(
            f"cannot resume {path} with a different configuration (only {free} may change, "
            "and optim.epochs may grow):\n  " + "\n  ".join(diff)
        )


def check_same_store(path: Path, saved: str | None, actual: str) -> None:
    """Refuse a store with other content than the one the checkpoint was trained on."""
    if saved is not None and saved != actual:
        raise ConfigError(
            f"{path} was trained on a store with content hash {saved[:12]}..., but the store "
            f"given has {actual[:12]}...; resume with that store (or start a new run)"
        )
