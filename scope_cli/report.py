"""`scope report RUN [RUN ...] [--out DIR]`: one figure and one markdown table comparing runs.

    scope report grpo scope luffy --out reports/arith

Reads each run's round-R/eval/summary.parquet (written by `scope eval`), round-R/eval/training.parquet
(or the round's stage tables) and round-R/train/metrics.parquet, and writes to DIR:

- report.png: accuracy, pass@k, diversity and policy entropy against optimizer updates (round R sits
  at the last update of its train-step; round 0, the base policy, at update 0), one colour per run;
- report.md: the same numbers as a table, one row per run and evaluated round (also printed).

Accuracy is greedy accuracy on every eval set (one line style per set); pass@k and diversity are on
the first eval set. Nothing here writes into the runs.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scope_cli.errors import ScopeError

LINESTYLES = ("-", "--", ":", "-.")


class ReportError(ScopeError):
    """Nothing to report: one line naming the run folder and what is missing."""


@dataclass
class RunData:
    """One run's numbers: summary[(round, eval_set, metric)], training[(round, metric)], entropy per
    update, and the update each round ends at."""

    name: str
    root: Path
    sets: list[str] = field(default_factory=list)
    updates: dict[int, int] = field(default_factory=dict)
    summary: dict[tuple[int, str, str], float] = field(default_factory=dict)
    training: dict[tuple[int, str], float] = field(default_factory=dict)
    entropy: list[tuple[int, float]] = field(default_factory=list)

    @property
    def rounds(self) -> list[int]:
        return sorted({r for r, _, _ in self.summary})

    def value(self, round_: int, eval_set: str, metric: str) -> float | None:
        return self.summary.get((round_, eval_set, metric))


# ---- reading -------------------------------------------------------------------------------------
def check_read(root: Path, round_: int) -> None:
    """Round R's train metrics, eval summary and training table, where present, are what their
    manifests record (a damaged one is named with the command that recomputes it)."""
    from scope_cli.manifests import run_command, vouched

    train, evald = Path(root) / f"round-{round_:03d}" / "train", Path(root) / f"round-{round_:03d}" / "eval"
    for path, man, repair in (
            (train / "metrics.parquet", train / "_manifest" / "shard-00000.json",
             run_command(root, f"train-step --round {round_}")),
            *((evald / name, evald / "_manifest" / "summary.json", run_command(root, f"eval --round {round_}"))
              for name in ("summary.parquet", "training.parquet"))):
        if path.exists() and (why := vouched(path, man, Path(root), repair)) is not None:
            raise ReportError(why)


def load_run(root: Path) -> RunData:
    """Read what `scope eval` and train-step wrote into a run folder."""
    import polars as pl

    from scope_cli.metrics import training_metrics
    from scope_cli.runs import Run, run_command

    root = Path(root)
    run = Run.open(root)
    data = RunData(name=root.name, root=root)
    for round_ in sorted({0, *run.rounds()}):
        check_read(root, round_)
        metrics_file = run.train_dir(round_) / "metrics.parquet"
        if metrics_file.exists():
            train = pl.read_parquet(metrics_file)
            if train.height:
                data.updates[round_] = int(train["update"].max())
                if "entropy" in train.columns:
                    data.entropy.extend((int(u), float(e)) for u, e in
                                        zip(train["update"], train["entropy"]) if e is not None)
        elif round_ == 0:
            data.updates[0] = 0
        summary_file = run.eval_dir(round_) / "summary.parquet"
        if summary_file.exists():
            for row in pl.read_parquet(summary_file).iter_rows(named=True):
                data.summary[(round_, row["eval_set"], row["metric"])] = row["value"]
                if row["eval_set"] not in data.sets:
                    data.sets.append(row["eval_set"])
        training_file = run.eval_dir(round_) / "training.parquet"
        if training_file.exists():
            rows = pl.read_parquet(training_file).iter_rows(named=True)
            data.training.update({(round_, r["metric"]): r["value"] for r in rows})
        elif round_ > 0:
            data.training.update({(round_, k): v for k, v in training_metrics(run, round_).items()})
    if not data.summary:
        raise ReportError(f"{root}: no round-*/eval/summary.parquet (run `{run_command(root, 'eval --round 0')}` "
                          "first)")
    data.entropy.sort()
    return data


# ---- the table -------------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3f}"


def table_rows(runs: list[RunData]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the markdown table: one row per run and evaluated round."""
    sets = list(dict.fromkeys(s for r in runs for s in r.sets))
    first = sets[0]
    present = {m for r in runs for (_, s, m) in r.summary if s == first}
    ks = sorted(int(m[5:]) for m in present if m.startswith("pass@"))
    header = ["run", "round", "update"] + [f"{s} acc" for s in sets]
    wanted = [f"pass@{k}" for k in ks] + [f"maj@{k}" for k in ks[-1:]]
    wanted += ["distinct_correct_norm", "distinct-2"]
    columns = [m for m in wanted if m in present]
    header += [f"{first} {c}" for c in columns] + ["entropy", "rollout acc"]
    rows = []
    for run in runs:
        for round_ in run.rounds:
            update = run.updates.get(round_)
            row = [run.name, str(round_), "–" if update is None else str(update)]
            row += [_fmt(_accuracy(run, round_, s)) for s in sets]
            row += [_fmt(run.value(round_, first, c)) for c in columns]
            row += [_fmt(run.training.get((round_, "entropy"))),
                    _fmt(run.training.get((round_, "rollout_acc")))]
            rows.append(row)
    return header, rows


