"""Command lines that re-run a stage with the values it ran with, in the CLI's own syntax.

The arguments are read off the `mmnewsrec` command definitions (parameter names, option names,
flags and defaults), so a renamed or removed option fails here instead of printing a command
that no longer works. Values equal to the CLI's defaults are left out.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typer.core import TyperCommand, TyperOption


def command_line(command: str, **params: Any) -> str:
    """`mmnewsrec COMMAND ...`, shell-quoted, giving the command's parameters (its Python
    argument names, e.g. `image_crop`) these values."""
    return shlex.join(["mmnewsrec", command, *cli_args(command, params)])


def train_command(train_config: str, values: Mapping[str, Any], overrides: Sequence[str]) -> str:
    """`mmnewsrec train` for `load_config(train_config, overrides, values)`: a value that has
    an option of its own (`--store`, `--seed`, ...) as that option, the others as `--set`
    ahead of `overrides`, which keep the last word as they do in `load_config`."""
    from mmnewsrec.cli import TRAIN_OPTIONS

    option_of = {key: name for name, key in TRAIN_OPTIONS.items()}
    params: dict[str, Any] = {"config": train_config}
    sets = []
    for key, value in values.items():
        if value is None:
            continue
        if key in option_of:
            params[option_of[key]] = value
        else:
            sets.append(f"{key}={override_value(value)}")
    return command_line("train", **params, overrides=[*sets, *overrides])


def override_value(value: Any) -> str:
    """`value` as the right-hand side of a `--set key=value` that reads back as `value`."""
    from mmnewsrec.config import parse_value

    value = str(value) if isinstance(value, Path) else value
    text = value if isinstance(value, str) else json.dumps(value)
    if parse_value(text.strip()) != value:
        text = json.dumps(value)  # a string that would read as a number, bool or array
    if parse_value(text) != value:
        raise ValueError(f"cannot write {value!r} as an override value")
    return text


def cli_args(command: str, params: Mapping[str, Any]) -> list[str]:
    """The arguments of `mmnewsrec COMMAND` giving its parameters these values, in the
    command's parameter order."""
    definition = _commands().get(command)
    if definition is None:
        raise ValueError(f"no command `mmnewsrec {command}`")
    unknown = sorted(params.keys() - {param.name for param in definition.params})
    if unknown:
        raise ValueError(f"`mmnewsrec {command}` has no parameter {', '.join(unknown)}")
    args = []
    for param in definition.params:
        if param.name in params:
            args += _param_args(command, param, params[param.name])
    return args


@cache
def _commands() -> dict[str, TyperCommand]:
    import typer.main
    from typer.core import TyperGroup

    from mmnewsrec.cli import app

    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    return dict(group.commands)  # type: ignore[arg-type]


def _param_args(command: str, param: Any, value: Any) -> list[str]:
    """One parameter's arguments: [] for its default, [VALUE] for an argument, [--OPTION,
    VALUE] (repeated for a repeatable option) or [--FLAG] for an option."""
    from typer.core import TyperArgument, TyperOption

    where = f"`mmnewsrec {command}` {param.name}"
    if value is None or (param.multiple and not value):
        if param.required or param.default not in (None, ()):
            raise ValueError(f"{where}: no value, and its default is {param.default!r}")
        return []
    if isinstance(param, TyperArgument):
        return [cli_value(value)]
    assert isinstance(param, TyperOption)
    return _option_args(where, param, value)


def _option_args(where: str, param: TyperOption, value: Any) -> list[str]:
    if param.is_flag:
        if bool(value) == bool(param.default):
            return []
        names = param.opts if value else param.secondary_opts
        if not names:
            raise ValueError(f"{where}: no option sets it to {value!r}")
        return [_long(names)]
    if param.multiple:
        return [arg for item in value for arg in (_long(param.opts), cli_value(item))]
    if param.default is not None and cli_value(value) == cli_value(param.default):
        return []
    return [_long(param.opts), cli_value(value)]


def cli_value(value: Any) -> str:
    """A value as the CLI reads it: a sequence comma-separated (`15,15,215,180`)."""
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    return str(value)


def _long(names: Sequence[str]) -> str:
    """The first long name (`--config`) of an option, else its first name."""
    return next((name for name in names if name.startswith("--")), names[0])
