"""How an isolated round launches its stages: one subprocess each, train-step under torchrun when
round.train_procs > 1 (the GPU presets' one-node setting)."""

import sys

import pytest

from scope_cli.cli import rounds
from scope_cli.errors import ScopeError
from scope_cli.core.runs import Run


def launched(monkeypatch, run: Run, r: int, target: int, fail: str | None = None) -> list[list[str]]:
    commands = []

    class Done:
        def __init__(self, cmd):
            self.returncode = 1 if fail and fail in cmd else 0

    def fake_run(cmd, env=None):
        commands.append(cmd)
        return Done(cmd)

    monkeypatch.setattr(rounds.subprocess, "run", fake_run)
    rounds._round_in_subprocesses(run, r, target, quiet=True)
    return commands


def test_train_step_runs_under_torchrun_with_train_procs(tmp_path, monkeypatch):
    run = Run.open(tmp_path / "run", None, ["round.train_procs=8", "eval.every=1"], create=True)
    commands = launched(monkeypatch, run, 2, 2)
    stages = [c[c.index("--") + 1] if "--" in c else c[3] for c in commands]
    assert stages == ["generate", "verify", "prm-score", "locate-error", "rectify", "train-step", "eval"]
    train = commands[5]
    assert train[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                         "--nproc-per-node=8", "-m"]
    assert train[6:] == ["scope_cli.cli.app", "--", "train-step", "--round", "2", "--run", str(run.root),
                         "--quiet"]
    assert all(c[:3] == [sys.executable, "-m", "scope_cli.cli.app"] for i, c in enumerate(commands) if i != 5)


def test_one_process_by_default_and_a_failed_stage_stops_the_round(tmp_path, monkeypatch):
    run = Run.open(tmp_path / "run", None, [], create=True)
    commands = launched(monkeypatch, run, 1, 3)
    assert [c[3] for c in commands] == list(rounds.STAGE_COMMANDS)  # no eval: round 1 of 3, every 5
    with pytest.raises(ScopeError, match="round 1: `scope_cli.cli.app rectify --round 1"):
        launched(monkeypatch, run, 1, 3, fail="rectify")


def test_train_step_goes_to_the_ray_nodes_with_train_nodes(tmp_path, monkeypatch):
    """round.launcher = ray with round.train_nodes = 2: the isolated round hands train-step to
    ray_workers.train_on_nodes (tests/test_ray_train.py runs it); train_nodes = 1 keeps it here."""
    from scope_cli.cli import ray_workers

    handed = []
    monkeypatch.setattr(ray_workers, "train_on_nodes", lambda run, r, quiet: handed.append(r))
    monkeypatch.setattr("scope_cli.cli.workers.run_workers", lambda *a, **k: False)
    run = Run.open(tmp_path / "run", None, ["round.launcher=ray", "round.train_nodes=2"], create=True)
    commands = launched(monkeypatch, run, 1, 3)
    assert [c[3] for c in commands] == [s for s in rounds.STAGE_COMMANDS if s != "train-step"]
    assert handed == [1]
    run = Run.open(tmp_path / "run", None, ["round.launcher=ray", "round.train_nodes=1"])
    handed.clear()
    assert [c[3] for c in launched(monkeypatch, run, 1, 3)] == list(rounds.STAGE_COMMANDS) and handed == []
