"""One node's workers: wall time of `scope round 2` with round.workers = 1 and 2.

    python bench/workers_bench.py [--prompts 32] [--per-shard 8] [--n 8]

One run is prepared (the embedded arith task and tiny policy; --prompts per round cut into shards of
--per-shard prompts: 4 shards per sharded stage by default, 2 eval sets of 16 prompts), copied twice,
and each copy brought to round 2 in a fresh `scope round` process (round 0's eval, rounds 1 and 2
with the eval of round 2), one with --workers 1 (every stage in the one process), one with --workers 2
(generate, prm-score, rectify and eval as two worker processes each). The files of the two runs are
compared (sha256 of every Parquet and safetensors file). Prints a markdown table; asserts nothing
about speed.
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

from harness import machine, table  # noqa: E402


def data_files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.suffix in (".parquet", ".safetensors")
            and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--per-shard", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
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
        rows, files = [], {}
        for workers in (1, 2):
            run = Path(tmp) / f"w{workers}"
            shutil.copytree(base, run)
            start = time.perf_counter()
            subprocess.run([*scope, "round", "2", "--run", str(run), "--quiet", "--workers", str(workers)],
                           check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - start
            files[workers] = data_files(run)
            shards = len(list((run / "round-001" / "rollouts").glob("shard-*.parquet")))
            rows.append([workers, shards, seconds])
            print(f"workers={workers}: {seconds:.1f} s", flush=True)
        rows = [[w, n, f"{s:.1f}", f"{rows[0][2] / s:.2f}"] for w, n, s in rows]
        same = files[1] == files[2]
        print(f"\nscope round 2: {args.prompts} prompts x {args.n} per round, {args.per_shard} prompts per "
              f"shard; files identical: {same} ({len(files[1])} compared)\n")
        print(table(["round.workers", "shards per stage (generate)", "wall s", "speed-up vs 1"], rows))


if __name__ == "__main__":
    main()
