"""Parquet shard I/O: atomic writes, per-shard manifests, skip/resume, locks, schema checks.

A stage folder holds ``shard-NNNNN.parquet`` plus ``_manifest/shard-NNNNN.json``. A shard is done when
its output (and any file its job writes beside it) matches the size and sha256 its manifest records, and
the manifest's inputs (size + sha256) and config hash match (digests: scope_cli/core/manifests.py). Outputs
are written to a temporary name in the same folder and renamed, so a crash never leaves a file a reader
would take as done; the manifest is written last. Timings live only in manifests, never in Parquet.
Files and folders get the modes the umask gives (0666 / 0777 minus the umask), temporaries included.

Concurrent workers take an ``flock`` on ``_locks/shard-NNNNN.lock`` (released by the kernel when the
process dies) and skip shards another worker holds. A worker either has a static slot (index i of k:
shards with index % k == i; --shard-index/--num-shards, RANK/WORLD_SIZE, SLURM arrays) or claims
shards as it goes (``SCOPE_CLAIM_SHARDS=1``, what `scope round` with round.workers > 1 starts,
scope_cli/cli/workers.py): it walks every shard and computes the next one that is neither done nor
locked, so N claiming workers share the shards whatever each one's speed.

Temporary names carry their writer (scope_cli/tempfiles.py), so what a killed process left behind is
removed by the next run: a shard's temporaries by whoever holds its lock, any other temporary once
its writer is known dead (same host, no such process). A stage that reads
another stage's folder takes only a finished one (`complete_shards`): every shard of the writer's
``num_shards`` present, with its manifest.
"""

from __future__ import annotations

import fcntl
import functools
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from scope_cli import __version__
from scope_cli.core.files import (
    ShardError,
    check_inside_run,
    list_shard_files,
    manifest_path,
    shard_index,
    shard_name,
    shard_path,
    write_json_atomic,
    write_parquet_atomic,
)
from scope_cli.core.manifests import damaged, problem, read_manifest
from scope_cli.core.manifests import record as file_digest
from scope_cli.errors import env_int
from scope_cli.tempfiles import remove_path, remove_stale_temps


