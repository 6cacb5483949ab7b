import math

import pytest

from scope_cli.cli.compare import mean_ci, t_central, t_quantile, to_markdown


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
    assert 1.959964 < t_quantile(100000) < t_quantile(1000) < 1.9624  # towards the normal 1.959964


def test_mean_ci_hand_computed():
    # values 1, 2, 3: mean 2, sd 1, se 1/sqrt(3), t(2) = 4.302653 -> half width 2.484138
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert lo == pytest.approx(2 - 4.302652730 / 3 ** 0.5, abs=1e-6)
    assert hi == pytest.approx(2 + 4.302652730 / 3 ** 0.5, abs=1e-6)
    assert mean_ci([0.5]) == (0.5, 0.5, 0.5)


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
                           "--name", "t", "--jobs", "2", "--config", str(config)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "runs" / "t-compare"
    table = pl.read_parquet(out / "table.parquet")
    assert set(table["arm"]) == {"grpo", "luffy", "scope", "scope-grpo", "scope-luffy"}
    greedy = table.filter(pl.col("eval_set") == "heldout", pl.col("metric") == "greedy_acc")
    assert greedy.height == 5 and greedy["seeds"].to_list() == [1] * 5
    assert (out / "curves.png").stat().st_size > 10_000
    assert "| heldout | greedy_acc |" in (out / "table.md").read_text()
