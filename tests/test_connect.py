"""`mcensemble connect`: checkpoint discovery, Kruskal's tree, and a tiny end-to-end run over
four checkpoints (CLI with straight lines; Python with AutoNEB), resumed from its records."""
from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from helpers import timm_factory, train_seeded
from mcensemble.connect import checkpoint_files, connect_checkpoints, minimum_spanning_tree
from mcensemble.options import ConnectOptions
from mcensemble.errors import BadOptionError

DATA = "digits,train=128"


@pytest.fixture(scope="module")
def zoo4(tmp_path_factory):
    """Four `mce_digits_mlp` (width 16) trained briefly from seeds 0..3, in one folder."""
    from mcensemble.checkpoints import save_checkpoint
    folder = tmp_path_factory.mktemp("zoo4")
    for seed in range(4):
        net = train_seeded(timm_factory("mce_digits_mlp", width=16), seed, epochs=3, data="digits,train=400",
                           lr=0.2)
        save_checkpoint(net.state_dict(), folder / f"m{seed}.safetensors",
                        metadata={"arch": "mce_digits_mlp", "num_classes": 10, "in_chans": 1,
                                  "model_args": {"width": 16}})
    (folder / "notes.txt").write_text("not a checkpoint")
    return folder


def _tree_weight(m, edges) -> float:
    return sum(m[i][j] for i, j in edges)


def _spans(n, edges) -> bool:
    seen, todo = {0}, [0]
    while todo:
        x = todo.pop()
        for i, j in edges:
            for u, v in ((i, j), (j, i)):
                if u == x and v not in seen:
                    seen.add(v)
                    todo.append(v)
    return len(seen) == n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kruskal_is_a_minimum_spanning_tree(seed):
    rng = random.Random(seed)
    n = 5
    m = [[0.0] * n for _ in range(n)]
    for i, j in itertools.combinations(range(n), 2):
        m[i][j] = m[j][i] = rng.choice([0.1, 0.2, 0.5, rng.random()])  # ties included
    tree = minimum_spanning_tree(m)
    assert len(tree) == n - 1 and _spans(n, tree) and all(i < j for i, j in tree)
    best = min(_tree_weight(m, c) for c in itertools.combinations(itertools.combinations(range(n), 2), n - 1)
               if _spans(n, c))
    assert _tree_weight(m, tree) == pytest.approx(best)


def test_checkpoint_files(zoo4, tmp_path):
    files = checkpoint_files([zoo4])
    assert [f.name for f in files] == [f"m{i}.safetensors" for i in range(4)]
    assert checkpoint_files([zoo4 / "m1.safetensors", zoo4 / "m0.safetensors"])[0].name == "m1.safetensors"
    with pytest.raises(BadOptionError, match="twice"):
        checkpoint_files([zoo4, zoo4 / "m0.safetensors"])
    with pytest.raises(BadOptionError, match="at least two"):
        checkpoint_files([zoo4 / "m0.safetensors"])
    with pytest.raises(BadOptionError, match="no such file"):
        checkpoint_files([tmp_path / "missing.pt", zoo4])
    with pytest.raises(BadOptionError, match="holds no checkpoint"):
        checkpoint_files([tmp_path, zoo4])


@pytest.mark.parametrize("kw, option", [({"points": 1}, "points"), ({"path_points": 1.5}, "path_points")])
def test_options_are_checked(kw, option):
    with pytest.raises(BadOptionError, match=option) as e:
        ConnectOptions(**kw)
    assert e.value.option == option


