"""Reading the small JSON files a run keeps (manifests, markers, model configs) with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scope_cli.errors import ScopeError


class JsonFileError(ScopeError):
    """A JSON file that cannot be read or is not what it should be: one line naming the file."""


def read_json_object(path: Path, fix: str = "remove it or rerun the command that writes it") -> dict[str, Any]:
    """A JSON file that must hold an object: anything else is a one-line error naming the file and
    `fix`, what repairs it. A missing file raises FileNotFoundError (callers decide what that means)."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise JsonFileError(f"{path}: not valid JSON ({reason}); {fix}") from None
    if not isinstance(data, dict):
        raise JsonFileError(f"{path}: expected a JSON object, got {type(data).__name__}; {fix}")
    return data
