"""`make bench`: every benchmark, one after another, and one table of scope against the alternatives.

    .venv/bin/python bench/run_all.py [--quick] [--only round,trl,generate,verify,train,startup,digest]

Runs bench/{round,trl,generate,verify,train,startup,digest}_bench.py (each compares its sides in one run,
interleaved, medians of several steps, peak RSS beside time), then prints the summary table, the
machine, the command and each benchmark's own table, and writes the same markdown to
bench/out/latest.md. --quick (`make bench QUICK=1`) takes fewer steps and drops the largest sizes.
Asserts nothing about speed: a target missed shows as "no" in the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from harness import PROJECT_PYTHON, SUMMARY_HEADER, Summary, machine, table  # noqa: E402

BENCHES = {
    "round": "round_bench.py",
    "trl": "trl_bench.py",
    "generate": "generate_bench.py",
    "verify": "verify_bench.py",
    "train": "train_bench.py",
    "startup": "startup_bench.py",
    "digest": "digest_bench.py",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=",".join(BENCHES))
    args = ap.parse_args()
    started = time.perf_counter()
    header = (f"Run {datetime.datetime.now().isoformat(timespec='minutes')} on {machine()}; command: "
              f"`make bench{' QUICK=1' if args.quick else ''}` (bench/run_all.py{' --quick' if args.quick else ''}).")
    print(header, flush=True)
    summaries: list[Summary] = []
    details: list[str] = []
    with tempfile.TemporaryDirectory(prefix="scope-bench-") as tmp:
        for name in args.only.split(","):
            out = Path(tmp) / f"{name}.json"
            cmd = [str(PROJECT_PYTHON), str(ROOT / "bench" / BENCHES[name]), "--json", str(out),
                   *(["--quick"] if args.quick else [])]
            t = time.perf_counter()
            print(f"... {BENCHES[name]}", file=sys.stderr, flush=True)
            done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            seconds = time.perf_counter() - t
            if done.returncode != 0:
                details.append(f"### {BENCHES[name]}\n\nfailed (exit code {done.returncode}); run it alone "
                               "with BENCH_VERBOSE=1 to see why.")
                continue
            details.append(done.stdout.strip() + f"\n\n({BENCHES[name]}: {seconds:.0f} s)")
            if out.exists():
                summaries += [Summary(**s) for s in json.loads(out.read_text())]
    total = time.perf_counter() - started
    report = "\n\n".join([
        header,
        table(SUMMARY_HEADER, [s.row() for s in summaries]),
        f"Total {total / 60:.1f} min. Ratios are of medians, each comparison's sides interleaved in one run.",
        *details,
    ])
    print("\n\n".join([table(SUMMARY_HEADER, [s.row() for s in summaries]),
                       f"Total {total / 60:.1f} min.", *details]))
    out_dir = ROOT / "bench" / "out"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "latest.md").write_text(report + "\n")
    print(f"\n(written to {out_dir / 'latest.md'})", file=sys.stderr)


if __name__ == "__main__":
    main()
