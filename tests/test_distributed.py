"""More than one process: 2 CPU processes with the gloo backend.

One `torch.multiprocessing.spawn` job checks the library pieces (BN all-reduce against one
process over all the batches, a sharded curve fit keeping identical bends everywhere,
sharded candidate evaluation gathered in order); one `torchrun`-style run of
`python -m mcensemble build` checks the CLI end to end. The single-process behaviour of
the helpers is checked too (no-ops).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mcensemble import distributed as D
from mcensemble.bn import update_bn
from mcensemble.members import evaluate_candidates, uniform_points
from mcensemble.paths.curve_base import CurveConfig
from mcensemble.paths.fit import fit_curve
from mcensemble.zoo import DigitsCNN, DigitsMLP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bn_data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(7 * 16 + 5, 1, 8, 8, generator=g) * 2 + 0.5
    return DataLoader(TensorDataset(x), batch_size=16)  # 8 batches: 4 on rank 0, 4 on rank 1, last one short


def _bn_net() -> DigitsCNN:
    torch.manual_seed(0)
    return DigitsCNN(widths=(4, 8))


def _fit_inputs():
    torch.manual_seed(1)
    a = DigitsMLP(width=16).state_dict()
    torch.manual_seed(2)
    b = DigitsMLP(width=16).state_dict()
    g = torch.Generator().manual_seed(3)
    ds = TensorDataset(torch.rand(75, 1, 8, 8, generator=g), torch.randint(0, 10, (75,), generator=g))
    return a, b, DataLoader(ds, batch_size=16, shuffle=True)  # 5 batches, the last of 11 rows


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with D.session("cpu") as device:
        assert device == "cpu" and D.world_size() == world and D.rank() == rank
        net = _bn_net()
        update_bn(net, _bn_data(), distributed=True)
        bn = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
        a, b, loader = _fit_inputs()
        path = fit_curve(DigitsMLP(width=16), a, b, loader, config=CurveConfig(epochs=2, bends=2, seed=5),
                         progress=False)
        cands = evaluate_candidates([path], DigitsMLP(width=16), uniform_points(5), train_loader=loader)
        shards = D.gather_sharded([i * 10 for i in D.shard_indices(7)], 7)
        from mcensemble.evaluate import scan
        sc = scan(path, DigitsMLP(width=16), loader, points=3).to_dict()
        torch.save({"bn": bn, "bends": path.bends, "cands": [(c.t, c.train.loss) for c in cands], "scan": sc,
                    "shards": shards, "meta": path.metadata["fit"]}, os.path.join(out, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_bn_all_reduce_equals_one_process_over_all_batches(two_ranks):
    ref = _bn_net()
    update_bn(ref, _bn_data())
    want = {k: v for k, v in ref.state_dict().items() if "running" in k or "num_batches" in k}
    for res in two_ranks:
        assert res["bn"].keys() == want.keys()
        for k, v in want.items():
            if k.endswith("num_batches_tracked"):
                assert int(res["bn"][k]) == int(v) == 8
            else:
                torch.testing.assert_close(res["bn"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_sharded_fit_keeps_identical_bends_on_every_rank(two_ranks):
    r0, r1 = two_ranks
    for b0, b1 in zip(r0["bends"], r1["bends"]):
        assert all(torch.equal(b0[k], b1[k]) for k in b0)
    assert r0["meta"]["world_size"] == 2
    # the bends moved away from the straight line (the fit did something)
    a, b, _ = _fit_inputs()
    assert not torch.allclose(r0["bends"][0]["head.weight"], (2 * a["head.weight"] + b["head.weight"]) / 3)


def test_sharded_candidates_gathered_in_order(two_ranks):
    r0, r1 = two_ranks
    assert r0["cands"] == r1["cands"]
    assert [t for t, _ in r0["cands"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert r0["shards"] == r1["shards"] == [i * 10 for i in range(7)]
    assert r0["scan"] == r1["scan"] and [p["t"] for p in r0["scan"]["points"]] == [0.0, 0.5, 1.0]
    losses = dict(r0["cands"])  # the scan's points are the candidates' (same path, loader)
    assert all(p["loss"] == pytest.approx(losses[p["t"]], rel=1e-5) for p in r0["scan"]["points"])


def test_helpers_are_no_ops_in_one_process():
    assert (D.rank(), D.world_size(), D.is_main(), D.is_distributed()) == (0, 1, True, False)
    assert D.shard([1, 2, 3]) == [1, 2, 3] and D.gather_objects("x") == ["x"]
    assert D.gather_sharded([1, 2], 2) == [1, 2] and D.broadcast_object(5) == 5
    t = torch.ones(3)
    D.all_reduce_mean_([t])
    D.all_reduce_sum_([t])
    assert torch.equal(t, torch.ones(3))
    with D.session("cpu") as device:
        assert device == "cpu" and not D.is_distributed()
    assert str(D.process_device("cuda:1")) == "cuda:1"


def test_torchrun_build_two_processes(mce_cnn_pair, tmp_path):
    a, b = mce_cnn_pair
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "mcensemble", "build", str(a), str(b), "--epochs", "1",
           "--members", "2", "--exact-members", "--candidates", "3", "--data", "digits,train=200", "--val-data", "digits",
           "--batch-size", "64", "--threads", "1", "--out", str(tmp_path / "ens.safetensors"),
           "--report", str(tmp_path / "report.json"), "--checkpoint-dir", str(tmp_path / "ck"),
           "--soup", str(tmp_path / "soup.safetensors")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("train loss") == 1, proc.stdout  # the table is printed by rank 0 only
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["world_size"] == 2 and len(rep["members"]) == 2
    import mcensemble
    from mcensemble.data import create_loader
    from mcensemble.evaluate import evaluate
    ens = mcensemble.load_ensemble(tmp_path / "ens.safetensors")
    assert ens.temperature == pytest.approx(rep["calibration"]["temperature"], rel=1e-6)
    ens.temperature = 1.0  # the report's ensemble metrics are before calibration
    m = evaluate(ens, create_loader("digits", split="val", batch_size=128))
    assert m.acc > 0.3 and abs(m.nll - rep["ensemble"]["val"]["nll"]) < 1e-4
    from mcensemble.paths.fit_run import read_fit_checkpoint
    tensors, meta = read_fit_checkpoint(tmp_path / "ck" / "curve-0.safetensors")
    assert meta["world_size"] == 2 and meta["finished"] and {"rng.t.0", "rng.t.1"} <= tensors.keys()
    assert not list(tmp_path.glob("**/*.tmp"))
