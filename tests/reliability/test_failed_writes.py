"""Failed writes and half-written checkpoints.

A write that fails (a full disk, no permission on the temporary file; simulated) leaves no partial
file under a final name, stops the command with a one-line error, and the rerun works. A policy
folder or train state that is incomplete or damaged is refused with a one-line error naming it; the
pipeline never trains or samples from it. (Killed saves are in test_kill_resume.py; the
shard-level failed write is also tests/test_shards.py::test_failed_write_leaves_no_partial_shard.)
"""

from __future__ import annotations

import errno
import json
import shutil

import pytest
from rel_helpers import copy_run, data_files, temporaries
from typer.testing import CliRunner

from scope_cli.cli.app import app
from scope_cli.core.runs import Run
from scope_cli.core.files import list_shard_files, manifest_path


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def one_line_error(res, *fragments: str) -> str:
    assert res.exit_code == 2, res.output
    text = res.output.strip()
    assert text.startswith("error:") and len(text.splitlines()) == 1, text
    assert "Traceback" not in text
    for fragment in fragments:
        assert fragment in text, text
    return text


def same_as_reference(reference, root, prefix: str) -> None:
    want = {k: v for k, v in data_files(reference["root"]).items() if k.startswith(prefix)}
    got = {k: v for k, v in data_files(root).items() if k.startswith(prefix)}
    assert want and got == want
    assert temporaries(root) == []


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def no_permission(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")


@pytest.mark.parametrize("where, error", [
    ("shard", full_disk),          # the Parquet body of a shard
    ("temp", no_permission),       # creating the temporary file itself
    ("manifest", full_disk),       # the manifest, after the shard landed
])
def test_failed_shard_write(reference, tmp_path, monkeypatch, where, error):
    import scope_cli.core.files as files

    root = copy_run(reference["root"], tmp_path / "run")
    verified = Run.open(root).stage_dir(1, "verified")
    shutil.rmtree(verified)
    if where == "shard":
        monkeypatch.setattr(files.pq, "write_table", error)
    elif where == "temp":
        monkeypatch.setattr(files.tempfile, "mkstemp", error)
    else:  # the manifest's temporary file
        from pathlib import Path

        real = Path.write_text
        monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: error() if "_manifest" in str(self)
                            else real(self, *a, **k))
    res = cli("verify", "--round", "1", "--run", str(root))
    text = one_line_error(res, "verified/", "cannot write")
    assert "shard-00000" in text
    # nothing a reader would take as done: no manifest, and no shard left without one
    assert not manifest_path(verified, 0).exists()
    assert [p.name for p in list_shard_files(verified)] in ([], ["shard-00000.parquet"])
    assert not [p for p in verified.rglob(".*") if p.is_file()]
    monkeypatch.undo()
    assert cli("verify", "--round", "1", "--run", str(root)).exit_code == 0
    same_as_reference(reference, root, "round-001/verified/")


@pytest.mark.parametrize("what", ["policy", "state"])
def test_failed_checkpoint_write(reference, tmp_path, monkeypatch, what):
    """The disk fills while train-step saves the policy (or the optimizer state): no policy-001 and no
    temporary folder are left, the error is one line, the rerun writes the same files."""
    import safetensors.torch

    root = copy_run(reference["root"], tmp_path / "run")
    run = Run.open(root)
    shutil.rmtree(run.policy_dir(1))
    shutil.rmtree(run.train_dir(1))
    if what == "policy":
        from transformers import PreTrainedModel

        monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    res = cli("train-step", "--round", "1", "--run", str(root), "--quiet")
    one_line_error(res, "No space left on device")
    assert not run.policy_dir(1).exists()
    assert temporaries(root) == []
    monkeypatch.undo()
    assert cli("train-step", "--round", "1", "--run", str(root), "--quiet").exit_code == 0
    same_as_reference(reference, root, "policy-001/")
    same_as_reference(reference, root, "round-001/train/")


def test_incomplete_policy_is_never_used(reference, tmp_path):
    """policy-001 half there (weights cut short, no completion marker, as a copy interrupted by hand):
    the next round refuses it and names the last complete policy; `scope round` redoes round 1."""
    root = copy_run(reference["root"], tmp_path / "run")
    run = Run.open(root)
    weights = run.policy_dir(1) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (run.policy_dir(1) / "scope-policy.json").unlink()
    res = cli("generate", "--round", "2", "--run", str(root))
    one_line_error(res, "policy-001: policy missing or incomplete",
                   f"the last complete policy is policy-000; run `scope round 1 --run {root}` first")
    assert not run.stage_dir(2, "rollouts").exists()
    assert cli("round", "1", "--run", str(root), "--quiet").exit_code == 0
    same_as_reference(reference, root, "policy-001/")


def test_damaged_complete_policy_is_refused(reference, tmp_path):
    """A policy marked complete whose weights were damaged afterwards (disk fault, a bad copy): the
    stage that reads it stops with one line naming the file (its size or sha256 differs from what the
    policy's marker records) and the command that writes it again; nothing is sampled from it. A
    policy from elsewhere, whose marker records no files, is refused when it fails to load."""
    root = copy_run(reference["root"], tmp_path / "run")
    weights = Run.open(root).policy_dir(1) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    res = cli("generate", "--round", "2", "--run", str(root))
    one_line_error(res, "policy-001/model.safetensors: 1000 bytes where its manifest records",
                   f"run `scope train-step --round 1 --run {root}`")
    assert list_shard_files(Run.open(root).stage_dir(2, "rollouts")) == []
    marker = Run.open(root).policy_dir(1) / "scope-policy.json"
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "files"}))
    res = cli("generate", "--round", "2", "--run", str(root))
    one_line_error(res, "policy-001: cannot load the model", "SafetensorError")


def test_damaged_train_state_is_refused(reference, tmp_path):
    """Round 1's optimizer state damaged: round 2's train-step refuses it (one line, what to rerun) and
    writes no policy; after `train-step --round 1` rewrites it (the same bytes), round 2 trains."""
    root = copy_run(reference["root"], tmp_path / "run")
    run = Run.open(root)
    for stage in ("generate", "verify", "prm-score", "locate-error", "rectify"):
        assert cli(stage, "--round", "2", "--run", str(root), "--quiet").exit_code == 0
    state = run.train_dir(1) / "state" / "optimizer.safetensors"
    good = state.read_bytes()
    state.write_bytes(good[: len(good) // 2])
    res = cli("train-step", "--round", "2", "--run", str(root), "--quiet")
    one_line_error(res, "state/optimizer.safetensors: ", "bytes where its manifest records",
                   f"run `scope train-step --round 1 --run {root}`")
    assert not run.policy_dir(2).exists()
    assert cli("train-step", "--round", "1", "--run", str(root), "--quiet").exit_code == 0
    assert state.read_bytes() == good
    assert cli("train-step", "--round", "2", "--run", str(root), "--quiet").exit_code == 0
    assert (run.policy_dir(2) / "scope-policy.json").exists()
