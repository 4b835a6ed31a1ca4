"""The documentation's examples run, so the pages cannot drift from the code.

The convention (stated in docs/index.md): every ```bash and ```python block of docs/*.md runs;
```text, ```toml and ```json blocks are shown only (they need the network, a GPU, real MIND or
minutes of work, or they start a server). The blocks of a page run in order, in one folder per
page, the Python blocks in one namespace. Every folder starts as Getting started leaves it: its
blocks run first, once per session, on a small synthetic data set. The commands run on one
CPU thread each (OMP_NUM_THREADS=1): two threads of a small model mostly wait for each other.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
FIRST = "getting-started.md"  # its blocks make the data every other page starts from
RUN = ("bash", "python")
SHOWN = ("text", "toml", "json")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})(?P<lang>[\w-]*)")
TIMEOUT_S = 900


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: str  # path relative to docs/
    line: int  # 1-based line of the opening fence
    lang: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}:{self.lang}"


def code_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file, in order (indented ones dedented)."""
    page = path.relative_to(DOCS).as_posix()
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, ticks = opening["indent"], opening["ticks"]
        end = next(
            (j for j in range(i + 1, len(lines)) if lines[j].strip() == ticks),
            None,
        )
        if end is None:
            raise ValueError(f"{path}:{i + 1}: code block never closed")
        body = [line.removeprefix(indent) for line in lines[i + 1 : end]]
        blocks.append(Block(page, i + 1, opening["lang"], "\n".join(body) + "\n"))
        i = end + 1
    return blocks


def pages() -> list[Path]:
    """docs/**/*.md with Getting started first."""
    found = sorted(DOCS.rglob("*.md"))
    return sorted(found, key=lambda p: p.name != FIRST)


ALL_BLOCKS = [block for path in pages() for block in code_blocks(path)]
RUNNABLE = [block for block in ALL_BLOCKS if block.lang in RUN]


@dataclass
class PageRun:
    """The state of one page's blocks: its folder, its Python namespace, how far it got."""

    folder: Path
    namespace: dict = field(default_factory=lambda: {"__name__": "__docs__"})
    done: int = 0  # blocks of the page run so far
    failed: tuple[int, str] | None = None  # the first failing block: its index, the message

    def run_upto(self, blocks: list[Block], index: int) -> None:
        """Run the page's blocks up to blocks[index]; the first failure stops the page."""
        while self.done <= index and self.failed is None:
            try:
                run_block(blocks[self.done], self.folder, self.namespace)
            except BlockError as err:
                self.failed = (self.done, f"{blocks[self.done].id}: {err}")
            self.done += 1
        if self.failed is not None and self.failed[0] == index:
            raise BlockError(self.failed[1])
        if self.failed is not None and self.failed[0] < index:
            raise BlockError(f"not run: an earlier block failed ({self.failed[1].splitlines()[0]})")


class BlockError(Exception):
    """A documentation block that did not run."""


def run_block(block: Block, folder: Path, namespace: dict) -> None:
    if block.lang == "bash":
        run_bash(block, folder)
    else:
        run_python(block, folder, namespace)


def run_bash(block: Block, folder: Path) -> None:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = os.environ | {"PATH": path, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block.code],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    print(result.stdout)
    print(result.stderr, file=sys.stderr)
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-3000:]
        raise BlockError(f"exit status {result.returncode}\n{block.code}\n{output}")


def run_python(block: Block, folder: Path, namespace: dict) -> None:
    code = compile(block.code, f"{DOCS / block.page}:{block.line}", "exec")
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        exec(code, namespace)
    except Exception as err:
        raise BlockError(f"{type(err).__name__}: {err}\n{block.code}") from err
    finally:
        os.chdir(cwd)


def page_blocks(page: str) -> list[Block]:
    return [block for block in RUNNABLE if block.page == page]


@pytest.fixture(scope="session")
def page_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PageRun]:
    """One PageRun per page, made on first use; Getting started's folder is the start of all."""
    folder = tmp_path_factory.mktemp("docs") / "getting-started"
    folder.mkdir()
    return {FIRST: PageRun(folder)}


def page_run(runs: dict[str, PageRun], page: str) -> PageRun:
    if page not in runs:
        first = runs[FIRST]
        blocks = page_blocks(FIRST)
        try:
            first.run_upto(blocks, len(blocks) - 1)
        except BlockError as err:
            raise BlockError(f"Getting started did not run: {err}") from None
        folder = first.folder.parent / page.replace("/", "-").removesuffix(".md")
        shutil.copytree(first.folder, folder, symlinks=True)
        runs[page] = PageRun(folder)
    return runs[page]


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[block.id for block in RUNNABLE])
def test_doc_block_runs(block: Block, page_runs: dict[str, PageRun]) -> None:
    run = page_run(page_runs, block.page)
    blocks = page_blocks(block.page)
    try:
        run.run_upto(blocks, blocks.index(block))
    except BlockError as err:
        pytest.fail(str(err), pytrace=False)


def test_every_code_block_says_whether_it_runs():
    unmarked = [block.id for block in ALL_BLOCKS if block.lang not in RUN + SHOWN]
    assert not unmarked, f"code blocks without bash, python, {', '.join(SHOWN)}: {unmarked}"
    assert len(RUNNABLE) >= 20, "the guides lost their examples"


@pytest.mark.slow
def test_cli_reference_is_every_commands_help():
    """The CLI reference page is built from `--help`: every command, with its options."""
    import importlib.util

    from mmnewsrec.cli import app

    spec = importlib.util.spec_from_file_location("mkdocs_hooks", REPO / "mkdocs_hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = (DOCS / "reference/cli.md").read_text()
    reference = hooks.on_page_markdown(page, None, None, None)
    names = [command.name or command.callback.__name__ for command in app.registered_commands]
    assert hooks.MARKER not in reference
    for name in names:
        assert f"## mmnewsrec {name}\n" in reference
    assert "--recall-popular-share" in reference and "--image-map-columns" in reference
