"""File helpers: atomic writes, content hashes, tensors ready for safetensors, and the
per-tensor SHA-256 record that ensemble and path files carry (`tensor_hashes` when
writing, `verify_tensor_hashes` when checking)."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import re
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from .errors import CheckpointError

if TYPE_CHECKING:
    import torch

__all__ = ["atomic_path", "sha256_file", "independent_tensors", "tensor_sha256", "tensor_hashes",
           "FileHeader", "read_header", "safetensors_layout", "verify_tensor_hashes", "verify_file", "HASHES_KEY", "meta_field",
           "is_int", "is_number", "to_json", "write_safetensors_streamed", "can_stream_safetensors"]

log = logging.getLogger(__name__)

#: the JSON field (in ensemble and path files' `mcensemble` header) holding {tensor: sha256}
HASHES_KEY = "tensor_sha256"
# safetensors refuses headers larger than this (100 MB); so do we, before reading one
_MAX_HEADER = 100_000_000


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process's umask (read once: os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@functools.lru_cache(maxsize=1)
def _host_tag() -> str:
    """8 hex digits naming this machine in temporary file names (a pid means something
    only on the machine that owns it: folders may be shared between machines)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_prefix(dest: Path) -> str:
    return f".{dest.name}.mce-{_host_tag()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # someone else's live process, or cannot tell: keep its file
        return True
    return True


