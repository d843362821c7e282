"""Atomic file writes and size- and depth-limited JSON reading."""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Union

from .errors import ConfigError, PolicyError

PathLike = Union[str, "os.PathLike[str]"]

_DEFAULT_MODE = 0o644
_MAX_INT_DIGITS = 4000


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file, fsync, ``os.replace``.

    Parent directories are created. An existing file keeps its permission bits;
    a new one gets mode 0o644. On any error the temp file is removed, the
    original file is left untouched and the error is re-raised.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = _target_mode(target)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise _naming(exc, target) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _naming(exc, target) from exc
        raise
    _fsync_dir(target.parent)
    return target


def _naming(exc: OSError, target: Path) -> OSError:
    """The same error (same subclass: ENOSPC, EACCES, ...) naming the file the caller meant to write."""
    if exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror or str(exc), str(target))


def check_writable_dir(path: PathLike, option: str) -> Path:
    """Create directory ``path`` if needed and check that a file can be written in it.

    Run before a long job, so that an ``--out`` that is a file, read-only, or
    under a file or ``/proc`` is a :class:`ConfigError` naming the option, not
    a failure after the work is done.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{option} {printable(str(p))}: exists and is not a directory")
    _probe(p, f"{option} {printable(str(p))}")
    return p


def check_writable_file(path: PathLike, option: str) -> Path:
    """Check that file ``path`` can be written (its directory is created); see :func:`check_writable_dir`."""
    p = Path(path)
    label = f"{option} {printable(str(p))}"
    if p.is_dir():
        raise ConfigError(f"{label}: is a directory, expected a file name")
    if p.parent.exists() and not p.parent.is_dir():
        raise ConfigError(f"{label}: {printable(str(p.parent))} is not a directory")
    _probe(p.parent, label)
    return p


def _probe(directory: Path, label: str) -> None:
    """Create ``directory`` and a temporary file in it, or raise a ConfigError starting with ``label``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".budcache-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{label}: cannot write there ({exc.strerror or type(exc).__name__})") from None


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}
_CONTROL.update({c: f"\\u{c:04x}" for c in range(0x80, 0xA0)})


def printable(text: str) -> str:
    """``text`` with control characters (escape codes, carriage returns, newlines) shown as ``\\xNN``.

    Everything printed from a file goes through it, so a shared file cannot
    clear the terminal or fake output.
    """
    return text.translate(_CONTROL)


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically (no newline translation)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: object) -> str:
    """Serialise ``obj`` as indented JSON with a trailing newline; NaN/Infinity are errors."""
    return json.dumps(obj, indent=2, sort_keys=False, allow_nan=False, ensure_ascii=False) + "\n"


def write_json(path: PathLike, obj: object) -> Path:
    """Serialise ``obj`` (before touching the file) and write it to ``path`` atomically."""
    return atomic_write_text(path, dumps_json(obj))


def read_json_limited(
    path: PathLike,
    *,
    max_bytes: int,
    max_depth: int,
    what: str,
    error: type[Exception] = PolicyError,
) -> object:
    """Read and parse a JSON file, raising ``error`` with a clear message on any problem.

    Rejects a missing or unreadable file, a file over ``max_bytes`` (checked before
    reading), bytes that are not UTF-8, invalid JSON, NaN/Infinity, numbers that
    overflow, and nesting deeper than ``max_depth``. Messages start with
    ``"<what> '<path>'"``.
    """
    p = Path(path)
    label = f"{what} '{p}'"
    try:
        info = p.stat()
        if stat.S_ISDIR(info.st_mode):
            raise error(f"{label}: is a directory, expected a file")
        if info.st_size > max_bytes:
            raise error(
                f"{label}: file is {info.st_size} bytes, larger than the limit of {max_bytes} bytes"
            )
        with open(p, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise error(f"{label}: file not found") from None
    except OSError as exc:
        raise error(f"{label}: cannot read file ({exc.strerror or exc})") from None
    if len(raw) > max_bytes:
        raise error(f"{label}: file is larger than the limit of {max_bytes} bytes")
    return _parse_bytes(raw, label, max_depth, error)


def loads_json_limited(
    data: str | bytes,
    *,
    max_bytes: int,
    max_depth: int,
    what: str,
    error: type[Exception] = PolicyError,
) -> object:
    """Parse JSON from memory with the same limits and messages as :func:`read_json_limited`."""
    if isinstance(data, str):
        if len(data) > max_bytes:
            raise error(f"{what}: text is larger than the limit of {max_bytes} bytes")
        raw = data.encode("utf-8", "surrogatepass")
    else:
        raw = bytes(data)
    if len(raw) > max_bytes:
        raise error(f"{what}: text is {len(raw)} bytes, larger than the limit of {max_bytes} bytes")
    return _parse_bytes(raw, what, max_depth, error)


class _BadNumber(Exception):
    """Raised from the JSON parse hooks for NaN, Infinity and overflowing numbers."""


def _reject_constant(name: str) -> object:
    raise _BadNumber(f"{name} is not allowed (JSON numbers must be finite)")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadNumber(f"number {text[:32]} is out of range (overflows to infinity)")
    return value


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > _MAX_INT_DIGITS:
        raise _BadNumber(f"integer with {digits} digits is too large")
    return int(text)


def _parse_bytes(raw: bytes, label: str, max_depth: int, error: type[Exception]) -> object:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(
            f"{label}: not UTF-8 text (invalid byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None
    if not text.strip():
        raise error(f"{label}: empty, expected a JSON document")
    try:
        obj = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_parse_float,
            parse_int=_parse_int,
        )
    except _BadNumber as exc:
        raise error(f"{label}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise error(
            f"{label}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    except RecursionError:
        raise error(f"{label}: JSON is nested too deeply (limit {max_depth} levels)") from None
    except ValueError as exc:
        raise error(f"{label}: not valid JSON: {exc}") from None
    _check_depth(obj, label, max_depth, error)
    return obj


def _check_depth(obj: object, label: str, max_depth: int, error: type[Exception]) -> None:
    """Walk ``obj`` iteratively; a top-level array or object is depth 1."""
    stack: list[tuple[object, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: list[object] = list(node.values())
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > max_depth:
            raise error(f"{label}: JSON is nested too deeply (limit {max_depth} levels)")
        stack.extend((child, depth + 1) for child in children)


def _target_mode(target: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return _DEFAULT_MODE


def _fsync_dir(directory: Path) -> None:
    """Best effort: make the rename durable on POSIX file systems."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
