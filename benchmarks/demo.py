"""Time `mmnewsrec demo`: wall and CPU seconds of the whole run and of each phase.

Runs the demo in a child process into a fresh folder (its output in OUT/demo.log) and reports
its wall time, its CPU time (user + system of the process and all its children: the training
jobs), the cores it used (CPU / wall), its peak RSS and the load average before and after (other
work on the machine stretches wall time, less so CPU time). Then the phases the demo recorded in
timings.json (synth, prepare, encode per encoder, recall, every training run, report).

`--baseline SRC` first runs the demo of another checkout's src/ folder (e.g. a `git worktree`
of an older commit) the same way, and prints the new / old ratios.

    python benchmarks/demo.py --out /tmp/demo-bench --quick
    python benchmarks/demo.py --out /tmp/demo-bench --quick --baseline /tmp/old/src
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def run_demo(src: Path, out: Path, quick: bool) -> dict[str, float]:
    """Run the demo of the package under `src` into `out`; its wall, CPU, RSS and load."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-c", "from mmnewsrec.cli import app; app()", "demo", "--out"]
    command += [str(out), *(["--quick"] if quick else [])]
    env = {**os.environ, "PYTHONPATH": str(src)}
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    out.mkdir(parents=True)
    with (out / "demo.log").open("w") as log:
        child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # usage: the child and all it waited for
    wall = time.perf_counter() - started
    if status != 0:
        sys.exit(f"the demo of {src} failed (wait status {status}); see {out / 'demo.log'}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_gb": usage.ru_maxrss / 2**20,  # kB on Linux
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def print_run(label: str, run: dict[str, float], out: Path) -> None:
    """The totals of one run, then its phases if it recorded them."""
    print(
        f"{label}: wall {run['wall_s']:.1f} s, CPU {run['cpu_s']:.1f} s "
        f"({run['cpu_s'] / run['wall_s']:.2f} cores), peak RSS {run['peak_rss_gb']:.2f} GB, "
        f"load average {run['load_before']:.1f} -> {run['load_after']:.1f}"
    )
    timings = out / "timings.json"
    if not timings.is_file():
        print("  (no timings.json: phases not recorded by this version)")
        return
    recorded = json.loads(timings.read_text())
    print(f"  {'phase':<52} {'wall s':>8} {'CPU s':>8}   ({recorded['jobs']} training jobs)")
    for name, phase in recorded["phases"].items():
        print(f"  {name:<52} {phase['wall_s']:>8.1f} {phase['cpu_s']:>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="scratch folder (emptied)")
    parser.add_argument("--quick", action="store_true", help="time `demo --quick`")
    parser.add_argument("--baseline", type=Path, help="src/ folder of the version to compare")
    args = parser.parse_args()
    runs = {}
    if args.baseline:
        runs["baseline"] = run_demo(args.baseline, args.out / "baseline", args.quick)
        print_run("baseline", runs["baseline"], args.out / "baseline")
    runs["this"] = run_demo(SRC, args.out / "this", args.quick)
    print_run("this version", runs["this"], args.out / "this")
    if args.baseline:
        old, new = runs["baseline"], runs["this"]
        print(
            f"this / baseline: wall {new['wall_s'] / old['wall_s']:.2f}, "
            f"CPU {new['cpu_s'] / old['cpu_s']:.2f}"
        )


if __name__ == "__main__":
    main()
