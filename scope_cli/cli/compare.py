"""`scope compare`: the miniature experiment — GRPO vs LUFFY vs SCOPE (or any arms) from the same start.

    scope compare --name mini --rounds 20 --seeds 3 [--config configs/hard.toml] [--set k=v ...]
    scope compare --algos grpo,scope,scope-split=scope,train.advantage=grpo_split ...

An arm is a `run.algo` value (`grpo`: the arm named grpo) or `name=algo` followed by its own settings
`section.key=value`: a comma-separated item whose left side has a dot is a setting of the arm before
it, any other item starts an arm. `--algos` may be repeated (each value is such a list; `;` separates
like `,`); arm settings go through the config's override path after `--config` and `--set`, and every
arm is checked before anything runs (an unknown key is one line naming the nearest).

For every (arm, seed) it creates the run `<name>-<arm>-s<seed>` (same base policy, same prompt stream:
the prompts depend on prepare.seed and the round slices on run.seed, so arms with the same seed see the
same prompts in the same order) and brings it to round N with `scope round`, running the arms as
parallel single-thread processes. Then it reads each run's last eval summary and writes, under
runs/<name>-compare/:

  table.md / table.parquet   per metric and arm: mean over seeds with a 95% t-interval; paired
                             per-seed differences `A-grpo` (A − grpo) for every arm A but grpo and
                             `scope-A` (scope − A) for every arm A but grpo and scope, where arms
                             named grpo and scope are present, with their intervals
  curves.png                 the main metrics against optimizer updates, mean over seeds per arm

Arms that already finished are not rerun (every stage skips done work), so an interrupted compare
resumes where it stopped.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scope_cli.core.config import ConfigError, key_choices, load_config
from scope_cli.errors import ScopeError

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
    if not 0 < coverage < 1:
        raise ValueError(f"t_quantile: coverage must be in (0, 1), got {coverage}")
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


# ---- arms ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arm:
    """One arm of a comparison: its name (in run names and the table), its `run.algo` and its own
    `section.key=value` settings (applied after the comparison's --config and --set)."""
    name: str
    algo: str
    settings: tuple[str, ...] = ()

    @property
    def spec(self) -> str:
        """How --algos writes it: `algo` or `name=algo`, then its settings."""
        head = self.algo if self.name == self.algo else f"{self.name}={self.algo}"
        return ",".join([head, *self.settings])


REFERENCE_ARMS = ("grpo", "scope")  # every other arm is paired against the arms with these names
_ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_OWN_KEYS = ("run.algo", "run.seed")  # compare sets these per arm and seed


def split_items(text: str) -> list[str]:
    """Split on `,` and `;` outside brackets and quotes (a setting's value may be a list `[1, 4]`)."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch in ",;" and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def parse_arms(values: list[str]) -> list[Arm]:
    """Arms from `--algos` values: `grpo,luffy,scope` or `grpo,scope-split=scope,train.advantage=grpo_split`
    (an item `section.key=value` is a setting of the arm before it, in the same value)."""
    arms: list[Arm] = []
    for value in values:
        current: Arm | None = None
        for item in split_items(value):
            left, eq, right = item.partition("=")
            left, right = left.strip(), right.strip()
            if eq and "." in left:
                if current is None:
                    raise ScopeError(f"--algos {value!r}: setting {item!r} comes before any arm "
                                     "(write name=algo,section.key=value)")
                if left in _OWN_KEYS:
                    raise ScopeError(f"--algos arm '{current.name}': {left} is set by compare "
                                     f"({'give the algorithm as name=algo' if left == 'run.algo' else 'use --seeds'})")
                current = Arm(current.name, current.algo, (*current.settings, f"{left}={right}"))
                arms[-1] = current
                continue
            name, algo = (left, right) if eq else (left, left)
            if not _ARM_NAME.match(name):
                raise ScopeError(f"--algos: arm name {name!r} must be letters, digits, _ or - "
                                 "(a setting is section.key=value)")
            if any(a.name == name for a in arms):
                raise ScopeError(f"--algos: arm '{name}' given twice")
            current = Arm(name, algo)
            arms.append(current)
    if not arms:
        raise ScopeError("--algos: no arm given (e.g. --algos grpo,luffy,scope)")
    return arms


def check_arms(arms: list[Arm], config: str | None, overrides: list[str]) -> None:
    """Every arm's algorithm is a `run.algo` value and its config (--config < --set < its settings)
    loads and validates; one line naming the arm otherwise."""
    algos = key_choices("run.algo")
    for arm in arms:
        if arm.algo not in algos:
            close = difflib.get_close_matches(arm.algo, algos, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ScopeError(f"--algos arm '{arm.name}': unknown algorithm '{arm.algo}' "
                             f"(run.algo is one of {', '.join(algos)}){hint}")
        try:
            load_config(config, [*overrides, *arm.settings, f"run.algo={arm.algo}"])
        except ConfigError as exc:
            raise ScopeError(f"--algos arm '{arm.name}': {exc}") from None


def paired_columns(names: list[str]) -> list[tuple[str, str]]:
    """(a, b) for the paired differences a − b: every arm against grpo (A − grpo), then scope against
    every other arm (scope − A), for the reference arms that are present."""
    pairs = [(a, "grpo") for a in names if a != "grpo" and "grpo" in names]
    pairs += [("scope", a) for a in names if a not in REFERENCE_ARMS and "scope" in names]
    return pairs


def arm_name(name: str, arm: str, seed: int) -> str:
    return f"{name}-{arm}-s{seed}"


def run_arms(name: str, arms: list[Arm], seeds: list[int], rounds: int, config: str | None,
             overrides: list[str], jobs: int, runs_dir: Path, log_dir: Path | None = None) -> dict[str, int]:
    """Prepare and run every arm to `rounds`, `jobs` at a time (logs in `log_dir`, by default
    <runs_dir>/<name>-compare/logs); returns exit codes by arm."""
    from scope_cli.console import make_console

    console = make_console(stderr=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SCOPE_RUNS_DIR": str(runs_dir)}
    scope = [sys.executable, "-m", "scope_cli.cli.app"]
    pending = []
    for seed in seeds:
        for arm in arms:
            run = arm_name(name, arm.name, seed)
            args = ["--run", run, *(["--config", config] if config else [])]
            sets = [*overrides, *arm.settings, f"run.algo={arm.algo}", f"run.seed={seed}"]
            args += [x for s in sets for x in ("--set", s)]
            script = (f"{' '.join(map(_q, scope))} prepare {' '.join(map(_q, args))} --quiet && "
                      f"{' '.join(map(_q, scope))} round {rounds} {' '.join(map(_q, args))} --quiet")
            pending.append((run, script))
    log_dir = log_dir or runs_dir / f"{name}-compare" / "logs"
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


TRAINING_FOLDERS = ("rollouts", "verified", "scored", "located", "rectified", "train")


def run_compute(run_root: Path, rounds: int) -> dict[str, float]:
    """What a run spent on rounds 1..N, from its stage manifests: rollouts generated, guide-written
    rows that joined (rectified, reference, guided), tokens trained, optimizer updates, and the wall
    and CPU seconds of the training stages (eval left out: every arm evaluates alike). CPU seconds
    only where every manifest records them (runs made before they were recorded: wall only); {} for
    a run without manifests."""
    from scope_cli.core.manifests import read_manifest

    out = {"rollouts": 0.0, "guide_rows": 0.0, "tokens_trained": 0.0, "updates": 0.0,
           "wall_seconds": 0.0, "cpu_seconds": 0.0}
    cpu_everywhere, found = True, False
    for r in range(1, rounds + 1):
        for folder in TRAINING_FOLDERS:
            for path in sorted((run_root / f"round-{r:03d}" / folder / "_manifest").glob("shard-*.json")):
                m, _ = read_manifest(path)
                if m is None:
                    continue
                found = True
                s = m.get("summary") or {}
                out["rollouts"] += (m.get("rows") or 0) if folder == "rollouts" else 0
                out["guide_rows"] += sum(s.get(k, 0) for k in ("rectified", "reference", "guided")) \
                    if folder == "rectified" else 0
                if folder == "train":
                    out["tokens_trained"] += s.get("tokens", 0)
                    out["updates"] += s.get("updates", 0)
                out["wall_seconds"] += m.get("seconds") or 0.0
                cpu_everywhere &= m.get("cpu_seconds") is not None
                out["cpu_seconds"] += m.get("cpu_seconds") or 0.0
    if not cpu_everywhere:
        del out["cpu_seconds"]
    return out if found else {}


def summarise(name: str, arms: list[str], seeds: list[int], rounds: int, runs_dir: Path) -> list[dict[str, Any]]:
    """The table: per (eval_set, metric, arm) mean and 95% interval over seeds at round N (`arms`: the
    arm names), plus the paired differences of `paired_columns` (arm `a-b`, over the seeds both have).
    The set "compute" holds what each arm spent on its rounds (`run_compute`)."""
    finals: dict[tuple[str, str, str], dict[int, float]] = {}
    for arm in arms:
        for seed in seeds:
            root = runs_dir / arm_name(name, arm, seed)
            for rec in read_curves(root):
                if rec["round"] == rounds:
                    finals.setdefault((rec["eval_set"], rec["metric"], arm), {})[seed] = rec["value"]
            for metric, value in run_compute(root, rounds).items():
                finals.setdefault(("compute", metric, arm), {})[seed] = value
    return summary_rows(finals, arms)


def summary_rows(finals: dict[tuple[str, str, str], dict[int, float]], arms: list[str]) -> list[dict[str, Any]]:
    """Table rows from values by (eval_set, metric, arm) and seed: each arm's mean and 95% interval
    over its seeds, then the paired differences of `paired_columns` over the seeds both arms have."""
    table = []
    keys = sorted({(s, m) for s, m, _ in finals})
    for eval_set, metric in keys:
        for arm in arms:
            by_seed = finals.get((eval_set, metric, arm), {})
            mean, lo, hi = mean_ci(list(by_seed.values()))
            table.append({"eval_set": eval_set, "metric": metric, "arm": arm, "seeds": len(by_seed),
                          "mean": mean, "ci_low": lo, "ci_high": hi})
        for first, second in paired_columns(arms):
            a = finals.get((eval_set, metric, first), {})
            b = finals.get((eval_set, metric, second), {})
            paired = [a[s] - b[s] for s in sorted(set(a) & set(b))]
            mean, lo, hi = mean_ci(paired)
            table.append({"eval_set": eval_set, "metric": metric, "arm": f"{first}-{second}",
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
            else:
                f = "{:,.0f}" if eval_set == "compute" else "{:.3f}"  # counts and seconds: whole numbers
                mean, low, high = (f.format(r[k]) for k in ("mean", "ci_low", "ci_high"))
                cells.append(mean if r["seeds"] == 1 else f"{mean} [{low}, {high}]")
        lines.append(f"| {eval_set} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(name: str, arms: list[str], seeds: list[int], runs_dir: Path, out: Path,
                metrics: tuple[str, ...]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[tuple[str, str, str], dict[int, list[float]]] = {}
    for arm in arms:
        for seed in seeds:
            for rec in read_curves(runs_dir / arm_name(name, arm, seed)):
                if rec["metric"] in metrics:
                    key = (rec["eval_set"], rec["metric"], arm)
                    curves.setdefault(key, {}).setdefault(rec["update"], []).append(rec["value"])
    panels = sorted({(s, m) for s, m, _ in curves})
    if not panels:
        return
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
    for ax, (eval_set, metric) in zip(axes.flat, panels):
        for arm in arms:
            points = curves.get((eval_set, metric, arm), {})
            xs = sorted(points)
            ax.plot(xs, [sum(points[x]) / len(points[x]) for x in xs], marker="o", ms=3, label=arm)
        ax.set_title(f"{eval_set}: {metric}")
        ax.set_xlabel("optimizer updates")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