def _remove_stale_temps(dest: Path) -> None:
    """Remove temporary files that `atomic_path` left next to `dest` in a process that no
    longer runs (killed with SIGKILL, a power cut): only names of our own pattern
    `.<dest name>.mce-<this host>-<pid>-<random>.tmp` whose pid is not alive on this machine.
    Files of live writers (another build writing the same file now) are never touched."""
    prefix = _temp_prefix(dest)
    pattern = re.compile(re.escape(prefix) + r"(\d+)-[^/]*\.tmp$")
    try:
        names = [e.name for e in os.scandir(dest.parent) if e.name.startswith(prefix)]
    except OSError:
        return
    for name in names:
        m = pattern.match(name)
        if m is None or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        try:
            (dest.parent / name).unlink()
            log.info("removed %s, left by an interrupted write of %s", name, dest)
        except OSError:  # another process removed it first, or we may not
            pass


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `dest`; on success rename it onto `dest`.

    On any exception the temporary file is removed and `dest` is left as it was. A process
    killed during the write (SIGKILL) leaves `dest` as it was, or absent, never half
    written; its temporary file is removed by the next write to `dest` (on this machine).
    Concurrent writers to one `dest` each use their own temporary file (unique name), so
    `dest` ends as one complete file, the last renamed. Parent folders are created.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(dest)
    fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(dest)}{os.getpid()}-", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp makes the file private (0600); give it the mode a plain open() would
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def independent_tensors(tensors: Mapping[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """The tensors as safetensors' `save_file` takes them: detached, on the CPU,
    contiguous, each owning its whole storage and none sharing one (safetensors refuses
    shared memory). A tensor that already is all that is not copied."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.nbytes:
            t = t.clone()
            storage = t.untyped_storage()
        if t.numel():
            seen.add(storage.data_ptr())
        out[name] = t
    return out


# ----------------------------------------------------------------------------- tensor hashes
def _tensor_bytes(t: "torch.Tensor") -> memoryview:
    """The bytes of a CPU contiguous tensor as safetensors stores them (C order,
    little-endian), without copying them."""
    import torch
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def tensor_sha256(t: "torch.Tensor") -> str:
    """Hex SHA-256 of a tensor's bytes as safetensors stores them (C order, little-endian)."""
    return hashlib.sha256(_tensor_bytes(t.detach().cpu().contiguous())).hexdigest()


def tensor_hashes(tensors: Mapping[str, "torch.Tensor"]) -> dict[str, str]:
    """{name: tensor_sha256} of the tensors about to be written (the `tensor_sha256` record)."""
    return {name: tensor_sha256(t) for name, t in tensors.items()}


# safetensors' dtype names, in the order of its `Dtype` enum: its writer puts larger dtypes
# first (descending in this order, then by name), which keeps every tensor's data aligned
_ST_DTYPES = ("bool", "uint8", "int8", "int16", "uint16", "float16", "bfloat16", "int32", "uint32",
              "float32", "float64", "int64", "uint64")
_ST_NAMES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16", "float16": "F16",
             "bfloat16": "BF16", "int32": "I32", "uint32": "U32", "float32": "F32", "float64": "F64",
             "int64": "I64", "uint64": "U64"}


def can_stream_safetensors(dtypes: "Iterator[torch.dtype]") -> bool:
    """Whether `write_safetensors_streamed` knows every one of these dtypes."""
    return all(str(d).removeprefix("torch.") in _ST_NAMES for d in dtypes)


def write_safetensors_streamed(dest: str | os.PathLike,
                               entries: "Mapping[str, tuple[tuple[int, ...], torch.dtype]]",
                               tensor: "Callable[[str], torch.Tensor]",
                               metadata: Callable[[dict[str, str]], dict[str, str]]) -> dict[str, str]:
    """Write a safetensors file one tensor at a time: the same layout as safetensors'
    `save_file` (tensors ordered by dtype, larger first, then by name; the header padded with
    spaces to a multiple of 8), but only one tensor needs to exist at once.

    `entries`: name -> (shape, dtype) of every tensor; `tensor(name)` is called once per
    name, in file order, and must return a tensor of that shape and dtype (on any device; it
    is dropped once written). `metadata(hashes)` returns the header's `__metadata__`
    strings given {name: hex SHA-256 of its bytes}; it is called with placeholder hashes
    before the data is written and with the real ones after, and must give text of the same
    length both times (fixed-length hex strings in JSON do). Returns the hashes."""
    order = sorted(entries, key=lambda n: (-_ST_DTYPES.index(str(entries[n][1]).removeprefix("torch.")), n))
    spans, start = {}, 0
    for n in order:
        shape, dtype = entries[n]
        size = math.prod(shape) * dtype.itemsize
        spans[n], start = (start, start + size), start + size

    def header(hashes: dict[str, str]) -> bytes:
        doc: dict[str, Any] = {"__metadata__": metadata(hashes)}
        for n in order:
            doc[n] = {"dtype": _ST_NAMES[str(entries[n][1]).removeprefix("torch.")],
                      "shape": list(entries[n][0]), "data_offsets": list(spans[n])}
        raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)
        return len(raw).to_bytes(8, "little") + raw

    first = header(dict.fromkeys(order, "0" * 64))
    hashes: dict[str, str] = {}
    with open(dest, "wb") as f:
        f.write(first)
        for n in order:
            t = tensor(n).detach().to("cpu").contiguous()
            if tuple(t.shape) != tuple(entries[n][0]) or t.dtype != entries[n][1]:
                raise ValueError(f"tensor {n!r} is {tuple(t.shape)} {t.dtype}, announced as "
                                 f"{tuple(entries[n][0])} {entries[n][1]}")
            data = _tensor_bytes(t)
            hashes[n] = hashlib.sha256(data).hexdigest()
            f.write(data)
            del t, data
        final = header(hashes)
        if len(final) != len(first):
            raise ValueError("the metadata changed length between the placeholder and the real hashes")
        f.seek(0)
        f.write(final)
    return hashes


# ----------------------------------------------------------------------------- file headers
#: bytes per element of the safetensors dtypes (a dtype not listed here is not size-checked)
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2,
                "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8,
                "F64": 8, "C64": 8}


