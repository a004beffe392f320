"""Start-up time of the command line: `mcensemble --help` against the interpreter alone, a
bare `import mcensemble`, and what loading the commands costs (torch, timm, the pipeline).

    python tests/benchmarks/bench_startup.py --out FILE.md [--repeats 7]

Each row is a fresh `python` process, timed from start to exit (the median of `--repeats`
runs, interleaved so that a busy moment hits every row alike). Ratios are to `python -c pass`
measured in the same run; the last column says whether the process imported torch.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: label -> the python arguments
ROWS = {
    "`python -c pass` (the interpreter alone)": ["-c", "pass"],
    "`import mcensemble`": ["-c", "import mcensemble"],
    "`mcensemble --help`": ["-m", "mcensemble", "--help"],
    "`mcensemble --version`": ["-m", "mcensemble", "--version"],
    "`mcensemble build --help` (loads the commands)": ["-m", "mcensemble", "build", "--help"],
    "`import torch` (for scale)": ["-c", "import torch"],
}

PROBE = ("import runpy, sys\n"
         "sys.argv = ['mcensemble', *sys.argv[1:]]\n"
         "try:\n"
         "    runpy.run_module('mcensemble', run_name='__main__')\n"
         "except SystemExit:\n"
         "    pass\n"
         "print('torch' in sys.modules, file=sys.stderr)\n")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def _time(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *args], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - t0


def _imports_torch(args: list[str]) -> bool:
    if args[0] == "-m":
        cmd = [sys.executable, "-c", PROBE, *args[2:]]
    else:
        cmd = [sys.executable, "-c", args[1] + "\nimport sys; print('torch' in sys.modules, file=sys.stderr)"]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, check=True)
    return p.stderr.strip().splitlines()[-1] == "True"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="Markdown file for the table.")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    for a in ROWS.values():   # warm the file cache: the first run of each pays for the disk
        _time(a)
    times: dict[str, list[float]] = {k: [] for k in ROWS}
    for _ in range(args.repeats):
        for label, a in ROWS.items():
            times[label].append(_time(a))
    base = statistics.median(times[next(iter(ROWS))])
    lines = [f"Median of {args.repeats} fresh processes per row, interleaved; ratio to `python -c pass` "
             "in the same run.", "",
             "| what | median | ratio | imports torch |", "|---|---:|---:|---|"]
    for label, a in ROWS.items():
        med = statistics.median(times[label])
        lines.append(f"| {label} | {med * 1000:.0f} ms | {med / base:.1f}x | "
                     f"{'yes' if _imports_torch(a) else 'no'} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
