"""Mutation fuzz of every file kind mcensemble reads: a damaged or crafted file either loads
or raises `MCEnsembleError`, within a memory cap, never another exception.

Real files are written first (an ensemble; linear, bezier, polychain, dropout and short
paths; a curve-fit checkpoint; a checkpoint), by the library itself, for a tiny timm MLP. Each is
then mutated `MUTANTS_PER_KIND` times (seeded), both in its `mcensemble` header JSON
(every wrong JSON type, absurd sizes, missing and extra fields, broken JSON) and in its
tensors (truncation, flipped bytes, wrong dtypes / shapes / offsets in the safetensors
header, missing, extra and renamed tensors), and every mutant goes through the whole load:
`load_path` + `state_at`, `mcensemble.load_ensemble` + `forward`, `read_fit_checkpoint` + resuming
`fit_curve`, `load_checkpoint` + `build_model`, plus the hash check (`verify=True`).

The loads run in a subprocess whose address space is capped (`resource.RLIMIT_AS`, a
little above what the imports take), with a per-mutant alarm: a header that makes the
reader allocate from a size it never checked ends as an error here, not as a machine
that swaps. `python tests/test_fuzz_files.py --table` prints the outcome table that the
docs/reliability.md quotes.
"""
from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

#: the file kinds besides the path kinds (those come from the registry: `kinds()`)
OTHER_FILES = ("ensemble", "fit-checkpoint", "checkpoint")
MUTANTS_PER_KIND = 60
SEED = 13
CAP_ABOVE_IMPORTS = 2 << 30      # address space allowed beyond what the imports took
ALARM_S = 20                     # one mutant's load may take this long
ARCH = "mce_digits_mlp"
SPEC_KW = {"num_classes": 10, "in_chans": 1, "width": 8}

# JSON values of every type, and absurd sizes
WRONG_VALUES = [None, True, False, 0, -1, 1.5, -1e308, "", "x", [], [1, "a"], {}, {"a": 1}]
ABSURD_VALUES = [10 ** 9, 10 ** 18, -10 ** 9, 2 ** 64, 1e308, "x" * 100_000, list(range(10_000))]
ST_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "C64", "XX"]


# ----------------------------------------------------------------------------- seed files
def _loader():
    from torch.utils.data import DataLoader, TensorDataset

    from mcensemble.data import digits_tensors
    x, y = digits_tensors("train")
    return DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)


def _endpoints():
    import torch

    from mcensemble import zoo  # noqa: F401
    from mcensemble.models import ModelSpec, create_model
    spec = ModelSpec(arch=ARCH, kwargs=dict(SPEC_KW))
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append({k: v.detach().clone() for k, v in create_model(spec).state_dict().items()})
    return spec, states


def kinds() -> tuple[str, ...]:
    """Every file kind mcensemble reads: the ensemble, each registered path kind, the fit
    checkpoint and the plain checkpoint."""
    from mcensemble.paths import known_kinds
    return ("ensemble", *known_kinds(), "fit-checkpoint", "checkpoint")


#: settings that keep a built path tiny, whichever kind reads them (each ignores the others)
TINY_SETTINGS = {"epochs": 1, "bends": 1, "search_steps": 0, "cycles": ((2, 0.1),), "insert": 1, "dense_points": 2,
                 "eval_batches": 1}


def built_path_file(kind: str, dest: Path) -> Path:
    """A path of `kind` as `build` makes it (its `from_options`, tiny settings), saved to `dest`:
    the seed of any kind without a hand-made one below, e.g. AutoNEB or a kind registered by a test."""
    from mcensemble.options import BuildOptions, DataOptions
    from mcensemble.paths import path_kind
    spec, (a, b) = _endpoints()
    cls = path_kind(kind)
    path = cls.from_options(_model(), a, b, config=cls.config_from(TINY_SETTINGS, seed=0),
                            opts=BuildOptions(method=kind), data=DataOptions(progress=False),
                            fit_loader=_loader(), bn_loader=_loader())
    path.save(dest, model_spec=spec)
    return dest