@dataclass(frozen=True)
class FileHeader:
    """What `read_header` found at the start of a file.

    `format`: "safetensors", "torch-zip" (a `torch.save` zip), "pickle" (a legacy
    `torch.save` or plain pickle), "empty" or "unknown", sniffed from the leading bytes (the
    name does not count). For safetensors, `tensors` is the header's
    {name: {"dtype", "shape", "data_offsets"}} (checked: offsets contiguous, inside the file,
    sized for dtype x shape), `metadata` its `__metadata__` {str: str} and `data_start` the
    offset of the first data byte; for the other formats they are empty / 0 (nothing past
    the first bytes is read: a pickle is never opened here)."""

    path: Path
    format: str
    tensors: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)
    data_start: int = 0

    def document(self, key: str = "mcensemble") -> Any:
        """The JSON value stored under `key` in the safetensors metadata (mcensemble writes
        its file description under "mcensemble"); None when there is no such key.
        `CheckpointError` naming the file when the value is not valid JSON."""
        raw = self.metadata.get(key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError as e:
            raise CheckpointError(f"{self.path}: its {key!r} metadata is not valid JSON; the file is "
                                  "damaged") from e

    def raw(self) -> dict[str, Any]:
        """The safetensors header as the file holds it: the tensors plus `__metadata__`."""
        out: dict[str, Any] = {k: dict(v) for k, v in self.tensors.items()}
        if self.metadata:
            out["__metadata__"] = dict(self.metadata)
        return out


def _sniff(head: bytes) -> str:
    if not head:
        return "empty"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def read_header(file: str | os.PathLike) -> FileHeader:
    """Sniff a file's format from its leading bytes and, for safetensors, read and check its
    header (without reading any tensor): the one place mcensemble opens a file to learn what
    it is and what its metadata says (ensemble, path, checkpoint and training-checkpoint
    readers, `inspect`). `CheckpointError` naming the file when it is missing, a folder,
    unreadable, or a safetensors file whose header is cut short, not JSON, or does not
    describe the tensors that follow it."""
    path = Path(file)
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise CheckpointError(f"{path} is a folder, not a file")
        with open(path, "rb") as f:
            head = f.read(9)
            fmt = _sniff(head)
            if fmt != "safetensors":
                return FileHeader(path, fmt)
            n = int.from_bytes(head[:8], "little")
            if n > _MAX_HEADER or n + 8 > size:
                raise CheckpointError(f"{path}: truncated safetensors file (its header length {n} does "
                                      f"not fit its size {size}); the file is cut short or corrupt")
            f.seek(8)
            raw = f.read(n)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no such file") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({e.strerror or e})") from e
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON; the file is corrupt") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object; the file is corrupt")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: the safetensors metadata is not a {{string: string}} object; "
                              "the file is corrupt")
    _check_tensor_entries(path, header, size - 8 - n)
    return FileHeader(path, "safetensors", header, meta, 8 + n)


def _check_tensor_entries(path: Path, header: Mapping[str, Any], data_size: int) -> None:
    """The checks safetensors makes when it opens a file, with the file named: every entry
    has a dtype, a shape of sizes >= 0 and data_offsets [begin, end] sized for them; the
    entries tile the data section exactly."""
    spans = []
    for name, e in header.items():
        offsets = e.get("data_offsets") if isinstance(e, dict) else None
        shape = e.get("shape") if isinstance(e, dict) else None
        if not (isinstance(e, dict) and isinstance(e.get("dtype"), str)
                and isinstance(shape, list) and all(is_int(s) and s >= 0 for s in shape)
                and isinstance(offsets, list) and len(offsets) == 2
                and all(is_int(o) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{path}: tensor {name!r} has no valid dtype, shape and data_offsets in "
                                  "the safetensors header; the file is corrupt")
        itemsize = _ST_ITEMSIZE.get(e["dtype"])
        if itemsize is not None and math.prod(shape) * itemsize != offsets[1] - offsets[0]:
            raise CheckpointError(f"{path}: tensor {name!r} ({e['dtype']} {shape}) does not fit its "
                                  f"{offsets[1] - offsets[0]} bytes; the file is corrupt")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {begin} of the data, not where "
                                  f"the previous one ends ({end}); the file is corrupt")
        end = stop
    if end != data_size:
        raise CheckpointError(f"{path}: the tensors take {end} bytes but the file holds {data_size} after "
                              "its header; the file is truncated or corrupt")