def complete_shards(stage_dir: Path, writer: str) -> list[Path]:
    """The shards of a finished stage folder, in order, for the stage that reads it.

    A folder a stage wrote (it has ``_locks/`` or ``_manifest/``) must be finished: shards 0 ..
    num_shards-1 (as its manifests record), each with its manifest, and each shard's bytes the size and
    sha256 recorded there. Otherwise a one-line error names what is missing or damaged and `writer`,
    the command that finishes or recomputes it; a partly written or damaged input is never processed.
    A folder of shards made by hand (no manifests, no locks) is taken as it is.
    """
    stage_dir = Path(stage_dir)
    files = list_shard_files(stage_dir)
    man_dir = stage_dir / "_manifest"
    if not man_dir.is_dir() and not (stage_dir / "_locks").is_dir():
        if not files:
            raise ShardError(f"{stage_dir}: no shards (run `{writer}` first)")
        return files
    counts, done, bad = set(), [], []
    for index in sorted({shard_index(p) for p in files} | {
            shard_index(p) for p in man_dir.glob("shard-[0-9][0-9][0-9][0-9][0-9].json")}):
        out, man = shard_path(stage_dir, index), manifest_path(stage_dir, index)
        if not out.exists() or not man.exists():
            continue
        manifest, why = read_manifest(man)
        if manifest is None:
            bad.append(f"{man}: not a manifest ({why}); run `{writer}` to recompute its shard")
            continue
        counts.add(manifest["num_shards"])
        if manifest["output"]["size"] != out.stat().st_size:
            continue  # written after its manifest (a recompute under way) or truncated: not finished
        if (why := problem(out, manifest["output"])) is not None:
            bad.append(damaged(out, why, writer))
            continue
        done.append(index)
    if bad:
        raise ShardError(bad[0] + (f" ({len(bad) - 1} more like it)" if len(bad) > 1 else ""))
    if not done:
        raise ShardError(f"{stage_dir}: no shard is finished yet (run `{writer}` first)")
    if len(counts) != 1:
        raise ShardError(f"{stage_dir}: manifests disagree on num_shards ({sorted(counts, key=str)}); "
                         f"rerun `{writer}`")
    (num,) = counts
    missing = [i for i in range(num) if i not in done]
    extra = [p.name for p in files if shard_index(p) >= num]
    if missing:
        shown = ", ".join(shard_name(i) for i in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ShardError(f"{stage_dir}: {num - len(missing)} of {num} shards finished (missing or "
                         f"changed since its manifest: {shown}); run `{writer}` to finish it")
    if extra:
        raise ShardError(f"{stage_dir}: {', '.join(extra[:3])} beyond the stage's {num} shards "
                         f"(left by an earlier config?); rerun `{writer}`")
    return [shard_path(stage_dir, i) for i in range(num)]


# ---- locks and workers ---------------------------------------------------------------------------
@contextmanager
def shard_lock(stage_dir: Path, index: int) -> Iterator[bool]:
    """Yield True when this process holds the shard's lock, False when another process does."""
    lock_path = Path(stage_dir) / "_locks" / f"shard-{index:05d}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    finally:
        fh.close()


CLAIM_ENV = "SCOPE_CLAIM_SHARDS"  # "1": this worker claims shards as it goes (worker slot CLAIM)
CLAIM = (0, 0)  # the worker slot of a claiming worker: every shard, the next not done nor locked


def worker_slot(shard_index: int | None = None, num_shards: int | None = None) -> tuple[int, int]:
    """(index, count) of this worker: explicit flags, else CLAIM where SCOPE_CLAIM_SHARDS=1, else
    RANK/WORLD_SIZE, else SLURM arrays."""
    if shard_index is None and num_shards is None and os.environ.get(CLAIM_ENV, "") not in ("", "0"):
        if os.environ[CLAIM_ENV] != "1":
            raise ShardError(f"environment variable {CLAIM_ENV}={os.environ[CLAIM_ENV]!r}: expected 1 "
                             "(claim shards as they come) or 0")
        return CLAIM
    if shard_index is not None or num_shards is not None:
        index = 0 if shard_index is None else shard_index
        count = 1 if num_shards is None else num_shards
        where = "--shard-index/--num-shards"
    elif "WORLD_SIZE" in os.environ:
        index, count = env_int("RANK", "0"), env_int("WORLD_SIZE")
        where = "RANK/WORLD_SIZE"
    elif "SLURM_ARRAY_TASK_COUNT" in os.environ:
        index = env_int("SLURM_ARRAY_TASK_ID") - env_int("SLURM_ARRAY_TASK_MIN", "0")
        count = env_int("SLURM_ARRAY_TASK_COUNT")
        where = "SLURM_ARRAY_TASK_ID/_MIN/_COUNT"
    else:
        index, count = 0, 1
        where = ""
    if count < 1 or not 0 <= index < count:
        raise ShardError(f"worker slot {index} of {count} ({where}) is out of range: need a count >= 1 "
                         "and 0 <= index < count")
    return index, count


# ---- running a sharded stage -----------------------------------------------------------------------
@dataclass
class ShardJob:
    """One output shard: which files it reads and how to compute it."""

    index: int
    inputs: list[Path]
    compute: Callable[[], tuple[pa.Table, dict[str, Any]]]
    outputs: list[Path] = field(default_factory=list)  # files compute() writes beside the shard


@dataclass
class StageResult:
    computed: list[int] = field(default_factory=list)
    skipped_done: list[int] = field(default_factory=list)
    skipped_locked: list[int] = field(default_factory=list)
    not_mine: list[int] = field(default_factory=list)


def is_done(stage_dir: Path, index: int, inputs: list[Path], cfg_hash: str, root: Path,
            outputs: list[Path] = ()) -> bool:
    """The shard and its manifest exist, the manifest is whole, its config hash and input digests
    match, and the shard (and each file in `outputs`, written beside it) has the size and sha256 the
    manifest records. A damaged shard or manifest is not done: the caller recomputes it."""
    stage_dir = Path(stage_dir)
    out = shard_path(stage_dir, index)
    if not out.exists():
        return False
    manifest, _ = read_manifest(manifest_path(stage_dir, index))
    if manifest is None or manifest["config_hash"] != cfg_hash:
        return False
    extra = manifest.get("outputs", [])
    if sorted(r["path"] for r in extra) != sorted(str(Path(p).relative_to(stage_dir)) for p in outputs):
        return False
    files = [(out, manifest["output"]), *((stage_dir / r["path"], r) for r in extra)]
    if any(not p.is_file() or p.stat().st_size != r["size"] for p, r in files):
        return False
    recorded = [(i["path"], i["size"], i["sha256"]) for i in manifest.get("inputs", [])]
    current = [(d["path"], d["size"], d["sha256"]) for d in (file_digest(p, root) for p in inputs)]
    return recorded == current and all(problem(p, r) is None for p, r in files)


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have exited (user + system): a stage's
    compute cost beside its wall time. Long-lived workers (the verifier pool) count once they exit."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def write_manifest(path: Path, stage: str, inputs: list[dict[str, Any]], output: dict[str, Any],
                   cfg_hash: str, config_keys: list[str], *, shard: int = 0, num_shards: int = 1,
                   outputs: list[dict[str, Any]] = (), engines: dict[str, str] | None = None,
                   rows: int | None = None, seconds: float | None = None, cpu: float | None = None,
                   summary: dict[str, Any] | None = None, headline: dict[str, Any] | None = None,
                   **extra: Any) -> None:
    """A stage's manifest, written last (atomically): what its shard was made from (inputs with size
    and sha256, the config hash and keys), what it wrote (output and the files beside it, with size and
    sha256), engine and code versions, rows, seconds (wall) and cpu_seconds (`cpu_seconds`) and the
    stage's counters; `extra` for what a stage
    adds (train-step: the policy's marker, timings, world size). The one manifest format: every
    stage, train-step and eval's summary write it here, and `read_manifest` reads it."""
    write_json_atomic({
        "stage": stage, "shard": shard, "num_shards": num_shards, "inputs": inputs, "output": output,
        "outputs": list(outputs), "config_hash": cfg_hash, "config_keys": sorted(config_keys),
        "engines": engines or {}, "code_version": __version__, "rows": rows,
        "seconds": None if seconds is None else round(seconds, 4),
        **({} if cpu is None else {"cpu_seconds": round(cpu, 4)}), "summary": summary or {},
        "headline": headline or {}, **extra,
    }, path)


