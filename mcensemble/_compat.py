"""Old names kept working: a keyword argument that was renamed still works under its old
name, with a `DeprecationWarning` that says the new one (`renamed_keyword`)."""
from __future__ import annotations

import warnings
from typing import Any

from .errors import BadOptionError

__all__ = ["UNSET", "renamed_keyword"]


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


#: default of a deprecated keyword: "not passed" (None may be a value the caller meant)
UNSET: Any = _Unset()


def renamed_keyword(new_value: Any, old_value: Any, *, new: str, old: str, where: str,
                    default: Any = None, stacklevel: int = 3) -> Any:
    """The value of keyword `new`, formerly called `old`: `new_value` unless the caller
    passed `old_value` (anything but `UNSET`); then a `DeprecationWarning` naming `new` is
    issued (pointing at the caller's caller by default) and `old_value` is used. Passing
    both (the new one not left at `default`) is a `BadOptionError(option=new)`."""
    if old_value is UNSET:
        return new_value
    if new_value is not default:
        raise BadOptionError(f"{where}: pass {new}= only ({old}= is its old, deprecated name)", option=new)
    warnings.warn(f"{where}({old}=...) is deprecated; call it with {new}= (same meaning)",
                  DeprecationWarning, stacklevel=stacklevel)
    return old_value
