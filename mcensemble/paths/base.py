"""The `ModePath` base class, the path-kind registry and the path file format.

A path maps t in [0, 1] to a full state dict. Its tensors live in named *groups*
(`"endpoint.0"`, `"endpoint.1"`, `"bend.0"`, ...), each a state dict. A path file is one
safetensors file: tensor `<group>.<name>` for each group's tensor `<name>`, and header
metadata key `mcensemble` holding JSON::

    {"format": "mcensemble-path", "format_version": 1, "kind": "linear",
     "model": ModelSpec dict or null, "endpoints_sha256": [..., ...],
     "groups": ["endpoint.0", "endpoint.1", ...], "vertices": [...] or null,
     "certificate": {...} or null, "tensor_sha256": {tensor: sha256},
     ...kind-specific fields, ...extra}

A new kind subclasses `ModePath`, decorates itself with `@register_path("kind")`, implements
`_state_at(t)` (t already validated) and the classmethod `_from_file(groups, meta)`, and
may override `_file_fields()` to add JSON fields. A kind that `build` / `scan` / `connect`
make also defines `from_options` and, when it has settings, `config_class` (a frozen
dataclass) and `flags`; the registry is the one list of kinds (docs/adding-a-path-kind.md).
Files are read without unpickling. `_from_file` reads its own fields with `meta_field` (type and range checked, sizes bounded
by the groups actually in the file) and raises `CheckpointError` / `ValueError` on anything
inconsistent: `load_path` turns those into one `CheckpointError` naming the file.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
from typing import Any, Callable, ClassVar, Mapping, Sequence, TypeVar

import torch

from .._io import (HASHES_KEY, atomic_path, independent_tensors, meta_field, read_header, tensor_hashes,
                   verify_tensor_hashes)
from ..checkpoints import check_same_architecture
from ..errors import ArchitectureMismatchError, BadOptionError, CheckpointError
from ..models import ModelSpec
from ..options import make_config

__all__ = [
    "ModePath", "register_path", "load_path", "known_kinds", "path_kind", "buildable_kinds", "setting_flags", "check_same_layout", "state_dict_sha256",
    "verify_path_file", "PATH_FORMAT", "PATH_FORMAT_VERSION", "METADATA_KEY",
]

log = logging.getLogger(__name__)

PATH_FORMAT = "mcensemble-path"
PATH_FORMAT_VERSION = 1
METADATA_KEY = "mcensemble"
_RESERVED = ("format", "format_version", "kind", "groups", "tensor_sha256")

StateDict = dict[str, torch.Tensor]
P = TypeVar("P", bound="type[ModePath]")

_REGISTRY: dict[str, type["ModePath"]] = {}


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Content hash of a state dict: names (sorted), dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # the bytes in place, no copy
    return h.hexdigest()


def check_same_layout(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], *,
                      names: tuple[str, str] = ("A", "B")) -> None:
    """Raise `ArchitectureMismatchError` unless `a` and `b` have the same keys, shapes and
    dtypes (`checkpoints.check_same_architecture(..., dtypes=True)`): the message names the
    first differing tensor and both shapes (or dtypes), or the keys only one side has."""
    check_same_architecture(a, b, names=names, dtypes=True)


def _check_t(t: Any) -> float:
    try:
        tf = float(t)
    except (TypeError, ValueError) as e:
        raise BadOptionError(f"t must be a number in [0, 1], got {t!r}", option="t") from e
    if not (math.isfinite(tf) and 0.0 <= tf <= 1.0):
        raise BadOptionError(f"t={t!r} is outside the path's range [0, 1]; pick t with 0 <= t <= 1",
                             option="t")
    return tf


class ModePath:
    """A map t in [0, 1] -> state dict, stored as named groups of tensors.

    Attributes: `kind` (registered name), `groups` (name -> state dict, in order),
    `vertex_t` (the t values where a piecewise-linear path bends, ends included; None for
    smooth curves; the file field "vertices"), `certificate` (a loss bound for
    dropout-stable paths, else None), `metadata` (the JSON document of a loaded file; for a
    new path, entries to store).
    """

    kind: ClassVar[str] = ""
    #: whether `from_options` trains the path on shuffled batches (`pipeline.connect` then
    #: hands it a shuffled fit loader)
    trained: ClassVar[bool] = False
    #: whether `build` / `scan` align the checkpoints first unless told (`align=`)
    align_by_default: ClassVar[bool] = False
    #: whether its paths have bends (groups "bend.<i>"), which span the plane `scan --plane` draws
    has_bends: ClassVar[bool] = False
    #: the frozen dataclass of this kind's own settings (None: it has none); `config_from` makes it
    config_class: ClassVar[type | None] = None
    #: the settings the command line takes as flags (`bends` -> `--bends`): name -> help
    flags: ClassVar[Mapping[str, str]] = {}
    vertex_t: list[float] | None = None
    certificate: dict[str, Any] | None = None

    @classmethod
    def config_from(cls, settings: Any = None, *, seed: int | None = None) -> Any:
        """This kind's settings as its `config_class` (None when it has none): `settings` is
        such a config (kept), or a mapping of field values (`{"bends": 2}`; another kind's
        fields are ignored, so one mapping serves every kind); `seed` fills a `seed` field."""
        return make_config(cls.config_class, settings, seed=seed)

    #: a kind that `build --method KIND` makes defines the classmethod
    #: ``from_options(net, a, b, *, config, opts, data, fit_loader, bn_loader, index=0, graph=None)``
    #: (`config`: its `config_from(opts.settings, seed=data.seed)`, `opts`: `options.BuildOptions`,
    #: `data`: `options.DataOptions`, `index`: which consecutive pair, `graph`: a hand-given unit
    #: graph or None) -> the path from a to b
    from_options: ClassVar[Callable[..., "ModePath"] | None] = None

    @classmethod
    def report_section(cls, paths: list["ModePath"], config: Any) -> dict[str, Any]:
        """Entries this kind adds to `build`'s report (e.g. `{"curve": {...}}`); none by default."""
        return {}

    def __init__(self, groups: Mapping[str, Mapping[str, torch.Tensor]], *,
                 metadata: Mapping[str, Any] | None = None, copy: bool = True):
        if "endpoint.0" not in groups or "endpoint.1" not in groups:
            raise BadOptionError("`groups` of a path must hold 'endpoint.0' and 'endpoint.1'", option="groups")
        for g in groups:
            if not g or g.endswith(".") or g.startswith("."):
                raise BadOptionError(f"bad group name {g!r} in `groups` (no empty name, none starting or ending "
                                     "with '.')", option="groups")
        self.groups: dict[str, StateDict] = {
            g: {k: (v.detach().clone() if copy else v.detach()) for k, v in sd.items()}
            for g, sd in groups.items()}
        self.metadata: dict[str, Any] = dict(metadata or {})
        if self.metadata.get("certificate") is not None and self.certificate is None:
            self.certificate = self.metadata["certificate"]

    # -- evaluation ---------------------------------------------------------------
    @property
    def endpoints(self) -> tuple[StateDict, StateDict]:
        return self.groups["endpoint.0"], self.groups["endpoint.1"]

    def state_at(self, t: float) -> StateDict:
        """The full state dict at `t` (0 <= t <= 1, else `BadOptionError`). The result is
        fresh tensors: changing it does not change the path."""
        return self._state_at(_check_t(t))

    def _end_state(self, t: float) -> StateDict | None:
        """A copy of A at t = 0 and of B at t = 1 (bit for bit), else None."""
        if t == 0.0 or t == 1.0:
            return {k: v.clone() for k, v in self.endpoints[int(t)].items()}
        return None

    def _state_at(self, t: float) -> StateDict:
        raise NotImplementedError(f"{type(self).__name__} does not implement _state_at")

    @property
    def model_spec(self):
        """The `ModelSpec` recorded in the metadata, or None."""
        d = self.metadata.get("model")
        if not d:
            return None
        return ModelSpec.from_dict(d)

    # -- files --------------------------------------------------------------------
    def _file_fields(self) -> dict[str, Any]:
        """Kind-specific JSON fields written to the file (override in subclasses)."""
        return {}

    @classmethod
    def _from_file(cls, groups: dict[str, StateDict], meta: dict[str, Any]) -> "ModePath":
        """Rebuild a path from a file's tensor groups and JSON document (override)."""
        raise NotImplementedError(f"{cls.__name__} does not implement _from_file")

    def save(self, file: str | os.PathLike, *, model_spec: Any = None,
             extra: Mapping[str, Any] | None = None) -> None:
        """Write the path to `file` (safetensors, atomically).

        `model_spec`: a `ModelSpec` or its dict (default: the one in `metadata`).
        `extra`: JSON-able fields to add. `endpoints_sha256` defaults to
        `metadata["endpoints_sha256"]` (e.g. the source files' hashes) or else to the
        content hashes of the two endpoint state dicts (`state_dict_sha256`). The SHA-256
        of every tensor's bytes is recorded too (`tensor_sha256`; `load_path(verify=True)`).
        """
        from safetensors.torch import save_file

        if model_spec is None:
            spec = self.metadata.get("model")
        elif hasattr(model_spec, "to_dict"):
            spec = model_spec.to_dict()
        else:
            spec = dict(model_spec)
        doc: dict[str, Any] = {k: v for k, v in self.metadata.items() if k not in _RESERVED}
        doc.update({
            "format": PATH_FORMAT, "format_version": PATH_FORMAT_VERSION, "kind": self.kind,
            "model": spec,
            "groups": list(self.groups),
            "vertices": None if self.vertex_t is None else [float(v) for v in self.vertex_t],
            "certificate": self.certificate,
        })
        doc.setdefault("endpoints_sha256", [state_dict_sha256(sd) for sd in self.endpoints])
        doc.update(self._file_fields())
        for k, v in (extra or {}).items():
            if k in _RESERVED:
                raise BadOptionError(f"extra= may not set the reserved field {k!r}; pass other "
                                     "field names", option="extra")
            doc[k] = v
        tensors = independent_tensors({f"{g}.{name}": t for g, sd in self.groups.items()
                                       for name, t in sd.items()})
        doc[HASHES_KEY] = tensor_hashes(tensors)  # checked by load_path(verify=True), inspect --verify
        try:
            header = json.dumps(doc)
        except (TypeError, ValueError) as e:
            raise BadOptionError(f"path metadata is not JSON-serialisable ({e}); pass plain "
                                 "numbers, strings, lists and dicts in metadata / extra",
                                 option="extra") from e
        with atomic_path(file) as tmp:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: header})
        log.debug("saved %s path to %s", self.kind, file)

    def __repr__(self) -> str:
        n = len(self.groups["endpoint.0"])
        return f"{type(self).__name__}(kind={self.kind!r}, groups={list(self.groups)}, tensors={n})"