def _accuracy(run: RunData, round_: int, eval_set: str) -> float | None:
    greedy = run.value(round_, eval_set, "greedy_acc")
    return greedy if greedy is not None else run.value(round_, eval_set, "avg@1")


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ---- the figure --------------------------------------------------------------------------------------
def _series(run: RunData, eval_set: str, metric: str) -> tuple[list[int], list[float]]:
    points = [(run.updates[r], v) for r in run.rounds
              if r in run.updates and (v := run.value(r, eval_set, metric)) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def figure_png(runs: list[RunData]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(s for r in runs for s in r.sets))
    first = sets[0]
    present = {m for r in runs for (_, s, m) in r.summary if s == first}
    ks = sorted(int(m[5:]) for m in present if m.startswith("pass@"))
    greedy = any(m == "greedy_acc" for m in present)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]
        for j, eval_set in enumerate(sets):
            xs, ys = _series(run, eval_set, "greedy_acc" if greedy else "avg@1")
            axes[0, 0].plot(xs, ys, LINESTYLES[j % 4], marker="o", color=colour,
                            label=f"{run.name} {eval_set}")
        for j, k in enumerate(ks):
            xs, ys = _series(run, first, f"pass@{k}")
            axes[0, 1].plot(xs, ys, LINESTYLES[j % 4], marker="o", color=colour, label=f"{run.name} pass@{k}")
        for j, metric in enumerate(("distinct_correct_norm", "distinct-2")):
            xs, ys = _series(run, first, metric)
            axes[1, 0].plot(xs, ys, LINESTYLES[j % 4], marker="o", color=colour, label=f"{run.name} {metric}")
        if run.entropy:
            axes[1, 1].plot([u for u, _ in run.entropy], [e for _, e in run.entropy], color=colour,
                            label=run.name)
    titles = [f"{'greedy' if greedy else 'avg@1'} accuracy", f"pass@k ({first})",
              f"diversity of correct solutions ({first})", "policy entropy (train-step)"]
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title)
        ax.set_xlabel("optimizer updates")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


# ---- the command -------------------------------------------------------------------------------------
def _write_atomic(data: bytes, path: Path) -> None:
    from scope_cli.tempfiles import honour_umask

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        honour_umask(Path(tmp))
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def report(run_roots: list[Path], out_dir: Path) -> dict[str, Any]:
    """Write report.png and report.md for the runs; returns their paths and the markdown text."""
    if not run_roots:
        raise ReportError("no runs given (scope report RUN [RUN ...])")
    runs = [load_run(Path(r)) for r in run_roots]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # same folder name under different parents: use the paths
        for r in runs:
            r.name = str(r.root)
    header, rows = table_rows(runs)
    text = markdown(header, rows)
    out_dir = Path(out_dir)
    png, md = out_dir / "report.png", out_dir / "report.md"
    _write_atomic(figure_png(runs), png)
    _write_atomic(f"# scope report\n\n![report](report.png)\n\n{text}".encode(), md)
    return {"png": png, "markdown": md, "table": text}
