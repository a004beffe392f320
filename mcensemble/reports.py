"""The JSON reports of the jobs (`build`, `eval`, FGE): their rows, summaries and baselines.

Everything here turns what a job computed into the report's dictionaries; the scoring of
baseline rows is `baselines.Scorer`'s.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path as _FsPath
from typing import Any

from ._io import sha256_file
from .baselines import SOUP_NOTE, Scorer, packed_state, skipped_row, soup_state, vs_reference, weighted_average
from .bn import has_batchnorm
from .checkpoints import load_checkpoint
from .distributed import world_size
from .evaluate import barrier, evaluate
from .inputs import overlap_warning
from .members import candidate_state
from .options import BuildOptions, DataOptions
from .paths import path_kind

__all__ = ["TRAIN_ONLY_WARNING", "describe_source", "data_report", "report_splits", "choice_report",
           "choice_summary", "build_report", "scan_summary", "cand_metrics", "endpoint_cands", "ens_metrics",
           "soup_note", "packed_row", "build_baselines", "source_states", "eval_baselines", "fge_baselines",
           "calibrated_on", "calibration_of"]

_log = logging.getLogger(__name__)


TRAIN_ONLY_WARNING = ("no `val_data`: the members were not chosen on held-out data, and every number in the "
                      "report is on the training data, which also fitted the checkpoints and the path; pass "
                      "`val_data` (and `test_data`) for an honest comparison")


def describe_source(ck) -> dict[str, Any]:
    md = ck.metadata
    return {k: md.get(k) for k in ("format", "arch", "weights", "sha256") if md.get(k) is not None}


def data_report(data: DataOptions) -> dict[str, Any]:
    d = {"train": data.data, "val": data.val_data}
    if data.test_data:
        d["test"] = data.test_data
    return d


def report_splits(train, val, test) -> dict[str, Any]:
    """The splits every baseline row is scored on: "val" (else "train") and "test"."""
    splits = {"val": val} if val is not None else {"train": train}
    if test is not None:
        splits["test"] = test
    return splits


def choice_report(sel, grid, *, max_members: int, exact: bool = False) -> dict[str, Any]:
    """The member choice for the report: the rule, the reference and the alternative, the
    examples each was picked and confirmed on, the confirmed gain and its interval, the
    members and weights, the selection NLL of each choice, the guarantee."""
    def where(i: int) -> dict[str, Any]:
        return {"t": grid[i].u, "path": grid[i].path, "path_t": grid[i].t}

    def members_of(d: dict[str, Any]) -> list[dict[str, Any]]:
        return [{**where(i), "count": c} for i, c in zip(d["indices"], d["counts"])]

    b = sel.baselines
    nll: dict[str, Any] = {"best_single": b["best_single"]["nll"], "best_single_t": grid[b["best_single"]["index"]].u,
                           "endpoints": [{**where(e["index"]), "nll": e["nll"]} for e in b["endpoints"]],
                           "chosen": sel.nll}
    if "endpoints_ensemble" in b:
        nll["endpoints_ensemble"] = b["endpoints_ensemble"]["nll"]
    greedy = dict(sel.greedy)
    if greedy:
        greedy["members"] = members_of(greedy)
        del greedy["indices"], greedy["counts"]
    ref = sel.reference
    reference = {"name": ref["name"], "cost": ref["cost"], "selection_nll": ref["nll"], "members": members_of(ref)}
    conf = dict(sel.confirmation)
    if conf:
        conf["folds"] = [{**{k: v for k, v in f.items() if k != "alternative"},
                          "alternative": members_of(f["alternative"])} for f in conf["folds"]]
    out = {"rule": sel.rule, "data": "val", "max_members": max_members, "exact": exact,
           "n_members": len(sel.indices), "weights": sel.weights, "counts": sel.counts,
           "members": [{**where(i), "count": c, "weight": w} for i, c, w in zip(sel.indices, sel.counts, sel.weights)],
           "reference": reference, "confirmation": conf, "selection_nll": nll, "greedy": greedy,
           "guarantee": sel.guarantee}
    if sel.vs_checkpoints is not None:
        out["vs_checkpoints"] = sel.vs_checkpoints
    return out


def choice_summary(choice: dict[str, Any]) -> dict[str, Any]:
    """What the ensemble file records of the choice (the report has the rest)."""
    keys = ("rule", "data", "max_members", "exact", "n_members", "decision", "guarantee")
    out = {k: choice.get(k) for k in keys}
    if choice.get("reference"):
        out["reference"] = choice["reference"]["name"]
    test = (choice.get("confirmation") or {}).get("test")
    if test:
        out["confirmation"] = {k: test[k] for k in ("gain", "relative_gain", "ci95", "p_positive", "accepted")}
    if "selection_nll" in choice:
        out["selection_nll"] = {k: v for k, v in choice["selection_nll"].items() if k != "endpoints"}
    return out


def build_report(files, cks, paths, grid, members, weights, line, opts: BuildOptions, data: DataOptions, *,
                  greedy: bool, batchnorm: bool, ensemble: dict[str, Any]) -> dict[str, Any]:
    """The JSON report of `build`: endpoints, members, the ensemble, both scans. BatchNorm
    statistics are re-estimated at every point of a BN model."""
    bn = batchnorm
    report: dict[str, Any] = {
        "method": opts.method, "selection": "greedy-val-nll" if greedy else "uniform",
        "checkpoints": [{"file": str(f), **describe_source(ck)} for f, ck in zip(files, cks)],
        "data": data_report(data), "seed": data.seed,
        "batchnorm": bn, "bn_reestimated": bn,
        "endpoints": {name: cand_metrics(c) for name, c in endpoint_cands(grid, len(paths))},
        "members": [{**c.info(paths[0].kind), "weight": w} for c, w in zip(members, weights)],
        "ensemble": ensemble,
        "path": scan_summary(grid), "line": scan_summary(line), "world_size": world_size(),
        "split": "val" if data.val_data else "train", "warnings": [],
    }
    if not data.val_data:
        _log.warning(TRAIN_ONLY_WARNING)
        report["warnings"].append(TRAIN_ONLY_WARNING)
    if overlap_warning(data):
        report["warnings"].append(overlap_warning(data))
    kind = path_kind(opts.method)  # its own entries: a curve's settings, AutoNEB's bands, ...
    report.update(kind.report_section(paths, kind.config_from(opts.settings, seed=data.seed)))
    if getattr(paths[0], "certificate", None):
        report["certificates"] = [p.certificate for p in paths]
    return report


def scan_summary(cands) -> dict[str, Any]:
    return {"points": [cand_metrics(c) for c in cands], "worst": cand_metrics(max(cands, key=_train_loss)),
            "barrier": _barrier(cands)}


def _train_loss(c) -> float:
    return c.train.loss


def _barrier(cands) -> float:
    """The largest of the joined paths' barriers (`evaluate.barrier` of each path's scanned
    points; 0 when no path has both ends scanned)."""
    by_path: dict[int, dict[float, float]] = {}
    for c in cands:  # joined paths share their ends: path p starts where path p - 1 ends
        by_path.setdefault(c.path, {})[c.t] = c.train.loss
        if c.t == 1.0:
            by_path.setdefault(c.path + 1, {}).setdefault(0.0, c.train.loss)
    heights = [barrier(sorted(pts), [pts[t] for t in sorted(pts)])[0]
               for pts in by_path.values() if 0.0 in pts and 1.0 in pts]
    return max([0.0, *heights])


def cand_metrics(c) -> dict[str, Any]:
    d: dict[str, Any] = {"t": c.u, "path": c.path, "path_t": c.t}
    if c.train is not None:
        d.update(loss=c.train.loss, acc=c.train.acc, nll=c.train.nll, ece=c.train.ece)
    if c.val is not None:
        d.update(val_loss=c.val.loss, val_acc=c.val.acc, val_nll=c.val.nll, val_ece=c.val.ece)
    return d


def endpoint_cands(grid, n_paths: int):
    """(name, candidate) for every checkpoint: the grid points at u = p / n_paths."""
    names = [chr(ord("A") + i) if n_paths < 26 else f"ckpt{i}" for i in range(n_paths + 1)]
    ends = [c for c in grid if c.t in (0.0, 1.0)]
    return list(zip(names, sorted(ends, key=lambda c: c.u)))


def ens_metrics(ens, train, val, device, test=None) -> dict[str, Any]:
    out = {"train": evaluate(ens, train, device=device, progress=False).to_dict()}
    if val is not None:
        out["val"] = evaluate(ens, val, device=device, progress=False).to_dict()
    if test is not None:
        out["test"] = evaluate(ens, test, device=device, progress=False).to_dict()
    out["strategy"] = ens.strategy
    return out


def soup_note(report) -> str:
    return SOUP_NOTE if report.get("batchnorm") else SOUP_NOTE.split(",")[0] + " (no BatchNorm)"


def packed_row(sc, net, a, b, train, *, graph=None, data) -> dict[str, Any]:
    """The packed pair's report row: scored by `sc`, or skipped with the reason it does not apply."""
    packed, why = packed_state(net, a, b, train, graph=graph, device=data.device, progress=data.progress)
    if packed is None:
        return skipped_row("packed pair", "packed", 1, why)
    sc.add("packed", packed.state)
    return sc.row("packed pair", "packed", ["packed"], method=packed.method, certificate=packed.certificate,
                  seconds=packed.seconds, note="importance-ranked halves, no swap search; BatchNorm and eps "
                  f"on {packed.certificate['data']['losses']} (`mcensemble pack` searches)")


