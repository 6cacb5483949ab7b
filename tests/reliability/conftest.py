"""Fixtures of the reliability suite (helpers in rel_helpers.py): the uninterrupted reference run that
the fault tests compare with, and the figures printed at the end of a session."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from rel_helpers import LONG, TALLY, prepare_args, run_plan


def build_reference(work: Path, target: int) -> dict:
    """An uninterrupted run, prepared and brought to round `target`, built through the fault runner with
    every file event logged: the kill tests draw their moments from these."""
    root = work / "run"
    results = run_plan(root, [
        {"args": prepare_args(root), "log_events": True},
        {"args": ["round", str(target), "--run", str(root), "--quiet"], "log_events": True},
    ], work / "plan")
    assert [r["status"] for r in results] == ["exit", "exit"], results
    assert [r["code"] for r in results] == [0, 0], results
    return {"root": root, "target": target, "prepare_events": results[0]["events"],
            "round_events": results[1]["events"]}


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The reference run at round 1: what most tests copy and compare with."""
    return build_reference(tmp_path_factory.mktemp("reference"), 1)


@pytest.fixture(scope="session")
def kill_reference(reference, tmp_path_factory):
    """The reference of the kill chains: round 1, or round 2 in the long version."""
    return build_reference(tmp_path_factory.mktemp("reference2"), 2) if LONG else reference


@pytest.fixture(scope="session")
def prepared(reference, tmp_path_factory):
    """A copy of the reference run as `scope prepare` left it (no round yet)."""
    root = tmp_path_factory.mktemp("prepared") / "run"
    root.mkdir()
    for name in ("config.toml", "prompts", "eval-sets", "policy-000"):
        src = reference["root"] / name
        (shutil.copytree(src, root / name) if src.is_dir() else shutil.copy2(src, root / name))
    return root


def pytest_terminal_summary(terminalreporter):
    if not TALLY["runs_compared"]:
        return
    terminalreporter.write_line(
        "reliability: {kills} kills, {resumes} resumes, {runs_compared} runs compared "
        "({files_compared} Parquet/safetensors files), {differences} differences, "
        "{recomputed_done_shards} finished shards recomputed, {leftover_temporaries} temporaries left"
        .format(**TALLY))
    report = os.environ.get("SCOPE_RELIABILITY_REPORT")
    if report:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(json.dumps({"long": LONG, **TALLY}, indent=1) + "\n")
