"""Strategy diversity that neither accuracy nor error position can move, for the arms of a `scope
compare`: the chance that two correct solutions of a prompt differ (the order in which they apply the
terms; scope_cli.metrics.pair_differ_probability), averaged over the prompts on which EVERY arm of
the seed has at least two correct samples, then meaned and paired per seed as `scope compare` does.

    python bench/diversity_common.py --name headline --seeds 5 --round 8 \
        --arms grpo,grpo-ds,luffy_matched,vppo,scope,scope-model [--runs runs] [--out FILE]

Why: the eval rows distinct-2[correct], distinct_correct@k and strategy_entropy[all] are computed on
every prompt, so failures cannot move them, but they move with how many samples are correct (with 2,
4 and 8 correct samples drawn from 24 equally likely orders, distinct-2[correct] is about 0.94, 0.85,
0.71 and the entropy 0.96, 1.88, 2.72 bits for the same policy). Here the per-prompt estimate is
unbiased at any number of correct samples (tests/test_metrics.py) and the prompt set is one set per
seed for all arms. What it cannot see: diversity on prompts some arm rarely solves.

Reads round-R/eval/<set>-sampled.parquet of each run <name>-<arm>-s<seed> (columns prompt_id, correct,
canonical_solution); prints a markdown table (cells: mean [95% t-interval] over seeds; `a-b`: paired
per-seed differences) and writes it to --out (default <runs>/<name>-compare/diversity_common.md).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scope_cli.cli.compare import arm_name, paired_columns, summary_rows, to_markdown  # noqa: E402
from scope_cli.cli.status import Checker, stage_summary  # noqa: E402
from scope_cli.metrics import pair_differ_probability  # noqa: E402

MIN_CORRECT = 2


def solutions_by_prompt(path: Path) -> dict[str, Counter]:
    """prompt_id -> Counter of the canonical solutions of its correct samples."""
    import polars as pl

    rows = pl.read_parquet(path, columns=["prompt_id", "correct", "canonical_solution"])
    out: dict[str, Counter] = {p: Counter() for p in rows["prompt_id"].unique().to_list()}
    for prompt_id, correct, solution in rows.iter_rows():
        if correct:
            out[prompt_id][solution] += 1
    return out


def seed_values(runs: Path, name: str, arms: list[str], seed: int, round_: int, eval_set: str
                ) -> tuple[dict[str, float], int]:
    """Each arm's mean pair-differ probability over the prompts where every arm has >= 2 correct
    samples, and the number of those prompts."""
    by_arm = {}
    for arm in arms:
        root = runs / arm_name(name, arm, seed)
        eval_dir = root / f"round-{round_:03d}" / "eval"
        path = eval_dir / f"{eval_set}-sampled.parquet"
        if not path.is_file():
            raise SystemExit(f"diversity_common: {path} is missing (is round {round_} of that arm evaluated?)")
        check = Checker(root, verify=True)  # what `scope status --verify` checks: sha256 against the manifests
        stage_summary(eval_dir, check)
        if check.problems:
            raise SystemExit(f"diversity_common: {check.problems[0]}")
        by_arm[arm] = solutions_by_prompt(path)
    common = set.intersection(*({p for p, c in s.items() if sum(c.values()) >= MIN_CORRECT}
                                for s in by_arm.values()))
    if not common:
        return {}, 0
    return ({arm: sum(pair_differ_probability(list(s[p].values())) for p in common) / len(common)
             for arm, s in by_arm.items()}, len(common))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--arms", required=True, help="comma-separated arm names, as in the compare table")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--round", type=int, required=True)
    parser.add_argument("--sets", default="heldout,ood")
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    runs, arms = Path(args.runs), args.arms.split(",")
    finals: dict[tuple[str, str, str], dict[int, float]] = {}  # (set, metric, arm) -> seed -> value
    for eval_set in args.sets.split(","):
        for seed in range(args.seeds):
            values, prompts = seed_values(runs, args.name, arms, seed, args.round, eval_set)
            for arm, value in values.items():
                finals.setdefault((eval_set, "pair_differ[common]", arm), {})[seed] = value
            finals.setdefault((eval_set, "common_prompts", arms[0]), {})[seed] = prompts  # one set for all arms
    columns = arms + [f"{a}-{b}" for a, b in paired_columns(arms)]
    text = (f"# {args.name}: pair_differ[common] at round {args.round}, {args.seeds} seeds "
            f"(common_prompts: prompts per seed, in the first arm's column)\n\n"
            + to_markdown(summary_rows(finals, arms), columns))
    print(text)
    out = Path(args.out) if args.out else runs / f"{args.name}-compare" / "diversity_common.md"
    from scope_cli.core.files import write_text_atomic

    write_text_atomic(text, out)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