def build_baselines(net, grid, paths, ends, soup_sd, report, opts: BuildOptions, data: DataOptions, *, graph,
                     loaders, members=None, weights=None) -> list[dict[str, Any]]:
    """Rows: each checkpoint (cost 1), their equal-weight ensemble (cost = their number),
    the soup (cost 1), the packed pair (cost 1, two checkpoints of a layered network) and
    the built ensemble (cost K), on the report's splits. With the built ensemble's `members`
    (grid candidates) and `weights`, its row carries `vs_reference`: the members' mixture
    (uncalibrated, as it was chosen) against the reference (`report["choice"]["reference"]`,
    else the checkpoints' ensemble) per split, the NLL gain with an interval. Members that are
    checkpoints, and every member's selection split, reuse what is already scored."""
    train, val, test = loaders
    sc = Scorer(net, report_splits(train, val, test), device=data.device, calibrate=calibrated_on(report))
    ends_c = endpoint_cands(grid, len(paths))
    for name, c in ends_c:
        sc.add(name, candidate_state(paths[c.path], c), known={"val": c.val_log_probs})
    rows = [sc.row(f"endpoint {name}", "endpoint", [name], t=c.u) for name, c in ends_c]
    names = [n for n, _ in ends_c]
    rows.append(sc.row(f"{'+'.join(names)} ensemble", "endpoints-ensemble", names))
    sc.add("soup", soup_sd)
    rows.append(sc.row("soup", "soup", ["soup"], note=soup_note(report)))
    if not opts.packed:
        rows.append(skipped_row("packed pair", "packed", 1, "not computed (`packed` is off)"))
    elif len(ends) != 2:
        rows.append(skipped_row("packed pair", "packed", 1, f"packs two checkpoints; {len(ends)} were given"))
    else:
        rows.append(packed_row(sc, net, ends[0], ends[1], train, graph=graph, data=data))
    e = report["ensemble"]
    k = len(report["members"])
    row = {"name": f"built ensemble ({k} member{'s' if k != 1 else ''})", "kind": "ensemble",
           "cost": sum(1 for m in report["members"] if m["weight"] > 0), **{s: e[s] for s in sc.splits if s in e},
           **calibration_of(report)}
    if members is not None:
        ref = (report.get("choice") or {}).get("reference")
        at = {round(m["t"], 9) for m in ref["members"]} if ref else None
        ref_keys = [n for n, c in ends_c if at is None or round(c.u, 9) in at]
        keys = [next((n for n, e in ends_c if e is c), None) or
                sc.add(("member", i), candidate_state(paths[c.path], c), known={"val": c.val_log_probs})
                for i, c in enumerate(members)]
        row["vs_reference"] = vs_reference(sc, ref["name"] if ref else f"the {len(names)} checkpoints' ensemble",
                                           ref_keys, keys, weights=weights)
    rows.append(row)
    return rows


