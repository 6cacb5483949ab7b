"""Reading prepare's sources: files, dataset folders and hub datasets, as (where, raw row) pairs, and
one raw row as the prompts columns. The prepare stage (stages/prepare.py) says which sources exist
and how a row's task is chosen.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from scope_cli.errors import ScopeError
from scope_cli.tasks import TASKS, arith, task_for_source


class PrepareError(ScopeError, ValueError):
    """Bad source data: one line naming the file (and row / field) and what was expected."""


def prompt_id(task: str, problem: str) -> str:
    return hashlib.sha256(f"{task}\x00{problem.strip()}".encode()).hexdigest()[:16]


def _as_text(value: Any, where: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise PrepareError(f"{where}: not valid UTF-8 text") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise PrepareError(f"{where}: expected text, got {type(value).__name__}")
    return value


def _messages(value: Any, where: str) -> list[dict[str, str]] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, (list, tuple)) and all(isinstance(m, dict) and "content" in m for m in value):
        return [{"role": str(m.get("role") or "user"), "content": _as_text(m["content"], where)}
                for m in value]
    raise PrepareError(f"{where}: expected a chat list of {{role, content}} or a string")


def _last_content(messages: list[dict[str, str]], role: str | None = None) -> str:
    picked = [m for m in messages if role is None or m["role"] == role] or messages
    return picked[-1]["content"]


def normalise_row(raw: dict[str, Any], where: str, default_task: str) -> dict[str, Any]:
    """One source row (JSONL / verl / HF) -> the prompts columns (without prompt_id)."""
    messages = None
    if "problem" in raw and raw["problem"] is not None:
        problem = _as_text(raw["problem"], f"{where}: field problem")
        messages = _messages(raw.get("messages"), f"{where}: field messages")
    elif "prompt" in raw and raw["prompt"] is not None:
        if isinstance(raw["prompt"], str):
            problem = _as_text(raw["prompt"], f"{where}: field prompt")
        else:
            messages = _messages(raw["prompt"], f"{where}: field prompt")
            problem = _last_content(messages, "user") if messages else ""
    elif "question" in raw and raw["question"] is not None:
        problem = _as_text(raw["question"], f"{where}: field question")
    else:
        raise PrepareError(f"{where}: missing field problem (or verl's prompt)")
    if not problem.strip():
        raise PrepareError(f"{where}: empty problem")

    answer = raw.get("answer")
    reward_model = raw.get("reward_model")
    if answer is None and isinstance(reward_model, dict):
        answer = reward_model.get("ground_truth")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise PrepareError(f"{where}: missing field answer (or verl's reward_model.ground_truth)")
    if isinstance(answer, (list, tuple)):
        answer = answer[0] if len(answer) == 1 else json.dumps(list(answer))
    answer = _as_text(answer, f"{where}: field answer")

    solution = raw.get("solution")
    if solution is None and raw.get("target") is not None:  # LUFFY's off-policy trace
        target = raw["target"]
        solution = target if isinstance(target, str) else _last_content(
            _messages(target, f"{where}: field target") or [{"content": ""}])
    solution = None if solution is None else _as_text(solution, f"{where}: field solution")

    data_source = _as_text(raw.get("data_source") or default_task, f"{where}: field data_source")
    task = raw.get("task") or task_for_source(data_source, default_task)
    if task not in TASKS:
        raise PrepareError(f"{where}: field task: unknown task {task!r} "
                           f"(expected one of {', '.join(TASKS)})")
    if task == "arith":
        try:
            arith.parse_problem(problem)
        except ValueError:
            raise PrepareError(f"{where}: field problem: {problem[:40]!r} is not an arith problem "
                               "(single digits joined by + and -), but the row's task or data_source "
                               "says arith") from None
    extra = raw.get("extra_info")
    difficulty = _difficulty(raw.get("difficulty", raw.get("level")), where)
    return {
        "problem": problem,
        "messages": messages,
        "answer": answer,
        "solution": solution,
        "data_source": data_source,
        "task": task,
        "difficulty": difficulty,
        "extra_info": None if extra is None else json.dumps(extra, sort_keys=True, default=str),
    }


def _difficulty(value: Any, where: str) -> int | None:
    """A row's difficulty (or MATH's `level`) as an integer (a fraction is cut) when numeric, else none."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if not math.isfinite(value) or abs(value) >= 2**63:
        raise PrepareError(f"{where}: field difficulty: expected a finite number below 2**63, got {value!r}")
    return int(value)