def test_connect_cli_end_to_end_and_resume(zoo4, tmp_path, mce_cli):
    out = tmp_path / "out"
    args = ("connect", zoo4, "--method", "linear", "--points", "3", "--path-points", "3", "--data", DATA,
            "--threads", "1", "--out-dir", out)
    r = mce_cli(*args)
    assert r.exit_code == 0, r.output
    assert "largest saddle loss on the tree" in r.output
    header = next(line for line in r.output.splitlines() if line.startswith("tree edge"))
    assert header.split("|")[0].split()[2:] == ["barrier:", "line", "barrier:", "linear"]   # rises above the chord
    assert header.split("|")[1].split()[:2] == ["saddle", "loss"]                            # an absolute loss
    rep = json.loads((out / "connect.json").read_text())
    m = rep["matrix"]
    assert rep["matrix_batchnorm"] is None  # an MLP: nothing to re-estimate
    assert len(m) == 4 and all(m[i][j] == m[j][i] >= 0 for i in range(4) for j in range(4))
    assert len(rep["pairs"]) == 6 and len(rep["tree"]) == 3 and not any(p["reused"] for p in rep["pairs"])
    assert {(e["i"], e["j"]) for e in rep["tree"]} == set(minimum_spanning_tree(m))
    for name in ("barriers.png", "tree.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    # the matrix is the straight line's barrier, as `scan` computes it
    from mcensemble.checkpoints import load_checkpoint
    from mcensemble.data import create_loader
    from mcensemble.evaluate import scan
    from mcensemble.paths import LinearPath, load_path
    a, b = (load_checkpoint(zoo4 / f"m{i}.safetensors") for i in (0, 2))
    ref = scan(LinearPath(a.state_dict, b.state_dict), a.build_model(), create_loader(DATA), points=3)
    assert m[0][2] == pytest.approx(max(ref.barrier, 0.0), rel=1e-5, abs=1e-7)
    e = rep["tree"][0]
    assert load_path(out / e["path_file"]).kind == "linear"
    # resume: a lost pair and a lost edge are recomputed, nothing else
    (out / "pairs" / "pair-0-1.json").unlink()
    (out / "edges" / f"edge-{e['i']}-{e['j']}.json").unlink()
    r = mce_cli(*args)
    assert r.exit_code == 0, r.output
    rep2 = json.loads((out / "connect.json").read_text())
    assert [p["reused"] for p in rep2["pairs"]] == [(p["i"], p["j"]) != (0, 1) for p in rep2["pairs"]]
    assert [t["reused"] for t in rep2["tree"]] == [False, True, True]
    assert sum(rep2["matrix"], []) == pytest.approx(sum(m, []), rel=1e-6)
    # other settings: nothing is reused
    r = mce_cli(*args[:5], "5", *args[6:])
    assert r.exit_code == 0, r.output
    assert not any(p["reused"] for p in json.loads((out / "connect.json").read_text())["pairs"])


def test_connect_cli_errors(zoo4, tmp_path, mce_cli):
    r = mce_cli("connect", zoo4, "--method", "nope", "--out-dir", tmp_path / "o", "--data", DATA)
    assert r.exit_code == 2 and "unknown method" in r.output and "Traceback" not in r.output


def test_connect_neb_tree_is_below_the_straight_lines(zoo4, tmp_path):
    from mcensemble.paths.neb import NebConfig
    from mcensemble.options import BuildOptions, DataOptions
    torch.manual_seed(0)
    neb = NebConfig(cycles=((8, 0.1), (8, 0.1)), insert=1, dense_points=3, eval_batches=1)
    data = DataOptions(data=DATA, val_data="digits", batch_size=64)
    ens_file = tmp_path / "neb" / "ens.safetensors"
    rep = connect_checkpoints([zoo4], out_dir=tmp_path / "neb", data=data,
                              opts=ConnectOptions(points=5, path_points=9, candidates=5, members=3),
                              build=BuildOptions(method="neb", settings=neb), ensemble=ens_file)
    assert rep["method"] == "neb" and len(rep["tree"]) == 3
    pairs = {(p["i"], p["j"]): p for p in rep["pairs"]}
    for e in rep["tree"]:
        assert e["kind"] == "neb"
        line = json.loads((tmp_path / "neb" / "pairs" / f"pair-{e['i']}-{e['j']}.json").read_text())
        assert e["saddle"] < max(p["loss"] for p in line["points"]), (e, pairs[e["i"], e["j"]])
    assert rep["tree_max_saddle"] == max(e["saddle"] for e in rep["tree"])
    # the ensemble from the tree: members chosen across its paths on the validation data
    import mcensemble
    from mcensemble.data import create_loader
    from mcensemble.evaluate import evaluate
    e = rep["ensemble"]
    assert e["candidates"] == 3 * 5 - 2  # each checkpoint once
    assert sorted(e["checkpoints_val_nll"]) == ["0", "1", "2", "3"]
    assert 1 <= len(e["members"]) <= 3 and sum(m["weight"] for m in e["members"]) == pytest.approx(1.0)
    # 4 checkpoints, at most 3 members: the reference is the best checkpoint, never beaten in-sample
    assert e["reference"]["name"] == "the best checkpoint" and e["decision"].startswith("rule ")
    assert e["val"]["nll"] <= min(e["checkpoints_val_nll"].values()) * (1 + 1e-6)
    ens = mcensemble.load_ensemble(ens_file)
    m = evaluate(ens, create_loader("digits", split="val", batch_size=128))
    assert len(ens) == len(e["members"]) and m.nll == pytest.approx(e["val"]["nll"], rel=1e-4)
    with pytest.raises(BadOptionError, match="`val_data`"):
        connect_checkpoints([zoo4], out_dir=tmp_path / "x", data=DataOptions(data=DATA), ensemble=ens_file)