def source_entry(file, sha256: str | None, dest) -> dict[str, Any]:
    """How a written file records a source checkpoint: `file` (absolute) and `relative` (to
    the folder of `dest`, the file being written), so that `eval` finds it from any folder,
    and after the files moved together."""
    path = _FsPath(file).resolve()
    entry: dict[str, Any] = {"file": str(path), "sha256": sha256}
    if dest is not None:
        try:
            entry["relative"] = os.path.relpath(path, _FsPath(dest).resolve().parent)
        except ValueError:  # another drive (Windows): the absolute name only
            pass
    return entry


def calibrated_on(report) -> str | None:
    """The split a build's temperature was fitted on (the baselines are calibrated on it too)."""
    cal = report.get("calibration") or {}
    return cal.get("fit") if "temperature" in cal else None


def calibration_of(report) -> dict[str, Any]:
    """`{"calibration": ...}` for the built ensemble's row when the build fitted a temperature."""
    return {"calibration": report["calibration"]} if calibrated_on(report) else {}


def source_states(ens, file, model) -> tuple[list[tuple[str, dict]], list[tuple[str, str]]]:
    """(name, state dict) of each recorded source checkpoint still there and unchanged (looked
    for by its absolute name, then relative to the ensemble file's folder), and why others
    were not used."""
    found, why = [], []
    here = _FsPath(file).parent
    for i, src in enumerate(ens.metadata.get("sources") or []):
        name = chr(ord("A") + i) if i < 26 else f"ckpt{i}"
        f = src.get("file") if isinstance(src, dict) else None
        rel = src.get("relative") if isinstance(src, dict) and isinstance(src.get("relative"), str) else None
        cands = [] if not f else [_FsPath(f), *([here / rel] if rel else []), here / f]
        path = next((p for p in cands if p.exists()), None)
        if path is None:
            why.append((name, f"source {f!r} is not there"))
            continue
        try:
            ck = load_checkpoint(path, model=model if model is not None else ens.model_spec)
            sha = ck.metadata.get("sha256") or sha256_file(ck.path)
        except Exception as e:  # noqa: BLE001 - a baseline that cannot be read is skipped, with the reason
            why.append((name, f"{path} could not be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})"))
            continue
        if src.get("sha256") and sha != src["sha256"]:
            why.append((name, f"{path} changed since the build (sha256 differs)"))
            continue
        found.append((name, ck.state_dict))
    return found, why


