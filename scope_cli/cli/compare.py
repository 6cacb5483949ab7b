"""`scope compare`: the miniature experiment — GRPO vs LUFFY vs SCOPE from the same start.

    scope compare --name mini --rounds 20 --seeds 3 [--config configs/hard.toml] [--set k=v ...]

For every (algo, seed) it creates the run `<name>-<algo>-s<seed>` (same base policy, same prompt stream:
the prompts depend on prepare.seed and the round slices on run.seed, so arms with the same seed see the
same prompts in the same order) and brings it to round N with `scope round`, running the arms as
parallel single-thread processes. Then it reads each run's last eval summary and writes, under
runs/<name>-compare/:

  table.md / table.parquet   per metric and algo: mean over seeds with a 95% t-interval; paired
                             per-seed differences SCOPE − GRPO and SCOPE − LUFFY with their intervals
  curves.png                 the main metrics against optimizer updates, mean over seeds per algo

Arms that already finished are not rerun (every stage skips done work), so an interrupted compare
resumes where it stopped.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

def t_central(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer df > 0, in closed form (Abramowitz & Stegun 26.7.3-4):
    with th = atan(t / sqrt(df)), odd df: (2/pi)(th + sin th (cos th + 2/3 cos^3 th + ...)), even df:
    sin th (1 + 1/2 cos^2 th + 1*3/(2*4) cos^4 th + ...), up to the cos^(df-2) th term."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:
        term, total = math.cos(theta), 0.0
        for j in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * j) / (2 * j + 1)
        return 2 / math.pi * (theta + s * total)
    term, total = 1.0, 0.0
    for j in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * j - 1) / (2 * j)
    return s * total


def t_quantile(df: int, coverage: float = 0.95) -> float:
    """The half-width multiplier of a two-sided `coverage` t-interval with df degrees of freedom (the
    (1 + coverage) / 2 quantile, 2.0423 for df = 30, 1.9799 for 120), by bisection on `t_central`;
    nan for df <= 0."""
    if df <= 0:
        return float("nan")
    low, high = 0.0, 1.0
    while t_central(high, df) < coverage:
        low, high = high, high * 2
    for _ in range(200):
        mid = (low + high) / 2
        if mid in (low, high):
            break
        low, high = (mid, high) if t_central(mid, df) < coverage else (low, mid)
    return (low + high) / 2


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high) of a 95% t-interval; with one value the interval is that value."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, mean, mean
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    half = t_quantile(n - 1) * math.sqrt(var / n)
    return mean, mean - half, mean + half


def arm_name(name: str, algo: str, seed: int) -> str:
    return f"{name}-{algo}-s{seed}"


def run_arms(name: str, algos: list[str], seeds: list[int], rounds: int, config: str | None,
             overrides: list[str], jobs: int, runs_dir: Path) -> dict[str, int]:
    """Prepare and run every arm to `rounds`, `jobs` at a time; returns exit codes by arm."""
    from scope_cli.console import make_console

    console = make_console(stderr=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SCOPE_RUNS_DIR": str(runs_dir)}
    scope = [sys.executable, "-m", "scope_cli.cli.app"]
    pending = []
    for seed in seeds:
        for algo in algos:
            run = arm_name(name, algo, seed)
            args = ["--run", run, *(["--config", config] if config else [])]
            sets = [*overrides, f"run.algo={algo}", f"run.seed={seed}"]
            args += [x for s in sets for x in ("--set", s)]
            script = (f"{' '.join(map(_q, scope))} prepare {' '.join(map(_q, args))} --quiet && "
                      f"{' '.join(map(_q, scope))} round {rounds} {' '.join(map(_q, args))} --quiet")
            pending.append((run, script))
    log_dir = runs_dir / f"{name}-compare" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    running: list[tuple[str, subprocess.Popen, float]] = []
    codes: dict[str, int] = {}
    while pending or running:
        while pending and len(running) < jobs:
            run, script = pending.pop(0)
            log = open(log_dir / f"{run}.log", "w")
            proc = subprocess.Popen(["bash", "-c", script], env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((run, proc, time.time()))
            console.print(f"compare: started {run}")
        for item in list(running):
            run, proc, start = item
            if proc.poll() is not None:
                running.remove(item)
                codes[run] = proc.returncode
                state = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {log_dir / run}.log)"
                console.print(f"compare: {run} {state} in {time.time() - start:.0f}s")
        time.sleep(0.5)
    return codes


def _q(text: str) -> str:
    import shlex

    return shlex.quote(str(text))


def read_curves(run_root: Path) -> list[dict[str, Any]]:
    """Every evaluated round of a run as rows {round, update, eval_set, metric, value}."""
    import polars as pl

    from scope_cli.cli.report import check_read

    rows = []
    for summary in sorted(run_root.glob("round-*/eval/summary.parquet")):
        round_ = int(summary.parent.parent.name[6:])
        check_read(run_root, round_)
        metrics = summary.parent.parent / "train" / "metrics.parquet"
        update = 0
        if round_ > 0 and metrics.exists():
            update = int(pl.read_parquet(metrics)["update"].max())
        elif round_ > 0:
            prev = [r for r in rows if r["round"] < round_]
            update = max((r["update"] for r in prev), default=0)
        for rec in pl.read_parquet(summary).iter_rows(named=True):
            rows.append({"round": round_, "update": update, "eval_set": rec["eval_set"],
                         "metric": rec["metric"], "value": rec["value"]})
    return rows


def summarise(name: str, algos: list[str], seeds: list[int], rounds: int, runs_dir: Path) -> list[dict[str, Any]]:
    """The table: per (eval_set, metric, algo) mean and 95% interval over seeds at round N, plus paired
    differences of SCOPE against each other algo."""
    finals: dict[tuple[str, str, str], dict[int, float]] = {}
    for algo in algos:
        for seed in seeds:
            for rec in read_curves(runs_dir / arm_name(name, algo, seed)):
                if rec["round"] == rounds:
                    finals.setdefault((rec["eval_set"], rec["metric"], algo), {})[seed] = rec["value"]
    table = []
    keys = sorted({(s, m) for s, m, _ in finals})
    for eval_set, metric in keys:
        for algo in algos:
            by_seed = finals.get((eval_set, metric, algo), {})
            mean, lo, hi = mean_ci(list(by_seed.values()))
            table.append({"eval_set": eval_set, "metric": metric, "arm": algo, "seeds": len(by_seed),
                          "mean": mean, "ci_low": lo, "ci_high": hi})
        if "scope" in algos:
            for other in (a for a in algos if a != "scope"):
                a = finals.get((eval_set, metric, "scope"), {})
                b = finals.get((eval_set, metric, other), {})
                paired = [a[s] - b[s] for s in sorted(set(a) & set(b))]
                mean, lo, hi = mean_ci(paired)
                table.append({"eval_set": eval_set, "metric": metric, "arm": f"scope-{other}",
                              "seeds": len(paired), "mean": mean, "ci_low": lo, "ci_high": hi})
    return table


COUNTS = ("prompts", "samples_per_prompt")  # the same in every arm: left out of the markdown table


def to_markdown(table: list[dict[str, Any]], arms: list[str]) -> str:
    keys = []
    for row in table:
        if row["metric"] not in COUNTS and (row["eval_set"], row["metric"]) not in keys:
            keys.append((row["eval_set"], row["metric"]))
    cell = {(r["eval_set"], r["metric"], r["arm"]): r for r in table}
    header = "| set | metric | " + " | ".join(arms) + " |"
    lines = [header, "|" + "---|" * (len(arms) + 2)]
    for eval_set, metric in keys:
        cells = []
        for arm in arms:
            r = cell.get((eval_set, metric, arm))
            if r is None or r["seeds"] == 0:
                cells.append("")
            elif r["seeds"] == 1:
                cells.append(f"{r['mean']:.3f}")
            else:
                cells.append(f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")
        lines.append(f"| {eval_set} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(name: str, algos: list[str], seeds: list[int], runs_dir: Path, out: Path,
                metrics: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[tuple[str, str, str], dict[int, list[float]]] = {}
    for algo in algos:
        for seed in seeds:
            for rec in read_curves(runs_dir / arm_name(name, algo, seed)):
                if rec["metric"] in metrics:
                    key = (rec["eval_set"], rec["metric"], algo)
                    curves.setdefault(key, {}).setdefault(rec["update"], []).append(rec["value"])
    panels = sorted({(s, m) for s, m, _ in curves})
    if not panels:
        return
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
    for ax, (eval_set, metric) in zip(axes.flat, panels):
        for algo in algos:
            points = curves.get((eval_set, metric, algo), {})
            xs = sorted(points)
            ax.plot(xs, [sum(points[x]) / len(points[x]) for x in xs], marker="o", ms=3, label=algo)
        ax.set_title(f"{eval_set}: {metric}")
        ax.set_xlabel("optimizer updates")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
