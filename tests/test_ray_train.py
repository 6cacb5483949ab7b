"""train-step over two nodes through Ray (round.launcher = ray, round.train_nodes = 2): one torchrun
per node started as a Ray task on a two-raylet local cluster writes the same bytes as one torchrun of
two processes on one node (the same world size, so the same reduction order)."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from train_helpers import build_round, make_run

from scope_cli.core.runs import Run

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="the ray extra is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def outputs(root):
    train = root / "round-001" / "train"
    manifest = json.loads((train / "_manifest" / "shard-00000.json").read_text())
    return ((root / "policy-001" / "model.safetensors").read_bytes(), (train / "metrics.parquet").read_bytes(),
            manifest["world_size"])


def test_train_step_on_two_ray_nodes_equals_two_processes_on_one(tmp_path, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    from scope_cli.cli.ray_workers import train_on_nodes

    run = make_run(tmp_path / "one-node", ["train.minibatches=1", "train.lr=0.001"])
    build_round(run, 1, n_prompts=4)
    shutil.copytree(run.root, tmp_path / "two-nodes")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "scope_cli.cli.app", "--", "train-step", "--run", str(run.root), "--round", "1",
                           "--quiet"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 << 20})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=80 << 20)
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        nodes = Run.open(tmp_path / "two-nodes", None, ["round.launcher=ray", "round.train_nodes=2",
                                                       f"round.train_port={free_port()}"])
        train_on_nodes(nodes, 1, quiet=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    logs = sorted(p.name for p in (nodes.round_dir(1) / "logs").iterdir())
    assert logs == ["train-step-node-0.log", "train-step-node-1.log"]
    assert outputs(nodes.root) == outputs(run.root)
    assert outputs(run.root)[2] == 2