def eval_baselines(ens, file, per, loader, train, test, model, data: DataOptions, *,
                   calibrate: bool = False) -> list[dict[str, Any]]:
    """`eval`'s rows: the recorded checkpoints (as saved) and their ensemble, the soup, the
    packed pair and the file's ensemble, on the evaluation data ("eval") and `--test-data`;
    `calibrate`: each row also gets a temperature fitted on the evaluation data."""
    splits = {"eval": loader, **({"test": test} if test is not None else {})}
    net = ens.members[0]
    sc = Scorer(net, splits, device=data.device, calibrate="eval" if calibrate else None)
    for i, member in enumerate(ens.members):
        sc.add(("member", i), model=member, known={"eval": per[i]})
    srcs, why = source_states(ens, file, model)
    rows: list[dict[str, Any]] = []
    names: list[str] = []
    for name, st in srcs:
        try:
            sc.add(name, st)
        except Exception as e:  # noqa: BLE001 - e.g. a source of another architecture
            why.append((name, f"does not load into the ensemble's model ({str(e).splitlines()[0][:200]})"))
            continue
        rows.append(sc.row(f"endpoint {name}", "endpoint", [name]))
        names.append(name)
    if len(names) >= 2:  # the checkpoints as saved, beside the file's own members (BatchNorm maybe re-estimated)
        rows.append(sc.row(f"{'+'.join(names)} ensemble (checkpoints as saved)", "endpoints-ensemble", names))
    rows += [skipped_row(f"endpoint {name}", "endpoint", 1, reason) for name, reason in why]
    bn = has_batchnorm(net)
    need_train = "needs training data: pass `data` (training) and `val_data` (evaluation)"
    if train is None and bn:
        rows.append(skipped_row("soup", "soup", 1, need_train + " (BatchNorm is re-estimated on it)"))
    else:
        states = ens.member_states()
        soup = soup_state(copy.deepcopy(net), states, ens.weights, train, device=data.device) if bn else \
            weighted_average(states, ens.weights)
        sc.add("soup", soup)
        rows.append(sc.row("soup", "soup", ["soup"]))
    if len(srcs) != 2:
        rows.append(skipped_row("packed pair", "packed", 1, f"packs two recorded checkpoints; {len(srcs)} found"))
    elif train is None:
        rows.append(skipped_row("packed pair", "packed", 1, need_train))
    else:
        rows.append(packed_row(sc, copy.deepcopy(net), srcs[0][1], srcs[1][1], train, data=data))
    k = len(ens)
    stored = "as stored: BatchNorm re-estimated at build" if bn else "as stored"
    row = sc.row(f"this file's ensemble ({k} member{'s' if k != 1 else ''}, {stored})", "ensemble",
                 [("member", i) for i in range(k)], weights=ens.weights)
    if names:
        row["vs_reference"] = _eval_reference(sc, ens, names)
    rows.append(row)
    return rows


