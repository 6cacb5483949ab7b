"""train-step under torchrun on CPU (gloo): two processes, DDP and FSDP2, equal one process.

Each run makes one update on the same batch (train.minibatches=1); the two processes hold different
rows and token counts. Loss and gradient norm are scale-sensitive (Adam's first step is not), so they
are compared as well as the weights.
"""

import json
import os
import shutil
import subprocess
import sys

import polars as pl
import pytest
from safetensors.torch import load_file
from train_helpers import assert_adam_updates_agree, build_round, make_run

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "scope_cli.cli.app", "--"]  # "--": torchrun would read --run as its own --run-path


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    run = make_run(base / "one", ["train.minibatches=1", "train.lr=0.001"])
    build_round(run, 1, n_prompts=4)
    shutil.copytree(run.root, base / "template")
    proc = subprocess.run([sys.executable, "-m", "scope_cli.cli.app", "train-step", "--run", str(run.root),
                           "--round", "1", "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return base


def outputs(root):
    weights = load_file(root / "policy-001" / "model.safetensors")
    metrics = pl.read_parquet(root / "round-001" / "train" / "metrics.parquet")
    manifest = json.loads((root / "round-001" / "train" / "_manifest" / "shard-00000.json").read_text())
    return weights, metrics, manifest


@pytest.mark.parametrize("fsdp, packed_chunks", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["ddp", "fsdp2", "ddp-packed-chunked", "fsdp2-packed-chunked"])
def test_two_processes_equal_one(single, fsdp, packed_chunks):
    """packed-chunked: packed micro-batches and chunked log-probs (the GPU default) under DDP and
    FSDP2, whose lm_head weight is gathered only inside the model's forward, against one process on
    the padded whole-logits path."""
    root = single / (("fsdp" if fsdp else "ddp") + ("-packed" if packed_chunks else ""))
    shutil.copytree(single / "template", root)
    cmd = [*TORCHRUN, "train-step", "--run", str(root), "--round", "1", "--quiet"]
    if fsdp:
        cmd += ["--set", "train.fsdp=true", "--force"]
    if packed_chunks:
        cmd += ["--set", "train.packing=on", "--set", "train.logprob_chunks=on",
                "--set", "train.logprob_chunk_tokens=7"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    w1, m1, man1 = outputs(single / "one")
    w2, m2, man2 = outputs(root)
    base = load_file(single / "template" / "policy-000" / "model.safetensors")
    assert man2["world_size"] == 2 and man2["fsdp"] is fsdp
    a, b = man2["rank_tokens"]
    assert a != b and a + b == man1["rank_tokens"][0]  # ranks hold different token counts
    assert sorted(w1) == sorted(w2)
    moved = max((w1[k] - base[k]).abs().max().item() for k in w1)
    assert moved > 5e-4  # one Adam step of lr 1e-3
    for col in ("loss", "grad_norm", "entropy", "mean_ratio", "mean_offpolicy_prob"):
        assert m2[col][0] == pytest.approx(m1[col][0], rel=1e-5, abs=1e-7), col
    for col in ("onpolicy_tokens", "offpolicy_tokens"):
        assert m2[col][0] == m1[col][0]
    assert_adam_updates_agree(w2, w1, lr=1e-3)
