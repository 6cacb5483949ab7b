"""locate-error: find each failed rollout's first wrong step and choose the rows to salvage.

    scope locate-error --run NAME --round R [--shard-index I --num-shards K]

Reads round-R/scored/, writes round-R/located/ (schema LOCATED), shard N from shard N (a shard holds
whole prompt groups). Columns:

- ``first_error_step`` (0-based): the first step whose score is below locate.threshold (0.5)
  (locate.method=threshold), or the lowest-scored step (argmin); null when the row has no scores or
  no step is below the threshold.
- ``salvage``: whether rectify replaces (or, in augment mode, adds to) this row. The rules, per
  prompt group (one prompt_id):
    * run.algo=scope: failed rows whose first error is at step >= locate.min_prefix_steps (1), i.e.
      with at least that many correct steps to keep; longest correct prefix first (ties: lower
      sample_idx); at most locate.max_per_group (2).
    * run.algo=luffy: the same number of rows per group, chosen from ALL failed rows wherever their
      first error is (lowest sample_idx first): the control differs only in what replaces them.
    * In rectify.mode=replace, a group that has correct rows keeps at least one failed row
      unrectified (rectifying every failure would make the group all-correct and every advantage
      zero). An all-wrong group (no GRPO signal) is salvaged up to the limit.
    * run.algo=grpo: nothing is salvaged.
- A failed row with scores but no wrong step found is a PRM/verifier disagreement: counted, and not
  salvaged unless locate.salvage_disagreement, which puts its first error at the last step (the
  verifier's verdict is about the answer).

Summary counters (manifest): rows, failed, located, disagreements, no_steps, salvaged, and groups
all_correct / mixed / all_wrong.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa

from scope_cli.backends.prm import first_error
from scope_cli.core.config import config_hash
from scope_cli.core.runs import Run
from scope_cli.schema import LOCATED, SCORED, conform
from scope_cli.core.shards import ShardJob, StageResult, complete_shards, run_shards
from scope_cli.core.files import read_shard, shard_index

CONFIG_KEYS = ["locate", "run.algo", "rectify.mode"]


def group_limit(n_failed: int, n_correct: int, max_per_group: int, mode: str) -> int:
    """How many failed rows of a group may be salvaged."""
    limit = min(max_per_group, n_failed)
    if mode == "replace" and n_correct > 0:
        limit = min(limit, n_failed - 1)
    return max(limit, 0)


def select(rows: list[dict[str, Any]], cfg: Any) -> tuple[list[int | None], list[bool], dict[str, int]]:
    """first_error_step and salvage for each row (rows: dicts with prompt_id, sample_idx, correct,
    steps, step_scores), and the summary counters."""
    loc = cfg.locate
    n = len(rows)
    counts = {"rows": n, "failed": 0, "located": 0, "disagreements": 0, "no_steps": 0, "salvaged": 0,
              "groups_all_correct": 0, "groups_mixed": 0, "groups_all_wrong": 0}
    firsts: list[int | None] = [None] * n
    salvage = [False] * n
    for i, row in enumerate(rows):
        scores = row.get("step_scores")
        failed = not row["correct"]
        counts["failed"] += failed
        if scores is None:
            continue
        firsts[i] = first_error(scores, loc.method, loc.threshold)
        if not failed:
            continue
        if not scores:
            counts["no_steps"] += 1
        elif firsts[i] is None:
            counts["disagreements"] += 1
            if loc.salvage_disagreement:
                firsts[i] = len(scores) - 1
        counts["located"] += firsts[i] is not None
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[row["prompt_id"]].append(i)
    algo = cfg.run.algo
    for members in groups.values():
        failed = [i for i in members if not rows[i]["correct"]]
        n_correct = len(members) - len(failed)
        kind = "all_correct" if not failed else ("all_wrong" if n_correct == 0 else "mixed")
        counts[f"groups_{kind}"] += 1
        if algo == "grpo" or not failed:
            continue
        limit = group_limit(len(failed), n_correct, loc.max_per_group, cfg.rectify.mode)
        if algo == "scope":
            pool = [i for i in failed if firsts[i] is not None and firsts[i] >= loc.min_prefix_steps]
            pool.sort(key=lambda i: (-firsts[i], rows[i]["sample_idx"]))
        else:  # luffy: any failure
            pool = sorted(failed, key=lambda i: rows[i]["sample_idx"])
        for i in pool[:limit]:
            salvage[i] = True
    counts["salvaged"] = sum(salvage)
    return firsts, salvage, counts


def locate_table(table: pa.Table, cfg: Any) -> tuple[pa.Table, dict[str, Any]]:
    rows = table.select(["prompt_id", "sample_idx", "correct", "step_scores"]).to_pylist()
    firsts, salvage, counts = select(rows, cfg)
    out = table
    for name, values in (("first_error_step", firsts), ("salvage", salvage)):
        if name in out.column_names:
            out = out.drop_columns([name])
        out = out.append_column(name, pa.array(values, LOCATED.field(name).type))
    return conform(out, LOCATED), counts


def locate_error(run: Run, round_: int, *, force: bool = False, worker: tuple[int, int] = (0, 1),
                 quiet: bool = False) -> StageResult:
    cfg = run.config
    src, dst = run.stage_dir(round_, "scored"), run.stage_dir(round_, "located")
    files = complete_shards(src, run.command(f"prm-score --round {round_}"))

    def compute(path: Path):
        return locate_table(read_shard(path, SCORED), cfg)

    jobs = [ShardJob(shard_index(f), [f], (lambda f=f: compute(f))) for f in files]
    return run_shards(
        "locate-error", dst, jobs, config_hash(cfg, CONFIG_KEYS), CONFIG_KEYS, run.root,
        force=force, worker=worker, headline={"label": "salvaged", "num": "salvaged", "den": "failed"},
        quiet=quiet,
    )
