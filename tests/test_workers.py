"""One node's workers (scope_cli/cli/workers.py): shards claimed as they come, GPUs cut into
tensor-parallel groups, and a round run by two worker processes per sharded stage writing the same
bytes as one process; a killed worker's shards are computed by the rerun; round.workers is operational."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scope_cli.cli import workers
from scope_cli.cli.rounds import bring_to_round, dry_run
from scope_cli.cli.workers import device_groups, worker_envs
from scope_cli.core.files import ShardError, list_shard_files
from scope_cli.core.runs import Run
from scope_cli.core.shards import CLAIM, CLAIM_ENV, ShardJob, run_shards, worker_slot
from scope_cli.errors import ScopeError
from stages.prepare import prepare

TOY = str(Path(__file__).with_name("toy_stage.py"))
# 8 prompts x 4 samples in 4 shards per stage (2 eval sets: 2 eval shards)
TINY = ["prepare.train_size=64", "prepare.eval_size=12", "prepare.ood_size=6", "generate.prompts_per_round=8",
        "generate.prompts_per_shard=2", "generate.n=4", "generate.max_tokens=40", "eval.n_samples=2",
        "eval.ks=[1, 2]", "eval.sampled_limit=2", "eval.limit=4", "eval.max_tokens=40", "verify.workers=1",
        "eval.every=100", "train.minibatches=2", "run.keep_state=0"]


@pytest.mark.parametrize("devices, size, groups", [
    (["0", "1", "2", "3", "4", "5", "6", "7"], 1, [["0"], ["1"], ["2"], ["3"], ["4"], ["5"], ["6"], ["7"]]),
    (["0", "1", "2", "3", "4", "5", "6", "7"], 2, [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]),
    (["0", "1", "2", "3", "4", "5", "6", "7"], 3, [["0", "1", "2"], ["3", "4", "5"]]),  # 6, 7 unused
    (["0", "1", "2", "3", "4", "5", "6", "7"], 8, [["0", "1", "2", "3", "4", "5", "6", "7"]]),
    (["4", "6"], 2, [["4", "6"]]),
    (["GPU-a", "GPU-b"], 1, [["GPU-a"], ["GPU-b"]]),
])
def test_device_groups(devices, size, groups):
    assert device_groups(devices, size) == groups


def test_a_group_larger_than_the_gpus_is_refused():
    with pytest.raises(ScopeError, match=r"^generate.tensor_parallel_size = 4 needs 4 GPUs per worker; "
                                         r"round.devices \(or the visible GPUs\) give 2 \(0,1\)$"):
        device_groups(["0", "1"], 4, "generate.tensor_parallel_size")


@pytest.mark.parametrize("workers_, groups, shards, envs", [
    (2, None, 4, [{CLAIM_ENV: "1"}, {CLAIM_ENV: "1"}]),
    (3, None, 2, [{CLAIM_ENV: "1"}, {CLAIM_ENV: "1"}]),  # never more workers than shards
    (1, [["0", "1"], ["2", "3"]], 8, [{CLAIM_ENV: "1", "CUDA_VISIBLE_DEVICES": "0,1"},
                                      {CLAIM_ENV: "1", "CUDA_VISIBLE_DEVICES": "2,3"}]),
    (5, [["0"], ["1"], ["2"]], 2, [{CLAIM_ENV: "1", "CUDA_VISIBLE_DEVICES": "0"},
                                   {CLAIM_ENV: "1", "CUDA_VISIBLE_DEVICES": "1"}]),
])
def test_worker_envs(workers_, groups, shards, envs):
    assert worker_envs(workers_, groups, shards) == envs


def test_claim_slot_from_the_environment(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(CLAIM_ENV, "1")
    assert worker_slot() == CLAIM
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    assert worker_slot() == CLAIM  # the launcher's claim wins over an outer job's slot
    assert worker_slot(1, 2) == (1, 2)  # explicit flags win over both
    monkeypatch.setenv(CLAIM_ENV, "0")
    assert worker_slot() == (1, 4)
    monkeypatch.setenv(CLAIM_ENV, "yes")
    with pytest.raises(ShardError, match=f"{CLAIM_ENV}='yes': expected 1"):
        worker_slot()


def test_claiming_workers_split_the_shards_between_them(tmp_path):
    """Two claiming processes: every shard computed exactly once, wherever it was computed."""
    out = tmp_path / "toy"
    env = {**os.environ, CLAIM_ENV: "1"}
    procs = [subprocess.Popen([sys.executable, TOY, str(out), str(tmp_path), "6", "0.3"], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    results = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    computed = [i for r in results for i in r["computed"]]
    assert sorted(computed) == list(range(6))  # each once: none recomputed, none left
    assert len(list_shard_files(out)) == 6


def test_claiming_with_force_is_refused(tmp_path):
    jobs = [ShardJob(0, [], lambda: None)]
    with pytest.raises(ShardError, match="claiming workers would recompute each other's shards"):
        run_shards("toy", tmp_path / "toy", jobs, "cfg", [], tmp_path, force=True, worker=CLAIM, quiet=True)


# ---- a round over two workers ---------------------------------------------------------------------------
def data_files(root: Path) -> dict[str, str]:
    """sha256 of every Parquet and safetensors file a reader sees (no hidden paths)."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.suffix in (".parquet", ".safetensors") and not any(
                part.startswith(".") for part in p.relative_to(root).parts)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    run = Run.open(tmp_path_factory.mktemp("workers") / "prepared", None, TINY, create=True)
    prepare(run, quiet=True)
    return run.root


