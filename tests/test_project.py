"""Project-level guarantees: the README commands and CI agree, the CLI lists its commands."""

from pathlib import Path

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


def test_cli_help_lists_every_stage():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    commands = "synth download prepare encode train evaluate predict score truth experiment demo"
    for command in (*commands.split(), "recommend", "serve"):
        assert command in result.output