def make_seed_files(folder: Path) -> dict[str, Path]:
    """One real file of each kind, written by the library (hand-made where it reaches more of
    the format: deltas, column scalings, an empty delta group)."""
    import torch

    from mcensemble.checkpoints import save_checkpoint
    from mcensemble.ensemble import save_ensemble
    from mcensemble.paths import BezierPath, LinearPath, PolyChainPath
    from mcensemble.paths.curve_base import straight_bends
    from mcensemble.paths.dropout import DropoutPath
    from mcensemble.paths.short import ShortPath
    from mcensemble.paths.curve_base import CurveConfig
    from mcensemble.paths.fit import fit_curve
    spec, (a, b) = _endpoints()
    out = {k: folder / f"{k}.safetensors" for k in kinds()}
    mid = {k: (a[k] + b[k]) / 2 for k in a}
    save_ensemble(out["ensemble"], [a, mid, b], model_spec=spec,
                  members=[{"t": 0.0}, {"t": 0.5}, {"t": 1.0}], extra={"note": "fuzz"})
    LinearPath(a, b).save(out["linear"], model_spec=spec)
    BezierPath(a, b, straight_bends(a, b, 2)).save(out["bezier"], model_spec=spec)
    PolyChainPath(a, b, straight_bends(a, b, 2)).save(out["polychain"], model_spec=spec)
    v1 = {k: v.clone() for k, v in a.items()}
    v1["layers.1.weight"][:2] = b["layers.1.weight"][:2]      # a row delta (R:/V:)
    v1["head.bias"] = b["head.bias"].clone()                   # a full delta (F:)
    v2 = {k: v.clone() for k, v in v1.items()}                 # an empty delta group
    DropoutPath([a, v1, v2, b], certificate={"max_loss": 1.0, "eps": 0.1}).save(out["dropout"], model_spec=spec)
    v3 = {k: v.clone() for k, v in v1.items()}
    v3["layers.3.weight"][:, 0] *= 2                           # a column scaling (C:)
    v3["layers.3.weight"][:, 1] = 0
    ShortPath([a, v1, v3, b], certificate={"max_loss": 1.0, "segments": []}).save(out["short"], model_spec=spec)
    save_checkpoint(a, out["checkpoint"], metadata={"arch": ARCH, **SPEC_KW, "model_args": {"width": 8}})
    fit_curve(_model(), a, b, _loader(), config=CurveConfig(kind="bezier", bends=1, epochs=1),
              checkpoint=out["fit-checkpoint"], progress=False)
    for kind in kinds():
        if not out[kind].exists():          # a kind without a hand-made seed: built as `build` builds it
            built_path_file(kind, out[kind])
    torch.manual_seed(0)
    return out


def _model():
    from mcensemble.models import ModelSpec, create_model
    return create_model(ModelSpec(arch=ARCH, kwargs=dict(SPEC_KW)))


# ----------------------------------------------------------------------------- file surgery
def _split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + body


def _tensors(header: dict, body: bytes) -> list[list]:
    """[name, dtype, shape, bytes] in file order."""
    out = [[k, v["dtype"], list(v["shape"]), body[v["data_offsets"][0]:v["data_offsets"][1]]]
           for k, v in header.items() if k != "__metadata__"]
    return sorted(out, key=lambda e: header[e[0]]["data_offsets"][0])


def _pack(meta: dict | None, entries: list[list]) -> bytes:
    """A structurally valid safetensors file from [name, dtype, shape, bytes] entries."""
    header: dict = {"__metadata__": meta} if meta is not None else {}
    body, pos = b"", 0
    for name, dtype, shape, data in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(data)]}
        body += data
        pos += len(data)
    return _join(header, body)


def _field_paths(doc, prefix=(), depth=3) -> list[tuple]:
    out = []
    if depth == 0:
        return out
    items = doc.items() if isinstance(doc, dict) else enumerate(doc[:3]) if isinstance(doc, list) else []
    for k, v in items:
        out.append(prefix + (k,))
        if isinstance(v, (dict, list)):
            out += _field_paths(v, prefix + (k,), depth - 1)
    return out


