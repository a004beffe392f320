"""`mcensemble export`: an ensemble as one self-contained artifact for serving without mcensemble.

`export_ensemble(ens, out, format=...)` writes one file whose model maps an input batch
(dynamic batch size) to the ensemble's class probabilities, (B, C) float32:
softmax(log(sum_k w_k softmax(f_k(x))) / T) with the members' weights w_k (members of weight
0 left out) and the file's temperature T (`mcensemble.calibration`; none: T = 1), the
same function as `EnsembleModel` (`ens(x).exp()`).

Formats:

- ``onnx``: ONNX (opset 17, the TorchScript-based exporter of `torch.onnx.export`), input
  ``input``, output ``probs``; run with onnxruntime. Needs ``pip install mcensemble[export]``
  (onnx, onnxruntime).
- ``exported-program``: `torch.export` (`torch.export.load(file).module()(x)`).
- ``torchscript``: `torch.jit.trace` (`torch.jit.load(file)(x)`).

Each artifact carries a JSON description (`mcensemble.json`: members, weights,
temperature, input shape, classes): ONNX metadata_props, or the extra files of the other
two. After writing, the artifact is loaded with its own runtime and checked against the
ensemble on two batch sizes (`verify`, on by default): `ExportError` when the
probabilities differ by more than 1e-4 relative.
"""
from __future__ import annotations

import copy
import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from ._io import atomic_path
from .data import example_input
from .ensemble import EnsembleModel, load_ensemble
from .errors import BadOptionError, DataSpecError, ExportError
from .models import ModelSpec, import_entry

__all__ = ["FORMATS", "EnsembleProbabilities", "export_ensemble", "export_file", "run_artifact", "EXPORT_EXTRA"]

log = logging.getLogger(__name__)

FORMATS = ("onnx", "exported-program", "torchscript")
EXPORT_EXTRA = "pip install mcensemble[export]"
#: relative tolerance of the check against the ensemble
VERIFY_RTOL = 1e-4
ONNX_OPSET = 17


def _standalone(member: nn.Module) -> nn.Module:
    """A copy of an ensemble member that owns its tensors (the member's are views of the
    ensemble's stacked storage); tied parameters stay tied."""
    m = copy.deepcopy(member)
    done: dict[int, Any] = {}
    with torch.no_grad():
        for mod in m.modules():
            for n, p in list(mod._parameters.items()):
                if p is not None:
                    if id(p) not in done:
                        done[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=False)
                    mod._parameters[n] = done[id(p)]
            for n, b in list(mod._buffers.items()):
                if b is not None:
                    if id(b) not in done:
                        done[id(b)] = b.detach().clone()
                    mod._buffers[n] = done[id(b)]
    return m.eval()


class EnsembleProbabilities(nn.Module):
    """The ensemble as one plain module: (B, ...) inputs -> (B, C) probabilities (module
    docstring). `members`: modules; `weights`: K weights > 0 (normalised here)."""

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float], temperature: float = 1.0):
        super().__init__()
        if len(members) != len(weights) or not members:
            raise BadOptionError(f"{len(members)} member(s) and {len(weights)} weight(s) given", option="weights")
        w = torch.tensor([float(v) for v in weights], dtype=torch.float32)
        self.members = nn.ModuleList(members)
        self.register_buffer("log_weights", (w / w.sum()).log())
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lp = torch.stack([torch.log_softmax(m(x).float(), dim=1) for m in self.members])
        mix = torch.logsumexp(lp + self.log_weights.view(-1, 1, 1), dim=0)
        if self.temperature != 1.0:
            mix = torch.log_softmax(mix / self.temperature, dim=1)
        return mix.exp()


def _need(module: str) -> Any:
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BadOptionError(f"ONNX export needs {module}: `{EXPORT_EXTRA}` (onnx and onnxruntime)",
                             option="format") from e


def _check_format(format: str) -> None:
    if format not in FORMATS:
        import difflib
        close = difflib.get_close_matches(str(format), FORMATS, n=1)
        raise BadOptionError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}"
                             + (f" (did you mean {close[0]!r}?)" if close else ""), option="format")
    if format == "onnx":
        _need("onnx")
        _need("onnxruntime")


def _description(ens, module: EnsembleProbabilities, x: torch.Tensor, n_classes: int, format: str) -> dict[str, Any]:
    md = getattr(ens, "metadata", {}) or {}
    return {"format": "mcensemble-export", "format_version": 1, "export_format": format,
            "members": len(module.members), "weights": module.log_weights.exp().tolist(),
            "temperature": module.temperature, "input_shape": ["batch", *x.shape[1:]], "classes": n_classes,
            "output": "probabilities (batch, classes)", "model": md.get("model"), "sources": md.get("sources")}


