"""`scope report`: a PNG and a markdown table from two hand-built runs, plotted against updates."""

import pyarrow as pa
import pytest

from scope_cli.metrics import summary_table
from scope_cli.cli.report import ReportError, load_run, report
from scope_cli.core.runs import Run
from scope_cli.schema import TRAIN_METRICS, conform
from scope_cli.core.files import write_parquet_atomic


def fake_run(root, accs, updates_per_round, entropy0, extra=None):
    """A run with rounds 0..len(accs)-1 evaluated and train metrics for rounds >= 1 (`extra`: more
    held-out metrics)."""
    run = Run.open(root, create=True)
    for round_, acc in enumerate(accs):
        metrics = {"greedy_acc": acc, "avg@1": acc / 2, "pass@1": acc / 2, "pass@8": min(1.0, acc * 2),
                   "maj@8": acc, "distinct_correct_norm": 0.1 * round_, "distinct-2": 0.5, **(extra or {})}
        tables = [summary_table(round_, f"policy-{round_:03d}", "heldout", metrics),
                  summary_table(round_, f"policy-{round_:03d}", "ood", {"greedy_acc": acc / 4})]
        write_parquet_atomic(pa.concat_tables(tables), run.eval_dir(round_) / "summary.parquet")
        if round_ == 0:
            continue
        first = (round_ - 1) * updates_per_round
        rows = [{"round": round_, "update": first + u + 1, "epoch": 0, "minibatch": u, "loss": 0.0,
                 "lr": 1e-3, "entropy": entropy0 - 0.01 * (first + u), "mean_ratio": 1.0,
                 "clip_fraction": 0.0, "dropped_groups": 0} for u in range(updates_per_round)]
        write_parquet_atomic(conform(pa.Table.from_pylist(rows), TRAIN_METRICS),
                             run.train_dir(round_) / "metrics.parquet")
    return root


def test_report_writes_png_and_markdown(tmp_path, capsys):
    a = fake_run(tmp_path / "runs" / "grpo", [0.2, 0.3, 0.4], updates_per_round=4, entropy0=1.5)
    b = fake_run(tmp_path / "runs" / "scope", [0.2, 0.5], updates_per_round=2, entropy0=1.4)

    data = load_run(a)
    assert data.updates == {0: 0, 1: 4, 2: 8}  # round R at its last update
    assert data.sets == ["heldout", "ood"]
    assert data.training[(2, "entropy")] == pytest.approx(1.5 - 0.01 * 5.5)  # mean of updates 5..8
    assert len(data.entropy) == 8

    out = report([a, b], tmp_path / "out")
    png = out["png"].read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert out["pdf"].read_bytes().startswith(b"%PDF")
    md = out["markdown"].read_text()
    assert "![report](report.png)" in md
    lines = out["table"].splitlines()
    assert lines[0].split(" | ")[:5] == ["| run", "round", "update", "heldout acc", "ood acc"]
    assert "heldout pass@8" in lines[0] and "heldout maj@8" in lines[0]
    assert len(lines) == 2 + 3 + 2  # header, rule, 3 rounds of grpo, 2 of scope
    assert lines[2].startswith("| grpo | 0 | 0 | 0.200 | 0.050 |")
    assert lines[4].startswith("| grpo | 2 | 8 | 0.400 | 0.100 | 0.200 | 0.800 |")
    assert lines[6].startswith("| scope | 1 | 2 | 0.500 |")


def test_report_needs_an_evaluated_run_and_skips_one_without(tmp_path):
    Run.open(tmp_path / "empty", create=True)
    with pytest.raises(ReportError, match="summary.parquet"):
        report([tmp_path / "empty"], tmp_path / "out")
    a = fake_run(tmp_path / "grpo", [0.2, 0.3], updates_per_round=4, entropy0=1.5)
    out = report([a, tmp_path / "empty"], tmp_path / "out")
    assert out["skipped"] == [f"{tmp_path / 'empty'}: no round-*/eval/summary.parquet (run "
                              f"`scope eval --round 0 --run {tmp_path / 'empty'}` first)"]
    assert "Skipped: " in out["markdown"].read_text() and "| empty |" not in out["table"]


