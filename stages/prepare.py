"""prepare: write a run's training prompts, held-out eval sets and base policy.

    scope prepare --run NAME [--config FILE] [--set prepare.source=PATH]

Sources (`prepare.source`):
  arith                the built-in arithmetic task: training prompts, a held-out set (3-6 operands)
                       and an out-of-distribution set (7-8 operands), all disjoint;
  FILE.jsonl           rows with problem, answer, optional solution / data_source / task / messages;
  FILE.parquet         verl's schema (prompt, reward_model.ground_truth, data_source, extra_info;
                       LUFFY's target becomes solution) or the JSONL columns;
  FOLDER               a local Hugging Face dataset: a `save_to_disk` folder or a folder of
                       parquet/jsonl files (the split named by `prepare.split` when several);
  hf:ID                a hub dataset through the `datasets` package (where the network allows).
Eval sets for other sources come from `prepare.eval_sources = ["name=PATH", ...]`; their problems
are removed from the training prompts.

`prompt_id` is a hash of (task, problem): identical problems are kept once and counted; the same
problem with two different answers is an error naming both sources. Writes prompts/shard-NNNNN.parquet
(+ manifests), eval-sets/<name>.parquet and policy-000/ (a copy of `policy.path`).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from scope_cli.config import config_hash
from scope_cli.errors import ScopeError
from scope_cli.runs import Run, check_round_size, policy_complete
from scope_cli.schema import PROMPTS, conform
from scope_cli.manifests import json_object, problems, record_lists_problem, records
from scope_cli.shards import (
    ShardJob,
    check_inside_run,
    is_done,
    list_shard_files,
    manifest_path,
    remove_stale_temps,
    run_shards,
    write_json_atomic,
    write_parquet_atomic,
)
from scope_cli.tasks import TASKS, arith, task_for_source

CONFIG_KEYS = ["prepare", "task"]


class PrepareError(ScopeError, ValueError):
    """Bad source data: one line naming the file (and row / field) and what was expected."""


# ---- reading sources ---------------------------------------------------------------------------
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
                               "(single digits joined by + and -)") from None
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


def read_source(source: str, split: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, raw row) pairs from a file, folder or hub dataset."""
    if source.startswith("hf:"):
        try:
            import datasets  # optional: only for hub ids
        except ImportError:
            raise PrepareError(f"{source}: hub datasets need the `datasets` package "
                               "(pip install datasets), or download it to a folder") from None
        ds = datasets.load_dataset(source[3:], split=split)
        return _read_arrow_table(ds.data.table, source)
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


def dedupe(rows: list[tuple[str, dict[str, Any]]]) -> tuple[list[dict[str, Any]], int]:
    """Add prompt_id; keep the first of identical problems; conflicting answers are an error."""
    seen: dict[str, tuple[str, str]] = {}
    out, duplicates = [], 0
    for where, row in rows:
        pid = prompt_id(row["task"], row["problem"])
        if pid in seen:
            first_where, first_answer = seen[pid]
            if first_answer.strip() != row["answer"].strip():
                raise PrepareError(
                    f"{where}: same problem as {first_where} with a different answer "
                    f"({row['answer']!r} vs {first_answer!r})"
                )
            duplicates += 1
            continue
        seen[pid] = (where, row["answer"])
        out.append({"prompt_id": pid, **row})
    return out, duplicates


# ---- the built-in task ---------------------------------------------------------------------------
def arith_rows(count: int, lo: int, hi: int, seed: int, exclude: set[str], name: str):
    try:
        rows = arith.generate_problems(seed, count, lo, hi, exclude)
    except ValueError as exc:
        raise PrepareError(f"prepare: the {name} set: {exc}") from None
    return [(f"arith:{name}:{i}", {**r, "messages": None, "data_source": "arith", "task": "arith",
                                    "extra_info": None}) for i, r in enumerate(rows)]


def build_tables(cfg) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]], dict[str, int]]:
    p = cfg.prepare
    counts: dict[str, int] = {}
    if p.source == "arith":
        train, counts["duplicates"] = dedupe(arith_rows(p.train_size, p.min_operands,
                                                        p.max_operands, p.seed, set(), "train"))
        used = {r["problem"] for r in train}
        heldout, _ = dedupe(arith_rows(p.eval_size, p.min_operands, p.max_operands,
                                       p.seed + 1, used, "heldout"))
        used |= {r["problem"] for r in heldout}
        ood, _ = dedupe(arith_rows(p.ood_size, p.ood_min_operands, p.ood_max_operands,
                                   p.seed + 2, used, "ood"))
        return train, {"heldout": heldout, "ood": ood}, counts
    raw = [(w, normalise_row(r, w, cfg.task.name)) for w, r in read_source(p.source, p.split)]
    train, counts["duplicates"] = dedupe(raw)
    evals = {}
    for item in p.eval_sources:
        name, eq, path = item.partition("=")
        if not eq or not name.strip() or "/" in name:
            raise PrepareError(f"prepare.eval_sources: expected 'name=path', got {item!r}")
        rows = [(w, normalise_row(r, w, cfg.task.name)) for w, r in read_source(path, "test")]
        evals[name.strip()], _ = dedupe(rows)
    held = {r["prompt_id"] for rows in evals.values() for r in rows}
    before = len(train)
    train = [r for r in train if r["prompt_id"] not in held]
    counts["removed_eval_overlap"] = before - len(train)
    if not train:
        raise PrepareError(f"{p.source}: no training prompts left")
    return train, evals, counts


