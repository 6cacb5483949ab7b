"""`scope round`: in one process, as one subprocess per stage, and stage by stage from the CLI, the
files are identical; a finished round is not rerun; eval runs on the rounds it should."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scope_cli.cli.rounds import bring_to_round, round_done
from scope_cli.core.runs import Run
from stages.prepare import prepare

TINY = ["prepare.train_size=64", "prepare.eval_size=12", "prepare.ood_size=6", "generate.prompts_per_round=4",
        "generate.prompts_per_shard=2", "generate.n=4", "generate.max_tokens=40", "eval.n_samples=4",
        "eval.ks=[1, 4]", "eval.sampled_limit=3", "eval.max_tokens=40", "verify.workers=1", "eval.every=2",
        "train.minibatches=2", "run.keep_state=0"]
SCOPE = [sys.executable, "-m", "scope_cli.cli.app"]


def new_run(root: Path, *extra: str) -> Run:
    run = Run.open(root, None, [*TINY, *extra], create=True)
    prepare(run, quiet=True)
    return run


def outputs(root: Path) -> dict[str, bytes]:
    """Every Parquet and safetensors file of a run (manifests hold timings, so they are left out)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.suffix in (".parquet", ".safetensors")}


def cli(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*SCOPE, *args, "--quiet"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    run = new_run(tmp_path_factory.mktemp("rounds") / "in-process")
    assert bring_to_round(run, 2, quiet=True, isolate=False) == [0, 1, 2]
    return run


def test_round_runs_every_stage_and_the_due_evals(in_process):
    run = in_process
    for r in (1, 2):
        for folder in ("rollouts", "verified", "scored", "located", "rectified"):
            assert list(run.stage_dir(r, folder).glob("shard-*.parquet")), (r, folder)
        assert (run.policy_dir(r) / "scope-policy.json").exists()
    assert (run.eval_dir(0) / "summary.parquet").exists()  # the baseline
    assert not (run.eval_dir(1) / "summary.parquet").exists()  # eval.every = 2
    assert (run.eval_dir(2) / "summary.parquet").exists()
    assert all(round_done(run, r, 2) for r in (0, 1, 2))
    before = outputs(run.root)
    assert bring_to_round(run, 2, quiet=True, isolate=False) == []  # nothing to do
    assert outputs(run.root) == before


def test_single_stages_write_what_round_writes(in_process, tmp_path):
    """The stage functions the CLI calls, one by one in this (differently used) process."""
    from stages.eval import evaluate
    from stages.generate import generate
    from stages.locate_error import locate_error
    from stages.prm_score import prm_score
    from stages.rectify import rectify
    from stages.train_step import train_step
    from stages.verify import verify

    by_stage = new_run(tmp_path / "by-stage")
    evaluate(by_stage, 0, quiet=True)
    for r in (1, 2):
        for stage in (generate, verify, prm_score, locate_error, rectify, train_step):
            stage(by_stage, r, quiet=True)
    evaluate(by_stage, 2, quiet=True)
    assert outputs(by_stage.root) == outputs(in_process.root)


def test_a_round_in_subprocesses_writes_what_one_process_writes(in_process, tmp_path):
    isolated = new_run(tmp_path / "isolated")
    cli("round", "1", "--run", str(isolated.root), "--isolate")
    assert (isolated.eval_dir(1) / "summary.parquet").exists()  # round 1 is the last round here
    # round 1 is not evaluated in the two-round run: compare everything else up to round 1
    skip = ("round-001/eval", "round-002", "policy-002")
    got = {k: v for k, v in outputs(isolated.root).items() if not k.startswith(skip)}
    expected = {k: v for k, v in outputs(in_process.root).items() if not k.startswith(skip)}
    assert got == expected


def test_round_needs_a_base_policy(tmp_path):
    from scope_cli.errors import ScopeError

    run = Run.open(tmp_path / "r", None, [*TINY, f"policy.path={tmp_path / 'none'}"], create=True)
    with pytest.raises(ScopeError, match="policy.path: .*policy folder does not exist"):
        prepare(run, quiet=True)  # refused before writing anything
    with pytest.raises(ScopeError, match="no base policy"):
        bring_to_round(run, 1, quiet=True, isolate=False)