def engine_versions(*names: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    out.update((name, v) for name in names if (v := _package_version(name)) is not None)
    return out


@functools.lru_cache(maxsize=None)
def _package_version(name: str) -> str | None:
    """An installed distribution's version (cached: reading package metadata takes milliseconds, and
    every shard's manifest asks)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def run_shards(
    stage: str,
    stage_dir: Path,
    jobs: list[ShardJob],
    cfg_hash: str,
    config_keys: list[str],
    root: Path,
    engines: dict[str, str] | None = None,
    force: bool = False,
    worker: tuple[int, int] = (0, 1),
    headline: dict[str, str] | None = None,
    quiet: bool = False,
) -> StageResult:
    """Compute every job of this worker that is not done; skip shards locked by another worker.
    `worker`: (index, count), a static slot, or CLAIM: every job, each taken when neither done nor
    locked (a claiming worker says nothing of the shards other workers hold: that is its normal case).

    `headline` ({"label", "num", "den"}) tells `scope status` which summary counters make the
    stage's headline metric. It says what it finds done by an earlier run (all of it: "done earlier,
    skipped"; some: what it resumes from) and shows a bar over the shards it computes.
    """
    from scope_cli.console import progress_bars

    with progress_bars(quiet) as bars:
        return _run_shards(stage, stage_dir, jobs, cfg_hash, config_keys, root, engines, force, worker,
                           headline, quiet, bars)


def _where(stage_dir: Path) -> str:
    """"round R" for a round's stage folder, else the folder."""
    name = stage_dir.parent.name
    return f"round {int(name[6:])}" if name.startswith("round-") and name[6:].isdigit() else str(stage_dir)


def _shards(n: int) -> str:
    return f"{n} shard" + ("" if n == 1 else "s")


def _run_shards(stage: str, stage_dir: Path, jobs: list[ShardJob], cfg_hash: str, config_keys: list[str],
                root: Path, engines: dict[str, str] | None, force: bool, worker: tuple[int, int],
                headline: dict[str, str] | None, quiet: bool, bars: Any) -> StageResult:
    from scope_cli.console import make_console

    console = make_console(stderr=True, quiet=quiet)
    stage_dir = Path(stage_dir)
    check_inside_run(stage_dir, root)
    stage_dir.mkdir(parents=True, exist_ok=True)
    leftovers = remove_stale_temps(stage_dir) + remove_stale_temps(stage_dir / "_manifest")
    # shards that no job writes any more (a changed config cut the stage into fewer shards)
    wanted = {j.index for j in jobs}
    for old in list_shard_files(stage_dir):
        if shard_index(old) not in wanted:
            manifest_path(stage_dir, shard_index(old)).unlink(missing_ok=True)
            old.unlink(missing_ok=True)
    result = StageResult()
    claiming = worker == CLAIM
    if claiming and force:
        raise ShardError(f"{stage}: --force with {CLAIM_ENV}=1: claiming workers would recompute each "
                         "other's shards; recompute with one worker (or static --shard-index/--num-shards)")
    index, count = (0, 1) if claiming else worker
    mine = [j for j in jobs if j.index % count == index]
    result.not_mine = [j.index for j in jobs if j.index % count != index]
    for job in mine:
        for p in job.inputs:
            if not Path(p).exists():
                raise ShardError(f"{p}: input of {stage} shard {job.index} does not exist")
    where = _where(stage_dir)
    earlier = set() if force else {j.index for j in mine
                                   if is_done(stage_dir, j.index, j.inputs, cfg_hash, root, j.outputs)}
    if earlier and len(earlier) < len(mine) and not claiming:
        console.print(f"{stage}: {where}: {len(earlier)} of {_shards(len(mine))} done earlier; computing "
                      f"{len(mine) - len(earlier)}")
    task = bars.add_task(f"{stage} {where}: shards", total=len(mine) - len(earlier), rate="")
    for job in mine:
        with shard_lock(stage_dir, job.index) as held:
            if not held:
                result.skipped_locked.append(job.index)
                if claiming:
                    continue
                console.print(f"{stage}: {where}: shard {job.index} is being computed by another process; "
                              "left to it")
                continue
            # temporaries of this shard are stale, whoever wrote them: only the lock holder writes it
            for name in (shard_name(job.index), f"shard-{job.index:05d}.json"):
                for path in [p for p in leftovers if p.name.startswith(f".{name}.tmp@")]:
                    remove_path(path)
            if not force and (job.index in earlier or is_done(stage_dir, job.index, job.inputs, cfg_hash,
                                                               root, job.outputs)):
                result.skipped_done.append(job.index)
                continue
            inputs = [file_digest(p, root) for p in job.inputs]
            start, start_cpu = time.perf_counter(), cpu_seconds()
            table, summary = job.compute()
            seconds, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
            out = shard_path(stage_dir, job.index)
            write_parquet_atomic(table, out)
            write_manifest(manifest_path(stage_dir, job.index), stage, inputs, file_digest(out, stage_dir),
                           cfg_hash, config_keys, shard=job.index, num_shards=len(jobs),
                           outputs=[file_digest(p, stage_dir) for p in job.outputs],
                           engines=engines or engine_versions("pyarrow"), rows=table.num_rows,
                           seconds=seconds, cpu=cpu, summary=summary, headline=headline or {})
            result.computed.append(job.index)
            console.print(f"{stage}: {where}: shard {job.index} ({table.num_rows} rows, {seconds:.1f}s)")
            bars.advance(task)
    bars.remove_task(task)
    if claiming:
        console.print(f"{stage}: {where}: this worker computed {_shards(len(result.computed))} of "
                      f"{len(jobs)}; the others were done earlier or by other workers")
    elif result.skipped_done and not result.computed:
        console.print(f"{stage}: {where}: {_shards(len(result.skipped_done))} done earlier, skipped")
    return result