def register_path(kind: str) -> Callable[[P], P]:
    """Class decorator: register a `ModePath` subclass under `kind` (sets `cls.kind`)."""
    def deco(cls: P) -> P:
        if not (isinstance(cls, type) and issubclass(cls, ModePath)):
            raise TypeError("register_path decorates ModePath subclasses")
        old = _REGISTRY.get(kind)
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise BadOptionError(f"path kind {kind!r} is already registered by {old.__qualname__}", option="kind")
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls
    return deco


def _import_builtin_kinds() -> None:
    """Import every module of `mcensemble.paths` so that its kinds register themselves."""
    import importlib
    import pkgutil

    from .. import paths as pkg
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            try:
                importlib.import_module(f"{pkg.__name__}.{info.name}")
            except Exception as e:  # a broken optional module must not hide the others
                log.debug("could not import %s.%s: %s", pkg.__name__, info.name, e)


def known_kinds() -> list[str]:
    """Every registered path kind (the built-in ones are imported first)."""
    _import_builtin_kinds()
    return sorted(_REGISTRY)


def buildable_kinds() -> dict[str, type[ModePath]]:
    """kind -> class, for the kinds `build`, `scan` and `connect` make (those with `from_options`)."""
    _import_builtin_kinds()
    return {k: c for k, c in sorted(_REGISTRY.items(), key=lambda kv: _BUILTIN_ORDER.get(kv[0], 99))
            if c.from_options is not None}


