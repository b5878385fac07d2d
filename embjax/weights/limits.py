"""Resource limits shared by every weight reader: a per-call byte budget and a bounded repr for errors.

A weight file comes from the internet; what it claims (shapes, element counts, member sizes) is checked
against a budget before anything is allocated. The budget counts the logical size of every array a
reader will hand back (a zero-stride tensor of a billion elements counts a billion elements, however
small the file), plus the reader's own intermediate buffers where they exist. The default is generous
(8 GiB); pass `max_bytes=` to a reader, or set the environment variable `EMBJAX_MAX_WEIGHT_BYTES`, to
change it. Nothing here is module state a file could change: every call builds its own `ByteBudget`.
"""
from __future__ import annotations

import os
import reprlib

__all__ = ["DEFAULT_MAX_BYTES", "ENV_MAX_BYTES", "MAX_NESTING", "ByteBudget", "resolve_max_bytes", "short_repr"]

DEFAULT_MAX_BYTES = 8 << 30
ENV_MAX_BYTES = "EMBJAX_MAX_WEIGHT_BYTES"
# A state dict nests two or three levels (checkpoint -> state_dict -> name); 64 leaves room for any real
# layout while keeping every walk far from Python's recursion limit.
MAX_NESTING = 64


def resolve_max_bytes(max_bytes: int | None) -> int:
    """`max_bytes` if given, else $EMBJAX_MAX_WEIGHT_BYTES, else DEFAULT_MAX_BYTES; read at every call."""
    if max_bytes is None:
        env = os.environ.get(ENV_MAX_BYTES)
        if env is None or not env.strip():
            return DEFAULT_MAX_BYTES
        try:
            max_bytes = int(env)
        except ValueError:
            raise ValueError(f"${ENV_MAX_BYTES}={env!r} is not a whole number of bytes") from None
    max_bytes = int(max_bytes)
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    return max_bytes


class ByteBudget:
    """Bytes a single read may still allocate; `charge` raises `error_type` naming the file and the item."""

    __slots__ = ("path", "limit", "used", "error_type")

    def __init__(self, path: str, max_bytes: int | None, error_type: type[Exception]):
        self.path, self.limit, self.used, self.error_type = path, resolve_max_bytes(max_bytes), 0, error_type

    def charge(self, nbytes: int, what: str) -> None:
        nbytes = int(nbytes)
        if nbytes < 0:
            raise self.error_type(f"{self.path}: {what} has a negative size ({nbytes} bytes): the file is corrupt")
        if self.used + nbytes > self.limit:
            raise self.error_type(
                f"{self.path}: {what} needs {nbytes:,} bytes, which with the {self.used:,} already read exceeds "
                f"the {self.limit:,}-byte cap on what one weight file may produce. If the file is trusted and "
                f"really that large, pass max_bytes= to the reader or set ${ENV_MAX_BYTES}.")
        self.used += nbytes


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 80, 80, 40


def short_repr(obj) -> str:
    """A repr bounded in time and length whatever the object (deep, shared or self-referencing)."""
    try:
        return _REPR.repr(obj)
    except Exception as e:  # a repr must never turn a clear error into another one
        return f"<unprintable {type(obj).__name__}: {type(e).__name__}>"
