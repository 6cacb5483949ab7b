"""The one error type the CLI prints as a single line (exit code 2) instead of a traceback, and the
one-line errors of what a run reads and writes: a failed write, a JSON file that is not what it should
be, an environment variable that is not a number."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class ScopeError(Exception):
    """Bad input or state: the message names the file, column or key and what was expected."""


class WriteError(ScopeError, OSError):
    """A write that failed (disk full, no permission): nothing partial is left under the final name."""


def write_failure(exc: BaseException, path: Path) -> BaseException:
    """A failed write as a one-line WriteError: an OSError (a full disk, a permission) or
    safetensors' SafetensorError, which a full disk raises while writing weights and which is not an
    OSError. Anything else is returned unchanged."""
    from safetensors import SafetensorError

    if isinstance(exc, ScopeError) or not isinstance(exc, (OSError, SafetensorError)):
        return exc
    reason = (exc.strerror if isinstance(exc, OSError) else None) or (str(exc).splitlines() or [""])[0]
    return WriteError(f"{path}: cannot write ({reason or type(exc).__name__}); nothing was left under "
                      "this name, rerun once there is space or permission")


@contextmanager
def write_errors_named(path: Path) -> Iterator[None]:
    """Within the block, a failed write (see `write_failure`) is raised as one line naming `path`."""
    try:
        yield
    except BaseException as exc:
        failure = write_failure(exc, path)
        if failure is exc:
            raise
        raise failure from exc


def env_int(name: str, default: str | None = None) -> int:
    text = os.environ.get(name, default)
    try:
        return int(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ScopeError(f"environment variable {name}={text!r}: expected an integer") from None


# ---- small JSON files (manifests, markers, model configs) -------------------------------------------
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
               float: "number", type(None): "null"}


class JsonFileError(ScopeError):
    """A JSON file that cannot be read or is not what it should be: one line naming the file."""


def json_object(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(object, None), or (None, why not): missing, unreadable, not JSON, or JSON but not an object."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"unreadable ({exc})"
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None, "not valid JSON"
    if not isinstance(data, dict):
        return None, f"a JSON {_JSON_TYPES.get(type(data), 'value')}, not an object"
    return data, None


def read_json_object(path: Path, fix: str = "remove it or rerun the command that writes it") -> dict[str, Any]:
    """A JSON file that must hold an object: anything else is a one-line error naming the file and
    `fix`, what repairs it. A missing file raises FileNotFoundError (callers decide what that means)."""
    data, why = json_object(path)
    if why == "missing":
        raise FileNotFoundError(2, "No such file or directory", str(path))
    if data is None:
        raise JsonFileError(f"{path}: {why}; {fix}")
    return data
