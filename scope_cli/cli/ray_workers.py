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


def logged_process() -> Any:
    """The function a Ray task runs (made here, so it travels to the nodes by value): `cmd` as a
    process with `env` added, its output in `log`; returns its exit code."""

    def run_logged(cmd: list[str], env: dict[str, str], log: str) -> int:  # (on a Ray worker)
        import ctypes
        import os
        import signal
        import subprocess

        def end_with_this_task() -> None:
            """The process gets SIGKILL when the Ray worker running this task dies (its raylet or node
            lost): it never outlives its task holding shard locks (Linux PR_SET_PDEATHSIG = 1; Ray
            runs a task on its worker's main thread)."""
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)

        with open(log, "w") as out:
            return subprocess.run(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, check=False,
                                  preexec_fn=end_with_this_task).returncode

    return run_logged


class RayWorker:
    """One worker as a Ray task; the same interface as workers.LocalWorker."""

    def __init__(self, cmd: list[str], env: dict[str, Any], log: Path):
        ray = connect()
        env = dict(env)
        num_gpus = env.pop("num_gpus", 0)

        self.log, self.why, self._code = log, "", None
        task = ray.remote(num_cpus=1, num_gpus=num_gpus, max_retries=1)(logged_process())
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


def train_on_nodes(run: Run, round_: int, quiet: bool = False) -> None:
    """Round R's train-step over round.train_nodes nodes: one torchrun per node (round.train_procs
    processes each) as a Ray task, one task per node (a STRICT_SPREAD placement group), node ranks in
    bundle order, the rendezvous static at the address of the node holding bundle 0 and
    round.train_port. Each node's output goes to round-RRR/logs/train-step-node-K.log; a failure is
    one line naming the node and its log."""
    import sys

    ray = connect()
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    rc = run.config.round
    gpus = int(ray.cluster_resources().get("GPU", 0))
    bundle = {"CPU": 1, **({"GPU": rc.train_procs} if gpus else {})}
    group = placement_group([bundle] * rc.train_nodes, strategy="STRICT_SPREAD")
    try:
        if not group.wait(timeout_seconds=300):
            raise ScopeError(f"round.train_nodes = {rc.train_nodes}: the Ray cluster did not offer "
                             f"{rc.train_nodes} nodes with {bundle} free within 300 s")
        node_of = placement_group_table(group)["bundles_to_node_id"]
        address = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}[node_of[0]]
        logs = run.round_dir(round_) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        task = ray.remote(logged_process())
        refs = []
        for rank in range(rc.train_nodes):
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={rc.train_nodes}",
                   f"--node-rank={rank}", f"--nproc-per-node={rc.train_procs}", f"--master-addr={address}",
                   f"--master-port={rc.train_port}", "-m", "scope_cli.cli.app", "--", "train-step",
                   "--round", str(round_), "--run", str(run.root), *(["--quiet"] if quiet else [])]
            passed = {k: os.environ[k] for k in ("PYTHONPATH", "OMP_NUM_THREADS") if k in os.environ}
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)
            refs.append(task.options(num_cpus=1, num_gpus=bundle.get("GPU", 0), max_retries=0,
                                     scheduling_strategy=strategy).remote(cmd, passed,
                                                                          str(logs / f"train-step-node-{rank}.log")))
        codes = ray.get(refs)
    finally:
        remove_placement_group(group)
    failed = [(rank, code) for rank, code in enumerate(codes) if code != 0]
    if failed:
        rank, code = failed[0]
        raise ScopeError(f"round {round_}: train-step on node {rank} of {rc.train_nodes} failed with exit code "
                         f"{code} (log: {logs / f'train-step-node-{rank}.log'})")
