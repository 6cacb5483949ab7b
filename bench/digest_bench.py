"""What content digests cost: a round with and without hashing, and hashing throughput.

    .venv/bin/python bench/digest_bench.py [--reps 5] [--size-gb 1] [--quick] [--only round,throughput]

1. round: the embedded default round, run as bench/round_bench.py's scope side runs it (the six
   training stages in one process, Parquet shards, manifests, policy and optimizer state saved and
   loaded), side by side with the same code whose hashing is replaced by a constant
   (`scope_cli.core.manifests._hash_file` returns a fixed string; stat calls and manifests stay alike).
   Each side is its own process, stepped in turn (bench/harness.py); the ratio is the median over
   rounds of with / without for the same round (rounds differ in cost).
2. throughput: a file of --size-gb GiB (random bytes; written to a temporary folder, removed after)
   hashed the two ways `scope_cli.core.manifests` hashes: one sha256 (files up to 1 GiB), and sha256 over
   256 MiB blocks in up to 32 threads (larger files: a 7B policy's weight files and optimizer state). Wall and
   CPU MB/s, and the seconds a 15 GB file takes at the measured rates. On a shared machine CPU MB/s
   is the steadier figure (what one free core does).

Prints markdown tables; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import PROJECT_PYTHON, Side, Summary, fmt_s, interleave, table, write_summaries  # noqa: E402


def worker(root: Path, hashing: bool) -> None:
    """round_bench's scope side; with `hashing`, the seconds spent hashing are timed and reported with
    each round; without, hashing is replaced by a constant."""
    import harness
    import scope_cli.core.manifests as manifests
    from round_bench import scope_worker

    spent = [0.0]
    real = manifests._hash_file

    def timed(path, block=None):
        start = time.perf_counter()
        try:
            return real(path, block)
        finally:
            spent[0] += time.perf_counter() - start

    manifests._hash_file = timed if hashing else (lambda path, block=None: "0" * 64)
    ready, done = harness.Lockstep.ready, harness.Lockstep.done

    def ready_(self, **info):  # the warm-up round's hashing is not a timed round's
        spent[0] = 0.0
        return ready(self, **info)

    def done_(self, seconds=None, **info):
        info["hash_seconds"], spent[0] = spent[0], 0.0
        return done(self, seconds, **info)

    harness.Lockstep.ready, harness.Lockstep.done = ready_, done_
    scope_worker(root, [])


def round_with_and_without(reps: int, tmp: Path) -> tuple[str, list[Summary]]:
    sides = [Side(name, [PROJECT_PYTHON, __file__, "--worker", name, "--root", tmp / name])
             for name in ("digests", "no-hashing")]
    res = interleave(sides, reps)
    on, off = res["digests"], res["no-hashing"]
    ratio = statistics.median(a / b for a, b in zip(on.seconds, off.seconds))
    cpu_ratio = statistics.median(a["cpu"] / b["cpu"] for a, b in zip(on.info, off.info))
    per_round = ", ".join(f"{a / b:.3f}" for a, b in zip(on.seconds, off.seconds))
    hashing = statistics.median(i["hash_seconds"] for i in on.info)
    share = statistics.median(i["hash_seconds"] / t for i, t in zip(on.info, on.seconds))
    rows = [["with digests (as shipped)", fmt_s(on.median), f"{ratio:.3f}", fmt_s(on.cpu), f"{cpu_ratio:.3f}",
             f"{hashing * 1000:.1f} ms ({share:.2%})"],
            ["hashing replaced by a constant", fmt_s(off.median), "1.000", fmt_s(off.cpu), "1.000", "-"]]
    text = (f"### A round with and without content digests\n\nEmbedded default, rounds "
            f"{on.info[0]['round']}-{on.info[-1]['round']} after a warm-up round, the six training stages "
            f"in one process; ratio: median over rounds of with / without ({per_round}). Hashing: time "
            "spent inside the hash function per round (median), and its share of the round's wall time."
            "\n\n" + table(["side", "wall/round", "ratio", "CPU/round", "CPU ratio", "hashing/round"], rows))
    return text, [Summary("digests: round with vs without hashing", f"{fmt_s(on.median)}/round",
                          f"{fmt_s(off.median)}/round", ratio, "time with / without, per round", "≤ 1.02",
                          ratio <= 1.02, on.max_rss_mb, off.max_rss_mb)]


def throughput(size_gb: float, tmp: Path) -> str:
    from scope_cli.core.manifests import BLOCK, _hash_file

    path = tmp / "digest-bench.bin"
    chunk = os.urandom(64 << 20)
    with open(path, "wb") as fh:
        for _ in range(max(1, int(size_gb * 16))):
            fh.write(chunk)
    size = path.stat().st_size
    rows = []
    threads = min(os.cpu_count() or 1, 32)
    ways = (("one sha256 (one thread)", None), (f"{BLOCK >> 20} MiB blocks, {threads} threads", BLOCK))
    for label, block in ways:
        walls, cpus = [], []
        for _ in range(3):
            w, c = time.perf_counter(), time.process_time()
            _hash_file(path, block)
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
        wall, cpu = min(walls), min(cpus)
        rows.append([label, f"{size / wall / 1e6:.0f}", f"{size / cpu / 1e6:.0f}",
                     f"{15e9 / (size / wall):.1f} s", f"{15e9 / (size / cpu):.1f} s"])
    path.unlink()
    load = os.getloadavg()[0]
    return (f"### Hashing throughput\n\nA {size / 2**30:.1f} GiB file just written (in the page cache), best "
            f"of 3; {os.cpu_count()} cores, load average {load:.1f} at the end. CPU MB/s: bytes per CPU "
            "second of the process (all threads).\n\n"
            + table(["how", "wall MB/s", "CPU MB/s", "15 GB file (wall)", "15 GB file (one core's CPU)"],
                    rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--only", default="round,throughput")
    ap.add_argument("--quick", action="store_true", help="3 rounds, a 0.5 GiB file")
    ap.add_argument("--json", default=None, help="write the summary lines here (bench/run_all.py)")
    ap.add_argument("--worker", choices=["digests", "no-hashing"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(Path(args.root), args.worker == "digests")
        return
    tmp = Path(tempfile.mkdtemp(prefix="scope-bench-"))
    parts, summaries = [], []
    try:
        if "round" in args.only:
            text, s = round_with_and_without(3 if args.quick else args.reps, tmp)
            parts.append(text)
            summaries += s
        if "throughput" in args.only:
            parts.append(throughput(0.5 if args.quick else args.size_gb, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n\n".join(parts))
    write_summaries(args.json, summaries)


if __name__ == "__main__":
    main()
