import math

import pyarrow.parquet as pq
import pytest

from typer.testing import CliRunner

from scope_cli.cli.app import app
from scope_cli.cli.compare import (
    Arm, check_arms, mean_ci, paired_columns, parse_arms, split_items, summarise, t_central, t_quantile,
    to_markdown,
)
from scope_cli.errors import ScopeError
from scope_cli.metrics import summary_table


@pytest.mark.parametrize("df, quantile", [
    # the 0.975 quantiles of Student's t (published tables, 9 digits)
    (1, 12.706204736), (2, 4.302652730), (3, 3.182446305), (5, 2.570581836), (10, 2.228138852),
    (11, 2.200985160), (30, 2.042272456), (40, 2.021075390), (60, 2.000297822), (120, 1.979930405),
])
def test_t_quantile_is_exact(df, quantile):
    # bisection to double precision on a closed-form CDF: the error is the table's rounding
    assert t_quantile(df) == pytest.approx(quantile, abs=1e-6)
    assert t_central(quantile, df) == pytest.approx(0.95, abs=1e-8)


def test_t_quantile_edges():
    assert math.isnan(t_quantile(0))
    assert t_central(0.0, 7) == 0.0
    assert t_central(1.0, 1) == pytest.approx(0.5)  # Cauchy: P(|T| < 1) = 2 atan(1) / pi
    assert t_central(2.0, 2) == pytest.approx(2 / math.sqrt(6))  # df 2: t / sqrt(2 + t^2)
    assert t_quantile(1, coverage=0.5) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        t_quantile(5, coverage=1.0)
    assert 1.959964 < t_quantile(100000) < t_quantile(1000) < 1.9624  # towards the normal 1.959964


def test_mean_ci_hand_computed():
    # values 1, 2, 3: mean 2, sd 1, se 1/sqrt(3), t(2) = 4.302653 -> half width 2.484138
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert lo == pytest.approx(2 - 4.302652730 / 3 ** 0.5, abs=1e-6)
    assert hi == pytest.approx(2 + 4.302652730 / 3 ** 0.5, abs=1e-6)
    assert mean_ci([0.5]) == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("values, arms", [
    (["grpo,luffy,scope"], [Arm("grpo", "grpo"), Arm("luffy", "luffy"), Arm("scope", "scope")]),
    (["grpo, scope ,"], [Arm("grpo", "grpo"), Arm("scope", "scope")]),
    (["grpo,scope,scope-split=scope,train.advantage=grpo_split"],
     [Arm("grpo", "grpo"), Arm("scope", "scope"), Arm("scope-split", "scope", ("train.advantage=grpo_split",))]),
    # repeated --algos, `;` between arms, two settings, a list value with commas
    (["grpo", "model=scope,rectify.guide=model,eval.ks=[1, 4, 8];scope"],
     [Arm("grpo", "grpo"), Arm("model", "scope", ("rectify.guide=model", "eval.ks=[1, 4, 8]")),
      Arm("scope", "scope")]),
    (["scope,train.advantage=grpo_split"], [Arm("scope", "scope", ("train.advantage=grpo_split",))]),
])
def test_parse_arms(values, arms):
    assert parse_arms(values) == arms
    assert parse_arms([";".join(a.spec for a in arms)]) == arms  # the spec reads back as the arm


@pytest.mark.parametrize("values, message", [
    (["train.advantage=grpo_split,scope"], "comes before any arm"),
    (["grpo,grpo"], "arm 'grpo' given twice"),
    (["a=grpo,a=scope"], "arm 'a' given twice"),
    (["scope,run.algo=grpo"], "give the algorithm as name=algo"),
    (["scope,run.seed=3"], "use --seeds"),
    (["my arm=scope"], "arm name 'my arm'"),
    ([""], "no arm given"),
])
def test_parse_arms_rejects(values, message):
    with pytest.raises(ScopeError, match=message):
        parse_arms(values)


def test_split_items_keeps_brackets_and_quotes():
    assert split_items('a=b,x.y=[1, 2],z.w="p,q";c') == ["a=b", "x.y=[1, 2]", 'z.w="p,q"', "c"]


def test_check_arms_goes_through_the_config():
    check_arms(parse_arms(["grpo,scope-split=scope,train.advantage=grpo_split"]), None, [])
    with pytest.raises(ScopeError, match=r"arm 'x': unknown key 'advantge' .*did you mean 'train.advantage'"):
        check_arms([Arm("x", "scope", ("train.advantge=grpo_split",))], None, [])
    with pytest.raises(ScopeError, match=r"arm 'x': train.advantage: expected one of"):
        check_arms([Arm("x", "scope", ("train.advantage=nope",))], None, [])
    with pytest.raises(ScopeError, match=r"arm 'x': unknown algorithm 'scoep'.*did you mean 'scope'"):
        check_arms([Arm("x", "scoep")], None, [])
    # the arm's settings come after --set
    check_arms([Arm("x", "scope", ("generate.n=4",))], None, ["generate.n=0"])


