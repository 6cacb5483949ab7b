"""The eval folder's files around the eval stage (stages/eval.py): the eval sets it reads, checked
against what `scope prepare` recorded, and the summary it writes as one unit — summary.parquet (every
set's metrics), training.parquet (what round R's stages recorded) and, last, _manifest/summary.json,
which lists both with their sizes and sha256 and what they were computed from. The eval is done only
once that manifest exists and matches (scope_cli/cli/rounds.py eval_done), so a kill between the two
tables leaves an eval that the next run finishes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from scope_cli.core.files import list_shard_files, manifest_path, read_shard, shard_path, write_parquet_atomic
from scope_cli.core.manifests import damaged, manifest_files, problem, read_manifest, record_lists_problem, vouched
from scope_cli.core.manifests import record as file_digest
from scope_cli.core.runs import Run
from scope_cli.core.shards import ShardJob, complete_shards, write_manifest
from scope_cli.errors import ScopeError, json_object
from scope_cli.metrics import summary_table
from scope_cli.schema import EVAL_SUMMARY, PROMPTS, conform


class EvalError(ScopeError):
    """A missing eval set or policy: one line naming it."""


def check_eval_set(run: Run, path: Path) -> None:
    """An eval set is what eval-sets/_manifest.json records (size and sha256). Sets without a manifest
    (made by hand) or not listed in it are taken as they are."""
    marker = run.eval_sets_dir / "_manifest.json"
    if not marker.exists():
        return
    data, why = json_object(marker)
    why = why or record_lists_problem(data, "files")
    if why is not None:
        raise EvalError(f"{marker}: {why}; run `{run.command('prepare')}` to write the eval sets again")
    rec = {r["path"]: r for r in data.get("files", [])}.get(path.name)
    if rec is not None and (why := problem(path, rec)) is not None:
        raise EvalError(damaged(path, why, run.command("prepare")))


def read_eval_set(run: Run, name: str) -> list[dict[str, Any]]:
    path = run.eval_sets_dir / f"{name}.parquet"
    check_eval_set(run, path)
    rows = read_shard(path, PROMPTS).to_pylist()
    if run.config.eval.limit:
        rows = rows[:run.config.eval.limit]
    if not rows:
        raise EvalError(f"{path}: no prompts")
    return rows


SUMMARY_FILES = ("summary.parquet", "training.parquet")


def summary_manifest(out_dir: Path) -> Path:
    return Path(out_dir) / "_manifest" / "summary.json"


def training_sources(run: Run, round_: int) -> list[Path]:
    """What training.parquet is computed from (round R's verified, located and rectified shards and
    train metrics), each checked against its manifest."""
    files = []
    for folder, writer in (("verified", "verify"), ("located", "locate-error"), ("rectified", "rectify")):
        if list_shard_files(run.stage_dir(round_, folder)):
            files += complete_shards(run.stage_dir(round_, folder), run.command(f"{writer} --round {round_}"))
    metrics = run.train_dir(round_) / "metrics.parquet"
    if metrics.exists():
        why = vouched(metrics, manifest_path(run.train_dir(round_), 0), run.root,
                      run.command(f"train-step --round {round_}"))
        if why is not None:
            raise EvalError(why)
        files.append(metrics)
    return files


def summary_done(out_dir: Path, inputs: list[Path], cfg_hash: str, root: Path) -> bool:
    """The summary manifest is whole, its files match it, and they were made from `inputs`."""
    m, _ = read_manifest(summary_manifest(out_dir))
    if m is None or m["config_hash"] != cfg_hash:
        return False
    if any(problem(p, r) is not None for p, r in manifest_files(m, out_dir, root)):
        return False
    return m.get("inputs") == [file_digest(p, root) for p in inputs]


def write_summary(run: Run, out_dir: Path, jobs: list[ShardJob], inputs: list[Path], cfg_hash: str,
                  config_keys: list[str], train: dict[str, float] | None, round_: int, policy: str) -> None:
    """summary.parquet, training.parquet (with `train`), then the manifest that makes them done."""
    summary_manifest(out_dir).unlink(missing_ok=True)  # not done until both are rewritten
    tables = [read_shard(shard_path(out_dir, j.index), EVAL_SUMMARY) for j in jobs]
    write_parquet_atomic(conform(pa.concat_tables(tables), EVAL_SUMMARY), out_dir / SUMMARY_FILES[0])
    outputs = []
    if train:
        write_parquet_atomic(summary_table(round_, policy, "train", train), out_dir / SUMMARY_FILES[1])
        outputs.append(file_digest(out_dir / SUMMARY_FILES[1], out_dir))
    else:
        (out_dir / SUMMARY_FILES[1]).unlink(missing_ok=True)
    write_manifest(summary_manifest(out_dir), "eval", [file_digest(p, run.root) for p in inputs],
                   file_digest(out_dir / SUMMARY_FILES[0], out_dir), cfg_hash, config_keys, outputs=outputs)
