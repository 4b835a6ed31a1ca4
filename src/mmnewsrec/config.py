"""Typed training configuration: one TOML file, then command-line overrides.

A file has four tables, each optional except for the keys without a default:

    [data]   store_dir, vectors_dir, train_split, dev_split, history_len, negatives, loss, ...
    [model]  name, preset, and [model.args] overriding fields of the preset
    [optim]  epochs, batch_size (global, over all processes), lr, schedule, warm-up, clipping,
             precision
    [run]    out_dir, seed, device, evaluation cadence, early stopping, logging

Overrides are `section.key=value` strings; the value is read as a TOML value when it parses as
one (`3`, `1e-4`, `true`, `"x"`, `[1, 2]`) and as a plain string otherwise.
"""

from __future__ import annotations

import logging
import math
import tomllib
from collections.abc import Mapping, Sequence
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mmnewsrec.devices import check_device
from mmnewsrec.formats.store import SIGNAL_NAMES

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration file or override that cannot be used."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(Section):
    """Inputs and how training samples are drawn from them."""

    store_dir: Path = Field(description="the store written by `prepare`")
    vectors_dir: Path = Field(description="the news vectors written by `encode`")
    train_split: str = Field("train", description="the split trained on")
    dev_split: str = Field("dev", description="'' for no dev evaluation")
    history_len: int = Field(50, ge=1, description="last L clicks fed to the model")
    negatives: int = Field(4, ge=1, description="K negatives per click (listwise)")
    loss: Literal["listwise", "pointwise"] = Field(
        "listwise",
        description="softmax cross-entropy over 1 positive and K negatives, or binary "
        "cross-entropy per candidate",
    )
    valid_split: str = Field(
        "",
        description="what selects the best checkpoint and stops early: impressions held out of "
        "train_split ('auto': its last UTC day when that holds at least 5% of them, else its "
        "latest tenth; 'last-day': its last UTC day, MIND's convention; 'YYYY-MM-DD': that day "
        "on; a fraction such as '0.1': its latest tenth), 'dev' (dev_split, which is then also "
        "the reported split) or '' (the default: none, the last weights, trained on every train "
        "impression)",
    )
    dev_impressions: int = Field(
        0, ge=0, description="evaluate on the first n selection impressions; 0 = all"
    )

    @field_validator("valid_split", mode="before")
    @classmethod
    def _valid_split(cls, value: object) -> str:
        """A fraction may come as a TOML number (`data.valid_split=0.1`)."""
        text = str(value) if isinstance(value, int | float | date) else value
        if not isinstance(text, str):
            raise ValueError(f"valid_split: expected a string, got {value!r}")
        valid_cut(text)
        return text


def valid_cut(rule: str) -> str | date | float | None:
    """The validation rule as 'auto', 'last-day', 'dev', a date, a fraction in (0, 1), or None
    for ''."""
    if rule in ("auto", "last-day", "dev"):
        return rule
    if not rule:
        return None
    try:
        return date.fromisoformat(rule)
    except ValueError:
        pass
    try:
        fraction = float(rule)
    except ValueError:
        fraction = math.nan
    if not 0 < fraction < 1:
        raise ValueError(
            f"valid_split {rule!r}: expected 'auto', 'last-day', 'dev', '', a date YYYY-MM-DD "
            "or a fraction between 0 and 1"
        )
    return fraction


class ModelConfig(Section):
    """Which ranker to build: a registry name, a named preset, field overrides and the
    behaviour signals it reads (`formats.store.SIGNAL_NAMES`)."""

    name: str = Field(
        "fast_rec_transformer",
        description="fast_rec_transformer, rec_transformer, additive_attention, gbdt, "
        "mean_cosine, popularity or random",
    )
    preset: str | None = Field(None, description="cpu, gpu or seed: the transformers' size")
    args: dict[str, Any] = Field(
        default_factory=dict, description="the model's own arguments, over the preset's"
    )
    signals: list[str] | Literal["all"] = Field(
        "all",
        description="behaviour signals of the store added to the content score (neural "
        'rankers) or used as features (gbdt); "all": every signal, for the models that read '
        "signals; []: content only",
    )
    categories: bool = Field(
        True,
        description="the neural rankers read each news item's category and subcategory (one-hot, "
        "vocabularies from the store) beside its vectors",
    )
    finetune_layers: int = Field(
        0,
        ge=0,
        description="train the text encoder's top N layers with the ranker (their input token "
        "states cached once); 0 = frozen news vectors",
    )
    finetune_lr: float = Field(1e-4, gt=0, description="learning rate of the fine-tuned layers")
    finetune_max_tokens: int = Field(32, ge=2, description="tokens kept per news text")
    text_encoder: str | None = Field(
        None,
        description="the text model the vectors were encoded with (a local path or hub id); "
        "None = the one their manifest names",
    )

    @field_validator("signals")
    @classmethod
    def _signals(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str):
            return value
        unknown = sorted(set(value) - set(SIGNAL_NAMES))
        if unknown:
            raise ValueError(f"unknown signals {unknown}; known: {list(SIGNAL_NAMES)}")
        if len(set(value)) != len(value):
            raise ValueError(f"signals named twice in {value}")
        return value


