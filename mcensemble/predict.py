"""`mcensemble predict`: an ensemble's predictions and uncertainty for a set of inputs, as a table.

Inputs, one of:

- an image folder: every image under it (recursively, sorted by path), read with the
  model's eval transforms (`data.image_transform`); the `file` column holds each image's path
  relative to the folder;
- a data spec (`digits`, an ImageFolder-layout folder is an image folder here,
  `module:function`), its `split`; a `label` column when the batches have labels;
- a tensor file: `.safetensors` (the inputs are the tensor named `x` / `input` / `inputs` /
  `image` / `images` / `pixel_values`, or the only tensor; labels from `y` / `label` /
  `labels` / `target` / `targets` when present) or `.pt` / `.pth` (read with
  `torch.load(weights_only=True)`: a tensor, a dict as above, or an (inputs, labels) tuple).

One row per input: `index`, `file` (folders), `label` (when known), `top1` .. `topk` (class
indices, best first) with `top1_prob` .., then `entropy`, `expected_entropy`,
`mutual_information`, `disagreement` (`uncertainty.Prediction`), and with `flag_above`
a `flagged` column (the `flag_on` quantity above the threshold). Written as CSV (`.csv`) or
Parquet (`.parquet`, needs pyarrow), atomically.
"""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ._io import atomic_path
from .bn import _INPUT_KEYS, _LABEL_KEYS, split_batch
from .checkpoints import _torch_load
from .data import create_loader, image_transform, loader_settings
from .ensemble import load_ensemble
from .errors import BadOptionError, CheckpointError, DataSpecError
from .models import ModelSpec, import_entry
from .precision import resolve_precision
from .uncertainty import Prediction

__all__ = ["predict_file", "predict_rows", "write_table", "output_format", "UNCERTAINTY_COLUMNS", "OUTPUT_FORMATS"]

#: the uncertainty columns, in order (fields of `uncertainty.Prediction`)
UNCERTAINTY_COLUMNS = ("entropy", "expected_entropy", "mutual_information", "disagreement")

#: output file suffix -> format
OUTPUT_FORMATS = {".csv": "csv", ".parquet": "parquet"}

_TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth")


class _Images(Dataset):
    """The images under a folder, as the model's inputs; item i = (input, i)."""

    def __init__(self, root: Path, files: list[Path], model: torch.nn.Module):
        self.root, self.files = root, files
        self.transform, self.mode = image_transform(model)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image
        path = self.files[i]
        try:
            with Image.open(path) as img:
                return self.transform(img.convert(self.mode)), i
        except Exception as e:  # noqa: BLE001 - any unreadable image is named
            raise DataSpecError(f"image {str(path)!r} cannot be read: {type(e).__name__}: {e}",
                                option="inputs") from e


def _image_files(root: Path) -> list[Path]:
    from timm.data.readers.img_extensions import get_img_extensions
    exts = tuple(get_img_extensions())
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(exts))
    if not files:
        raise DataSpecError(f"input folder {str(root)!r} has no images (no {' / '.join(exts)} files under it); "
                            "give a folder of images, a data spec or a tensor file", option="inputs")
    return files


def _pick(tensors: dict[str, Any], keys: Iterable[str], *, what: str, where: str, required: bool) -> Any:
    for k in keys:
        if k in tensors:
            return tensors[k]
    if what == "inputs" and len(tensors) == 1:
        return next(iter(tensors.values()))
    if required:
        raise DataSpecError(f"{where} holds {sorted(map(str, tensors))}: name the inputs one of "
                            f"{', '.join(keys)} (or store one tensor only)", option="inputs")
    return None


