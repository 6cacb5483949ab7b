"""Parquet shard I/O: atomic writes, per-shard manifests, skip/resume, locks, schema checks.

A stage folder holds ``shard-NNNNN.parquet`` plus ``_manifest/shard-NNNNN.json``. A shard is done when
its output (and any file its job writes beside it) matches the size and sha256 its manifest records, and
the manifest's inputs (size + sha256) and config hash match (digests: scope_cli/core/manifests.py). Outputs
are written to a temporary name in the same folder and renamed, so a crash never leaves a file a reader
would take as done; the manifest is written last. Timings live only in manifests, never in Parquet.
Files and folders get the modes the umask gives (0666 / 0777 minus the umask), temporaries included.

Concurrent workers take an ``flock`` on ``_locks/shard-NNNNN.lock`` (released by the kernel when the
process dies) and skip shards another worker holds.

Temporary names carry their writer (scope_cli/tempfiles.py), so what a killed process left behind is
removed by the next run: a shard's temporaries by whoever holds its lock, any other temporary once
its writer is known dead (same host, no such process). A stage that reads
another stage's folder takes only a finished one (`complete_shards`): every shard of the writer's
``num_shards`` present, with its manifest.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from scope_cli import __version__
from scope_cli.errors import ScopeError, env_int, write_failure
from scope_cli.core.manifests import damaged, problem, read_manifest, remember
from scope_cli.core.manifests import record as file_digest
from scope_cli.schema import OPTIONAL_COLUMNS, STAGE_OUTPUTS
from scope_cli.tempfiles import honour_umask, remove_path, remove_stale_temps, temp_prefix


class ShardError(ScopeError):
    """A bad or missing shard: the message is one line naming the file and what was expected."""


# ---- names -----------------------------------------------------------------------------------------
def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def shard_path(stage_dir: Path, index: int) -> Path:
    return Path(stage_dir) / shard_name(index)


def manifest_path(stage_dir: Path, index: int) -> Path:
    return Path(stage_dir) / "_manifest" / f"shard-{index:05d}.json"


def list_shard_files(stage_dir: Path) -> list[Path]:
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    return sorted(p for p in stage_dir.glob("shard-*.parquet") if p.name[6:11].isdigit())


# ---- folders ---------------------------------------------------------------------------------------
def check_inside_run(folder: Path, root: Path) -> None:
    """Refuse a folder of the run that is reached through a symbolic link: writing there (and removing
    stray shards there) would act on files outside the run, or on another stage's."""
    folder, root = Path(folder), Path(root)
    if not folder.is_relative_to(root):
        return  # a path given explicitly (eval --out DIR)
    want = root.resolve() / folder.relative_to(root)
    if folder.resolve() != want:
        raise ShardError(f"{folder}: leads to {folder.resolve()} through a symbolic link; a run's folders "
                         "must be real folders inside it (remove the link and rerun)")