def _to_bytes(module: nn.Module, x: torch.Tensor, format: str, description: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    extra = {"mcensemble.json": json.dumps(description)}
    if format == "onnx":
        onnx = _need("onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
            torch.onnx.export(module, (x,), buf, input_names=["input"], output_names=["probs"],
                              dynamic_axes={"input": {0: "batch"}, "probs": {0: "batch"}}, opset_version=ONNX_OPSET,
                              dynamo=False)
        proto = onnx.load_from_string(buf.getvalue())
        entry = proto.metadata_props.add()
        entry.key, entry.value = "mcensemble", extra["mcensemble.json"]
        onnx.checker.check_model(proto)
        return proto.SerializeToString()
    if format == "exported-program":
        batch = torch.export.Dim("batch", min=1)
        ep = torch.export.export(module, (x,), dynamic_shapes={"x": {0: batch}})
        torch.export.save(ep, buf, extra_files=extra)
        return buf.getvalue()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        traced = torch.jit.trace(module, x, check_trace=False)
        torch.jit.save(traced, buf, _extra_files=extra)
    return buf.getvalue()


def run_artifact(file: str | os.PathLike, x: torch.Tensor, *, format: str) -> torch.Tensor:
    """Run an exported file on `x` with its own runtime (onnxruntime on CPU,
    `torch.export.load`, `torch.jit.load`); returns (B, C) probabilities."""
    _check_format(format)
    if format == "onnx":
        ort = _need("onnxruntime")
        sess = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        return torch.from_numpy(sess.run(["probs"], {"input": x.detach().cpu().float().numpy()})[0])
    if format == "exported-program":
        with torch.no_grad():  # from a buffer: torch.export wants a file name ending in .pt2
            return torch.export.load(io.BytesIO(Path(file).read_bytes())).module()(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = torch.jit.load(str(file), map_location=x.device)
    with torch.no_grad():
        return m(x)


def _verify(file: Path, ens, x: torch.Tensor, format: str) -> float:
    """Largest difference between the artifact's probabilities and the ensemble's
    (`ens(x).exp()`, on the ensemble's device) on x and on a batch one larger, relative to
    the largest probability; `ExportError` above VERIFY_RTOL."""
    try:
        device = next(ens.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    worst = 0.0
    for inp in (x, torch.cat([x, x[:1] * 0.5])):
        with torch.no_grad():
            want = ens(inp.to(device)).exp().double().cpu()
        try:
            got = run_artifact(file, inp, format=format).double().cpu()
        except Exception as e:  # noqa: BLE001 - whatever the runtime raises, say which artifact failed
            raise ExportError(f"the exported {format} file {str(file)!r} does not run on a batch of "
                              f"{inp.shape[0]}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
        if got.shape != want.shape:
            raise ExportError(f"the exported {format} file gives shape {tuple(got.shape)} on a batch of "
                              f"{inp.shape[0]}, the ensemble {tuple(want.shape)}")
        diff = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
        worst = max(worst, diff)
    if not worst <= VERIFY_RTOL:
        raise ExportError(f"the exported {format} file's probabilities differ from the ensemble's by {worst:.3g} "
                          f"(relative; at most {VERIFY_RTOL} allowed): the model does not export faithfully")
    return worst


def export_ensemble(ens, out: str | os.PathLike, *, format: str = "onnx", example: torch.Tensor | None = None,
                    data: Any = None, verify: bool = True) -> dict[str, Any]:
    """Write `ens` (an `EnsembleModel`) as one artifact of `format` (module docstring) at
    `out`, atomically; the batch size is dynamic. `example`: an input batch (else one from
    `data`, a data spec or loader, else a shape guessed from the model:
    `data.example_input`). Exported on CPU in float32. Returns {"file", "format", "members",
    "temperature", "input_shape", "classes", "bytes", "verified_max_rel_diff" (with `verify`)}."""
    _check_format(format)
    if not isinstance(ens, EnsembleModel):
        raise BadOptionError(f"export needs an EnsembleModel, got {type(ens).__name__}", option="ensemble")
    keep = [i for i, w in enumerate(ens.weights) if w > 0]
    members = [_standalone(ens.members[i]).float().cpu() for i in keep]
    module = EnsembleProbabilities(members, [ens.weights[i] for i in keep], ens.temperature).eval()
    x = example if example is not None else example_input(members[0], data=data)
    x = x.detach().float().cpu()
    if x.shape[0] < 2:
        x = torch.cat([x, x])  # a batch of one would be specialised as a constant
    x = x[:2]
    try:
        with torch.no_grad():
            n_classes = int(module(x).shape[1])
    except RuntimeError as e:
        raise DataSpecError(f"the ensemble's model cannot take the example input of shape {tuple(x.shape[1:])}: "
                            f"{str(e).splitlines()[0][:300]}; pass `input_shape` C,H,W or `data`",
                            option="input_shape") from e
    desc = _description(ens, module, x, n_classes, format)
    try:
        blob = _to_bytes(module, x, format, desc)
    except BadOptionError:
        raise
    except Exception as e:  # noqa: BLE001 - exporters raise many kinds; name the format and the model
        raise ExportError(f"the ensemble's model cannot be exported as {format}: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}") from e
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_bytes(blob)
        res: dict[str, Any] = {"file": str(out), "format": format, "members": len(members),
                               "temperature": module.temperature, "input_shape": desc["input_shape"],
                               "classes": n_classes, "bytes": len(blob)}
        if verify:
            res["verified_max_rel_diff"] = _verify(tmp, ens, x, format)
    log.debug("exported %d member(s) as %s to %s", len(members), format, out)
    return res


def export_file(ensemble: str | os.PathLike, out: str | os.PathLike, *, format: str = "onnx", model: Any = None,
                trust_remote_code: bool = False, input_shape: Sequence[int] | None = None, data: Any = None,
                verify: bool = True) -> dict[str, Any]:
    """`mcensemble export`: load the ensemble file (model as in `load_ensemble`; a
    "module:function" string is imported) and `export_ensemble` it. `input_shape`: one
    input's shape without the batch axis (else from `data` or guessed)."""
    _check_format(format)
    example = None
    if input_shape is not None:
        shape = tuple(input_shape)
        if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
            raise BadOptionError(f"input_shape must be positive integers (C,H,W), got {input_shape!r}",
                                 option="input_shape")
        example = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    if isinstance(model, str):
        import_entry(model)
        model = ModelSpec(entry=model)
    ens = load_ensemble(ensemble, model=model, trust_remote_code=trust_remote_code, device="cpu")
    return export_ensemble(ens, out, format=format, example=example, data=data, verify=verify)
