"""`scope report RUN [RUN ...] [--out DIR] [--title T]`: one figure and one markdown table comparing runs.

    scope report grpo scope luffy                 # -> reports/grpo-vs-scope-vs-luffy/
    scope report grpo scope --out paper/fig3 --title "GRPO vs SCOPE, arith"

Reads each run's round-R/eval/summary.parquet (written by `scope eval`), round-R/eval/training.parquet
(or the round's stage tables) and round-R/train/metrics.parquet, and writes to DIR (default
reports/<run>-vs-<run>/ in the current folder: never inside the runs folder, where it would look
like a run):

- report.png (200 dpi) and report.pdf (vector): one row per metric family, one panel per metric,
  one colour per run (legend on top), against optimizer updates (integer ticks; round R sits at the
  last update of its train-step, round 0, the base policy, at update 0): accuracy (greedy, else
  avg@1) on each eval set; pass@k for each k on the first set; diversity on the first set (distinct
  correct solutions, distinct-2, and where the evals have them distinct-2 of correct samples and the
  strategy entropy) and the policy's entropy during train-step. Fractions are drawn on
  the full, shared 0-1 axis, so equal changes look equal; entropy has its own axis.
- report.md: the same numbers as a table, one row per run and evaluated round (also printed).

A run without any eval summary is skipped and named (in the output and report.md); with none left
the command fails. Nothing here writes into the runs; PNG and PDF carry no timestamps.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scope_cli.errors import ScopeError


class ReportError(ScopeError):
    """Nothing to report: one line naming the run folder and what is missing."""


class NoEvalError(ReportError):
    """A run without an eval summary: skipped when other runs have one."""


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
    from scope_cli.core.manifests import run_command, vouched

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

    from scope_cli.core.runs import training_metrics
    from scope_cli.core.runs import Run, run_command

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
        raise NoEvalError(f"{root}: no round-*/eval/summary.parquet (run `{run_command(root, 'eval --round 0')}` "
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
    wanted += ["distinct_correct_norm", "distinct-2", "distinct-2[correct]", "strategy_entropy[all]"]
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
@dataclass
class Panel:
    """One axes of the figure: a metric of one eval set (or the train-step entropy, eval_set None)."""

    family: str  # the figure row: accuracy | pass@k | diversity
    title: str
    ylabel: str
    metric: str
    eval_set: str | None
    unit: bool  # a fraction in [0, 1]: drawn on the full 0-1 axis, shared with the other fractions


def panels(runs: list[RunData]) -> list[Panel]:
    """The figure's panels, one per metric: accuracy per eval set, pass@k per k and diversity on the
    first set, and the policy's entropy during train-step."""
    sets = list(dict.fromkeys(s for r in runs for s in r.sets))
    first = sets[0]
    present = {m for r in runs for (_, s, m) in r.summary if s == first}
    greedy = any(m == "greedy_acc" for r in runs for (_, _, m) in r.summary)
    acc = "greedy_acc" if greedy else "avg@1"
    out = [Panel("accuracy", f"{s}: {'greedy' if greedy else 'avg@1'} accuracy", "accuracy", acc, s, True)
           for s in sets]
    ks = sorted(int(m[5:]) for m in present if m.startswith("pass@"))
    out += [Panel("pass@k", f"{first}: pass@{k}", f"pass@{k}", f"pass@{k}", first, True) for k in ks]
    if "distinct_correct_norm" in present:
        out.append(Panel("diversity", f"{first}: distinct correct solutions",
                         "(distinct − 1) / (correct − 1)", "distinct_correct_norm", first, True))
    if "distinct-2" in present:
        out.append(Panel("diversity", f"{first}: distinct-2", "distinct bigrams / bigrams",
                         "distinct-2", first, True))
    if "distinct-2[correct]" in present:  # measures where failures err cannot move (metrics.py)
        out.append(Panel("diversity", f"{first}: distinct-2 of correct samples",
                         "distinct bigrams / bigrams", "distinct-2[correct]", first, True))
    if "strategy_entropy[all]" in present:
        out.append(Panel("diversity", f"{first}: strategy entropy", "bits (order of terms)",
                         "strategy_entropy[all]", first, False))
    if any(r.entropy for r in runs):
        out.append(Panel("diversity", "policy entropy (train-step)", "entropy (nats / token)",
                         "entropy", None, False))
    return out