def _tensor_file(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(inputs, labels or None) of a .safetensors / .pt file."""
    where = f"tensor file {str(path)!r}"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            obj: Any = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a damaged file of any kind
            raise CheckpointError(f"{where} is not a readable safetensors file ({e})") from e
    else:
        obj = _torch_load(path)
    if isinstance(obj, torch.Tensor):
        x, y = obj, None
    elif isinstance(obj, (list, tuple)) and obj and all(isinstance(t, torch.Tensor) for t in obj[:2]):
        x, y = obj[0], (obj[1] if len(obj) > 1 else None)
    elif isinstance(obj, dict):
        x = _pick(obj, ("x", *_INPUT_KEYS), what="inputs", where=where, required=True)
        y = _pick(obj, _LABEL_KEYS, what="labels", where=where, required=False)
    else:
        raise DataSpecError(f"{where} holds a {type(obj).__name__}; store a tensor of inputs, a dict with "
                            "an 'x' tensor, or an (inputs, labels) tuple", option="inputs")
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or not x.is_floating_point():
        raise DataSpecError(f"{where}: the inputs must be a floating tensor (N, ...), found "
                            f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}",
                            option="inputs")
    if y is not None and (not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]):
        raise DataSpecError(f"{where}: the labels must be a tensor with one entry per input ({x.shape[0]})",
                            option="inputs")
    return x, y


def _batches(inputs: str | os.PathLike, net: torch.nn.Module, *, batch_size: int, workers: int, split: str,
             pin_memory: bool) -> tuple[Iterable, list[str] | None, str]:
    """(loader of (x, labels | None, indices | None) batches, file names or None, kind)."""
    path = Path(inputs)
    kw = {"num_workers": workers, "pin_memory": pin_memory, "persistent_workers": False}
    if path.is_dir():
        files = _image_files(path)
        loader = DataLoader(_Images(path, files, net), batch_size=batch_size, **kw)
        return ((x, None, i) for x, i in loader), [str(f.relative_to(path)) for f in files], "folder"
    if path.suffix in _TENSOR_SUFFIXES:
        if not path.is_file():
            raise DataSpecError(f"tensor file {str(path)!r} not found", option="inputs")
        x, y = _tensor_file(path)
        ds = TensorDataset(x) if y is None else TensorDataset(x, y)
        loader = DataLoader(ds, batch_size=batch_size, **kw)
        return ((b[0], b[1] if len(b) > 1 else None, None) for b in loader), None, "tensors"
    if path.exists():
        raise DataSpecError(f"input {str(path)!r} is a file but not a tensor file ({', '.join(_TENSOR_SUFFIXES)})",
                            option="inputs")
    with loader_settings(workers=workers, pin_memory=pin_memory):
        loader = create_loader(str(inputs), split=split, batch_size=batch_size, model=net)

    def gen() -> Iterator:
        for batch in loader:
            x, y = split_batch(batch)
            yield x, (torch.as_tensor(y) if y is not None else None), None
    return gen(), None, "spec"


def predict_rows(ens, batches: Iterable, *, device: str | torch.device = "cpu", precision: str | None = None,
                 progress: bool | None = None, total: int | None = None
                 ) -> Iterator[tuple[Prediction, torch.Tensor | None]]:
    """`ens.predict` on each (x, labels, _) batch (at `precision`): (Prediction on CPU, labels)."""
    from tqdm import tqdm

    prec = resolve_precision(precision, device)
    bar = tqdm(batches, total=total, desc="predict", unit="batch", file=sys.stderr,
               disable=None if progress is None else not progress)
    try:
        for x, y, _ in bar:
            if not isinstance(x, torch.Tensor):
                raise DataSpecError(f"the inputs are a {type(x).__name__}, not a tensor", option="inputs")
            with prec.autocast():
                try:
                    pred = ens.predict(prec.input(x.to(device)))
                except RuntimeError as e:
                    raise DataSpecError(f"the ensemble's model cannot take inputs of shape {tuple(x.shape)}: "
                                        f"{str(e).splitlines()[0][:300]}", option="inputs") from e
            yield Prediction(*(t.float().cpu() for t in pred)), y
    finally:
        bar.close()


def _columns(pred: Prediction, labels: torch.Tensor | None, k: int, start: int, names: list[str] | None,
             flag: tuple[str, float] | None) -> dict[str, list]:
    b = pred.probs.shape[0]
    cols: dict[str, list] = {"index": list(range(start, start + b))}
    if names is not None:
        cols["file"] = names[start:start + b]
    if labels is not None:
        cols["label"] = [int(v) for v in labels.reshape(b, -1)[:, 0].tolist()]
    probs, classes = pred.probs.topk(k, dim=1)
    for j in range(k):
        cols[f"top{j + 1}"] = classes[:, j].tolist()
        cols[f"top{j + 1}_prob"] = probs[:, j].tolist()
    for name in UNCERTAINTY_COLUMNS:
        cols[name] = getattr(pred, name).tolist()
    if flag is not None:
        cols["flagged"] = (getattr(pred, flag[0]) > flag[1]).tolist()
    return cols


def output_format(out: str | os.PathLike) -> str:
    """"csv" or "parquet" from the file's suffix; `BadOptionError(option="out")` otherwise, and
    for Parquet when pyarrow is missing."""
    fmt = OUTPUT_FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise BadOptionError(f"unknown output format {Path(out).suffix or '(no suffix)'!r} of {str(out)!r}; "
                             f"name the file {' or '.join('*' + s for s in OUTPUT_FORMATS)}", option="out")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError as e:
            raise BadOptionError(f"writing {str(out)!r} (Parquet) needs pyarrow: `pip install pyarrow`, or write "
                                 "a .csv", option="out") from e
    return fmt


def write_table(columns: dict[str, list], out: str | os.PathLike) -> Path:
    """Write equal-length columns as CSV or Parquet (by `out`'s suffix), atomically."""
    fmt = output_format(out)
    out = Path(out)
    with atomic_path(out) as tmp:
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.table(columns), str(tmp))
        else:
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(list(columns))
                w.writerows(zip(*columns.values()))
    return out


def predict_file(ensemble: str | os.PathLike, inputs: str | os.PathLike, out: str | os.PathLike, *,
                 model: Any = None, trust_remote_code: bool = False, top_k: int = 5, batch_size: int = 64,
                 device: str | torch.device = "cpu", precision: str | None = None, workers: int = 0,
                 split: str = "val", flag_above: float | None = None, flag_on: str = "mutual_information",
                 progress: bool | None = None) -> dict[str, Any]:
    """Predict with the ensemble file `ensemble` on `inputs` (module docstring) and write one
    row per input to `out` (.csv / .parquet). `model`: the members' architecture when the
    file does not name a timm one (nn.Module, callable, ModelSpec or "module:function").
    Everything is checked before the ensemble is loaded. Returns a summary: {"out", "rows",
    "inputs", "kind", "temperature", "flagged" (with `flag_above`)}."""
    output_format(out)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise BadOptionError(f"top_k must be an integer >= 1, got {top_k!r}", option="top_k")
    if flag_on not in UNCERTAINTY_COLUMNS:
        raise BadOptionError(f"flag_on must be one of {', '.join(UNCERTAINTY_COLUMNS)}, got {flag_on!r}",
                             option="flag_on")
    if flag_above is not None and (isinstance(flag_above, bool) or not isinstance(flag_above, (int, float))
                                   or flag_above != flag_above):
        raise BadOptionError(f"flag_above must be a number, got {flag_above!r}", option="flag_above")
    if isinstance(model, str):
        import_entry(model)  # fail early, naming the spec
        model = ModelSpec(entry=model)
    ens = load_ensemble(ensemble, model=model, trust_remote_code=trust_remote_code, device=device)
    net = ens.members[0]
    batches, names, kind = _batches(inputs, net, batch_size=batch_size, workers=workers, split=split,
                                    pin_memory=str(device).startswith("cuda"))
    columns: dict[str, list] = {}
    n = 0
    flag = (flag_on, float(flag_above)) if flag_above is not None else None
    for pred, labels in predict_rows(ens, batches, device=device, precision=precision, progress=progress):
        k = min(top_k, pred.probs.shape[1])
        for key, values in _columns(pred, labels, k, n, names, flag).items():
            columns.setdefault(key, []).extend(values)
        n += pred.probs.shape[0]
    if n == 0:
        raise DataSpecError(f"input {str(inputs)!r} gives no examples", option="inputs")
    write_table(columns, out)
    summary: dict[str, Any] = {"out": str(out), "rows": n, "inputs": str(inputs), "kind": kind,
                               "temperature": ens.temperature}
    if flag is not None:
        summary["flagged"] = int(sum(columns["flagged"]))
        summary["flag"] = {"on": flag_on, "above": flag[1]}
    return summary
