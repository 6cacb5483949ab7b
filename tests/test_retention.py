"""Checkpoint retention in the round driver: run.keep_policies / keep_every / keep_state."""

import json
import shutil
from pathlib import Path

import pytest

from scope_cli.core.config import ConfigError, load_config
from scope_cli.cli.rounds import bring_to_round, policy_pruned, prune_checkpoints, round_done
from scope_cli.core.runs import Run
from scope_cli.core.policy import mark_policy_complete, policy_complete
from scope_cli.core.manifests import record as file_digest
from scope_cli.core.files import manifest_path, write_json_atomic


def fake_run(tmp_path, last: int, overrides: list[str], evaluated: tuple[int, ...] = ()) -> Run:
    """A run folder with complete policies 0..last, each round's train manifest and state, and eval
    summaries for the rounds in `evaluated` (file contents do not matter to retention)."""
    run = Run.open(tmp_path / "run", None, overrides, create=True)
    for r in range(last + 1):
        policy = run.policy_dir(r)
        policy.mkdir(parents=True)
        (policy / "model.safetensors").write_bytes(b"w")
        mark_policy_complete(policy, {"round": r})
        if r > 0:
            state = run.train_dir(r) / "state"
            state.mkdir(parents=True)
            (state / "optimizer.safetensors").write_bytes(b"s")
            manifest_path(run.train_dir(r), 0).parent.mkdir(parents=True, exist_ok=True)
            manifest_path(run.train_dir(r), 0).write_text(json.dumps({"stage": "train-step"}))
    for r in evaluated:
        fake_eval(run, r)
    return run


def fake_eval(run: Run, r: int) -> None:
    """A finished eval: summary.parquet and the summary manifest that vouches for it."""
    run.eval_dir(r).mkdir(parents=True, exist_ok=True)
    (run.eval_dir(r) / "summary.parquet").write_bytes(b"e")
    write_json_atomic({"config_hash": "h", "output": file_digest(run.eval_dir(r) / "summary.parquet",
                                                                 run.eval_dir(r))},
                      run.eval_dir(r) / "_manifest" / "summary.json")


def kept_policies(run: Run) -> list[int]:
    return sorted(int(p.name[7:]) for p in run.root.glob("policy-*") if policy_complete(p))


def kept_states(run: Run) -> list[int]:
    return sorted(r for r in run.rounds() if (run.train_dir(r) / "state").exists())


def test_keeps_the_last_k_every_mth_the_base_and_pending_evals(tmp_path):
    # rounds 0..7 finished; eval every 5th: round 0 and 5 were evaluated, 7 (the target) is pending
    run = fake_run(tmp_path, 7, ["run.keep_policies=2", "run.keep_every=3", "run.keep_state=1",
                                 "eval.every=5"], evaluated=(0, 5))
    removed = prune_checkpoints(run, target=7)
    assert kept_policies(run) == [0, 3, 6, 7]  # base, every 3rd, the last two (7 also pending eval)
    assert removed == {"policies": [1, 2, 4, 5], "states": [1, 2, 3, 4, 5, 6]}
    assert kept_states(run) == [7]  # the next round's optimizer moments
    assert not list(run.root.glob(".*pruned"))  # nothing half-deleted left behind
    # a round whose policy was pruned is finished; its train files other than the state stay
    assert policy_pruned(run, 4) and round_done(run, 4, 7)
    assert manifest_path(run.train_dir(4), 0).exists()
    assert prune_checkpoints(run, target=7) == {"policies": [], "states": []}  # idempotent


def test_a_policy_whose_eval_is_pending_is_kept(tmp_path):
    run = fake_run(tmp_path, 6, ["run.keep_policies=1", "eval.every=5"], evaluated=(0,))
    prune_checkpoints(run, target=6)
    assert kept_policies(run) == [0, 5, 6]  # round 5's eval has not run yet
    fake_eval(run, 5)
    prune_checkpoints(run, target=6)
    assert kept_policies(run) == [0, 6]


def test_zero_keeps_everything(tmp_path):
    run = fake_run(tmp_path, 4, ["run.keep_policies=0", "run.keep_every=2", "run.keep_state=0"])
    assert prune_checkpoints(run, target=4) == {"policies": [], "states": []}
    assert kept_policies(run) == [0, 1, 2, 3, 4] and kept_states(run) == [1, 2, 3, 4]


def test_missing_policy_without_a_later_one_is_not_finished(tmp_path):
    run = fake_run(tmp_path, 3, ["run.keep_policies=0"])
    shutil.rmtree(run.policy_dir(3))  # the newest: its round must run again
    assert not policy_pruned(run, 3) and not round_done(run, 3, 3)


def test_retention_keys_are_operational_and_non_negative(tmp_path):
    run = Run.open(tmp_path / "r", None, [], create=True)
    again = Run.open(tmp_path / "r", None, ["run.keep_policies=3", "run.keep_state=2"])  # no --force
    assert again.config.run.keep_policies == 3
    with pytest.raises(ConfigError, match="run.keep_every: got -1, expected 0 \\(none\\) or an integer >= 1"):
        load_config(None, ["run.keep_every=-1"])
    assert run.config.run.keep_state == 1


def test_round_driver_prunes_and_continues_from_what_it_kept(tmp_path):
    """Three real rounds of the embedded task, keeping one policy and one train state: each round
    continues from the kept policy and optimizer state."""
    import polars as pl

    from stages.prepare import prepare

    policy = Path(__file__).resolve().parents[1] / "data" / "policies" / "arith-tiny"
    tiny = [f"policy.path={policy}", "prepare.train_size=64", "prepare.eval_size=8", "prepare.ood_size=8",
            "generate.prompts_per_round=4", "generate.prompts_per_shard=4", "generate.n=4",
            "generate.max_tokens=24", "eval.every=2",
            "eval.n_samples=2", "eval.ks=[1]", "eval.max_tokens=24", "train.minibatches=1",
            "verify.workers=1", "run.keep_policies=1", "run.keep_state=1"]
    run = Run.open(tmp_path / "run", None, tiny, create=True)
    prepare(run, quiet=True)
    assert bring_to_round(run, 2, quiet=True, isolate=False) == [0, 1, 2]
    assert kept_policies(run) == [0, 2] and kept_states(run) == [2]
    assert bring_to_round(run, 2, quiet=True, isolate=False) == []  # round 1 counts as done
    assert bring_to_round(run, 3, quiet=True, isolate=False) == [3]
    assert kept_policies(run) == [0, 3] and kept_states(run) == [3]
    info = json.loads((run.policy_dir(3) / "scope-policy.json").read_text())
    updates = sum(pl.read_parquet(run.train_dir(r) / "metrics.parquet").height for r in (1, 2, 3))
    assert info["parent"] == "policy-002" and info["updates"] == updates > 0  # the count carried on
