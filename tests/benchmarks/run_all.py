"""Run the benchmarks and write each one's table to docs/benchmarks/<name>.md.

    python tests/benchmarks/run_all.py [--only NAME ...] [--dir docs/benchmarks]

Each `bench_*.py` beside this file is a script taking `--out FILE.md`; this runs them one
after another in fresh processes (so peak-memory figures do not mix) and records the
machine, the date and the exact command above each table. Timings are ratios measured in
one run; they are never asserted in tests.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # no thread count here: each benchmark sets its own (`--threads`, default 1) and states it
    # in its table; this runner's own torch thread count says nothing about the figures
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"


def emit(text: str, out: str | None = None, *, echo: bool = True) -> None:
    """A benchmark's table: written to `out` when given (`--out FILE.md`, what this runner
    reads) and printed (with `echo=False`, printed only when there is no `out`)."""
    if out:
        Path(out).write_text(text)
    if echo or not out:
        print(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="docs/benchmarks", help="Folder for the Markdown files.")
    ap.add_argument("--only", nargs="*", help="Benchmark names to run (e.g. inference curve_step).")
    args = ap.parse_args()
    benches = sorted(HERE.glob("bench_*.py"))
    if args.only:
        benches = [b for b in benches if b.stem.removeprefix("bench_") in args.only]
    failed = []
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    for b in benches:
        name = b.stem.removeprefix("bench_")
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "table.md"
            print(f"running {b.name} ...", file=sys.stderr, flush=True)
            p = subprocess.run([sys.executable, str(b), "--out", str(out)], cwd=HERE.parent.parent)
            if p.returncode or not out.exists():
                failed.append(b.name)
                continue
            body = out.read_text()
        head = (f"# Benchmark: {name}\n\nMachine: {machine()}.  \nDate: {dt.date.today()}.  \n"
                f"Command: `python tests/benchmarks/run_all.py --only {name}` "
                f"(runs `python tests/benchmarks/{b.name} --out FILE.md`).\n\n")
        (Path(args.dir) / f"{name}.md").write_text(head + body)
    print(f"wrote {len(benches) - len(failed)} file(s) to {args.dir}" +
          (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