def copy_of(prepared: Path, dst: Path, *overrides: str) -> Run:
    shutil.copytree(prepared, dst)
    return Run.open(dst, None, [*TINY, *overrides])


@pytest.fixture(scope="module")
def one_worker(prepared, tmp_path_factory):
    run = copy_of(prepared, tmp_path_factory.mktemp("one") / "run")
    assert bring_to_round(run, 1, quiet=True, isolate=False) == [0, 1]
    return run


def test_two_workers_write_what_one_writes(one_worker, prepared, tmp_path):
    run = copy_of(prepared, tmp_path / "two", "round.workers=2")
    assert [len(e) for e in workers.plan_workers(run, 1, "generate")] == [1, 1]
    assert bring_to_round(run, 1, quiet=True, isolate=False) == [0, 1]
    ref, got = data_files(one_worker.root), data_files(run.root)
    assert len(list_shard_files(run.stage_dir(1, "rollouts"))) == 4
    assert got == ref and len(ref) > 40
    logs = sorted(p.name for p in (run.round_dir(1) / "logs").iterdir())
    assert logs == [f"{s}-worker-{k}.log" for s in ("eval", "generate", "prm-score", "rectify") for k in (0, 1)]
    # round.workers is operational: another count opens the run as it is, and finds it done
    again = Run.open(run.root, None, [*TINY, "round.workers=1"])
    assert {what for _, _, what in dry_run(again, 1)} == {"done"}
    assert bring_to_round(again, 1, quiet=True, isolate=False) == []


KILL_HOOK = textwrap.dedent("""\
    import os, re, signal, sys
    PATTERN = re.compile(os.environ["TEST_KILL_AT_RENAME"])
    def hook(event, args):
        if event == "os.rename" and PATTERN.search(str(args[0])):
            os.kill(os.getpid(), signal.SIGKILL)
    sys.addaudithook(hook)
""")