def safetensors_layout(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """(header, data start) of a safetensors file (`read_header`, as the file's JSON: tensor
    name -> {dtype, shape, data_offsets}, plus `__metadata__`). `CheckpointError` for a file
    that is not safetensors, or a damaged one."""
    h = read_header(path)
    if h.format != "safetensors":
        raise CheckpointError(f"{h.path}: not a safetensors file (it looks like {h.format}); the file is "
                              "corrupt or of another kind")
    return h.raw(), h.data_start


def _file_range_sha256(f, start: int, stop: int, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    f.seek(start)
    left = stop - start
    while left > 0:
        block = f.read(min(chunk, left))
        if not block:
            break
        h.update(block)
        left -= len(block)
    return h.hexdigest()


def verify_tensor_hashes(path: str | os.PathLike, recorded: Mapping[str, Any] | None) -> int | None:
    """Check every tensor's bytes in the safetensors file `path` against `recorded`
    ({name: hex sha256}, the file's `tensor_sha256` record). Returns how many tensors were
    checked, or None when nothing is recorded (a file written before mcensemble recorded
    hashes). `CheckpointError` naming the first tensor whose bytes differ (and how many
    do), a tensor with no recorded hash, or a recorded tensor missing from the file."""
    if recorded is None:
        return None
    path = Path(path)
    if not isinstance(recorded, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()):
        raise CheckpointError(f"{path}: its '{HASHES_KEY}' record is not a {{tensor: sha256}} object; "
                              "the file is damaged")
    header, start = safetensors_layout(path)
    names = [k for k in header if k != "__metadata__"]
    unrecorded = [k for k in names if k not in recorded]
    absent = [k for k in recorded if k not in header]
    if unrecorded or absent:
        what = (f"tensor {unrecorded[0]!r} has no recorded hash" if unrecorded
                else f"tensor {absent[0]!r} is recorded but not in the file")
        raise CheckpointError(f"{path}: integrity check failed: {what}; the file was changed after "
                              "it was written")
    bad = []
    with open(path, "rb") as f:
        for name in names:
            entry = header[name]
            offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
            if not (isinstance(offsets, list) and len(offsets) == 2
                    and all(isinstance(o, int) and o >= 0 for o in offsets)):
                raise CheckpointError(f"{path}: tensor {name!r} has no valid data_offsets; the file is corrupt")
            if _file_range_sha256(f, start + offsets[0], start + offsets[1]) != recorded[name]:
                bad.append(name)
    if bad:
        more = f" ({len(bad)} tensors differ: {', '.join(repr(b) for b in bad[:5])}" \
               f"{' ...' if len(bad) > 5 else ''})" if len(bad) > 1 else ""
        raise CheckpointError(f"{path}: integrity check failed: the bytes of tensor {bad[0]!r} do not "
                              f"match the SHA-256 recorded when the file was written{more}; the file "
                              "is corrupt or was modified. Re-copy it or rebuild it")
    return len(names)


def verify_file(path: str | os.PathLike) -> tuple[str, int | None]:
    """(format, tensors checked) for `mcensemble inspect --verify`: check an ensemble or
    path file's tensors against the SHA-256 recorded in its header (`verify_tensor_hashes`);
    tensors checked is None when the file records no hashes. `CheckpointError` for another
    kind of file (only ensemble and path files record hashes) or a tensor that differs."""
    doc = read_header(path).document("mcensemble")
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if fmt not in ("mcensemble-ensemble", "mcensemble-path"):
        raise CheckpointError(f"{path}: `verify` checks mcensemble ensemble and path files, which record a "
                              f"SHA-256 per tensor; this file is {'a ' + repr(fmt) if fmt else 'not one'} "
                              "(compare a checkpoint's sha256, shown by inspect, with a known one instead)")
    return fmt, verify_tensor_hashes(path, doc.get(HASHES_KEY))


# ----------------------------------------------------------------------------- metadata checks
def is_int(v: Any) -> bool:
    """An int that is not a bool (JSON true/false are not counts)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# expected type name -> (what the message says, test)
_EXPECT: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("an integer", is_int),
    "number": ("a finite number", is_number),
    "str": ("a string", lambda v: isinstance(v, str)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "list": ("a list", lambda v: isinstance(v, list)),
    "dict": ("a JSON object", lambda v: isinstance(v, dict)),
    "str-list": ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
    "number-list": ("a list of finite numbers", lambda v: isinstance(v, list) and all(is_number(x) for x in v)),
}
_MISSING = object()


def _show(v: Any) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def meta_field(meta: Mapping[str, Any], key: str, expect: str, *, where: str = "metadata",
               default: Any = _MISSING, nullable: bool = False,
               lo: float | None = None, hi: float | None = None) -> Any:
    """`meta[key]`, checked to be of type `expect` (a key of `_EXPECT`: "int", "number", "str",
    "bool", "list", "dict", "str-list", "number-list") and, for numbers, within [lo, hi].

    A missing key gives `default` when one is passed (else it is an error); `nullable`
    accepts None (JSON null). Anything else raises `CheckpointError` naming `where` (e.g.
    the file), the field, what was expected and what was found. Every reader of file
    metadata (path kinds' `_from_file`, ensemble and checkpoint readers) checks its fields
    with this before using them: a damaged or crafted header then gives one clear error,
    never a TypeError, and a size read from it is bounded by `hi` (what the file's tensors
    allow) before anything is allocated from it.
    """
    desc, ok = _EXPECT[expect]
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"{where}: the metadata is a {type(meta).__name__}, not a JSON object; "
                              "the file is damaged or was not written by mcensemble")
    if key not in meta:
        if default is not _MISSING:
            return default
        raise CheckpointError(f"{where}: metadata field {key!r} is missing; the file is damaged or "
                              "was not written by mcensemble")
    v = meta[key]
    if v is None and nullable:
        return None
    if not ok(v):
        raise CheckpointError(f"{where}: metadata field {key!r} must be {desc}"
                              f"{' or null' if nullable else ''}, found {_show(v)}; the file is damaged")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        span = f"from {lo} to {hi}" if lo is not None and hi is not None else \
            f">= {lo}" if lo is not None else f"<= {hi}"
        raise CheckpointError(f"{where}: metadata field {key!r} is {v}, it must be {span} (for the "
                              "tensors in the file); the file is damaged")
    return v


def to_json(x: Any) -> Any:
    """`x` as plain JSON values, the one converter of every file and report mcensemble
    writes: mappings (str keys), lists / tuples / sets, tensors and numpy scalars as numbers
    or lists, `argparse.Namespace` as a dict, objects with `to_dict()` through it, paths as
    strings; non-finite floats (a NaN metric) become null, so the output is standard JSON
    (`json.dumps(to_json(x), allow_nan=False)` never fails); anything else is `str(x)`."""
    import argparse
    import numbers

    if isinstance(x, argparse.Namespace):
        x = vars(x)
    elif hasattr(x, "to_dict") and callable(x.to_dict):
        x = x.to_dict()
    if isinstance(x, Mapping):
        return {str(k): to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [to_json(v) for v in x]
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if hasattr(x, "tolist") and not isinstance(x, numbers.Number):   # tensors, numpy arrays / scalars
        return to_json(x.tolist())
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real):
        return float(x) if math.isfinite(x) else None
    return str(x)
