"""Resource limits shared by every weight reader: a per-call byte budget and a bounded repr for errors.

A weight file comes from the internet; what it claims (shapes, element counts, member sizes) is checked
against a budget before anything is allocated. The budget counts the logical size of every array a
reader will hand back (a zero-stride tensor of a billion elements counts a billion elements, however
small the file), plus the reader's own intermediate buffers where they exist. The default is generous
(8 GiB); pass `max_bytes=` to a reader, or set the environment variable `EMBJAX_MAX_WEIGHT_BYTES`, to
change it. Nothing here is module state a file could change: every call builds its own `ByteBudget`.

Beside the byte budget, every reader bounds the structure of what it parses, so that the time and memory of
reading (or refusing) a file follow the bytes actually read, never what the file claims. Each bound is a
field of `Limits`, with a default below and an environment variable to raise it (`EMBJAX_WEIGHT_<FIELD>`,
e.g. EMBJAX_WEIGHT_MAX_ENTRIES=200000), or pass `limits=Limits(max_entries=...)` to a reader:

    max_entries          entries of a table or header (TF .index keys, safetensors tensors): 50,000. The
                         largest thesis checkpoint (NASNet-Large with its optimizer slots) has a few thousand.
    max_key_bytes        bytes of one key or tensor name: 1,024 (real names are under 300)
    max_total_key_bytes  bytes of all keys of one file together: 8 MiB
    max_rank             dimensions of one tensor: 32 (NumPy allows 64; no weight comes near either)
    max_elements         elements of one tensor, and the size of any one dimension: 2**34 (16 Gi), counted
                         with exact integers (no wrap-around)
    max_header_bytes     a file's metadata: a safetensors JSON header, a TF checkpoint .index file: 16 MiB
                         (a thousand-tensor model needs about 100 KB)
"""
from __future__ import annotations

import dataclasses
import os
import reprlib

__all__ = ["DEFAULT_MAX_BYTES", "ENV_MAX_BYTES", "MAX_NESTING", "ByteBudget", "Limits", "resolve_max_bytes",
           "short_repr", "element_count", "is_regular_file"]

DEFAULT_MAX_BYTES = 8 << 30
ENV_MAX_BYTES = "EMBJAX_MAX_WEIGHT_BYTES"
# A state dict nests two or three levels (checkpoint -> state_dict -> name); 64 leaves room for any real
# layout while keeping every walk far from Python's recursion limit.
MAX_NESTING = 64


@dataclasses.dataclass(frozen=True)
class Limits:
    """The structural bounds every reader applies (see the module docstring); `Limits.resolve()` reads the
    environment overrides at every call."""

    max_entries: int = 50_000
    max_key_bytes: int = 1024
    max_total_key_bytes: int = 8 << 20
    max_rank: int = 32
    max_elements: int = 1 << 34
    max_header_bytes: int = 16 << 20

    @classmethod
    def resolve(cls, given: "Limits | None" = None) -> "Limits":
        """`given` if a reader was passed one, else the defaults with each $EMBJAX_WEIGHT_<FIELD> applied."""
        if given is not None:
            return given
        values = {}
        for field in dataclasses.fields(cls):
            env = "EMBJAX_WEIGHT_" + field.name.upper()
            text = os.environ.get(env)
            if text is None or not text.strip():
                continue
            try:
                value = int(text)
            except ValueError:
                raise ValueError(f"${env}={text!r} is not a whole number") from None
            if value <= 0:
                raise ValueError(f"${env} must be positive, got {value}")
            values[field.name] = value
        return cls(**values)

    @staticmethod
    def hint(field: str) -> str:
        """How to raise a limit, for error messages."""
        return (f"if the file is trusted, raise the limit with $EMBJAX_WEIGHT_{field.upper()} or "
                f"limits=Limits({field}=...)")


def element_count(shape, limits: Limits) -> int:
    """The exact element count of `shape` (Python integers, no wrap-around); ValueError naming the bound
    when the rank, a dimension or the count exceeds `limits` or a dimension is negative."""
    shape = tuple(shape)
    if len(shape) > limits.max_rank:
        raise ValueError(f"shape of rank {len(shape)} exceeds max_rank={limits.max_rank}; {Limits.hint('max_rank')}")
    count = 1
    for d in shape:
        d = int(d)
        if d < 0:
            raise ValueError(f"negative dimension {d} in shape {short_repr(shape)}")
        if d > limits.max_elements:
            raise ValueError(f"shape dimension {d:,} exceeds max_elements={limits.max_elements:,}; "
                             f"{Limits.hint('max_elements')}")
        count *= d
    nonzero = 1
    for d in shape:
        nonzero *= max(int(d), 1)
    if count > limits.max_elements or nonzero > limits.max_elements:
        # An empty tensor too: (2**32, 2**32, 0) holds nothing, but no array library can build it.
        raise ValueError(f"shape {short_repr(shape)} has {count:,} elements, more than max_elements="
                         f"{limits.max_elements:,}; {Limits.hint('max_elements')}")
    return count


def is_regular_file(path) -> bool:
    """True for a regular file (after symlinks); False for a FIFO, socket, device, directory or nothing.
    Readers open only regular files: reading a FIFO would block forever, a device never end."""
    import stat

    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


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
