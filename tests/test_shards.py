import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scope_cli import schema
from scope_cli.core.shards import ShardJob, is_done, run_shards, shard_lock, worker_slot
from scope_cli.core.files import (
    ShardError,
    list_shard_files,
    manifest_path,
    read_shard,
    read_stage,
    read_stage_df,
    shard_path,
    write_parquet_atomic,
)
from scope_cli.cli.status import headline, stage_summary

TOY = str(Path(__file__).with_name("toy_stage.py"))


def toy(stage_dir, root, num=5, sleep=0.0, force=False):
    cmd = [sys.executable, TOY, str(stage_dir), str(root), str(num), str(sleep)] + (["--force"] if force else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kill_between_shards_then_rerun_computes_only_missing(tmp_path):
    killed_dir = tmp_path / "killed" / "toy"
    proc = subprocess.Popen([sys.executable, TOY, str(killed_dir), str(tmp_path), "6", "0.4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((killed_dir / "_manifest").glob("*.json"))
                                          if (killed_dir / "_manifest").exists() else []) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = sorted(int(p.stem[6:]) for p in (killed_dir / "_manifest").glob("*.json"))
    assert 2 <= len(done_before) < 6
    # no file a reader would take as done without its manifest, no temp files left visible as shards
    assert [p.name for p in list_shard_files(killed_dir)] == [shard_path(killed_dir, i).name
                                                           for i in range(len(list_shard_files(killed_dir)))]
    rerun = toy(killed_dir, tmp_path, num=6)
    assert rerun["computed"] == [i for i in range(6) if i not in done_before]
    assert rerun["skipped"] == done_before
    clean_dir = tmp_path / "clean" / "toy"
    toy(clean_dir, tmp_path, num=6)
    for i in range(6):
        assert shard_path(killed_dir, i).read_bytes() == shard_path(clean_dir, i).read_bytes()
    assert toy(killed_dir, tmp_path, num=6)["computed"] == []
    assert toy(killed_dir, tmp_path, num=6, force=True)["computed"] == list(range(6))


def test_done_requires_matching_inputs_and_config(tmp_path):
    src = tmp_path / "in.parquet"
    write_parquet_atomic(pa.table({"a": [1, 2]}), src)
    out = tmp_path / "stage"
    job = ShardJob(0, [src], lambda: (pa.table({"b": [3]}), {}))
    assert run_shards("s", out, [job], "h1", [], tmp_path, quiet=True).computed == [0]
    assert is_done(out, 0, [src], "h1", tmp_path)
    assert not is_done(out, 0, [src], "h2", tmp_path)  # changed config
    assert run_shards("s", out, [job], "h1", [], tmp_path, quiet=True).skipped_done == [0]
    write_parquet_atomic(pa.table({"a": [1, 2, 3]}), src)  # changed input
    assert not is_done(out, 0, [src], "h1", tmp_path)
    assert run_shards("s", out, [job], "h1", [], tmp_path, quiet=True).computed == [0]
    manifest = json.loads(manifest_path(out, 0).read_text())
    assert manifest["inputs"][0]["path"] == "in.parquet"
    assert manifest["rows"] == 1 and "seconds" in manifest
    # a missing manifest means not done, even with the output present
    manifest_path(out, 0).unlink()
    assert not is_done(out, 0, [src], "h1", tmp_path)


def test_missing_input_is_a_clear_error(tmp_path):
    job = ShardJob(0, [tmp_path / "nope.parquet"], lambda: (pa.table({"b": [3]}), {}))
    with pytest.raises(ShardError, match="nope.parquet: input of s shard 0 does not exist"):
        run_shards("s", tmp_path / "out", [job], "h", [], tmp_path, quiet=True)


def test_failed_write_leaves_no_partial_shard(tmp_path, monkeypatch):
    import scope_cli.core.files as files

    real_write = files.pq.write_table

    def full_disk(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 partial")  # a partial temp file, then the disk is full
        raise OSError(28, "No space left on device")

    out = tmp_path / "stage"
    job = ShardJob(0, [], lambda: (pa.table({"x": [1]}), {}))
    monkeypatch.setattr(files.pq, "write_table", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run_shards("s", out, [job], "h", [], tmp_path, quiet=True)
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == []
    assert not manifest_path(out, 0).exists()
    monkeypatch.setattr(files.pq, "write_table", real_write)
    assert run_shards("s", out, [job], "h", [], tmp_path, quiet=True).computed == [0]
    assert read_shard(shard_path(out, 0)).column("x").to_pylist() == [1]


def test_lock_skips_a_shard_held_elsewhere(tmp_path):
    out = tmp_path / "stage"
    jobs = [ShardJob(i, [], (lambda i=i: (pa.table({"x": [i]}), {}))) for i in range(3)]
    with shard_lock(out, 1) as held:
        assert held
        code = f"from scope_cli.core.shards import shard_lock\nwith shard_lock(r'{out}', 1) as h: print(h)"
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert other.stdout.strip() == "False"
        assert toy(out, tmp_path, num=3)["locked"] == [1]  # another worker skips the held shard
    # a lock left by a process that died is released by the kernel: the rerun computes shard 1
    code = (f"import os\nfrom scope_cli.core.shards import shard_lock\n"
            f"with shard_lock(r'{out}', 1) as h: os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert run_shards("toy", out, jobs, "cfg", [], tmp_path, quiet=True).computed == [1]


def test_worker_slots(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(var, raising=False)
    assert worker_slot() == (0, 1)
    assert worker_slot(2, 3) == (2, 3)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert worker_slot() == (1, 2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert worker_slot() == (1, 4)
    with pytest.raises(ShardError, match="out of range"):
        worker_slot(3, 2)


def test_two_workers_split_the_shards(tmp_path):
    out = tmp_path / "stage"
    jobs = [ShardJob(i, [], (lambda i=i: (pa.table({"x": [i]}), {}))) for i in range(5)]
    a = run_shards("toy", out, jobs, "cfg", [], tmp_path, worker=(0, 2), quiet=True)
    b = run_shards("toy", out, jobs, "cfg", [], tmp_path, worker=(1, 2), quiet=True)
    assert a.computed == [0, 2, 4] and b.computed == [1, 3]
    assert read_stage(out).column("x").to_pylist() == [0, 1, 2, 3, 4]
    assert read_stage_df(out)["x"].to_list() == [0, 1, 2, 3, 4]


def test_read_shard_errors_are_one_line(tmp_path):
    bad = tmp_path / "shard-00000.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(ShardError, match="not a readable Parquet file"):
        read_shard(bad)
    half = tmp_path / "half.parquet"
    write_parquet_atomic(pa.table({"prompt_id": ["a"], "problem": ["1+1"]}), half)
    with pytest.raises(ShardError) as err:
        read_shard(half, schema.VERIFIED)
    msg = str(err.value)
    assert "half.parquet: missing columns" in msg and "sample_idx" in msg and "reward" in msg
    assert "written by generate, prepare, verify" in msg
    typed = tmp_path / "typed.parquet"
    write_parquet_atomic(pa.table({"reward": ["high"]}), typed)
    with pytest.raises(ShardError, match="column reward has type string, expected float"):
        read_shard(typed, pa.schema([("reward", pa.float32())]))
    with pytest.raises(ShardError, match="no shards"):
        read_stage(tmp_path / "empty")


def test_status_summary_reads_manifests(tmp_path):
    out = tmp_path / "toy"
    toy(out, tmp_path, num=3)
    totals = stage_summary(out)
    assert totals["shards"] == 3 and totals["num_shards"] == 3 and totals["rows"] == 30
    assert totals["summary"]["big"] == 15
    assert headline(totals) == "big 0.500"
    os.remove(shard_path(out, 2))  # a manifest without its output does not count
    assert stage_summary(out)["shards"] == 2
    table = pq.read_table(shard_path(out, 0))
    assert "seconds" not in table.column_names  # timings only in manifests
