"""Project-level guarantees: the README commands and CI agree, the CLI lists its commands."""

from pathlib import Path

import pytest
import typer.main
from conftest import beside_checkout
from typer.testing import CliRunner

from mmnewsrec.cli import app

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """Shell lines of the README's code blocks that start with `python3 -m venv`."""
    lines = (REPO / "README.md").read_text().splitlines()
    return [line for line in lines if line.startswith("python3 -m venv")]


def test_ci_runs_exactly_the_readme_test_command():
    demo, tests = readme_commands()[:2]
    assert "mmnewsrec demo" in demo
    assert "pytest" in tests
    ci_lines = (REPO / ".ci/run").read_text().splitlines()
    assert tests in ci_lines


STAGES = "synth download prepare encode train evaluate predict score truth experiment demo"


def listed_commands(help_text: str) -> dict[str, str]:
    """The rows of the Commands panel of a `--help`: command name -> its help, joined."""
    rows: dict[str, str] = {}
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if "Commands" in line)
    for line in lines[start + 1 :]:
        if line.startswith("╰"):
            break
        cell = line.strip("│ ").rstrip()
        if line[2] != " ":  # a new row: name, then its help
            name, _, text = cell.partition(" ")
            rows[name] = text.strip()
        else:  # the help of the row above, wrapped
            rows[name] += " " + cell
    return rows


def test_cli_help_lists_every_registered_command_with_its_help():
    registered = typer.main.get_command(app).commands
    assert set(registered) == {*STAGES.split(), "recommend", "serve", "export-events", "copy-state"}
    result = CliRunner().invoke(app, ["--help"], terminal_width=100)
    assert result.exit_code == 0
    listed = listed_commands(result.output)
    assert list(listed) == list(registered)
    for name, command in registered.items():  # as written: no text taken for rich markup
        assert listed[name] == " ".join(command.help.split("\n\n")[0].split()), name


@pytest.mark.parametrize(
    ("ci", "outcome"), [(None, pytest.skip.Exception), ("true", pytest.fail.Exception)]
)
def test_data_beside_the_checkout_is_skipped_when_absent_but_required_under_ci(
    tmp_path, monkeypatch, ci, outcome
):
    monkeypatch.delenv("CI", raising=False)
    if ci:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="not found at"):
        beside_checkout(tmp_path / "absent", "samples")
    assert beside_checkout(tmp_path, "samples") == tmp_path
