"""The layout: stages on one ground floor. Read from the import statements of src/, so a new
arrow that runs up or sideways, or a cycle, fails here."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mmnewsrec"
STAGES = ("data", "encode", "recall", "rank", "evaluate", "serve")
# Other stages a stage may import; everything else it uses lives on the ground floor.
MAY_IMPORT = {
    "data": set(),
    "encode": set(),
    "recall": set(),
    "rank": {"encode", "recall"},  # fine-tuning the text encoder; mean_cosine's recall space
    "evaluate": {"data", "encode", "recall", "rank"},  # the experiment grid runs them all
    # encode: news added while serving (POST /news); data: the behaviour signals' incremental
    # face (one definition with prepare's) and MIND's tsv format (export-events)
    "serve": {"data", "recall", "rank", "encode"},
}
GROUND = ["config", "csr", "devices", "files", "formats", "growing", "metrics"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.AST, type_checking: bool) -> set[str]:
    """Modules imported under `node` (functions included); `if TYPE_CHECKING:` blocks only when
    `type_checking`."""
    if isinstance(node, ast.ImportFrom) and node.module:
        return {node.module}
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING" and not type_checking:
        return set().union(*(imported(child, type_checking) for child in node.orelse))
    return set().union(*(imported(child, type_checking) for child in ast.iter_child_nodes(node)))


def imports(type_checking: bool = True) -> dict[str, set[str]]:
    """The mmnewsrec modules each module imports."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        found = imported(ast.parse(path.read_text()), type_checking)
        graph[module_name(path)] = {m for m in found if m.startswith("mmnewsrec.")}
    return graph


def layer(module: str) -> str:
    """'data', 'encode', ... for a stage module; 'ground' or 'top' (cli, demo) otherwise."""
    part = module.split(".")[1] if "." in module else ""
    if part in STAGES:
        return part
    return "ground" if part in GROUND else "top"


def test_stages_import_the_ground_floor_and_allowed_stages_only():
    wrong = [
        f"{module} -> {target}"
        for module, targets in imports().items()
        for target in targets
        if layer(module) in STAGES
        and layer(target) in STAGES
        and layer(target) not in MAY_IMPORT[layer(module)] | {layer(module)}
    ]
    assert not wrong


def test_the_ground_floor_imports_no_stage():
    wrong = [
        f"{module} -> {target}"
        for module, targets in imports().items()
        for target in targets
        if layer(module) == "ground" and layer(target) != "ground"
    ]
    assert not wrong


# Imports made inside a function that may close a cycle, each for a stated reason.
LAZY_CYCLE_EDGES = {
    # The report's Reproduce block reads the command line's own option definitions, so a
    # printed command cannot drift from the CLI; the CLI imports the experiment only inside
    # its commands.
    ("mmnewsrec.evaluate.reproduce", "mmnewsrec.cli"),
}


def test_no_import_cycles_at_run_time():
    graph = imports(type_checking=False)
    for module, target in LAZY_CYCLE_EDGES:
        graph[module].discard(target)
    done: set[str] = set()

    def cycle_from(module: str, path: list[str]) -> list[str]:
        """A cycle through `path` + `module`, or [] when every import below it is acyclic."""
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return []
        for target in sorted(graph.get(module, ())):
            if cycle := cycle_from(target, [*path, module]):
                return cycle
        done.add(module)
        return []

    assert [cycle_from(module, []) for module in sorted(graph)] == [[]] * len(graph)


def test_reading_artifacts_loads_no_model_library():
    code = (
        "import sys\n"
        "import mmnewsrec.csr, mmnewsrec.devices, mmnewsrec.files, mmnewsrec.metrics\n"
        "import mmnewsrec.formats.runs, mmnewsrec.formats.store, mmnewsrec.formats.vectors\n"
        "heavy = ('torch', 'transformers', 'sentence_transformers', 'mmnewsrec.encode',\n"
        "         'mmnewsrec.rank', 'mmnewsrec.recall', 'mmnewsrec.serve', 'mmnewsrec.data')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(heavy)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_the_synthetic_generator_has_no_import_cycle_even_for_type_checking():
    graph = imports(type_checking=True)
    synthetic = {m for m in graph if m.startswith("mmnewsrec.data.synthetic.")}
    for module in synthetic:
        below, todo = set(), [module]
        while todo:  # every module `module` reaches through the package's own imports
            for target in graph[todo.pop()] & synthetic - below:
                below.add(target)
                todo.append(target)
        assert module not in below, f"{module} imports itself through {sorted(below)}"
