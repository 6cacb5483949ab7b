"""Start-up: seconds before useful work, for each `scope` command.

    .venv/bin/python bench/startup_bench.py [--reps 3] [--quick]

A run is brought to round 1 first (`scope prepare` + `scope round 1`, eval sets cut to a few
prompts). Then each command is timed as a fresh process on that finished run, where it finds its
work done and stops after its checks: the time is what a command costs before it does anything —
interpreter, imports, opening the run, checking manifests. `scope --help` and `scope status` read
no model and import no heavy library (target: under 1 s each). Commands alternate; median of
--reps; peak RSS of the process. Prints a markdown table; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from harness import Summary, fmt_mb, fmt_s, table, timed_commands, write_summaries  # noqa: E402

SCOPE = str(ROOT / ".venv" / "bin" / "scope")
STAGES = ("generate", "verify", "prm-score", "locate-error", "rectify", "train-step", "eval")


def compare(reps: int, tmp: Path, quick: bool) -> tuple[str, list[Summary]]:
    env = {"SCOPE_RUNS_DIR": str(tmp), "OMP_NUM_THREADS": "1"}
    run = ["--run", "s"]
    subprocess.run([SCOPE, "prepare", *run, "--quiet", "--set", "eval.limit=8", "--set", "eval.sampled_limit=4"],
                   check=True, env={**os.environ, **env}, cwd=ROOT, stdout=subprocess.DEVNULL)
    subprocess.run([SCOPE, "round", "1", *run, "--quiet"], check=True, env={**os.environ, **env},
                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    commands = {"scope --help": [[SCOPE, "--help"]], "scope status": [[SCOPE, "status", *run]]}
    if not quick:
        commands["scope prepare (done)"] = [[SCOPE, "prepare", *run, "--quiet"]]
    for stage in (STAGES[:1] + STAGES[-2:]) if quick else STAGES:
        commands[f"scope {stage} --round 1 (done)"] = [[SCOPE, stage, *run, "--round", "1", "--quiet"]]
    commands["scope round 1 (done)"] = [[SCOPE, "round", "1", *run, "--quiet"]]
    res = timed_commands(commands, reps, env=env)
    rows = [[name, fmt_s(r.median), fmt_mb(r.max_rss_mb)] for name, r in res.items()]
    text = (f"### 7. Start-up: each command on a finished run (its work already done)\n\nWall seconds of a "
            f"fresh process, median of {reps}; peak RSS.\n\n" + table(["command", "seconds", "max RSS"], rows))
    help_, status = res["scope --help"], res["scope status"]
    slowest = max((r for n, r in res.items() if n not in ("scope --help", "scope status")), key=lambda r: r.median)
    return text, [
        Summary("7. start-up: `scope --help`", fmt_s(help_.median), "-", help_.median, "seconds", "< 1 s",
                help_.median < 1.0, help_.max_rss_mb),
        Summary("7. start-up: `scope status`", fmt_s(status.median), "-", status.median, "seconds", "< 1 s",
                status.median < 1.0, status.max_rss_mb),
        Summary(f"7. start-up: slowest command ({slowest.name})", fmt_s(slowest.median), "-", slowest.median,
                "seconds", "-", None, slowest.max_rss_mb),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None, help="write the summary lines here (bench/run_all.py)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="scope-bench-"))
    try:
        text, summaries = compare(args.reps, tmp, args.quick)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(text)
    write_summaries(args.json, summaries)


if __name__ == "__main__":
    main()