#: the order the built-in kinds are listed in (help texts, tables); others follow by name
_BUILTIN_ORDER = {k: i for i, k in enumerate(("linear", "bezier", "polychain", "dropout", "short", "neb"))}


def path_kind(kind: str, *, others: Sequence[str] = ()) -> type[ModePath]:
    """The class `build` uses for `kind` (`method`): `BadOptionError(option="method")` listing
    the buildable kinds and `others` (the caller's other methods, accepted elsewhere), with
    the closest name suggested."""
    kinds = buildable_kinds()
    if kind not in kinds:
        known = [*kinds, *others]
        close = difflib.get_close_matches(str(kind), known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise BadOptionError(f"unknown method {kind!r}; choose one of {', '.join(known)}.{hint}", option="method")
    return kinds[kind]


def setting_flags(extra: Sequence[type] = ()) -> dict[str, dict[str, Any]]:
    """The kinds' settings that are command-line flags: name -> {"help", "type", "defaults"
    ({kind: default})}, gathered from each buildable kind's `flags` and `config_class`
    (and from `extra` config classes with `flags`, e.g. FGE's, under their `method`)."""
    out: dict[str, dict[str, Any]] = {}
    owners = [(k, c.config_class, c.flags) for k, c in buildable_kinds().items()]
    owners += [(getattr(e, "method", e.__name__), e, getattr(e, "flags", {})) for e in extra]
    for kind, config, flags in owners:
        defaults = {f.name: f.default for f in dataclasses.fields(config)} if config is not None else {}
        for name, help_text in flags.items():
            entry = out.setdefault(name, {"help": help_text, "type": type(defaults[name]), "defaults": {}})
            entry["defaults"][kind] = defaults[name]
    return out


def _split_groups(tensors: dict[str, torch.Tensor], groups: list[str], file: str) -> dict[str, StateDict]:
    out: dict[str, StateDict] = {g: {} for g in groups}
    by_len = sorted(groups, key=len, reverse=True)
    for key, t in tensors.items():
        for g in by_len:
            if key.startswith(g + "."):
                out[g][key[len(g) + 1:]] = t
                break
        else:
            raise CheckpointError(f"{file}: tensor {key!r} belongs to none of the path's groups {groups}; "
                                  "the file is damaged or was not written by mcensemble")
    return out


def _path_document(file: str) -> dict[str, Any]:
    """The JSON document of a path file (its header only, `read_header`): format and
    version checked; `CheckpointError` naming the file otherwise."""
    if not os.path.lexists(file):
        raise CheckpointError(f"path file {file} does not exist")
    try:
        header = read_header(file)
    except CheckpointError as e:
        raise CheckpointError(f"{file} is not a readable safetensors path file ({e}); it is corrupt, "
                              "truncated, or in another format") from e
    if header.format != "safetensors":
        raise CheckpointError(f"{file} is not a readable safetensors path file (it is {header.format}); "
                              "path files are written by ModePath.save() (`path_out` of a build)")
    meta = header.document(METADATA_KEY)
    if meta is None:
        raise CheckpointError(
            f"{file} is not an mcensemble path file: it is a safetensors file without "
            f"'{METADATA_KEY}' metadata (a plain checkpoint?). Path files are written by "
            "ModePath.save() (`path_out` of a build)")
    if not isinstance(meta, dict) or meta.get("format") != PATH_FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        what = "an mcensemble ensemble file (load it with mcensemble.load_ensemble)" \
            if fmt == "mcensemble-ensemble" else f"a {fmt!r} file" if isinstance(fmt, str) and fmt \
            else "an mcensemble file of unknown format"
        raise CheckpointError(f"{file} is not an mcensemble path file (format {PATH_FORMAT!r}); "
                              f"it is {what}")
    version = meta_field(meta, "format_version", "int", where=file)
    if version > PATH_FORMAT_VERSION:
        raise CheckpointError(
            f"{file} is a path file of format version {version}, newer than this mcensemble "
            f"supports ({PATH_FORMAT_VERSION}); upgrade mcensemble (pip install -U mcensemble)")
    return meta


def _read_path_file(file: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(JSON document, tensors) of a path file; the document's format and version checked."""
    from safetensors.torch import load_file
    meta = _path_document(file)
    try:
        tensors = load_file(file, device="cpu")
    except OSError as e:
        raise CheckpointError(f"cannot read path file {file}: {e}") from e
    except Exception as e:  # safetensors raises its own error type on a bad file
        raise CheckpointError(f"{file} is not a readable safetensors path file ({e}); it is corrupt, "
                              "truncated, or in another format") from e
    return meta, tensors


def _check_common_fields(meta: dict[str, Any], file: str) -> None:
    """Type-check the fields every path file has (kind-specific ones: the kind's `_from_file`)."""
    meta_field(meta, "kind", "str", where=file)
    meta_field(meta, "groups", "str-list", where=file, default=None, nullable=True)
    meta_field(meta, "model", "dict", where=file, default=None, nullable=True)
    meta_field(meta, "vertices", "number-list", where=file, default=None, nullable=True)
    meta_field(meta, "endpoints_sha256", "str-list", where=file, default=None, nullable=True)
    meta_field(meta, "tensor_sha256", "dict", where=file, default=None, nullable=True)
    cert = meta_field(meta, "certificate", "dict", where=file, default=None, nullable=True)
    if cert is not None:
        for key in ("max_loss", "eps", "loss_a", "loss_b", "bound"):
            meta_field(cert, key, "number", where=f"{file} (certificate)", default=None, nullable=True)


def _path_class(kind: str, file: str) -> type[ModePath]:
    cls = _REGISTRY.get(kind)
    if cls is None:
        _import_builtin_kinds()
        cls = _REGISTRY.get(kind)
    if cls is None:
        raise CheckpointError(f"{file}: unknown path kind {kind!r}; this mcensemble knows "
                              f"{', '.join(sorted(_REGISTRY))}. Upgrade mcensemble if the file is newer")
    return cls


def verify_path_file(file: str | os.PathLike) -> int | None:
    """Check the SHA-256 of every tensor of a path file against the record in its header.
    Returns how many tensors were checked, None when the file records no hashes (written
    before mcensemble recorded them); `CheckpointError` naming the first tensor that differs."""
    file = os.fspath(file)
    meta = _path_document(file)
    return verify_tensor_hashes(file, meta_field(meta, "tensor_sha256", "dict", where=file,
                                                 default=None, nullable=True))


def load_path(file: str | os.PathLike, *, verify: bool = False) -> ModePath:
    """Read a path file written by `ModePath.save` (safetensors; nothing is unpickled).

    `verify`: first check every tensor's bytes against the SHA-256 recorded in the file
    (`CheckpointError` naming the tensor that differs; a file without hashes is loaded with
    a warning). Every metadata field is type-checked, and sizes in it (bends, vertices) are
    checked against the tensors in the file: a damaged or crafted file raises
    `CheckpointError`, never another exception."""
    file = os.fspath(file)
    if os.path.isdir(file):
        raise CheckpointError(f"{file} is a directory, not a path file; give the .safetensors file "
                              "written by ModePath.save() (`path_out` of a build)")
    if not os.path.exists(file):
        raise CheckpointError(f"path file {file} does not exist")
    if verify and verify_path_file(file) is None:
        log.warning("%s records no tensor hashes (written before mcensemble recorded them): not verified", file)
    meta, tensors = _read_path_file(file)
    _check_common_fields(meta, file)
    kind = meta["kind"]
    cls = _path_class(kind, file)
    groups_names = meta.get("groups") or ["endpoint.0", "endpoint.1"]
    if len(set(groups_names)) != len(groups_names):
        raise CheckpointError(f"{file}: the path's 'groups' field names a group twice; the file is damaged")
    groups = _split_groups(tensors, groups_names, file)
    try:
        path = cls._from_file(groups, meta)
    except CheckpointError as e:
        raise CheckpointError(f"{file}: the {kind} path in it is damaged: {e}") from e
    except (KeyError, ValueError, TypeError, IndexError, ArchitectureMismatchError) as e:
        raise CheckpointError(f"{file}: the {kind} path in it is damaged or inconsistent: {e}") from e
    path.metadata = dict(meta)
    if path.certificate is None and meta.get("certificate") is not None:
        path.certificate = meta["certificate"]
    return path
