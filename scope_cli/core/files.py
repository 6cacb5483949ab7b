"""Files of a stage folder: shard and manifest names, atomic writes (a temporary name renamed into place,
so a reader never sees half a file; nothing partial is left when a write fails) and reading shards
against the column contract (scope_cli/schema.py), with one-line errors naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from scope_cli.core.manifests import remember
from scope_cli.errors import ScopeError, write_failure
from scope_cli.schema import OPTIONAL_COLUMNS, STAGE_OUTPUTS
from scope_cli.tempfiles import honour_umask, temp_prefix


class ShardError(ScopeError):
    """A bad or missing shard: the message is one line naming the file and what was expected."""


# ---- names -----------------------------------------------------------------------------------------
def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"



def shard_path(stage_dir: Path, index: int) -> Path:
    return Path(stage_dir) / shard_name(index)



def manifest_path(stage_dir: Path, index: int) -> Path:
    return Path(stage_dir) / "_manifest" / f"shard-{index:05d}.json"



def shard_index(path: Path) -> int:
    """N of a shard-NNNNN.parquet (or its manifest shard-NNNNN.json)."""
    return int(Path(path).name[6:11])



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
    """`write` fills a temporary file beside `path`, which gets the umask's mode, is fsynced and
    renamed into place."""
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


def write_bytes_atomic(data: bytes, path: Path) -> None:
    _atomic(path, lambda tmp: tmp.write_bytes(data))


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



def read_stage_df(stage_dir: Path, lazy: bool = False):  # -> polars DataFrame | LazyFrame
    """A whole stage as one polars DataFrame (or LazyFrame) — what users inspect."""
    import polars as pl

    files = list_shard_files(stage_dir)
    if not files:
        raise ShardError(f"{stage_dir}: no shards (has the stage that writes it run?)")
    frame = pl.scan_parquet([str(p) for p in files])
    return frame if lazy else frame.collect()