def _pick(rng, paths: list[tuple]) -> tuple:
    """A field path, each top-level field equally likely (a field itself half the time, else
    one inside it), so that big records (the hashes) do not crowd out the small fields."""
    tops = sorted({p[0] for p in paths}, key=str)
    top = rng.choice(tops)
    inside = [p for p in paths if p[0] == top and len(p) > 1]
    if (top,) in paths and (not inside or rng.random() < 0.5):
        return (top,)
    return rng.choice(inside)


def _set(doc, path, value, *, delete=False):
    node = doc
    for k in path[:-1]:
        node = node[k]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value


def _get(doc, path):
    for k in path:
        doc = doc[k]
    return doc


def _json_type(v) -> str:
    return "null" if v is None else "bool" if isinstance(v, bool) else "number" if isinstance(v, (int, float)) \
        else type(v).__name__


# each mutation: (rng, data) -> (new bytes, what). Grouped by what the table reports.
def _meta_doc(data: bytes) -> tuple[dict, bytes, dict]:
    header, body = _split(data)
    return header, body, json.loads(header["__metadata__"]["mcensemble"])


def _with_doc(data: bytes, fn) -> bytes:
    header, body, doc = _meta_doc(data)
    doc = fn(doc)
    header["__metadata__"]["mcensemble"] = doc if isinstance(doc, str) else json.dumps(doc)
    return _join(header, body)


def m_wrong_type(rng, data):
    _, _, doc = _meta_doc(data)
    path = _pick(rng, _field_paths(doc))
    cur = _json_type(_get(doc, path))
    value = rng.choice([v for v in WRONG_VALUES if _json_type(v) != cur])
    return _with_doc(data, lambda d: (_set(d, path, copy.deepcopy(value)), d)[1]), f"{path} = {value!r}"


def m_absurd(rng, data):
    _, _, doc = _meta_doc(data)
    paths = _field_paths(doc)
    numeric = [p for p in paths if _json_type(_get(doc, p)) == "number"]
    path = _pick(rng, numeric if numeric and rng.random() < 0.7 else paths)
    value = rng.choice(ABSURD_VALUES)
    return _with_doc(data, lambda d: (_set(d, path, copy.deepcopy(value)), d)[1]), f"{path} = {str(value)[:20]}"


def m_missing(rng, data):
    _, _, doc = _meta_doc(data)
    path = _pick(rng, [p for p in _field_paths(doc) if isinstance(_get(doc, p[:-1]), dict)])
    return _with_doc(data, lambda d: (_set(d, path, None, delete=True), d)[1]), f"del {path}"


def m_extra(rng, data):
    _, _, doc = _meta_doc(data)
    dicts = [()] + [p for p in _field_paths(doc) if isinstance(_get(doc, p), dict)]
    where = rng.choice(dicts)
    value = rng.choice(WRONG_VALUES + ABSURD_VALUES[:2])
    return _with_doc(data, lambda d: (_set(d, where + ("zz_extra",), value), d)[1]), f"{where}+zz_extra"


def m_broken_json(rng, data):
    choice = rng.choice(["{not json", "[]", "null", "3", '"s"', '{"format": "mcensemble-path"}',
                         '{"format": "mcensemble-ensemble"}', "{}"])
    return _with_doc(data, lambda d: choice), f"doc = {choice}"