class OptimConfig(Section):
    """Optimisation: AdamW with warm-up then decay, clipping, mixed precision on CUDA."""

    epochs: int = Field(3, ge=1, description="passes over the train split")
    batch_size: int = Field(128, ge=1, description="global batch, split over processes")
    lr: float = Field(5e-4, gt=0, description="peak learning rate of AdamW")
    weight_decay: float = Field(0.01, ge=0, description="AdamW's decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's betas")
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="share of steps warming up")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="the decay after warm-up"
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="the final lr, as a share of lr")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 = off")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast dtype on CUDA (auto: bf16 where supported); fp32 on CPU"
    )


class RunConfig(Section):
    """Where results go and how the run is driven."""

    out_dir: Path = Field(Path("runs/train"), description="the run folder to write")
    seed: int = Field(0, description="seeds weights, negatives, order and dropout")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    eval_every: int = Field(0, ge=0, description="dev evaluation every n steps; 0 = per epoch only")
    eval_each_epoch: bool = Field(True, description="evaluate at the end of each epoch")
    patience: int = Field(3, ge=0, description="evaluations without a better dev AUC; 0 = off")
    eval_batch_size: int = Field(2048, ge=1, description="candidates per evaluation forward")
    log_every: int = Field(50, ge=1, description="log the loss every n steps")
    max_steps: int = Field(
        0, ge=0, description="cap on optimiser steps (sets the schedule); 0 = off"
    )
    stop_after: int = Field(0, ge=0, description="checkpoint and stop after this step; 0 = off")
    checkpoint_minutes: float = Field(
        10, ge=0, description="write last.pt at least this often (and at every evaluation); 0 = off"
    )
    num_workers: int = Field(0, ge=0, description="data loader worker processes")
    progress: bool = Field(True, description="show progress bars")

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device(value)


class TrainConfig(Section):
    """The whole training configuration: a TOML file's four sections, as written to
    RUN_DIR/config.json. Read one with [`load_config`][mmnewsrec.config.load_config]."""

    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    def resolved(self) -> TrainConfig:
        """A copy with absolute store, vectors and output paths."""
        data = self.data.model_copy(
            update={
                "store_dir": self.data.store_dir.expanduser().resolve(),
                "vectors_dir": self.data.vectors_dir.expanduser().resolve(),
            }
        )
        run = self.run.model_copy(update={"out_dir": self.run.out_dir.expanduser().resolve()})
        return self.model_copy(update={"data": data, "run": run})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings)."""
        return self.model_dump(mode="json")


def shipped_configs() -> list[Path]:
    """The configuration files that ship inside the package."""
    folder = resources.files("mmnewsrec") / "configs"
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml"))


def find_config(name: str | Path) -> Path:
    """A config path, or the name of a shipped config (`train_cpu` or `train_cpu.toml`)."""
    path = Path(name)
    if path.is_file():
        return path
    for shipped in shipped_configs():
        if path.name in (shipped.name, shipped.stem):
            return shipped
    names = ", ".join(p.stem for p in shipped_configs())
    raise ConfigError(f"config file not found: {path} (shipped configs: {names})")


def parse_value(text: str) -> Any:
    """A TOML value (number, bool, quoted string, array, inline table), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `section.key[.sub]=value` strings to a nested dict (a new dict is returned)."""
    values = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        values[key.strip()] = parse_value(value.strip())
    return set_values(raw, values)


def set_values(raw: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys (`optim.lr`) of a nested dict to Python values (a new dict is returned).

    Setting `model.name` to another model drops the file's `model.args`, which belong to the
    model it named.
    """
    out = _deep_copy(raw)
    for key, value in values.items():
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {key!r}: expected section.key")
        if parts == ["model", "name"]:
            model = out.setdefault("model", {})
            if model.get("name", ModelConfig.model_fields["name"].default) != value:
                logger.info("model.name %s: dropping the model.args of another model", value)
                model.pop("args", None)
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part} is not a table")
        node[parts[-1]] = value
    return out


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Read a training configuration, as `mmnewsrec train` does.

    Args:
        path: A TOML file, or the name of a shipped config (`train_cpu`, `train_gpu`,
            `train_seed`); None for no file.
        overrides: `section.key=value` strings, the value read as TOML (`--set`).
        values: Dotted keys to Python values, set before the overrides (None values are
            skipped): what the command's own options set.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: A missing file, bad TOML, an unknown key or a bad value; the message
            names the source and each field.
    """
    source = "config"
    raw: dict[str, Any] = {}
    if path is not None:
        file = find_config(path)
        source = str(file)
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{file}: {err}") from err
    raw = set_values(raw, {k: v for k, v in (values or {}).items() if v is not None})
    raw = apply_overrides(raw, overrides)
    return validate_config(raw, source)


def validate_config(raw: Mapping[str, Any], source: str = "config") -> TrainConfig:
    """A TrainConfig from a nested dict, with errors naming the source and each field."""
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as err:
        lines = [
            f"  {'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}"
            + (f" (got {e['input']!r})" if e["type"] != "missing" else "")
            for e in err.errors()
        ]
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(lines)) from None
