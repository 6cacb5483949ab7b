"""Content digests and manifests (scope_cli/core/manifests.py), and the file modes of atomic writes."""

import hashlib
import json
import os
import time

import pyarrow as pa
import pytest

from scope_cli.core import manifests
from scope_cli.core.manifests import (
    folder_digest,
    policy_digests,
    problem,
    read_manifest,
    record,
    remember,
    repair_command,
    sha256_of,
)
from scope_cli.core.files import ShardError, check_inside_run, write_json_atomic, write_parquet_atomic

GOOD = {"output": {"path": "shard-00000.parquet", "size": 3, "sha256": "ab"}, "config_hash": "h",
        "num_shards": 2, "inputs": [], "outputs": []}


@pytest.mark.parametrize("text, why", [
    ("[]", "a JSON array, not an object"),
    ("null", "a JSON null, not an object"),
    ('"s"', "a JSON string, not an object"),
    ("1", "a JSON number, not an object"),
    ('{"output": null}', "no 'output' {path, size, sha256}"),
    ('{"output": {"path": "x", "size": 3}, "config_hash": "h"}', "no 'output'"),  # no sha256: older
    (json.dumps({**GOOD, "config_hash": None}), "no 'config_hash'"),
    (json.dumps({**GOOD, "num_shards": 0}), "'num_shards' is 0"),
    (json.dumps({**GOOD, "inputs": [1]}), "'inputs' is not a list of {path, size, sha256}"),
    (json.dumps({**GOOD, "outputs": {}}), "'outputs' is not a list"),
    (json.dumps({**GOOD, "policy_marker": []}), "'policy_marker' is not"),
    ("{", "not valid JSON"),
    ("[" * 100_000, "not valid JSON"),  # nested too deep for the parser
    (None, "missing"),
])
def test_read_manifest_names_what_is_wrong(tmp_path, text, why):
    path = tmp_path / "m.json"
    if text is not None:
        path.write_text(text)
    data, got = read_manifest(path)
    assert data is None and got.startswith(why), got


def test_read_manifest_accepts_a_whole_one(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps(GOOD))
    assert read_manifest(tmp_path / "m.json") == (GOOD, None)


def test_digest_is_sha256_and_a_change_in_place_is_seen(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 1000)
    old = time.time() - 10
    os.utime(path, (old, old))  # long before the hash: cacheable
    assert sha256_of(path) == hashlib.sha256(b"a" * 1000).hexdigest()
    key = manifests._key(os.stat(path), None)
    assert manifests._CACHE[key] == hashlib.sha256(b"a" * 1000).hexdigest()
    with open(path, "r+b") as fh:  # one byte changed, same size: a new mtime, so hashed again
        fh.seek(500)
        fh.write(b"b")
    assert sha256_of(path) == hashlib.sha256(b"a" * 500 + b"b" + b"a" * 499).hexdigest()


def test_a_file_hashed_right_after_a_change_is_not_cached_unless_written_here(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 10)
    sha256_of(path)  # mtime within RACY_NS of the hash: a change in the same tick could hide
    assert manifests._key(os.stat(path), None) not in manifests._CACHE
    remember(path)  # a file this process wrote: cached however recent
    assert manifests._CACHE[manifests._key(os.stat(path), None)] == hashlib.sha256(b"x" * 10).hexdigest()


def test_problem_names_missing_size_and_content(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    rec = record(path, tmp_path)
    assert rec == {"path": "f.bin", "size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}
    assert problem(path, rec) is None
    assert problem(path, {**rec, "size": 4}) == "3 bytes where its manifest records 4"
    assert problem(path, {**rec, "sha256": "0" * 64}) == "content differs from its manifest (sha256)"
    assert problem(tmp_path / "gone", rec) == "missing"


def test_policy_digests_hash_is_the_folder_digest(tmp_path):
    for name, data in (("config.json", b"{}"), ("model.safetensors", b"w" * 100), ("sub/t.txt", b"t")):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    info = policy_digests(tmp_path)
    assert info["hash"] == folder_digest(tmp_path)
    assert [r["path"] for r in info["files"]] == ["config.json", "model.safetensors", "sub/t.txt"]


@pytest.mark.parametrize("rel, command", [
    ("prompts/shard-00000.parquet", "scope prepare"),
    ("eval-sets/heldout.parquet", "scope prepare"),
    ("policy-000/model.safetensors", "scope prepare"),
    ("policy-003/model.safetensors", "scope train-step --round 3"),
    ("round-002/rollouts/shard-00001.parquet", "scope generate --round 2"),
    ("round-001/scored/_manifest/shard-00000.json", "scope prm-score --round 1"),
    ("round-001/train/state/optimizer.safetensors", "scope train-step --round 1"),
    ("round-000/eval/heldout-greedy.parquet", "scope eval --round 0"),
])
def test_repair_command(rel, command):
    assert repair_command(rel) == command


def test_a_stage_folder_behind_a_symlink_is_refused(tmp_path):
    root = tmp_path / "run"
    (root / "round-001").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "round-001" / "verified").symlink_to(outside)
    with pytest.raises(ShardError, match="through a symbolic link"):
        check_inside_run(root / "round-001" / "verified", root)
    check_inside_run(root / "round-001" / "rollouts", root)  # a real (or not yet made) folder
    (tmp_path / "link").symlink_to(root)  # the run itself reached through a link is fine
    check_inside_run(tmp_path / "link" / "round-001" / "rollouts", tmp_path / "link")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_take_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_parquet_atomic(pa.table({"a": [1]}), tmp_path / "t.parquet")
        write_json_atomic({"a": 1}, tmp_path / "m.json")
    finally:
        os.umask(old)
    for name in ("t.parquet", "m.json"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask


def test_a_large_file_is_hashed_in_blocks(tmp_path, monkeypatch):
    """Files over BIG: sha256 of the blocks' sha256 digests (by hand here, with 300-byte blocks)."""
    monkeypatch.setattr(manifests, "BIG", 1000)
    monkeypatch.setattr(manifests, "BLOCK", 300)
    data = bytes(range(256)) * 6  # 1536 bytes: blocks of 300, 300, 300, 300, 300, 36
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    want = hashlib.sha256(b"".join(hashlib.sha256(data[i:i + 300]).digest()
                                   for i in range(0, len(data), 300))).hexdigest()
    rec = record(path)
    assert rec["block"] == 300 and rec["sha256"] == want
    small = tmp_path / "small.bin"
    small.write_bytes(data[:1000])
    assert "block" not in record(small) and record(small)["sha256"] == hashlib.sha256(data[:1000]).hexdigest()
    with open(path, "r+b") as fh:  # a byte of the last block
        fh.seek(1530)
        fh.write(b"\xff")
    assert problem(path, rec) == "content differs from its manifest (sha256)"
