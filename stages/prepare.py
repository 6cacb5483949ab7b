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
  hf:ID                a hub dataset through the `datasets` package: downloaded where the network
                       allows, else read from the local cache (HF_DATASETS_CACHE / HF_HOME, e.g. with
                       HF_HUB_OFFLINE=1); hf:FOLDER reads a `save_to_disk` folder with load_from_disk.
A row's task is its `task` column, else the one its `data_source` names (arith, math, choice, or an
ARC/GPQA/MMLU set), else `task.name` where that says math or choice; a file source never defaults to
arith (the default task.name): only the built-in source is arith, so its rows default to math.
Eval sets for other sources come from `prepare.eval_sources = ["name=PATH", ...]`; their problems
are removed from the training prompts.

`prompt_id` is a hash of (task, problem): identical problems are kept once and counted; the same
problem with two different answers is an error naming both sources. Writes prompts/shard-NNNNN.parquet
(+ manifests), eval-sets/<name>.parquet and policy-000/ (a copy of `policy.path`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from scope_cli.core.config import config_hash
from scope_cli.core.runs import Run, check_round_size
from scope_cli.core.policy import policy_complete
from scope_cli.schema import PROMPTS, conform
from scope_cli.core.manifests import json_object, problems, record_lists_problem, records
from scope_cli.core.shards import ShardJob, is_done, run_shards
from scope_cli.core.files import (
    check_inside_run,
    list_shard_files,
    manifest_path,
    shard_index,
    write_json_atomic,
    write_parquet_atomic,
)
from scope_cli.tempfiles import remove_stale_temps
from scope_cli.core.sources import PrepareError, normalise_row, prompt_id, read_source
from scope_cli.tasks import arith

CONFIG_KEYS = ["prepare", "task"]


# ---- rows (read by scope_cli/core/sources.py) ----------------------------------------------------------
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
    default_task = "math" if cfg.task.name == "arith" else cfg.task.name  # see the module docstring
    raw = [(w, normalise_row(r, w, default_task)) for w, r in read_source(p.source, p.split)]
    train, counts["duplicates"] = dedupe(raw)
    evals = {}
    for item in p.eval_sources:
        name, eq, path = item.partition("=")
        if not eq or not name.strip() or "/" in name:
            raise PrepareError(f"prepare.eval_sources: expected 'name=path', got {item!r}")
        rows = [(w, normalise_row(r, w, default_task)) for w, r in read_source(path, "test")]
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
    from scope_cli.backends.hf import PolicyError, check_policy_folder
    from scope_cli.core.policy import copy_policy

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
        g = cfg.generate
        check_round_size(g.prompts_per_round * g.oversample, len(train), cfg.prepare.source,
                         "generate.prompts_per_round × generate.oversample" if g.oversample > 1
                         else "generate.prompts_per_round")
        per = cfg.prepare.shard_rows
        chunks = [train[i:i + per] for i in range(0, len(train), per)]
        jobs = [ShardJob(i, source_files, (lambda rows=rows: (to_table(rows), {"rows": len(rows)})))
                for i, rows in enumerate(chunks)]
        for stale in prompt_files[len(chunks):]:
            stale.unlink()
            manifest_path(run.prompts_dir, shard_index(stale)).unlink(missing_ok=True)
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
