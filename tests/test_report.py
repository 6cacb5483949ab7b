"""`scope report`: a PNG and a markdown table from two hand-built runs, plotted against updates."""

import pyarrow as pa
import pytest

from scope_cli.metrics import summary_table
from scope_cli.report import ReportError, load_run, report
from scope_cli.runs import Run
from scope_cli.schema import TRAIN_METRICS, conform
from scope_cli.shards import write_parquet_atomic


def fake_run(root, accs, updates_per_round, entropy0):
    """A run with rounds 0..len(accs)-1 evaluated and train metrics for rounds >= 1."""
    run = Run.open(root, create=True)
    for round_, acc in enumerate(accs):
        metrics = {"greedy_acc": acc, "avg@1": acc / 2, "pass@1": acc / 2, "pass@8": min(1.0, acc * 2),
                   "maj@8": acc, "distinct_correct_norm": 0.1 * round_, "distinct-2": 0.5}
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
    md = out["markdown"].read_text()
    assert "![report](report.png)" in md
    lines = out["table"].splitlines()
    assert lines[0].split(" | ")[:5] == ["| run", "round", "update", "heldout acc", "ood acc"]
    assert "heldout pass@8" in lines[0] and "heldout maj@8" in lines[0]
    assert len(lines) == 2 + 3 + 2  # header, rule, 3 rounds of grpo, 2 of scope
    assert lines[2].startswith("| grpo | 0 | 0 | 0.200 | 0.050 |")
    assert lines[4].startswith("| grpo | 2 | 8 | 0.400 | 0.100 | 0.200 | 0.800 |")
    assert lines[6].startswith("| scope | 1 | 2 | 0.500 |")


def test_report_needs_an_evaluated_run(tmp_path):
    Run.open(tmp_path / "empty", create=True)
    with pytest.raises(ReportError, match="summary.parquet"):
        report([tmp_path / "empty"], tmp_path / "out")


def test_report_command(tmp_path):
    from typer.testing import CliRunner

    from scope_cli.app import app

    a = fake_run(tmp_path / "grpo", [0.2, 0.3], updates_per_round=4, entropy0=1.5)
    result = CliRunner().invoke(app, ["report", str(a), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "| grpo | 1 | 4 | 0.300 |" in result.output
    assert (tmp_path / "out" / "report.png").exists() and (tmp_path / "out" / "report.md").exists()
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no run here" in missing.output
