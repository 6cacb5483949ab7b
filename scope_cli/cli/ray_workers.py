"""`round.launcher = ray`: a round's sharded stages as tasks on an existing Ray cluster.

    ray start --head                                   # on one node
    ray start --address HEAD:6379                      # on each other node (the run folder shared)
    scope round 2 --run /shared/runs/q7 --set round.launcher=ray

`scope round` connects to the cluster its node has joined (`ray.init(address=RAY_ADDRESS or "auto")`)
and runs each sharded stage's workers (generate, prm-score, rectify, eval; scope_cli/cli/workers.py)
as Ray tasks: one per tensor-parallel group of the cluster's GPUs (`num_gpus` = the stage's
tensor-parallel size; Ray sets each task's CUDA_VISIBLE_DEVICES), or round.workers where the cluster
has no GPUs; never more than the stage has shards. A task runs the stage's own command as a process
claiming shards through the locks of the shared run folder, its output in round-RRR/logs/, exactly
as a local worker does, so the files are the same bytes as one process writes. The other stages
(verify, locate-error, train-step) run where `scope round` runs. Every node needs the same Python
environment at the same path (the command is this interpreter's) and the run folder at the same path.

A node lost mid-stage takes its worker process with it (a worker process is also killed when the Ray
worker running its task dies, its raylet lost), and with it its shard locks (flock: released when the
process dies; on NFS when the lease expires). Ray retries such a task once
(`max_retries=1`): the new worker claims what is left, the lost node's shards included; otherwise
the stage is reported as failed and the next `scope round` computes what is missing.

Only this module imports ray, and only when round.launcher = ray (install: `pip install -e '.[ray]'`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from scope_cli.core.runs import Run
from scope_cli.core.shards import CLAIM_ENV
from scope_cli.errors import ScopeError


def connect() -> Any:
    """The ray module, connected to the cluster (RAY_ADDRESS, else the one this node has joined)."""
    try:
        import ray
    except ImportError:
        raise ScopeError("round.launcher = ray: the ray package is not installed (pip install -e '.[ray]')"
                         ) from None
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or "auto"
        try:
            ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        except (ConnectionError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ScopeError(f"round.launcher = ray: no Ray cluster at {address} ({first}); start one with "
                             "`ray start --head` (and `ray start --address HEAD:6379` on the other nodes)"
                             ) from None
    return ray


def ray_plan(run: Run, shards: int, size: int) -> list[dict[str, Any]]:
    """What each task of a stage with `shards` shards and `size` GPUs per worker adds to its worker's
    environment, and the GPUs it asks Ray for (key "num_gpus", taken out before it runs)."""
    ray = connect()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count, per_task = (gpus // size, size) if gpus else (run.config.round.workers, 0)
    passed = {k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}  # (this code on the nodes)
    return [{CLAIM_ENV: "1", **passed, "num_gpus": per_task} for _ in range(min(count, max(shards, 1)))]


class RayWorker:
    """One worker as a Ray task; the same interface as workers.LocalWorker."""

    def __init__(self, cmd: list[str], env: dict[str, Any], log: Path):
        ray = connect()
        env = dict(env)
        num_gpus = env.pop("num_gpus", 0)

        def run_logged(cmd: list[str], env: dict[str, str], log: str) -> int:  # (on a Ray worker)
            import ctypes
            import os
            import signal
            import subprocess

            def end_with_this_task() -> None:
                """The worker process gets SIGKILL when the Ray worker running this task dies (its
                raylet or node lost): it never outlives its task holding shard locks (Linux
                PR_SET_PDEATHSIG = 1; Ray runs a task on its worker's main thread)."""
                ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)

            with open(log, "w") as out:
                return subprocess.run(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, check=False,
                                      preexec_fn=end_with_this_task).returncode

        self.log, self.why, self._code = log, "", None
        task = ray.remote(num_cpus=1, num_gpus=num_gpus, max_retries=1)(run_logged)
        self._ref = task.remote(cmd, env, str(log))

    def poll(self) -> int | None:
        import ray

        if self._code is None:
            ready, _ = ray.wait([self._ref], timeout=0)
            if ready:
                try:
                    self._code = ray.get(self._ref)
                except ray.exceptions.RayError as exc:  # its node lost, retries spent
                    self._code = -1
                    self.why = f"Ray task lost: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}"
        return self._code

    def stop(self) -> None:
        import ray

        if self._code is None and self.poll() is None:
            ray.cancel(self._ref, force=True)