# ---- atomic writes ---------------------------------------------------------------------------------
def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        honour_umask(tmp_path)
        write(tmp_path)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        remember(tmp_path)  # hashed once, while in the page cache; the rename keeps its inode
        os.replace(tmp_path, path)
    except BaseException as exc:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        failure = write_failure(exc, path)
        if failure is exc:
            raise
        raise failure from exc


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write deterministically (no timestamps in the file) to a temp name, then rename."""
    _atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd", write_statistics=True))


def write_json_atomic(obj: Any, path: Path) -> None:
    text = json.dumps(obj, indent=1, sort_keys=True) + "\n"
    _atomic(path, lambda tmp: tmp.write_text(text))


def write_text_atomic(text: str, path: Path) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text))


# ---- reading -----------------------------------------------------------------------------------------
def read_shard(path: Path, required: pa.Schema | None = None) -> pa.Table:
    """Read one shard; with `required`, check that every column exists with a compatible type."""
    path = Path(path)
    if not path.exists():
        raise ShardError(f"{path}: shard does not exist")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ShardError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    if required is not None:
        check_columns(table, path, required)
    return table


def _writer_of(column: str) -> str:
    """The earliest stage whose output has `column` (STAGE_OUTPUTS is in pipeline order)."""
    for schema, stage in STAGE_OUTPUTS.values():
        if column in schema.names:
            return stage
    return "an earlier stage"


def check_columns(table: pa.Table, path: Path, required: pa.Schema) -> None:
    """Every column of `required` present with a castable type; a missing OPTIONAL_COLUMNS column (a
    shard written before it existed) is allowed."""
    missing = [f.name for f in required
               if f.name not in table.column_names and f.name not in OPTIONAL_COLUMNS]
    if missing:
        writers = sorted({_writer_of(c) for c in missing})
        raise ShardError(
            f"{path}: missing columns {', '.join(missing)} (written by {', '.join(writers)})"
        )
    for fld in required:
        if fld.name not in table.column_names:
            continue
        got = table.schema.field(fld.name).type
        if got != fld.type and not _castable(got, fld.type):
            raise ShardError(f"{path}: column {fld.name} has type {got}, expected {fld.type}")


def _castable(got: pa.DataType, want: pa.DataType) -> bool:
    if pa.types.is_null(got):
        return True
    numeric = (pa.types.is_integer, pa.types.is_floating)
    if any(t(got) for t in numeric) and any(t(want) for t in numeric):
        return True
    if pa.types.is_large_string(got) and pa.types.is_string(want):
        return True
    if (pa.types.is_list(got) or pa.types.is_large_list(got)) and pa.types.is_list(want):
        return _castable(got.value_type, want.value_type)
    return False


def read_stage(stage_dir: Path, required: pa.Schema | None = None) -> pa.Table:
    """All shards of a stage folder as one Arrow table (in shard order)."""
    files = list_shard_files(stage_dir)
    if not files:
        raise ShardError(f"{stage_dir}: no shards (has the stage that writes it run?)")
    tables = [read_shard(p, required) for p in files]
    return pa.concat_tables(tables, promote_options="default")


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
    for index in sorted({int(p.name[6:11]) for p in files} | {
            int(p.name[6:11]) for p in man_dir.glob("shard-[0-9][0-9][0-9][0-9][0-9].json")}):
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
    extra = [p.name for p in files if int(p.name[6:11]) >= num]
    if missing:
        shown = ", ".join(shard_name(i) for i in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ShardError(f"{stage_dir}: {num - len(missing)} of {num} shards finished (missing or "
                         f"changed since its manifest: {shown}); run `{writer}` to finish it")
    if extra:
        raise ShardError(f"{stage_dir}: {', '.join(extra[:3])} beyond the stage's {num} shards "
                         f"(left by an earlier config?); rerun `{writer}`")
    return [shard_path(stage_dir, i) for i in range(num)]


def read_stage_df(stage_dir: Path, lazy: bool = False):  # -> polars DataFrame | LazyFrame
    """A whole stage as one polars DataFrame (or LazyFrame) — what users inspect."""
    import polars as pl

    files = list_shard_files(stage_dir)
    if not files:
        raise ShardError(f"{stage_dir}: no shards (has the stage that writes it run?)")
    frame = pl.scan_parquet([str(p) for p in files])
    return frame if lazy else frame.collect()


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


def worker_slot(shard_index: int | None = None, num_shards: int | None = None) -> tuple[int, int]:
    """(index, count) of this worker: explicit flags, else RANK/WORLD_SIZE, else SLURM arrays."""
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
        if int(old.name[6:11]) not in wanted:
            manifest_path(stage_dir, int(old.name[6:11])).unlink(missing_ok=True)
            old.unlink(missing_ok=True)
    result = StageResult()
    index, count = worker
    mine = [j for j in jobs if j.index % count == index]
    result.not_mine = [j.index for j in jobs if j.index % count != index]
    for job in mine:
        for p in job.inputs:
            if not Path(p).exists():
                raise ShardError(f"{p}: input of {stage} shard {job.index} does not exist")
    where = _where(stage_dir)
    earlier = set() if force else {j.index for j in mine
                                   if is_done(stage_dir, j.index, j.inputs, cfg_hash, root, j.outputs)}
    if earlier and len(earlier) < len(mine):
        console.print(f"{stage}: {where}: {len(earlier)} of {_shards(len(mine))} done earlier; computing "
                      f"{len(mine) - len(earlier)}")
    task = bars.add_task(f"{stage} {where}: shards", total=len(mine) - len(earlier), rate="")
    for job in mine:
        with shard_lock(stage_dir, job.index) as held:
            if not held:
                result.skipped_locked.append(job.index)
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
            start = time.perf_counter()
            table, summary = job.compute()
            seconds = time.perf_counter() - start
            out = shard_path(stage_dir, job.index)
            write_parquet_atomic(table, out)
            manifest = {
                "stage": stage,
                "shard": job.index,
                "num_shards": len(jobs),
                "inputs": inputs,
                "output": file_digest(out, stage_dir),
                "outputs": [file_digest(p, stage_dir) for p in job.outputs],
                "config_hash": cfg_hash,
                "config_keys": sorted(config_keys),
                "engines": engines or engine_versions("pyarrow"),
                "code_version": __version__,
                "rows": table.num_rows,
                "seconds": round(seconds, 4),
                "summary": summary,
                "headline": headline or {},
            }
            write_json_atomic(manifest, manifest_path(stage_dir, job.index))
            result.computed.append(job.index)
            console.print(f"{stage}: {where}: shard {job.index} ({table.num_rows} rows, {seconds:.1f}s)")
            bars.advance(task)
    bars.remove_task(task)
    if result.skipped_done and not result.computed:
        console.print(f"{stage}: {where}: {_shards(len(result.skipped_done))} done earlier, skipped")
    return result
