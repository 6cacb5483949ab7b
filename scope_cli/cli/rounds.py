"""`scope round N`: bring a run to round N — every round up to N that is not finished, in order.

A round is the seven stages: generate → verify → prm-score → locate-error → rectify → train-step →
eval (every `eval.every`-th round, the last one, and round 0 — the base policy — once). Each stage
skips the shards that are already done, so a killed round resumes where it stopped and a finished one
costs only the checks.

Two ways to run the stages, with identical files:
- in one process (CPU and small models): libraries, the generation engine and the verify pool start
  once for all rounds; the engine loads each new policy's weights instead of restarting;
- one subprocess per stage (`round.isolate = on`, and `auto` when CUDA is used): the policy engine,
  PRM, guide and trainer are never resident together, as a GPU needs. With round.train_procs = N > 1,
  train-step runs under `torchrun --standalone --nproc-per-node N` (one node's GPUs); with
  round.launcher = ray and round.train_nodes = K > 1, under one torchrun per node of K, started as Ray
  tasks (scope_cli/cli/ray_workers.py `train_on_nodes`), in either way of running.

Either way, generate, prm-score, rectify and eval run as several worker processes claiming shards
where round.workers > 1 on CPU, or over round.devices' GPUs with CUDA (scope_cli/cli/workers.py).

Checkpoint retention (`prune_checkpoints`, after each finished round: its train-step and eval done). A
7B run writes ~15 GB of weights and ~56 GB of optimizer state per round. run.keep_policies = K keeps
the last K policy folders and, with run.keep_every = M, every M-th (0: keep all); run.keep_state = K
keeps the train state (optimizer moments) of the last K rounds (0: all). Never removed: policy-000
(the base, and the KL reference), the newest complete policy (the next round's input), a policy whose
eval is still pending, and the newest train state (the next round continues its moments). A round
whose policy was removed counts as finished. A folder is renamed out of the way (``.NAME.pruned``)
before it is deleted; what a killed pruning left is deleted by the next `scope round`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from scope_cli.errors import ScopeError
from scope_cli.core.loggers import log_rounds
from scope_cli.core.runs import Run
from scope_cli.core.policy import policy_complete

STAGE_COMMANDS = ("generate", "verify", "prm-score", "locate-error", "rectify", "train-step")


def eval_done(run: Run, round_: int) -> bool:
    """Round R's eval finished: its summary manifest (written after summary.parquet and
    training.parquet) is whole and both files have the sizes it records. (Their contents are checked
    by `scope eval`, `scope status` and the readers: this check runs for every round, often.)"""
    from scope_cli.core.eval_files import summary_manifest
    from scope_cli.core.manifests import manifest_files, read_manifest

    eval_dir = run.eval_dir(round_)
    m, _ = read_manifest(summary_manifest(eval_dir))
    return m is not None and all(p.is_file() and p.stat().st_size == r["size"]
                                 for p, r in manifest_files(m, eval_dir, run.root))


def train_done(run: Run, round_: int) -> bool:
    """Round R's train-step finished (policy complete, its manifest written last): the stages before
    it have nothing left to do for the round."""
    from scope_cli.core.files import manifest_path

    return policy_complete(run.policy_dir(round_)) and manifest_path(run.train_dir(round_), 0).exists()


def policy_pruned(run: Run, round_: int) -> bool:
    """policy-R was removed by checkpoint retention: round R's train-step finished (its manifest is
    written after the policy) and a later policy is complete (retention keeps the newest)."""
    from scope_cli.core.files import manifest_path

    last = run.last_policy_round()
    return (last is not None and last > round_ and not policy_complete(run.policy_dir(round_))
            and manifest_path(run.train_dir(round_), 0).exists())


def round_done(run: Run, round_: int, target: int) -> bool:
    """Finished: its policy is complete, its train-step manifest (written last) exists and, where this
    round is evaluated, its eval summary exists; or its policy was removed by checkpoint retention
    after the round finished."""
    from scope_cli.core.files import manifest_path
    from stages.eval import should_eval

    if round_ > 0 and not policy_complete(run.policy_dir(round_)):
        return policy_pruned(run, round_)
    if round_ > 0 and not manifest_path(run.train_dir(round_), 0).exists():
        return False  # killed after the policy landed, before the manifest: train-step finishes it
    return not should_eval(run.config, round_, target) or eval_done(run, round_)


def use_isolation(run: Run) -> bool:
    mode = run.config.round.isolate
    if mode != "auto":
        return mode == "on"
    from scope_cli.backends.engine import resolve_backend

    if resolve_backend(run.config.generate.backend) == "vllm":
        return True
    import torch

    return torch.cuda.is_available()


def bring_to_round(run: Run, target: int, *, quiet: bool = False, isolate: bool | None = None) -> list[int]:
    """Run every unfinished round 1..target (and the round-0 eval). Returns the rounds that ran."""
    if target < 1:
        raise ScopeError(f"round: expected a round number >= 1, got {target}")
    if not policy_complete(run.policy_dir(0)):
        from scope_cli.backends.hf import PolicyError, check_policy_folder

        try:
            check_policy_folder(run.config.policy.path)
        except PolicyError as exc:  # say what is wrong with it
            raise ScopeError(f"{run.policy_dir(0)}: no base policy; policy.path {exc}") from None
        raise ScopeError(f"{run.policy_dir(0)}: no base policy (run `{run.command('prepare')}` with a "
                         "valid policy.path first)")
    todo = [r for r in range(0, target + 1) if not round_done(run, r, target)]
    if not todo:
        # what a killed run had left to prune (as `scope round <newest>` would prune it)
        prune_checkpoints(run, max(target, run.last_policy_round() or 0))
    elif isolate if isolate is not None else use_isolation(run):
        for r in todo:
            _round_in_subprocesses(run, r, target, quiet)
            prune_checkpoints(run, target)
    else:
        _rounds_in_process(run, todo, target, quiet)
    log_rounds(run)  # every round's curves (the stages log their own; this fills in older runs')
    return todo


def _rounds_in_process(run: Run, rounds: list[int], target: int, quiet: bool) -> None:
    from scope_cli.core.resources import StageResources
    from stages.eval import evaluate, should_eval
    from stages.generate import generate
    from stages.locate_error import locate_error
    from stages.prm_score import prm_score
    from stages.rectify import rectify
    from stages.train_step import train_step
    from stages.verify import verify

    from scope_cli.cli.workers import run_workers

    cfg = run.config

    def sharded(r: int, stage: str, call: Any) -> None:
        """The stage as the node's workers (round.workers / round.devices), then here, where it
        finds their shards done (and writes what comes after them, eval's summary); or only here."""
        workers = run_workers(run, r, stage, quiet)
        _all_done(run, r, stage, call(quiet or workers))

    with StageResources(cfg) as res:  # the engine, verifier pool, PRM and guide, for all rounds
        for r in rounds:
            if r > 0 and not train_done(run, r):  # (a round left with only its eval to do)
                sharded(r, "generate", lambda q: generate(run, r, resources=res, quiet=q))
                _all_done(run, r, "verify", verify(run, r, resources=res, quiet=quiet))
                sharded(r, "prm-score", lambda q: prm_score(run, r, resources=res, quiet=q))
                res.release("prm")  # freed after its stage, as a stage run alone frees it
                _all_done(run, r, "locate-error", locate_error(run, r, quiet=quiet))
                sharded(r, "rectify", lambda q: rectify(run, r, resources=res, quiet=q))
                res.release("guide")
                if on_nodes(run):
                    from scope_cli.cli.ray_workers import train_on_nodes

                    train_on_nodes(run, r, quiet)
                else:
                    train_step(run, r, quiet=quiet)
            if should_eval(cfg, r, target) and not eval_done(run, r):
                sharded(r, "eval", lambda q: evaluate(run, r, resources=res, quiet=q)["summary"] is not None)
            prune_checkpoints(run, target)


def _all_done(run: Run, r: int, stage: str, result: Any) -> None:
    """Stop the round when another process holds some of a stage's shards: the next stage would
    find its input unfinished."""
    if result is True or (result is not False and not getattr(result, "skipped_locked", None)):
        return
    raise ScopeError(f"round {r}: {stage} shards are being computed by another process (a second "
                     f"`scope round` or worker on {run.root}?); rerun when it has finished")


def _round_in_subprocesses(run: Run, r: int, target: int, quiet: bool) -> None:
    from stages.eval import should_eval

    base = [sys.executable, "-m", "scope_cli.cli.app"]
    common = ["--run", str(run.root), *(["--quiet"] if quiet else [])]
    commands = []
    procs = run.config.round.train_procs
    if r > 0 and not train_done(run, r):
        for stage in STAGE_COMMANDS:
            args = [stage, "--round", str(r), *common]
            if stage == "train-step" and (procs > 1 or on_nodes(run)):  # `--`: torchrun's args end
                commands.append([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 f"--nproc-per-node={procs}", "-m", "scope_cli.cli.app", "--", *args])
            else:
                commands.append([*base, *args])
    if should_eval(run.config, r, target) and not eval_done(run, r):
        commands.append([*base, "eval", "--round", str(r), *common])
    from scope_cli.cli.workers import run_workers, stage_folder

    for cmd in commands:
        stage = cmd[3]
        if stage == "--standalone" and on_nodes(run):  # train-step over several nodes, through Ray
            from scope_cli.cli.ray_workers import train_on_nodes

            train_on_nodes(run, r, quiet)
            continue
        if run_workers(run, r, stage, quiet) and _finished(run, r, stage, stage_folder(run, r, stage)):
            continue  # (else the stage's one process finishes it: eval's summary, a shard left)
        done = subprocess.run(cmd, env=os.environ.copy())
        if done.returncode != 0:
            raise ScopeError(f"round {r}: `{' '.join(cmd[2:])}` failed with exit code {done.returncode}")


def on_nodes(run: Run) -> bool:
    """train-step runs over several nodes (round.train_nodes > 1 with round.launcher = ray)."""
    return run.config.round.launcher == "ray" and run.config.round.train_nodes > 1


def _finished(run: Run, r: int, stage: str, folder: Path) -> bool:
    """After a stage's workers: every shard is there (eval: and its summary)."""
    from scope_cli.core.files import ShardError
    from scope_cli.core.shards import complete_shards

    if stage == "eval":
        return eval_done(run, r)
    try:
        complete_shards(folder, stage)
    except ShardError:
        return False
    return True


def prune_checkpoints(run: Run, target: int) -> dict[str, list[int]]:
    """Remove the policy folders and train states that run.keep_policies / keep_every / keep_state do
    not keep (see the module docstring). `target` is the round being brought to: it decides which
    evals are pending. Returns the rounds whose policy and whose train state were removed."""
    from stages.eval import should_eval

    keep = run.config.run
    removed: dict[str, list[int]] = {"policies": [], "states": []}
    finish_pruning(run)
    last = run.last_policy_round()
    if last is None:
        return removed
    if keep.keep_policies > 0:
        for path in sorted(run.root.glob("policy-[0-9][0-9][0-9]")):
            r = int(path.name[7:])
            if (r == 0 or r > last - keep.keep_policies or not policy_complete(path)
                    or (keep.keep_every > 0 and r % keep.keep_every == 0)
                    or (should_eval(run.config, r, target) and not eval_done(run, r))):
                continue
            _remove_tree(path)
            removed["policies"].append(r)
    if keep.keep_state > 0:
        for r in run.rounds():
            state = run.train_dir(r) / "state"
            if r <= last - keep.keep_state and state.exists():
                _remove_tree(state)
                removed["states"].append(r)
    return removed


def _remove_tree(path: Path) -> None:
    """Rename out of the way first (a policy folder stops being complete at once), then delete."""
    trash = path.parent / f".{path.name}.pruned"
    if trash.exists():
        shutil.rmtree(trash)
    path.rename(trash)
    shutil.rmtree(trash)


def finish_pruning(run: Run) -> list[Path]:
    """Delete what a pruning killed mid-way left (``.policy-NNN.pruned``, ``train/.state.pruned``):
    renamed out of the way, so nothing reads it; it only holds disk space."""
    left = [*run.root.glob(".policy-[0-9][0-9][0-9].pruned"),
            *run.root.glob("round-[0-9][0-9][0-9]/train/.state.pruned")]
    for trash in left:
        shutil.rmtree(trash, ignore_errors=True)
    return left


def round_table(run: Run, target: int) -> list[dict[str, Any]]:
    """Per evaluated round: the first eval set's headline numbers, for the CLI to print."""
    import polars as pl

    rows = []
    for r in range(0, target + 1):
        summary = run.eval_dir(r) / "summary.parquet"
        if eval_done(run, r):
            frame = pl.read_parquet(summary)
            rows.append({"round": r, **{f"{s}:{m}": v for s, m, v in
                                        frame.select("eval_set", "metric", "value").iter_rows()}})
    return rows



# ---- `scope round N --dry-run` -----------------------------------------------------------------------
def dry_run(run: Run, target: int) -> list[tuple[int, str, str]]:
    """What `scope round target` would do, as (round, stage, what) rows: the same done checks the
    stages make (manifests, config hashes, input digests), with nothing computed or loaded (no torch,
    no model). train-step counts as done when its policy and manifest exist and nothing before it
    would run."""
    from scope_cli.core.config import config_hash
    from scope_cli.core.shards import complete_shards, is_done
    from scope_cli.core.files import ShardError
    from stages import eval as eval_stage
    from stages import generate, locate_error, prm_score, rectify, verify

    def count(dst: Path, inputs: list[list[Path]], cfg_hash: str, extra: Any = None) -> str:
        done = sum(is_done(dst, i, files, cfg_hash, run.root) and (extra is None or extra(i))
                   for i, files in enumerate(inputs))
        if done == len(inputs):
            return f"done ({_n_shards(done)})"
        return (f"{done} of {_n_shards(len(inputs))} done; would compute {len(inputs) - done}" if done
                else f"would run ({_n_shards(len(inputs))})")

    rows: list[tuple[int, str, str]] = []
    cfg = run.config
    for r in range(0, target + 1):
        if round_done(run, r, target):
            rows.append((r, "all", "done"))
            continue
        pending = False  # an earlier stage of this round would compute: every later one runs
        if r > 0:
            if not policy_complete(run.policy_dir(r - 1)):
                pending = True
                rows.append((r, "generate", f"would run (after round {r - 1})"))
            else:
                groups = generate.shard_groups(run.round_prompt_ids(r), cfg.generate.prompts_per_shard,
                                               cfg.generate.n)
                files = complete_shards(run.prompts_dir, run.command("prepare"))
                state = count(run.stage_dir(r, "rollouts"), [files] * len(groups),
                              generate.stage_hash(run, run.policy_dir(r - 1)))
                pending = not state.startswith("done")
                rows.append((r, "generate", state))
            for name, module, src, dst in (("verify", verify, "rollouts", "verified"),
                                           ("prm-score", prm_score, "verified", "scored"),
                                           ("locate-error", locate_error, "scored", "located"),
                                           ("rectify", rectify, "located", "rectified")):
                if pending:
                    rows.append((r, name, "would run"))
                    continue
                try:
                    files = complete_shards(run.stage_dir(r, src), name)
                except ShardError:
                    files = None
                if files is None:
                    pending = True
                    rows.append((r, name, "would run"))
                    continue
                state = count(run.stage_dir(r, dst), [[f] for f in files],
                              config_hash(cfg, module.config_keys(cfg) if hasattr(module, "config_keys")
                                          else module.CONFIG_KEYS))
                pending = not state.startswith("done")
                rows.append((r, name, state))
            trained = not pending and train_done(run, r)
            pending = not trained
            rows.append((r, "train-step", "done" if trained else "would run"))
        if not eval_stage.should_eval(cfg, r, target):
            rows.append((r, "eval", f"not due (eval.every = {cfg.eval.every})"))
        elif eval_done(run, r) and not pending:
            rows.append((r, "eval", "done"))
        elif pending:
            rows.append((r, "eval", "would run"))
        else:
            names = eval_stage.eval_set_names(run)
            sets = [[run.eval_sets_dir / f"{n}.parquet"] for n in names]
            modes = [m for m in eval_stage.MODES if m != "greedy" or cfg.eval.greedy]

            def tables(i: int, r: int = r) -> bool:  # a set whose per-sample tables are gone reruns
                return all(eval_stage.samples_path(run.eval_dir(r), names[i], m).exists() for m in modes)

            state = count(run.eval_dir(r), sets, eval_stage.stage_hash(
                cfg, eval_stage.policy_id(run.policy_dir(r)), names), tables)
            rows.append((r, "eval", state.replace("shard", "set")))
    return rows


def _n_shards(n: int) -> str:
    return f"{n} shard" + ("" if n == 1 else "s")
