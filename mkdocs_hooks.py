"""MkDocs hook: the command line reference is the `--help` of every `mmnewsrec` command, run at
build time, so the page cannot drift from the command. docs/reference/cli.md marks the place."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

MARKER = "<!-- mmnewsrec --help -->"


def help_text(*args: str) -> str:
    """`mmnewsrec ARGS --help`, plain (no boxes), as the installed command prints it."""
    command = Path(sys.executable).parent / "mmnewsrec"
    env = os.environ | {"TYPER_USE_RICH": "0", "COLUMNS": "100", "NO_COLOR": "1"}
    result = subprocess.run(
        [str(command), *args, "--help"], capture_output=True, text=True, env=env, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"mmnewsrec {' '.join(args)} --help failed:\n{result.stderr}")
    return result.stdout.strip()


def command_names(top_help: str) -> list[str]:
    """The command names listed under "Commands:" in the top-level help, in its order."""
    section = top_help.split("\nCommands:\n", 1)[1]
    return re.findall(r"^  (\S+)", section, flags=re.MULTILINE)


def reference() -> str:
    top = help_text()
    parts = ["```text", top, "```"]
    for name in command_names(top):
        parts += ["", f"## mmnewsrec {name}", "", "```text", help_text(name), "```"]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, reference())