def test_a_killed_worker_is_reported_and_the_rerun_finishes_its_shard(one_worker, prepared, tmp_path):
    """A worker is SIGKILLed as it is about to land generate's shard 1: the round names it with its
    log; the shard is not there; the rerun computes it and every rollout shard matches one worker's."""
    run = copy_of(prepared, tmp_path / "killed", "round.workers=2")
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILL_HOOK)  # runs in the workers only (they start after)
    env = {"PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]),
           "TEST_KILL_AT_RENAME": r"rollouts/\.shard-00001\.parquet\.tmp@"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with pytest.raises(ScopeError, match=r"round 1: generate worker [12] of 2 failed with exit code -9"
                                             r".*generate-worker-[01]\.log.*rerun"):
            workers.run_workers(run, 1, "generate", quiet=True)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    rollouts = run.stage_dir(1, "rollouts")
    assert 1 not in [int(p.stem[6:]) for p in list_shard_files(rollouts)]
    assert workers.run_workers(run, 1, "generate", quiet=True)
    ref = {k: v for k, v in data_files(one_worker.root).items() if k.startswith("round-001/rollouts/")}
    got = {k: v for k, v in data_files(run.root).items() if k.startswith("round-001/rollouts/")}
    assert got == ref and len(ref) == 4
    assert not [p for p in rollouts.iterdir() if ".tmp@" in p.name]  # the killed worker's temporary


def test_with_cuda_one_worker_per_gpu_group_whatever_round_workers(tmp_path, monkeypatch):
    run = Run.open(tmp_path / "run", None, ["generate.tensor_parallel_size=2", "rectify.guide=model",
                                            "rectify.guide_tensor_parallel_size=4", "round.workers=3"],
                   create=True)
    monkeypatch.setattr(workers, "visible_gpus", lambda run: ["0", "1", "2", "3", "4", "5", "6", "7"])
    monkeypatch.setattr(workers, "shard_count", lambda run, r, stage: 8)
    gpus = {stage: [e["CUDA_VISIBLE_DEVICES"] for e in workers.plan_workers(run, 1, stage)]
            for stage in ("generate", "prm-score", "rectify", "eval", "verify", "locate-error")}
    assert gpus == {"generate": ["0,1", "2,3", "4,5", "6,7"], "eval": ["0,1", "2,3", "4,5", "6,7"],
                    "prm-score": ["0", "1", "2", "3", "4", "5", "6", "7"], "rectify": ["0,1,2,3", "4,5,6,7"],
                    "verify": [], "locate-error": []}
    monkeypatch.setattr(workers, "visible_gpus", lambda run: ["0"])  # one GPU: the stage as before
    assert workers.plan_workers(run, 1, "prm-score") == []
    assert not workers.run_workers(run, 1, "prm-score", quiet=True)
    with pytest.raises(ScopeError, match="generate.tensor_parallel_size = 2 needs 2 GPUs per worker"):
        workers.plan_workers(run, 1, "generate")


def test_an_isolated_round_hands_its_sharded_stages_to_the_workers(tmp_path, monkeypatch):
    from scope_cli.cli import rounds

    run = Run.open(tmp_path / "run", None, ["eval.every=1", "round.workers=2"], create=True)
    asked, ran = [], []
    monkeypatch.setattr(workers, "run_workers", lambda run, r, stage, quiet: asked.append(stage)
                        or stage in workers.SHARDED_STAGES)
    monkeypatch.setattr(rounds, "_finished", lambda run, r, stage, folder: True)

    class Done:
        returncode = 0

    monkeypatch.setattr(rounds.subprocess, "run", lambda cmd, env=None: ran.append(cmd[3]) or Done())
    rounds._round_in_subprocesses(run, 1, 1, quiet=True)
    assert asked == ["generate", "verify", "prm-score", "locate-error", "rectify", "train-step", "eval"]
    assert ran == ["verify", "locate-error", "train-step"]
    # a stage the workers left unfinished (eval's summary, a shard held elsewhere) runs once more
    monkeypatch.setattr(rounds, "_finished", lambda run, r, stage, folder: stage != "eval")
    ran.clear()
    rounds._round_in_subprocesses(run, 1, 1, quiet=True)
    assert ran == ["verify", "locate-error", "train-step", "eval"]


# ---- round.launcher = ray --------------------------------------------------------------------------------
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray not installed (the [ray] extra)")
def test_nothing_imports_ray_unless_the_launcher_is_ray(monkeypatch):
    code = ("import sys, scope_cli.cli.app, scope_cli.cli.rounds, scope_cli.cli.workers, stages.generate; "
            "print('ray' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    from scope_cli.cli import ray_workers

    monkeypatch.setitem(sys.modules, "ray", None)  # as where it is not installed
    with pytest.raises(ScopeError, match=r"round.launcher = ray: the ray package is not installed"):
        ray_workers.connect()


@needs_ray
def test_ray_tasks_on_a_two_node_cluster_write_what_one_worker_writes(one_worker, prepared, tmp_path,
                                                                     monkeypatch):
    """Two raylets on this host (1 CPU each): each sharded stage as two Ray tasks, the same bytes."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 << 20})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=80 << 20)
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        monkeypatch.setattr(workers, "LocalWorker", None)  # no process of this node's launcher
        run = copy_of(prepared, tmp_path / "ray", "round.launcher=ray", "round.workers=2")
        assert bring_to_round(run, 1, quiet=True, isolate=False) == [0, 1]
        assert data_files(run.root) == data_files(one_worker.root)
        assert (run.round_dir(1) / "logs" / "generate-worker-1.log").exists()
    finally:
        ray.shutdown()
        cluster.shutdown()


@needs_ray
def test_a_lost_ray_node_leaves_its_shards_to_the_retried_task(one_worker, prepared, tmp_path, monkeypatch):
    """generate as two Ray tasks on two one-CPU raylets; one raylet is killed once the first shard has
    landed (its Ray worker and the stage process under it die with it). Ray retries that task on
    the other raylet; the stage ends with every shard there, the same bytes as one worker's."""
    import threading
    import time

    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 80 << 20})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=80 << 20)
        lost = cluster.add_node(num_cpus=1, object_store_memory=80 << 20)
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        run = copy_of(prepared, tmp_path / "lost", "round.launcher=ray", "round.workers=2")
        manifests = run.stage_dir(1, "rollouts") / "_manifest"
        killed = []

        def kill_when_a_shard_lands() -> None:
            deadline = time.monotonic() + 600
            while not list(manifests.glob("shard-*.json")) and time.monotonic() < deadline:
                time.sleep(0.05)
            killed.append(len(list(manifests.glob("shard-*.json"))))
            cluster.remove_node(lost, allow_graceful=False)

        killer = threading.Thread(target=kill_when_a_shard_lands)
        killer.start()
        assert workers.run_workers(run, 1, "generate", quiet=True)
        killer.join()
        assert killed and killed[0] < 4  # the node was lost mid-stage
        ref = {k: v for k, v in data_files(one_worker.root).items() if k.startswith("round-001/rollouts/")}
        got = {k: v for k, v in data_files(run.root).items() if k.startswith("round-001/rollouts/")}
        assert got == ref and len(ref) == 4
    finally:
        ray.shutdown()
        cluster.shutdown()