def figure(runs: list[RunData], title: str | None = None) -> Any:
    """The report figure: one row per metric family (accuracy, pass@k, diversity), one panel per
    metric, one colour per run; fractions share the 0-1 axis; x is optimizer updates (integers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    chosen = panels(runs)
    families = list(dict.fromkeys(p.family for p in chosen))
    rows = [[p for p in chosen if p.family == f] for f in families]
    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(4.2 * cols, 3.3 * len(rows) + 0.8),
                             squeeze=False, constrained_layout=True)
    colours = plt.get_cmap("tab10").colors
    for row, row_axes in zip(rows, axes):
        for ax in row_axes[len(row):]:
            ax.set_visible(False)
        for panel, ax in zip(row, row_axes):
            for i, run in enumerate(runs):
                if panel.eval_set is None:
                    xs, ys = [u for u, _ in run.entropy], [e for _, e in run.entropy]
                    ax.plot(xs, ys, color=colours[i % 10], lw=1.5)
                else:
                    xs, ys = _series(run, panel.eval_set, panel.metric)
                    ax.plot(xs, ys, color=colours[i % 10], lw=1.8, marker="o", ms=4)
            ax.set_title(panel.title, fontsize=10)
            ax.set_xlabel("optimizer updates")
            ax.set_ylabel(panel.ylabel)
            if panel.unit:
                ax.set_ylim(-0.02, 1.02)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
    updates = [u for r in runs for u in r.updates.values()] + [u for r in runs for u, _ in r.entropy]
    for ax in axes.flat:  # one x range for every panel, so a column of points lines up
        ax.set_xlim(min(updates) - 0.5, max(updates) + 0.5)
    handles = [plt.Line2D([], [], color=colours[i % 10], lw=2, marker="o", label=run.name)
               for i, run in enumerate(runs)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(runs), 6), frameon=False)
    fig.suptitle(title or "scope report: " + ", ".join(r.name for r in runs))
    return fig


def _series(run: RunData, eval_set: str, metric: str) -> tuple[list[int], list[float]]:
    points = [(run.updates[r], v) for r in run.rounds
              if r in run.updates and (v := run.value(r, eval_set, metric)) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def figure_files(runs: list[RunData], title: str | None = None) -> dict[str, bytes]:
    """The figure as PNG (200 dpi) and PDF bytes, without timestamps (same runs, same bytes)."""
    import matplotlib.pyplot as plt

    fig = figure(runs, title)
    out = {}
    for fmt, metadata in (("png", {"Software": None}), ("pdf", {"CreationDate": None, "Producer": None})):
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=200, metadata=metadata)
        out[fmt] = buf.getvalue()
    plt.close(fig)
    return out


# ---- the command -------------------------------------------------------------------------------------
def default_out_dir(run_roots: list[Path]) -> Path:
    """reports/<run>-vs-<run>/ in the current folder: outside the runs folder, one per comparison."""
    return Path("reports") / "-vs-".join(Path(r).name for r in run_roots)


def report(run_roots: list[Path], out_dir: Path | None = None, title: str | None = None) -> dict[str, Any]:
    """Write report.png, report.pdf and report.md for the runs; a run without an eval summary is
    skipped and named in "skipped" (and in report.md). Returns the paths, the table and the skips."""
    if not run_roots:
        raise ReportError("no runs given (scope report RUN [RUN ...])")
    runs, skipped = [], []
    for root in run_roots:
        try:
            runs.append(load_run(Path(root)))
        except NoEvalError as exc:
            skipped.append(str(exc))
    if not runs:
        raise ReportError("; ".join(skipped))
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # same folder name under different parents: use the paths
        for r in runs:
            r.name = str(r.root)
    header, rows = table_rows(runs)
    text = markdown(header, rows)
    from scope_cli.core.files import write_bytes_atomic

    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(run_roots)
    files = figure_files(runs, title)
    paths = {fmt: out_dir / f"report.{fmt}" for fmt in files}
    for fmt, data in files.items():
        write_bytes_atomic(data, paths[fmt])
    md = out_dir / "report.md"
    notes = "".join(f"\nSkipped: {s}\n" for s in skipped)
    write_bytes_atomic(f"# scope report\n\n![report](report.png)\n\n{text}{notes}".encode(), md)
    return {"png": paths["png"], "pdf": paths["pdf"], "markdown": md, "table": text, "skipped": skipped}
