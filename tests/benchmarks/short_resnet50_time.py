"""Build time of the short path on a timm resnet50 pair at 64x64 (issue 9: "in minutes").

Two randomly initialised timm `resnet50` (10 classes, seeds 0 and 1), `--examples` random
3x64x64 inputs with random labels in batches of 32, one thread, then
`build_short_path(model, a, b, loader, search_examples=EXAMPLES, search_steps=STEPS)`
(everything else at its defaults: 17 points per measured segment, the random-half
baseline). Prints one JSON line: wall and CPU seconds of the build, the wall and CPU
seconds of one evaluation pass over the loader before it, the load average before and
after (the machine may be shared: CPU seconds and the pass counts do not depend on load),
the evaluation passes and search forwards the path records, and the search's summary.

Run:  python tests/benchmarks/short_resnet50_time.py [--steps 4] [--examples 64]
For a side by side, run it once with PYTHONPATH pointing at each tree.
Not collected by pytest, not run by run_all.py (name without the bench_ prefix).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="search_steps (swap trials per group)")
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--arch", default="resnet50")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    import timm
    from torch.utils.data import DataLoader, TensorDataset

    import mcensemble
    from mcensemble.evaluate import evaluate
    from mcensemble.paths.short import build_short_path
    torch.manual_seed(0)
    model = timm.create_model(args.arch, num_classes=10).eval()
    a = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    b = {k: v.clone() for k, v in timm.create_model(args.arch, num_classes=10).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.examples, 3, args.size, args.size, generator=gen)
    y = torch.randint(0, 10, (args.examples,), generator=gen)
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    w, c = time.perf_counter(), time.process_time()
    evaluate(model, loader)
    pass_wall, pass_cpu = time.perf_counter() - w, time.process_time() - c
    load0 = os.getloadavg()
    w, c = time.perf_counter(), time.process_time()
    path = build_short_path(model, a, b, loader, search_examples=args.examples, search_steps=args.steps,
                            progress=False)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    md = path.metadata
    print(json.dumps({"arch": args.arch, "examples": args.examples, "steps": args.steps,
                      "package": os.path.dirname(mcensemble.__file__), "build_wall_s": round(wall, 1),
                      "build_cpu_s": round(cpu, 1), "pass_wall_s": round(pass_wall, 2),
                      "pass_cpu_s": round(pass_cpu, 2), "cpu_x_pass": round(cpu / pass_cpu, 1),
                      "load_before": load0, "load_after": os.getloadavg(),
                      "evaluation_passes": md["evaluation_passes"], "search_forwards": md["search_forwards"],
                      "max_loss": path.certificate["max_loss"], "eps": path.certificate["eps"],
                      "search": {k: v for k, v in md["search"].items() if k != "start_objectives"}}))


if __name__ == "__main__":
    main()