def _read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PrepareError(f"{path}: cannot read ({exc.strerror})") from None
    for lineno, raw_line in enumerate(data.splitlines(), 1):
        if not raw_line.strip():
            continue
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError:
            raise PrepareError(f"{path}:{lineno}: not valid UTF-8 text") from None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PrepareError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise PrepareError(f"{path}:{lineno}: JSON nested too deeply to read") from None
        if not isinstance(obj, dict):
            raise PrepareError(f"{path}:{lineno}: expected a JSON object per line")
        rows.append((f"{path}:{lineno}", obj))
    return rows


def _read_arrow_table(table: pa.Table, name: str) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{name} row {i}", row) for i, row in enumerate(table.to_pylist())]


def _read_parquet(path: Path) -> list[tuple[str, dict[str, Any]]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise PrepareError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    return _read_arrow_table(table, str(path))


def _read_folder(path: Path, split: str) -> list[tuple[str, dict[str, Any]]]:
    arrow_files = sorted(path.rglob("*.arrow"))
    if arrow_files:  # datasets' save_to_disk layout: Arrow IPC streams
        chosen = [p for p in arrow_files if split in p.parts or split in p.name] or arrow_files
        rows = []
        for p in chosen:
            with pa.memory_map(str(p)) as source:
                try:
                    table = pa.ipc.open_stream(source).read_all()
                except pa.ArrowInvalid:
                    table = pa.ipc.open_file(source).read_all()
            rows.extend(_read_arrow_table(table, str(p)))
        return rows
    files = sorted([*path.rglob("*.parquet"), *path.rglob("*.jsonl")])
    if not files:
        raise PrepareError(f"{path}: no .arrow, .parquet or .jsonl files in the dataset folder")
    chosen = [p for p in files if split in p.name or split in p.parent.name] or files
    rows = []
    for p in chosen:
        rows.extend(_read_parquet(p) if p.suffix == ".parquet" else _read_jsonl(p))
    return rows


def _read_hf(source: str, split: str) -> list[tuple[str, dict[str, Any]]]:
    """hf:ID through `datasets` (the hub, or its local cache when offline); hf:FOLDER, a folder
    written by `save_to_disk`, through load_from_disk."""
    import datasets

    name = source[3:]
    try:
        if Path(name).is_dir():
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise PrepareError(f"{source}: no split {split!r} (have: {', '.join(ds)}); "
                                       "set prepare.split")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split)
    except PrepareError:
        raise
    except Exception as exc:  # not found, offline and not cached, unknown split: one line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise PrepareError(f"{source}: cannot load with `datasets` ({type(exc).__name__}: {first})") from None
    rows = [(f"{source} row {i}", row) for i, row in enumerate(ds)]
    if not rows:
        raise PrepareError(f"{source}: no rows in split {split!r}")
    return rows


def read_source(source: str, split: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, raw row) pairs from a file, folder or hub dataset."""
    if source.startswith("hf:"):
        return _read_hf(source, split)
    path = Path(source)
    if not path.exists():
        raise PrepareError(f"{path}: source does not exist")
    if path.is_dir():
        rows = _read_folder(path, split)
    elif path.suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif path.suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        raise PrepareError(f"{path}: expected a .jsonl or .parquet file or a dataset folder")
    if not rows:
        raise PrepareError(f"{path}: no rows")
    return rows