def m_dtype(rng, data):
    header, body = _split(data)
    name = rng.choice([k for k in header if k != "__metadata__"])
    header[name]["dtype"] = rng.choice(ST_DTYPES)
    if rng.random() < 0.5:   # keep the file structurally valid: bytes to match the new dtype
        meta = header.pop("__metadata__", None)
        entries = _tensors(header, body)
        size = {"F64": 8, "I64": 8, "C64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}
        for e in entries:
            if e[0] == name:
                n = 1
                for d in e[2]:
                    n *= d
                e[3] = (e[3] * 2)[:n * size.get(e[1], 1)]
        return _pack(meta, entries), f"{name} dtype {header[name]['dtype']} (repacked)"
    return _join(header, body), f"{name} dtype {header[name]['dtype']}"


def m_shape(rng, data):
    header, body = _split(data)
    name = rng.choice([k for k in header if k != "__metadata__"])
    shape = list(header[name]["shape"])
    options = [[], [0], [10 ** 9], [10 ** 9, 0], shape + [1], shape[:-1], shape[::-1], [2 * d for d in shape],
               [-1] + shape[1:]]
    new = rng.choice(options)
    header[name]["shape"] = new
    if rng.random() < 0.5 and all(isinstance(d, int) and 0 <= d < 10 ** 6 for d in new):
        meta = header.pop("__metadata__", None)
        entries = _tensors(header, body)
        for e in entries:
            if e[0] == name:
                n = 1
                for d in new:
                    n *= d
                item = len(e[3]) // max(1, _numel(shape)) or 4
                e[3] = (e[3] * (1 + n * item // max(1, len(e[3]))))[:n * item]
        return _pack(meta, entries), f"{name} shape {new} (repacked)"
    return _join(header, body), f"{name} shape {new}"


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def m_offsets(rng, data):
    header, body = _split(data)
    name = rng.choice([k for k in header if k != "__metadata__"])
    a, b = header[name]["data_offsets"]
    new = rng.choice([[b, a], [a, b + 4], [a + 4, b], [0, b - a], [a, len(body) + 4], [a, 10 ** 12],
                      [10 ** 12, 10 ** 12 + b - a]])
    header[name]["data_offsets"] = new
    return _join(header, body), f"{name} offsets {new}"


def m_missing_tensor(rng, data):
    header, body = _split(data)
    meta = header.pop("__metadata__", None)
    entries = _tensors(header, body)
    gone = entries.pop(rng.randrange(len(entries)))
    return _pack(meta, entries), f"without {gone[0]}"


def m_extra_tensor(rng, data):
    header, body = _split(data)
    meta = header.pop("__metadata__", None)
    entries = _tensors(header, body)
    src = rng.choice(entries)
    prefix = src[0].rsplit(".", 2)[0]
    name = rng.choice([f"{prefix}.zz.weight", "zz", "member.7.head.bias", "bend.5.head.bias", "delta.9.F:head.bias",
                       "rng.t.3", "momentum.4.head.bias", src[0] + ".x"])
    entries.append([name, src[1], src[2], src[3]])
    return _pack(meta, entries), f"extra {name}"


def m_rename(rng, data):
    header, body = _split(data)
    meta = header.pop("__metadata__", None)
    entries = _tensors(header, body)
    e = rng.choice(entries)
    old = e[0]
    e[0] = rng.choice([old.replace(".", "_"), "x." + old, old.replace("0", "3"), old.upper()])
    if len({x[0] for x in entries}) < len(entries):
        e[0] += ".dup"
    return _pack(meta, entries), f"rename {old} -> {e[0]}"


def m_truncate(rng, data):
    n = len(data)
    at = rng.choice([0, 4, 8, 9, rng.randrange(8, 8 + int.from_bytes(data[:8], "little")), rng.randrange(n),
                     n - 1, n - rng.randrange(1, 64)])
    return data[:at], f"truncated at {at} of {n}"


def m_flip(rng, data):
    hlen = 8 + int.from_bytes(data[:8], "little")
    buf = bytearray(data)
    if rng.random() < 0.25:
        i = rng.randrange(0, hlen)                      # the length prefix or the header JSON
    else:
        i = rng.randrange(hlen, len(buf))               # tensor bytes
    buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf), f"bit flipped at {i}"


def m_length_prefix(rng, data):
    n = rng.choice([0, 1, 2 ** 63, 2 ** 40, len(data), int.from_bytes(data[:8], "little") - 1])
    return n.to_bytes(8, "little") + data[8:], f"header length {n}"


MUTATIONS = {
    "header JSON: wrong type": [m_wrong_type],
    "header JSON: absurd size": [m_absurd],
    "header JSON: missing / extra field": [m_missing, m_extra],
    "header JSON: not JSON / not an object": [m_broken_json],
    "tensor index: dtype / shape / offsets": [m_dtype, m_shape, m_offsets],
    "tensors: missing / extra / renamed": [m_missing_tensor, m_extra_tensor, m_rename],
    "bytes: truncated / length prefix": [m_truncate, m_length_prefix],
    "bytes: bit flip": [m_flip],
}


def mutants(kind: str, data: bytes, n: int = MUTANTS_PER_KIND):
    """n seeded (category, what, bytes), cycling through the categories."""
    rng = random.Random(f"{SEED}-{kind}")
    cats = list(MUTATIONS)
    for i in range(n):
        cat = cats[i % len(cats)]
        new, what = rng.choice(MUTATIONS[cat])(rng, data)
        yield cat, what, new


# ----------------------------------------------------------------------------- loads
def _load_ensemble(f: Path) -> None:
    import torch

    import mcensemble
    from mcensemble.ensemble import verify_ensemble_file
    _checked(verify_ensemble_file, f)
    ens = mcensemble.load_ensemble(f, strategy="loop")
    ens(torch.rand(2, 1, 8, 8))


def _checked(verify, f: Path) -> None:
    """The hash check, which must also give MCEnsembleError or pass (the load decides the outcome)."""
    from mcensemble.errors import MCEnsembleError
    try:
        verify(f)
    except MCEnsembleError:
        pass


def _load_path(f: Path) -> None:
    from mcensemble.paths import load_path
    from mcensemble.paths.base import verify_path_file
    _checked(verify_path_file, f)
    p = load_path(f)
    p.state_at(0.5)
    p.state_at(0.3)


def _load_fit(f: Path) -> None:
    from mcensemble.paths.curve_base import CurveConfig
    from mcensemble.paths.fit import fit_curve
    from mcensemble.paths.fit_run import read_fit_checkpoint
    read_fit_checkpoint(f)
    _, (a, b) = _endpoints()
    fit_curve(_model(), a, b, _loader(), config=CurveConfig(kind="bezier", bends=1, epochs=1),
              checkpoint=f, resume=True, progress=False)


def _load_checkpoint(f: Path) -> None:
    from mcensemble.checkpoints import load_checkpoint
    load_checkpoint(f).build_model()


#: file kind -> its reader and what a user does next; every path kind: `_load_path`
LOADERS = {"ensemble": _load_ensemble, "fit-checkpoint": _load_fit, "checkpoint": _load_checkpoint}


def loader(kind: str):
    return LOADERS.get(kind, _load_path)


def fuzz_kind(kind: str, seed: Path, folder: Path, n: int, *, alarm_s: int | None = None) -> list[dict]:
    """Load `n` mutants of the file `seed` of `kind`: one result per mutant (outcome "loaded",
    "MCEnsembleError" or "other", with what happened). `alarm_s`: SIGALRM per mutant (the worker)."""
    import signal

    from mcensemble.errors import MCEnsembleError
    results = []
    progress = open(folder / "progress.txt", "a")
    data = seed.read_bytes()
    for i, (cat, what, blob) in enumerate(mutants(kind, data, n)):
        f = folder / "mutants" / kind / f"{i}.safetensors"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(blob)
        progress.write(f"{kind} {i} {cat}: {what}\n")
        progress.flush()
        if alarm_s:
            signal.alarm(alarm_s)
        try:
            loader(kind)(f)
            outcome = "loaded"
        except MCEnsembleError as e:
            outcome = "MCEnsembleError"
            detail = f"{type(e).__name__}: {e}"
        except _Alarm:
            outcome, detail = "other", f"no result within {alarm_s} s"
        except BaseException as e:  # noqa: BLE001 - what the test is looking for
            outcome, detail = "other", f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            if alarm_s:
                signal.alarm(0)
        results.append({"kind": kind, "category": cat, "what": what, "outcome": outcome,
                        "detail": detail if outcome != "loaded" else ""})
        f.unlink()
    progress.close()
    return results


class _Alarm(BaseException):
    pass


def _vm_size() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def run_worker(folder: Path, n: int = MUTANTS_PER_KIND) -> dict:
    """Write the seed files, cap the address space, load every mutant: the results."""
    import logging
    import resource
    import signal

    import torch

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    seeds = make_seed_files(folder)
    for kind in seeds:                       # the unmutated files load
        loader(kind)(seeds[kind])
    cap = _vm_size() + CAP_ABOVE_IMPORTS
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    def alarm(signum, frame):
        raise _Alarm()
    signal.signal(signal.SIGALRM, alarm)
    results = []
    for kind in seeds:
        results += fuzz_kind(kind, seeds[kind], folder, n, alarm_s=ALARM_S)
    return {"results": results, "cap_bytes": cap}


def run_fuzz(folder: Path, *, n: int = MUTANTS_PER_KIND, timeout: float = 600) -> dict:
    """Run `run_worker` in a fresh process (the memory cap must not hit the caller)."""
    out = folder / "results.json"
    code = (f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import test_fuzz_files as t; from pathlib import Path; "
            f"r = t.run_worker(Path({str(folder)!r}), {n}); "
            f"Path({str(out)!r}).write_text(json.dumps(r))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0 or not out.exists():
        last = (folder / "progress.txt").read_text().splitlines()[-1:] if (folder / "progress.txt").exists() else []
        raise AssertionError(f"the fuzz worker died (exit {proc.returncode}) at mutant {last}:\n"
                             f"{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


LABELS = {"ensemble": "ensemble", "fit-checkpoint": "fit checkpoint", "checkpoint": "checkpoint"}


def table(results: list[dict]) -> str:
    """Markdown: mutants per file kind and category, and what they gave (docs/reliability.md's table)."""
    per_kind = Counter(r["kind"] for r in results)
    by = defaultdict(Counter)
    for r in results:
        by[r["category"]][r["outcome"]] += 1
    lines = ["| file kind | mutants | loaded | MCEnsembleError | anything else |", "|---|---|---|---|---|"]
    for kind in per_kind:
        c = Counter(r["outcome"] for r in results if r["kind"] == kind)
        lines.append(f"| {LABELS.get(kind, kind + ' path')} | {per_kind[kind]} | {c['loaded']} | {c['MCEnsembleError']} | {c['other']} |")
    lines += ["", "| mutation | mutants | loaded | MCEnsembleError | anything else |", "|---|---|---|---|---|"]
    for cat in MUTATIONS:
        c = by[cat]
        lines.append(f"| {cat} | {sum(c.values())} | {c['loaded']} | {c['MCEnsembleError']} | {c['other']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the test
def test_every_mutant_loads_or_raises_mcensemble_error(tmp_path):
    report = run_fuzz(tmp_path)
    results = report["results"]
    assert len(results) == MUTANTS_PER_KIND * len(kinds()) and "neb" in kinds()
    bad = [r for r in results if r["outcome"] == "other"]
    assert not bad, f"{len(bad)} mutant(s) raised something else than MCEnsembleError:\n" + "\n".join(
        f"  {r['kind']} / {r['category']} / {r['what']}: {r['detail']}" for r in bad[:20])
    # the fuzz exercises both outcomes for every kind: it is not all rejected at the first byte
    for kind in kinds():
        outcomes = Counter(r["outcome"] for r in results if r["kind"] == kind)
        assert outcomes["loaded"] > 0 and outcomes["MCEnsembleError"] > 0, (kind, outcomes)
    print("\n" + table(results))


def test_mutations_are_seeded():
    data = json.dumps({"format": "x", "bends": 2, "groups": ["a", "b"]}).encode()
    header = {"__metadata__": {"mcensemble": data.decode()},
              "t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    blob = _join(header, b"\0" * 8)
    first = [(c, w, b) for c, w, b in mutants("linear", blob, 16)]
    assert first == list(mutants("linear", blob, 16))
    assert {c for c, _, _ in first} == set(MUTATIONS)


if __name__ == "__main__":
    import tempfile
    if "--table" in sys.argv:
        with tempfile.TemporaryDirectory() as d:
            rep = run_fuzz(Path(d))
        print(table(rep["results"]))
        for r in rep["results"]:
            if r["outcome"] == "other":
                print("OTHER", r)
