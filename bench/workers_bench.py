"""One node's workers: wall time of `scope round 2` with round.workers = 1 and 2 (and, with
--ray, round.launcher = ray on a local two-raylet Ray cluster).

    python bench/workers_bench.py [--prompts 32] [--per-shard 8] [--n 8] [--ray]

One run is prepared (the embedded arith task and tiny policy; --prompts per round cut into shards of
--per-shard prompts: 4 shards per sharded stage by default, 2 eval sets of 16 prompts), copied twice,
and each copy brought to round 2 in a fresh `scope round` process (round 0's eval, rounds 1 and 2
with the eval of round 2), one with --workers 1 (every stage in the one process), one with --workers 2
(generate, prm-score, rectify and eval as two worker processes each) and, with --ray, one as two Ray
tasks per sharded stage on a cluster of two raylets of one CPU each on this host
(ray.cluster_utils.Cluster). The files of the runs are compared with the first's (sha256 of every
Parquet and safetensors file). Prints a markdown table; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from harness import machine, table


def data_files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.suffix in (".parquet", ".safetensors")
            and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--per-shard", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--ray", action="store_true", help="also round.launcher = ray (needs the ray extra)")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    scope = [sys.executable, "-m", "scope_cli.cli.app"]
    sets = [f"generate.prompts_per_round={args.prompts}", f"generate.prompts_per_shard={args.per_shard}",
            f"generate.n={args.n}", "eval.limit=16", "eval.sampled_limit=8", "eval.n_samples=4",
            "eval.ks=[1,4]", "verify.workers=1", f"policy.path={ROOT / 'data' / 'policies' / 'arith-tiny'}"]
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="workers-bench-") as tmp:
        base = Path(tmp) / "prepared"
        subprocess.run([*scope, "prepare", "--run", str(base), "--quiet",
                        *(x for s in sets for x in ("--set", s))], check=True, env=env, cwd=ROOT)
        rows, files = [], []
        sides = [("local", 1), ("local", 2)] + ([("ray", 2)] if args.ray else [])
        for launcher, workers in sides:
            run = Path(tmp) / f"{launcher}-{workers}"
            shutil.copytree(base, run)
            cluster, side_env = None, dict(env)
            if launcher == "ray":
                from ray.cluster_utils import Cluster

                cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                                        "object_store_memory": 80 << 20})
                cluster.add_node(num_cpus=1, object_store_memory=80 << 20)
                side_env["RAY_ADDRESS"] = cluster.address
            start = time.perf_counter()
            subprocess.run([*scope, "round", "2", "--run", str(run), "--quiet", "--workers", str(workers),
                            "--set", f"round.launcher={launcher}"], check=True, env=side_env, cwd=ROOT,
                           stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            if cluster is not None:
                cluster.shutdown()
            files.append(data_files(run))
            shards = len(list((run / "round-001" / "rollouts").glob("shard-*.parquet")))
            rows.append([launcher, workers, shards, seconds, files[-1] == files[0]])
            print(f"{launcher} workers={workers}: {seconds:.1f} s", flush=True)
        rows = [[la, w, n, f"{s:.1f}", f"{rows[0][3] / s:.2f}", same] for la, w, n, s, same in rows]
        print(f"\nscope round 2: {args.prompts} prompts x {args.n} per round, {args.per_shard} prompts per "
              f"shard; {len(files[0])} Parquet and safetensors files compared with the first run's\n")
        print(table(["round.launcher", "round.workers", "shards per stage (generate)", "wall s",
                     "speed-up vs 1", "same bytes"], rows))


if __name__ == "__main__":
    main()
