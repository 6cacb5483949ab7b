"""Reading the small JSON files a run keeps (manifests, markers, model configs) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scope_cli.errors import ScopeError

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
