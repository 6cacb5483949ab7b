"""Concurrency: two processes on one run, a --force worker beside a running one, stale lock files.

Locks are flocks on `_locks/shard-NNNNN.lock` (train-step: `train/_locks/`), released by the kernel when
a process dies: a lock file itself never blocks anyone (also tests/test_shards.py::
test_lock_skips_a_shard_held_elsewhere, and every kill in test_kill_resume.py leaves one behind).
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
from rel_helpers import TALLY, compare_runs, copy_run, run_plan
from typer.testing import CliRunner

from scope_cli.cli.app import app
from scope_cli.core.runs import Run
from scope_cli.core.shards import shard_lock
from scope_cli.core.files import list_shard_files, manifest_path, shard_path

SHARD_LINE = re.compile(r"^(generate|verify|prm-score|locate-error|rectify|eval): round \d+: shard (\d+) \(", re.M)


@pytest.mark.timeout(900)
def test_scope_round_started_twice_computes_each_shard_once(reference, prepared, tmp_path):
    """Two `scope round 1` on the same run at the same moment (a job submitted twice): every shard is
    computed by exactly one of them, the one that finds work held by the other stops with a one-line
    error saying so, a rerun finishes, and the files equal the uninterrupted run's."""
    root = copy_run(prepared, tmp_path / "run")
    args = ["round", str(reference["target"]), "--run", str(root)]
    logs = [tmp_path / "a.log", tmp_path / "b.log", tmp_path / "c.log"]
    results = run_plan(root, [
        {"parallel": [{"args": args, "output": str(logs[0])}, {"args": args, "output": str(logs[1])}]},
        {"args": args, "output": str(logs[2])},
    ], tmp_path / "plan")
    first, rerun = results
    codes = [r["code"] for r in first["parallel"]]
    assert all(c in (0, 2) for c in codes), codes
    texts = [log.read_text() for log in logs]
    for code, text in zip(codes, texts):
        if code == 2:  # it met a shard or a train-step held by the other process, and said so
            assert "another process" in text, text[-2000:]
            assert "Traceback" not in text
    assert rerun["code"] == 0
    # every shard computed exactly once over the three processes (eval: once per evaluated round,
    # rounds 0 and the target)
    computed = Counter((stage, int(i)) for text in texts for stage, i in SHARD_LINE.findall(text))
    want = Counter({(stage, i): 2 if stage == "eval" else 1 for stage in
                    ("generate", "verify", "prm-score", "locate-error", "rectify", "eval")
                    for i in range(2 if stage == "eval" else 4)})
    assert computed == want, f"computed more or less than once: {computed - want} {want - computed}"
    trained = sum(len(re.findall(r"train-step: round 1: \d+ updates", text)) for text in texts)
    assert trained == 1
    diff = compare_runs(reference["root"], root)
    TALLY["runs_compared"] += 1
    TALLY["files_compared"] += diff["compared"]
    TALLY["differences"] += len(diff["differ"]) + len(diff["missing"]) + len(diff["extra"])
    assert diff["differ"] == diff["missing"] == diff["extra"] == diff["temporaries"] == [], diff


def test_force_beside_a_running_worker_leaves_its_shard_alone(reference, tmp_path):
    """A worker started with --force while another holds shard 1: it recomputes what it may (the same
    bytes), leaves the held shard to its owner, says so, and no finished file is lost."""
    root = copy_run(reference["root"], tmp_path / "run")
    rollouts = Run.open(root).stage_dir(1, "rollouts")
    before = {p.name: p.read_bytes() for p in list_shard_files(rollouts)}
    held_manifest = manifest_path(rollouts, 1).read_bytes()
    with shard_lock(rollouts, 1) as held:  # the other worker, busy with shard 1
        assert held
        res = CliRunner().invoke(app, ["generate", "--round", "1", "--run", str(root), "--force"])
    assert res.exit_code == 0, res.output
    assert "generate: round 1: shard 1 is being computed by another process; left to it" in res.output
    assert re.findall(r"generate: round 1: shard (\d+) \(", res.output) == ["0", "2", "3"]
    assert manifest_path(rollouts, 1).read_bytes() == held_manifest  # untouched
    assert {p.name: p.read_bytes() for p in list_shard_files(rollouts)} == before
    assert not [p for p in rollouts.iterdir() if p.name.startswith(".")]


def test_second_train_step_is_refused_while_one_runs(reference, tmp_path):
    root = copy_run(reference["root"], tmp_path / "run")
    run = Run.open(root)
    policy = (run.policy_dir(1) / "model.safetensors").read_bytes()
    with shard_lock(run.train_dir(1), 0) as held:
        assert held
        res = CliRunner().invoke(app, ["train-step", "--round", "1", "--run", str(root), "--force"])
    assert res.exit_code == 2
    assert "round 1's train-step is running in another process" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert (run.policy_dir(1) / "model.safetensors").read_bytes() == policy


def test_a_lock_file_left_behind_never_blocks(reference, tmp_path):
    """Lock files of finished and of killed processes stay on disk; only a live flock holds."""
    root = copy_run(reference["root"], tmp_path / "run")
    verified = Run.open(root).stage_dir(1, "verified")
    assert sorted(p.name for p in (verified / "_locks").iterdir())  # left by the reference run
    shard_path(verified, 2).unlink()
    res = CliRunner().invoke(app, ["verify", "--round", "1", "--run", str(root)])
    assert res.exit_code == 0, res.output
    assert re.findall(r"verify: round 1: shard (\d+) \(", res.output) == ["2"]
    assert shard_path(verified, 2).read_bytes() == shard_path(
        Run.open(reference["root"]).stage_dir(1, "verified"), 2).read_bytes()