def _eval_reference(sc, ens, names: list[str]) -> dict[str, Any]:
    """`eval`'s reference, as `build` chose it: the recorded checkpoints' ensemble when the
    build allowed as many members (`max_members`, else the file's member count), else the
    best of them on the evaluation data; the file's ensemble against it, with intervals."""
    choice = ens.metadata.get("choice") if isinstance(ens.metadata.get("choice"), dict) else {}
    budget = choice.get("max_members") if isinstance(choice.get("max_members"), int) else len(ens)
    if len(names) >= 2 and budget >= len(names):
        ref_name, ref_keys = f"the {len(names)} checkpoints' ensemble", names
    else:
        best = min(names, key=lambda n: sc.row(n, "endpoint", [n])["eval"]["nll"])
        ref_name, ref_keys = ("the best checkpoint" if len(names) > 1 else "the checkpoint"), [best]
    k = len(ens)
    out = vs_reference(sc, ref_name, ref_keys, [("member", i) for i in range(k)], weights=ens.weights)
    out["built_by"] = choice.get("decision")
    return out


def fge_baselines(net, ck, soup_sd, report, loaders, data: DataOptions) -> list[dict[str, Any]]:
    """FGE's rows: the start checkpoint (cost 1), the snapshots' soup (cost 1), the packed
    pair (does not apply: one checkpoint) and the FGE ensemble (cost K)."""
    sc = Scorer(net, report_splits(*loaders), device=data.device, calibrate=calibrated_on(report))
    sc.add("start", ck.state_dict)
    sc.add("soup", soup_sd)
    e, k = report["ensemble"], len(report["members"])
    return [sc.row("start checkpoint", "endpoint", ["start"]),
            sc.row("soup", "soup", ["soup"], note=soup_note(report)),
            skipped_row("packed pair", "packed", 1, "FGE starts from one checkpoint: there is no pair to pack"),
            {"name": f"FGE ensemble ({k} member{'s' if k != 1 else ''})", "kind": "ensemble", "cost": k,
             **{s: e[s] for s in sc.splits if s in e}, **calibration_of(report)}]
