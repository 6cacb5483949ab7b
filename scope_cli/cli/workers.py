"""One node's workers: `scope round` runs a round's sharded stages as several worker processes.

    scope round 2 --run NAME --set round.workers=2          # CPU: two processes per sharded stage
    scope round 2 --run NAME                                # CUDA: one worker per GPU (round.devices)

generate, prm-score, rectify and eval run as worker processes of the stage's own command
(`python -m scope_cli.cli.app STAGE --round R --run ROOT`) with SCOPE_CLAIM_SHARDS=1: each worker takes
the next shard that is neither done nor locked by another (scope_cli/core/shards.py), so the workers
share the shards whatever each one's speed, and the files are the same bytes as one process writes at
the same shard layout (generate.prompts_per_shard sets generate's, and prm-score and rectify follow
it; eval has one shard per eval set). There are never more workers than the stage has shards. verify
keeps its own pool (verify.workers); locate-error is arithmetic on a few columns (milliseconds per
shard: a worker's start, importing the libraries, would cost more than the stage); train-step runs
under torchrun with round.train_procs.

How many: on CPU, round.workers processes. With CUDA, one worker per group of the stage's
tensor-parallel size among round.devices ([]: every visible GPU), each with its own
CUDA_VISIBLE_DEVICES (`device_groups`); round.workers is then not used. One worker: the stage runs as
before (in the round's process, or its one subprocess).

Each worker writes its output to round-RRR/logs/STAGE-worker-K.log; the round prints a line as shards
land and one per worker that finishes. A worker that fails is reported with the end of its log once
the others have finished; the shards it held are unlocked when it exits and the next `scope round`
computes them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from scope_cli.core.files import list_shard_files
from scope_cli.core.runs import Run
from scope_cli.core.shards import CLAIM_ENV
from scope_cli.errors import ScopeError

SHARDED_STAGES = ("generate", "prm-score", "rectify", "eval")
LOG_TAIL = 15  # lines of a failed worker's log shown


def device_groups(devices: list[str], group_size: int, key: str = "tensor_parallel_size") -> list[list[str]]:
    """The GPUs cut into consecutive groups of `group_size` (the value of config key `key`), one worker
    each; GPUs left over that do not fill a group are not used."""
    if group_size > len(devices):
        raise ScopeError(f"{key} = {group_size} needs {group_size} GPUs per worker; round.devices (or the "
                         f"visible GPUs) give {len(devices)} ({','.join(devices) or 'none'})")
    return [devices[i:i + group_size] for i in range(0, len(devices) - group_size + 1, group_size)]


def worker_envs(workers: int, groups: list[list[str]] | None, shards: int) -> list[dict[str, str]]:
    """What each worker adds to its environment: with CUDA (`groups`) one worker per GPU group with
    its CUDA_VISIBLE_DEVICES, else `workers` CPU workers; never more workers than `shards`."""
    envs = ([{"CUDA_VISIBLE_DEVICES": ",".join(g)} for g in groups] if groups is not None
            else [{} for _ in range(workers)])
    return [{CLAIM_ENV: "1", **env} for env in envs[:max(shards, 1)]]


def stage_group_size(run: Run, stage: str) -> tuple[int, str]:
    """GPUs per worker of a stage (its engine's tensor-parallel size) and the key that sets it."""
    cfg = run.config
    if stage in ("generate", "eval"):
        return cfg.generate.tensor_parallel_size, "generate.tensor_parallel_size"
    if stage == "rectify" and cfg.rectify.guide == "model":
        return cfg.rectify.guide_tensor_parallel_size, "rectify.guide_tensor_parallel_size"
    return 1, "one GPU per worker"


def visible_gpus(run: Run) -> list[str] | None:
    """round.devices, else the GPUs this process sees (CUDA_VISIBLE_DEVICES, else all); None without
    CUDA."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    if run.config.round.devices:
        return [str(d) for d in run.config.round.devices]
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [d.strip() for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def stage_folder(run: Run, r: int, stage: str) -> Path:
    return run.eval_dir(r) if stage == "eval" else run.stage_dir(r, {
        "generate": "rollouts", "prm-score": "scored", "rectify": "rectified"}[stage])


def shard_count(run: Run, r: int, stage: str) -> int:
    """How many shards the stage writes in round r (its inputs are finished when it runs)."""
    if stage == "generate":
        from stages.generate import shard_groups

        g = run.config.generate
        return len(shard_groups(run.round_prompt_ids(r), g.prompts_per_shard, g.n))
    if stage == "eval":
        from stages.eval import eval_set_names

        return len(eval_set_names(run))
    source = {"prm-score": "verified", "rectify": "located"}[stage]
    return len(list_shard_files(run.stage_dir(r, source)))


def plan_workers(run: Run, r: int, stage: str) -> list[dict[str, str]]:
    """The environments of the workers `stage` of round r would run as (one or none: no launcher)."""
    if stage not in SHARDED_STAGES:
        return []
    cfg = run.config.round
    gpus = visible_gpus(run)
    groups = device_groups(gpus, *stage_group_size(run, stage)) if gpus else None
    if (groups is None and cfg.workers < 2) or (groups is not None and len(groups) < 2):
        return []
    return worker_envs(cfg.workers, groups, shard_count(run, r, stage))


class LocalWorker:
    """One worker process on this node, its output in `log`."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path):
        self.log, self.why = log, ""
        self._out = open(log, "w")  # noqa: SIM115 (closed when the process ends, or by stop)
        self._proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=self._out,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def poll(self) -> int | None:
        """Its exit code once it has ended, else None."""
        code = self._proc.poll()
        if code is not None:
            self._out.close()
        return code

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait()
        self._out.close()


def run_workers(run: Run, r: int, stage: str, quiet: bool) -> bool:
    """Run `stage` of round r as the node's workers (or, with round.launcher = ray, as Ray tasks) and
    wait for all of them. False when only one worker would run (the caller runs the stage as usual);
    raises a ScopeError naming a failed worker and its log."""
    if stage not in SHARDED_STAGES:
        return False
    if run.config.round.launcher == "ray":
        from scope_cli.cli.ray_workers import RayWorker, ray_plan

        envs = ray_plan(run, shard_count(run, r, stage), stage_group_size(run, stage)[0])
        start: Any = RayWorker
    else:
        envs, start = plan_workers(run, r, stage), LocalWorker
    if len(envs) < 2:
        return False
    from scope_cli.console import make_console

    console = make_console(stderr=True, quiet=quiet)
    logs = run.round_dir(r) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    folder, total = stage_folder(run, r, stage), shard_count(run, r, stage)
    before = _manifests(folder)
    cmd = [sys.executable, "-m", "scope_cli.cli.app", stage, "--round", str(r), "--run", str(run.root)]
    where = f"{stage}: round {r}"
    gpus = " | ".join(e["CUDA_VISIBLE_DEVICES"] for e in envs if "CUDA_VISIBLE_DEVICES" in e)
    console.print(f"{where}: {total} shards over {len(envs)} workers" + (f" (GPUs {gpus})" if gpus else "")
                  + (" (Ray tasks)" if start is not LocalWorker else "") + f"; logs in {logs}")
    workers: list[Any] = []
    began = time.perf_counter()
    try:
        for k, env in enumerate(envs):
            workers.append(start(cmd, env, logs / f"{stage}-worker-{k}.log"))
        running, written, failed = set(range(len(workers))), 0, []
        while running:
            time.sleep(0.2)
            now = len(_manifests(folder).items() - before.items())
            if now != written:
                written = now
                console.print(f"{where}: {written} of {total} shards written")
            for k in sorted(running):
                code = workers[k].poll()
                if code is None:
                    continue
                running.discard(k)
                state = "finished" if code == 0 else f"failed ({workers[k].why or f'exit code {code}'})"
                console.print(f"{where}: worker {k + 1} of {len(workers)} {state} after "
                              f"{time.perf_counter() - began:.1f}s")
                if code != 0:
                    failed.append((k, code))
    finally:
        for worker in workers:  # (all ended, unless the round itself stopped: an interrupt)
            worker.stop()
    if failed:
        (k, code), log = failed[0], workers[failed[0][0]].log
        lines = ([line for line in log.read_text(errors="replace").splitlines() if line.strip()]
                 if log.exists() else [])
        make_console(stderr=True).print("\n".join(f"  | {line}" for line in lines[-LOG_TAIL:]))
        others = f" ({len(failed) - 1} more failed)" if len(failed) > 1 else ""
        last = workers[k].why or (lines[-1] if lines else "no output")
        raise ScopeError(f"round {r}: {stage} worker {k + 1} of {len(workers)} failed with exit code {code}"
                         f"{others}: {last} (log: {log}); rerun `{run.command(f'round {r}')}` to compute "
                         "the shards it left")
    return True


def _manifests(folder: Path) -> dict[str, int]:
    """A stage folder's shard manifests and their modification times (ns)."""
    out = {}
    for path in (folder / "_manifest").glob("shard-[0-9][0-9][0-9][0-9][0-9].json"):
        try:
            out[path.name] = path.stat().st_mtime_ns
        except FileNotFoundError:  # replaced under us
            continue
    return out