# ---- the stage --------------------------------------------------------------------------------------
def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    return conform(pa.Table.from_pylist(rows, schema=PROMPTS), PROMPTS)


def prepare(run: Run, force: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Write prompts/, eval-sets/ and policy-000/. Returns counts for the CLI to print."""
    from scope_cli.policy import PolicyError, check_policy_folder, copy_policy

    cfg = run.config
    if not policy_complete(run.policy_dir(0)):  # checked before anything is written
        try:
            check_policy_folder(Path(cfg.policy.path))
        except PolicyError as exc:
            raise PolicyError(f"policy.path: {exc}") from None
    cfg_hash = config_hash(cfg, CONFIG_KEYS)
    sources = [] if cfg.prepare.source in ("arith",) or cfg.prepare.source.startswith("hf:") else [
        Path(cfg.prepare.source)]
    source_files = [f for s in sources for f in ([s] if s.is_file() else sorted(p for p in s.rglob("*") if p.is_file()))]
    done_marker = run.root / "eval-sets" / "_manifest.json"
    check_inside_run(run.eval_sets_dir, run.root)
    prompt_files = list_shard_files(run.prompts_dir)
    # done: a whole marker with this config hash, the eval sets it records and the prompt shards
    # intact (a damaged marker, set or shard is rebuilt, to the same bytes)
    marker, _ = json_object(done_marker)
    already = (not force and marker is not None and prompt_files and marker.get("config_hash") == cfg_hash
               and record_lists_problem(marker, "files") is None and "files" in marker
               and not problems(marker["files"], run.eval_sets_dir)
               and all(is_done(run.prompts_dir, i, source_files, cfg_hash, run.root)
                       for i in range(len(prompt_files))))
    summary: dict[str, Any] = {}
    if not already:
        train, evals, counts = build_tables(cfg)
        check_round_size(cfg.generate.prompts_per_round, len(train), cfg.prepare.source)
        per = cfg.prepare.shard_rows
        chunks = [train[i:i + per] for i in range(0, len(train), per)]
        jobs = [ShardJob(i, source_files, (lambda rows=rows: (to_table(rows), {"rows": len(rows)})))
                for i, rows in enumerate(chunks)]
        for stale in prompt_files[len(chunks):]:
            stale.unlink()
            manifest_path(run.prompts_dir, int(stale.name[6:11])).unlink(missing_ok=True)
        # force only with --force: a prepare killed before its marker keeps the shards it finished
        run_shards("prepare", run.prompts_dir, jobs, cfg_hash, CONFIG_KEYS, run.root, force=force,
                   quiet=quiet)
        remove_stale_temps(run.eval_sets_dir)
        if run.eval_sets_dir.exists():
            for old in run.eval_sets_dir.glob("*.parquet"):
                if old.stem not in evals:
                    old.unlink()
        for name, rows in evals.items():
            write_parquet_atomic(to_table(rows), run.eval_sets_dir / f"{name}.parquet")
        summary = {"prompts": len(train), **{f"eval:{k}": len(v) for k, v in evals.items()}, **counts}
        files = records([run.eval_sets_dir / f"{name}.parquet" for name in evals], run.eval_sets_dir)
        write_json_atomic({"config_hash": cfg_hash, **summary, "files": files}, done_marker)
    else:
        summary = {k: v for k, v in marker.items() if k not in ("config_hash", "files")}
        summary["skipped"] = "already prepared"

    copy_policy(Path(cfg.policy.path), run.policy_dir(0), {"round": 0}, code=cfg.policy.trust_remote_code)
    summary["policy-000"] = str(cfg.policy.path)
    return summary


def discard_new_run(root: Path, keep_folder: bool) -> None:
    """Remove what a failed first `scope prepare` wrote (the folder itself unless it existed before,
    empty, as `Run.open` requires of a new run's folder)."""
    import shutil

    if not keep_folder:
        shutil.rmtree(root, ignore_errors=True)
    elif root.is_dir():
        for entry in root.iterdir():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
