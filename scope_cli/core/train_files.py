"""The train folder of a round (round-R/train/): what a train-step reads and writes, checked against its
manifest. A train-step is done when its policy is complete and its manifest matches: the config hash,
every output (metrics, optimizer state, the new policy's marker and files) the size and sha256 recorded,
and the inputs (rectified shards, the input policy's marker, the previous round's state) unchanged —
or pruned by checkpoint retention since.
"""

from __future__ import annotations

from pathlib import Path

from scope_cli.backends.training import TrainError
from scope_cli.core.files import list_shard_files, manifest_path
from scope_cli.core.manifests import damaged, manifest_files, problem, problems, pruned, read_manifest
from scope_cli.core.manifests import record as file_digest
from scope_cli.core.manifests import repair_command
from scope_cli.core.policy import policy_complete, policy_problem, verify_policy
from scope_cli.core.runs import Run


# ---- the stage ------------------------------------------------------------------------------------
def stage_inputs(run: Run, round_: int) -> list[Path]:
    files = list_shard_files(run.stage_dir(round_, "rectified"))
    files.append(run.policy_dir(round_ - 1) / "scope-policy.json")
    if round_ > 1:
        state = run.train_dir(round_ - 1) / "state"
        files += [state / "trainer.json", state / "optimizer.safetensors"]
    return files


def is_done(run: Run, round_: int, cfg_hash: str) -> bool:
    """Policy complete, manifest whole with this config hash, every output (metrics, train state, the
    policy's marker and files) the size and sha256 recorded, and the inputs unchanged. Damaged: not
    done (rerunning recomputes it, to the same bytes on CPU)."""
    train_dir = run.train_dir(round_)
    if not policy_complete(run.policy_dir(round_)):
        return False
    m, _ = read_manifest(manifest_path(train_dir, 0))
    if m is None or m["config_hash"] != cfg_hash or "policy_marker" not in m:
        return False
    files = [(p, r) for p, r in manifest_files(m, train_dir, run.root) if not pruned(p, run.root)]
    if any(not p.is_file() or p.stat().st_size != r["size"] for p, r in files):
        return False
    # the previous policy and train state may since have been pruned (run.keep_policies /
    # keep_state): a missing one still counts as matching; every input that exists must match
    prunable = {str(p.relative_to(run.root)) for p in stage_inputs(run, round_)[-3:]
                if not p.is_relative_to(run.stage_dir(round_, "rectified"))}
    recorded = {x["path"]: (x["size"], x["sha256"]) for x in m.get("inputs", [])}
    current = {}
    for p in stage_inputs(run, round_):
        name = str(p.relative_to(run.root))
        if p.exists():
            x = file_digest(p, run.root)
            current[name] = (x["size"], x["sha256"])
        elif name in prunable:
            current[name] = recorded.get(name)
    return (current == recorded and all(problem(p, r) is None for p, r in files)
            and policy_problem(run.policy_dir(round_)) is None)


def check_inputs(run: Run, round_: int, in_policy: Path) -> None:
    """The input policy's files and the previous round's train state are what their manifests record
    (a damaged one is named, with the command that writes it again)."""
    verify_policy(in_policy, repair_command(in_policy.name, run.root))
    if round_ < 2:
        return
    prev = run.train_dir(round_ - 1)
    repair = run.command(f"train-step --round {round_ - 1}")
    m, why = read_manifest(manifest_path(prev, 0))
    if m is None:
        raise TrainError(f"{manifest_path(prev, 0)}: {why}, so round {round_ - 1}'s train state is "
                         f"not vouched for; run `{repair}`")
    bad = problems([r for r in m.get("outputs", []) if r["path"].startswith("state/")], prev)
    if bad:
        raise TrainError(damaged(*bad[0], repair))