def test_figure_for_a_paper(tmp_path):
    """One panel per metric, one colour per run, labelled axes, fractions on one 0-1 axis, integer
    update ticks, a title, PNG at 200 dpi and a PDF, the same bytes twice."""
    import io

    from PIL import Image

    from scope_cli.cli.report import figure, figure_files, panels

    runs = [load_run(fake_run(tmp_path / "grpo", [0.2, 0.3, 0.4], 4, 1.5)),
            load_run(fake_run(tmp_path / "scope", [0.2, 0.5], 2, 1.4))]
    chosen = panels(runs)
    assert [(p.family, p.title) for p in chosen] == [
        ("accuracy", "heldout: greedy accuracy"), ("accuracy", "ood: greedy accuracy"),
        ("pass@k", "heldout: pass@1"), ("pass@k", "heldout: pass@8"),
        ("diversity", "heldout: distinct correct solutions"), ("diversity", "heldout: distinct-2"),
        ("diversity", "policy entropy (train-step)")]
    fig = figure(runs, "GRPO vs SCOPE")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == len(chosen) and fig.get_suptitle() == "GRPO vs SCOPE"
    fig.canvas.draw()
    for ax, panel in zip(axes, chosen):
        assert ax.get_ylabel() == panel.ylabel and ax.get_xlabel() == "optimizer updates"
        colours = [line.get_color() for line in ax.get_lines()]
        assert len(colours) == 2 and colours[0] != colours[1]  # one colour per run
        if panel.unit:
            assert ax.get_ylim() == (-0.02, 1.02)
        assert all(float(t).is_integer() for t in ax.get_xticks())
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["grpo", "scope"]
    files = figure_files(runs)
    assert files == figure_files(runs)  # no timestamps
    image = Image.open(io.BytesIO(files["png"]))
    assert round(image.info["dpi"][0]) == 200 and files["pdf"].startswith(b"%PDF")


def test_default_output_is_outside_the_runs(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from scope_cli.cli.app import app

    monkeypatch.setenv("SCOPE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    fake_run(tmp_path / "runs" / "grpo", [0.2, 0.3], updates_per_round=4, entropy0=1.5)
    fake_run(tmp_path / "runs" / "scope", [0.2, 0.4], updates_per_round=4, entropy0=1.5)
    Run.open(tmp_path / "runs" / "fresh", create=True)
    result = CliRunner().invoke(app, ["report", "grpo", "scope", "fresh"])
    assert result.exit_code == 0, result.output
    assert f"skipped {tmp_path / 'runs' / 'fresh'}: no round-*/eval/summary.parquet" in result.output
    folder = tmp_path / "reports" / "grpo-vs-scope-vs-fresh"
    assert sorted(p.name for p in folder.iterdir()) == ["report.md", "report.pdf", "report.png"]
    assert not (tmp_path / "runs" / "reports").exists()


def test_report_command(tmp_path):
    from typer.testing import CliRunner

    from scope_cli.cli.app import app

    a = fake_run(tmp_path / "grpo", [0.2, 0.3], updates_per_round=4, entropy0=1.5)
    result = CliRunner().invoke(app, ["report", str(a), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "| grpo | 1 | 4 | 0.300 |" in result.output
    assert (tmp_path / "out" / "report.png").exists() and (tmp_path / "out" / "report.md").exists()
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no run here" in missing.output


def test_the_diversity_measures_failures_cannot_move_get_panels(tmp_path):
    """Evals with distinct-2[correct] and strategy_entropy[all] (scope_cli/metrics.py) add a panel each
    and a table column; the entropy in bits is not drawn on the 0-1 axis."""
    from scope_cli.cli.report import panels, table_rows

    extra = {"distinct-2[correct]": 0.6, "strategy_entropy[all]": 1.4}
    runs = [load_run(fake_run(tmp_path / "grpo", [0.2, 0.3], 4, 1.5, extra))]
    chosen = {p.metric: p for p in panels(runs) if p.family == "diversity"}
    assert list(chosen) == ["distinct_correct_norm", "distinct-2", "distinct-2[correct]", "strategy_entropy[all]",
                            "entropy"]
    assert chosen["distinct-2[correct]"].unit and not chosen["strategy_entropy[all]"].unit
    header, rows = table_rows(runs)
    assert header[-4:] == ["heldout distinct-2[correct]", "heldout strategy_entropy[all]", "entropy", "rollout acc"]
    assert rows[1][-4:-2] == ["0.600", "1.400"]