def test_compare_refuses_a_bad_arm_in_one_line_before_running(tmp_path, monkeypatch):
    monkeypatch.setenv("SCOPE_RUNS_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["compare", "--algos", "grpo,s=scope,train.advantge=grpo_split"])
    assert result.exit_code == 2
    assert "did you mean 'train.advantage'" in result.output
    assert not any(tmp_path.iterdir())  # nothing ran


@pytest.mark.parametrize("names, pairs", [
    (["grpo", "luffy", "scope"], [("luffy", "grpo"), ("scope", "grpo"), ("scope", "luffy")]),
    (["grpo", "scope"], [("scope", "grpo")]),
    (["scope", "vppo", "scope-split"], [("scope", "vppo"), ("scope", "scope-split")]),
    (["grpo", "dapo"], [("dapo", "grpo")]),
    (["luffy", "vppo"], []),
])
def test_every_arm_is_paired_against_grpo_and_scope(names, pairs):
    assert paired_columns(names) == pairs


def test_summarise_pairs_arms_per_seed(tmp_path):
    """Hand-made eval summaries of three arms (one with a hyphen) over two seeds at round 2."""
    values = {("grpo", 0): 0.50, ("grpo", 1): 0.40, ("scope", 0): 0.60, ("scope", 1): 0.45,
              ("scope-split", 0): 0.55, ("scope-split", 1): 0.55}
    for (arm, seed), value in values.items():
        for round_, v in ((1, 0.0), (2, value)):
            path = tmp_path / f"t-{arm}-s{seed}" / f"round-{round_:03d}" / "eval" / "summary.parquet"
            path.parent.mkdir(parents=True)
            pq.write_table(summary_table(round_, "p", "heldout", {"avg@1": v}), path)
    table = summarise("t", ["grpo", "scope", "scope-split"], [0, 1], 2, tmp_path)
    rows = {r["arm"]: r for r in table}
    assert list(rows) == ["grpo", "scope", "scope-split", "scope-grpo", "scope-split-grpo", "scope-scope-split"]
    assert rows["scope"]["mean"] == pytest.approx(0.525) and rows["scope"]["seeds"] == 2
    # paired per seed: scope - grpo = 0.10, 0.05; scope-split - grpo = 0.05, 0.15; scope - scope-split =
    # 0.05, -0.10; two values d1, d2: half width t(1) * |d1 - d2| / 2
    for arm, d in (("scope-grpo", (0.10, 0.05)), ("scope-split-grpo", (0.05, 0.15)),
                   ("scope-scope-split", (0.05, -0.10))):
        half = 12.706204736 * abs(d[0] - d[1]) / 2
        assert rows[arm]["mean"] == pytest.approx(sum(d) / 2)
        assert rows[arm]["ci_high"] - rows[arm]["mean"] == pytest.approx(half, abs=1e-5)


def test_run_compute_sums_the_training_stages_manifests(tmp_path):
    """Hand-written manifests of two rounds: rollouts from generate's rows, guide rows from rectify's
    counters, tokens and updates from train-step's, wall and CPU seconds over the training stages;
    eval and rounds past N are left out; CPU only when every manifest has it."""
    from scope_cli.cli.compare import run_compute
    from scope_cli.core.files import manifest_path
    from scope_cli.core.shards import write_manifest

    def manifest(round_, folder, shard, rows, seconds, cpu, summary):
        path = manifest_path(tmp_path / f"round-{round_:03d}" / folder, shard)
        write_manifest(path, folder, [], {"path": "x", "size": 1, "sha256": "0" * 64}, "h", [], shard=shard,
                       rows=rows, seconds=seconds, cpu=cpu, summary=summary)

    for r in (1, 2, 3):
        manifest(r, "rollouts", 0, 32, 2.0, 1.5, {})
        manifest(r, "rollouts", 1, 16, 1.0, 0.5, {})
        manifest(r, "rectified", 0, 50, 0.5, 0.25, {"rectified": 3, "reference": 1, "guided": 0})
        manifest(r, "train", 0, 40, 10.0, 9.0, {"tokens": 1000, "updates": 4})
        manifest(r, "eval", 0, 8, 100.0, 100.0, {})
    assert run_compute(tmp_path, 2) == {"rollouts": 96, "guide_rows": 8, "tokens_trained": 2000, "updates": 8,
                                        "wall_seconds": 27.0, "cpu_seconds": 22.5}
    manifest(2, "verified", 0, 48, 1.0, None, {})  # a manifest without cpu_seconds
    assert run_compute(tmp_path, 2) == {"rollouts": 96, "guide_rows": 8, "tokens_trained": 2000, "updates": 8,
                                        "wall_seconds": 28.0}
    assert run_compute(tmp_path / "none", 2) == {}


def test_markdown_table_has_arms_and_paired_differences():
    table = [
        {"eval_set": "heldout", "metric": "greedy_acc", "arm": "grpo", "seeds": 3, "mean": 0.5,
         "ci_low": 0.4, "ci_high": 0.6},
        {"eval_set": "heldout", "metric": "greedy_acc", "arm": "scope", "seeds": 3, "mean": 0.55,
         "ci_low": 0.5, "ci_high": 0.6},
        {"eval_set": "heldout", "metric": "greedy_acc", "arm": "scope-grpo", "seeds": 3, "mean": 0.05,
         "ci_low": -0.01, "ci_high": 0.11},
        {"eval_set": "heldout", "metric": "prompts", "arm": "grpo", "seeds": 3, "mean": 1000.0,
         "ci_low": 1000.0, "ci_high": 1000.0},
    ]
    md = to_markdown(table, ["grpo", "scope", "scope-grpo"])
    lines = md.strip().splitlines()
    assert lines[0] == "| set | metric | grpo | scope | scope-grpo |"
    assert lines[2] == ("| heldout | greedy_acc | 0.500 [0.400, 0.600] | 0.550 [0.500, 0.600] | "
                        "0.050 [-0.010, 0.110] |")
    assert len(lines) == 3  # the count metric is left out


def test_compare_end_to_end(tmp_path):
    """Three arms, one seed, one round of a tiny config: the table, its parquet and the plot."""
    import os
    import subprocess
    import sys

    import polars as pl

    config = tmp_path / "tiny.toml"
    config.write_text(
        "[prepare]\ntrain_size = 64\neval_size = 8\nood_size = 4\n"
        "[generate]\nprompts_per_round = 4\nprompts_per_shard = 4\nn = 4\nmax_tokens = 40\n"
        "[eval]\nn_samples = 4\nks = [1, 4]\nsampled_limit = 2\nmax_tokens = 40\n"
        "[verify]\nworkers = 1\n[train]\nminibatches = 1\n"
    )
    env = {**os.environ, "SCOPE_RUNS_DIR": str(tmp_path / "runs")}
    done = subprocess.run([sys.executable, "-m", "scope_cli.cli.app", "compare", "--rounds", "1", "--seeds", "1",
                           "--name", "t", "--jobs", "2", "--config", str(config), "--algos", "grpo,scope",
                           "--algos", "split=scope,train.advantage=grpo_split", "--out", str(tmp_path / "tables")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "tables"  # --out: the tables and logs there, the runs under SCOPE_RUNS_DIR
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["t-grpo-s0.log", "t-scope-s0.log", "t-split-s0.log"]
    assert not (tmp_path / "runs" / "t-compare").exists()
    table = pl.read_parquet(out / "table.parquet")
    assert set(table["arm"]) == {"grpo", "scope", "split", "scope-grpo", "split-grpo", "scope-split"}
    greedy = table.filter(pl.col("eval_set") == "heldout", pl.col("metric") == "greedy_acc")
    assert greedy.height == 6 and greedy["seeds"].to_list() == [1] * 6
    # the arm ran with its own setting, the others with the default
    from scope_cli.core.runs import Run

    assert Run.open(tmp_path / "runs" / "t-split-s0").config.train.advantage == "grpo_split"
    assert Run.open(tmp_path / "runs" / "t-scope-s0").config.train.advantage == "grpo"
    assert "split=scope,train.advantage=grpo_split" in (out / "table.md").read_text().splitlines()[0]
    assert (out / "curves.png").stat().st_size > 10_000
    assert "| heldout | greedy_acc |" in (out / "table.md").read_text()
    # each arm's compute: one round of 4 prompts x 4 samples, one update
    compute = table.filter(pl.col("eval_set") == "compute", pl.col("arm") == "grpo")
    values = dict(zip(compute["metric"], compute["mean"]))
    assert values["rollouts"] == 16 and values["updates"] == 1 and values["guide_rows"] == 0
    assert values["tokens_trained"] > 0 and values["wall_seconds"] > 0 and values["cpu_seconds"] > 0
