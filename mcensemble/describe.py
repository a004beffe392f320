"""`mcensemble inspect`: what a file is (checkpoint, ensemble file or path file), its
architecture, sizes, dtypes, metadata and, on request, its unit graph."""
from __future__ import annotations

import os
from collections import Counter
from typing import Any

from ._io import read_header
from .checkpoints import load_checkpoint
from .data import example_input
from .ensemble import read_ensemble_metadata
from .errors import MCEnsembleError
from .inputs import model_arg, unit_graph_of
from .models import ModelSpec
from .options import ModelOptions
from .paths import load_path
from .units import build_unit_graph

__all__ = ["describe_checkpoint"]


def _mcensemble_header(file: str | os.PathLike) -> dict[str, Any] | None:
    """The `mcensemble` JSON of a safetensors header, or None (not safetensors, no such key)."""
    try:
        doc = read_header(file).document("mcensemble")
    except MCEnsembleError:  # not safetensors / unreadable: the checkpoint reader gives the real error
        return None
    return doc if isinstance(doc, dict) else None


def _describe_own_file(file: str | os.PathLike, doc: dict[str, Any]) -> dict[str, Any]:
    """`inspect` of an ensemble or path file: validated through their own readers."""
    spec = ModelSpec.from_dict(doc["model"]).describe() if doc.get("model") else "not recorded (pass model=)"
    info: dict[str, Any] = {"file": str(file), "format": f"{doc['format']} v{doc.get('format_version')}",
                            "model": spec}
    if doc["format"] == "mcensemble-ensemble":
        doc = read_ensemble_metadata(file)
        info["members"] = len(doc.get("members") or [])
        info["t"] = ", ".join("?" if m.get("t") is None else f"{m['t']:.3f}" for m in doc.get("members") or [])
        info["combine"] = doc.get("combine")
    else:
        path = load_path(file)
        info["kind"] = path.kind
        if path.vertex_t is not None:
            info["vertices"] = len(path.vertex_t)
        if path.certificate:
            info["certificate"] = {k: path.certificate.get(k) for k in ("max_loss", "eps", "loss_a", "loss_b")}
    hashes = doc.get("tensor_sha256")
    info["hashes"] = (f"SHA-256 of {len(hashes)} tensors recorded (check them: `verify`)"
                      if isinstance(hashes, dict) and hashes else "none recorded (a file from before they were)")
    skip = {"format", "format_version", "model", "members", "groups", "vertices", "certificate", "tensor_sha256"}
    info["metadata"] = {k: v for k, v in doc.items() if k not in skip}
    return info


def describe_checkpoint(file: str | os.PathLike, opts: ModelOptions, *, units: bool = False,
                        units_out: str | os.PathLike | None = None) -> dict[str, Any]:
    """What `mcensemble inspect` prints: format, architecture, sizes, dtypes, EMA, metadata;
    with `units`, the unit graph (traced, or `opts.unit_graph` checked against the model);
    `units_out` writes it as JSON, to edit and pass back with `--unit-graph`."""
    doc = _mcensemble_header(file)
    if doc and doc.get("format") in ("mcensemble-ensemble", "mcensemble-path"):
        return _describe_own_file(file, doc)
    ck = load_checkpoint(file, model=model_arg(opts), ema=opts.ema)
    sd, md = ck.state_dict, dict(ck.metadata)
    dtypes = Counter(str(v.dtype).replace("torch.", "") for v in sd.values())
    info: dict[str, Any] = {
        "file": str(file),
        "format": md.pop("format", "?"),
        "arch": md.pop("arch", None) or (opts.arch or opts.model or "unknown (pass `arch` or `model`)"),
        "tensors": len(sd),
        "parameters": f"{sum(v.numel() for v in sd.values() if v.is_floating_point()):,} floating values",
        "dtypes": ", ".join(f"{k} x{n}" for k, n in sorted(dtypes.items())),
        "weights": md.pop("weights", None) or "plain state dict (no EMA)",
        "sha256": md.pop("sha256", None),
        "metadata": {k: v for k, v in md.items() if v is not None and k != "source"},
    }
    if units or units_out:
        net = ck.build_model()
        graph = unit_graph_of(net, opts) or build_unit_graph(net, example_input(net))
        info["units"] = graph.describe()
        if units_out is not None:
            graph.save(units_out)
            info["units_file"] = str(units_out)
    return info
