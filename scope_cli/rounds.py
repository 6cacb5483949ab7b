"""`scope round N`: bring a run to round N — every round up to N that is not finished, in order.

A round is the seven stages: generate → verify → prm-score → locate-error → rectify → train-step →
eval (every `eval.every`-th round, the last one, and round 0 — the base policy — once). Each stage
skips the shards that are already done, so a killed round resumes where it stopped and a finished one
costs only the checks.

Two ways to run the stages, with identical files:
- in one process (CPU and small models): libraries, the generation engine and the verify pool start
  once for all rounds; the engine loads each new policy's weights instead of restarting;
- one subprocess per stage (`round.isolate = on`, and `auto` when CUDA is used): the policy engine,
  PRM, guide and trainer are never resident together, as a GPU needs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from scope_cli.errors import ScopeError
from scope_cli.runs import Run, policy_complete

STAGE_COMMANDS = ("generate", "verify", "prm-score", "locate-error", "rectify", "train-step")


def eval_done(run: Run, round_: int) -> bool:
    return (run.eval_dir(round_) / "summary.parquet").exists()


def round_done(run: Run, round_: int, target: int) -> bool:
    """Finished: its policy is complete and, where this round is evaluated, its eval summary exists."""
    from stages.eval import should_eval

    if round_ > 0 and not policy_complete(run.policy_dir(round_)):
        return False
    return not should_eval(run.config, round_, target) or eval_done(run, round_)


def use_isolation(run: Run) -> bool:
    mode = run.config.round.isolate
    if mode != "auto":
        return mode == "on"
    from scope_cli.backends.generation import resolve_backend

    if resolve_backend(run.config.generate.backend) == "vllm":
        return True
    import torch

    return torch.cuda.is_available()


def bring_to_round(run: Run, target: int, *, quiet: bool = False, isolate: bool | None = None) -> list[int]:
    """Run every unfinished round 1..target (and the round-0 eval). Returns the rounds that ran."""
    if target < 1:
        raise ScopeError(f"round: expected a round number >= 1, got {target}")
    if not policy_complete(run.policy_dir(0)):
        raise ScopeError(f"{run.policy_dir(0)}: no base policy (run `scope prepare` with a valid "
                         "policy.path first)")
    todo = [r for r in range(0, target + 1) if not round_done(run, r, target)]
    if not todo:
        return []
    if isolate if isolate is not None else use_isolation(run):
        for r in todo:
            _round_in_subprocesses(run, r, target, quiet)
        return todo
    _rounds_in_process(run, todo, target, quiet)
    return todo


def _rounds_in_process(run: Run, rounds: list[int], target: int, quiet: bool) -> None:
    from scope_cli.backends.verifier import Verifier
    from stages.eval import evaluate, open_engine, should_eval
    from stages.generate import generate
    from stages.locate_error import locate_error
    from stages.prm_score import prm_score
    from stages.rectify import rectify
    from stages.train_step import train_step
    from stages.verify import verify

    _cpu_threads(run)
    cfg = run.config
    engine: Any = None
    with Verifier(workers=cfg.verify.workers, timeout=cfg.verify.timeout) as verifier:
        try:
            for r in rounds:
                if r > 0:
                    if engine is None:
                        engine = open_engine(run, run.input_policy(r))
                    generate(run, r, engine=engine, quiet=quiet)
                    verify(run, r, verifier=verifier, quiet=quiet)
                    prm_score(run, r, quiet=quiet)
                    locate_error(run, r, quiet=quiet)
                    rectify(run, r, quiet=quiet, verifier=verifier)
                    train_step(run, r, quiet=quiet)
                if should_eval(cfg, r, target) and not eval_done(run, r):
                    if engine is None:
                        engine = open_engine(run, run.policy_dir(r))
                    evaluate(run, r, engine=engine, verifier=verifier, quiet=quiet)
        finally:
            if engine is not None:
                engine.close()


def _round_in_subprocesses(run: Run, r: int, target: int, quiet: bool) -> None:
    from stages.eval import should_eval

    base = [sys.executable, "-m", "scope_cli.app"]
    common = ["--run", str(run.root), *(["--quiet"] if quiet else [])]
    commands = []
    if r > 0:
        commands += [[*base, stage, "--round", str(r), *common] for stage in STAGE_COMMANDS]
    if should_eval(run.config, r, target) and not eval_done(run, r):
        commands.append([*base, "eval", "--round", str(r), *common])
    for cmd in commands:
        done = subprocess.run(cmd, env=os.environ.copy())
        if done.returncode != 0:
            raise ScopeError(f"round {r}: `{' '.join(cmd[2:])}` failed with exit code {done.returncode}")


def _cpu_threads(run: Run) -> None:
    """Tiny models run fastest on one thread on small CPUs (measured); train.threads sets it."""
    import torch

    threads = run.config.train.threads
    if threads > 0 and not torch.cuda.is_available():
        torch.set_num_threads(threads)


def round_table(run: Run, target: int) -> list[dict[str, Any]]:
    """Per evaluated round: the first eval set's headline numbers, for the CLI to print."""
    import polars as pl

    rows = []
    for r in range(0, target + 1):
        summary = run.eval_dir(r) / "summary.parquet"
        if summary.exists():
            frame = pl.read_parquet(summary)
            rows.append({"round": r, **{f"{s}:{m}": v for s, m, v in
                                        frame.select("eval_set", "metric", "value").iter_rows()}})
    return rows

