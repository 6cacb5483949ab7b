"""locate-error: find each failed rollout's first wrong step and choose the rows to salvage.

    scope locate-error --run NAME --round R [--shard-index I --num-shards K]

Reads round-R/scored/, writes round-R/located/ (schema LOCATED), shard N from shard N (a shard holds
whole prompt groups). The maths is scope_cli/locate.py (`first_error`, `select`). Columns:

- ``first_error_step`` (0-based): the first step whose score is below locate.threshold (0.5)
  (locate.method=threshold), or the lowest-scored step (argmin); null when the row has no scores or
  no step is below the threshold.
- ``salvage``: whether rectify replaces (or, in augment mode, adds to) this row. The rules, per
  prompt group (one prompt_id):
    * run.algo=scope (and luffy_matched, which salvages the same rows): failed rows whose first
      error is at step >= locate.min_prefix_steps (1), i.e. with at least that many correct steps
      to keep; at most locate.max_per_group (2), taken in locate.order: longest (the default: the
      longest correct prefix first, ties: lower sample_idx) or random (a shuffle seeded from
      run.seed, the round and the prompt_id; run.seed is not in this stage's config hash: the
      input rows' seed column, derived from it, is in the input digest).
    * run.algo=luffy: the same number of rows per group, chosen from ALL failed rows wherever their
      first error is (lowest sample_idx first): the control differs only in what replaces them.
    * In rectify.mode=replace, a group that has correct rows keeps at least one failed row
      unrectified (rectifying every failure would make the group all-correct and every advantage
      zero). An all-wrong group (no GRPO signal) is salvaged up to the limit.
    * run.algo=grpo or vppo: nothing is salvaged (vppo's train-step reads the first errors).
- A failed row with scores but no wrong step found is a PRM/verifier disagreement: counted, and not
  salvaged unless locate.salvage_disagreement, which puts its first error at the last step (the
  verifier's verdict is about the answer).

Summary counters (manifest): rows, failed, located, disagreements, no_steps, salvaged, and groups
all_correct / mixed / all_wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from scope_cli.core.config import Config, config_hash
from scope_cli.core.runs import Run
from scope_cli.schema import LOCATED, SCORED, conform
from scope_cli.core.shards import ShardJob, StageResult, complete_shards, run_shards
from scope_cli.core.files import read_shard, shard_index
from scope_cli.locate import select

CONFIG_KEYS = ["locate", "run.algo", "rectify.mode"]


def locate_table(table: pa.Table, cfg: Config, round_: int = 0) -> tuple[pa.Table, dict[str, Any]]:
    """A scored table of round `round_` with first_error_step and salvage (scope_cli/locate.py
    `select`), and the summary counters."""
    rows = table.select(["prompt_id", "sample_idx", "correct", "step_scores"]).to_pylist()
    firsts, salvage, counts = select(rows, cfg.locate, cfg.run.algo, cfg.rectify.mode, cfg.run.seed,
                                     round_)
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
        return locate_table(read_shard(path, SCORED), cfg, round_)

    jobs = [ShardJob(shard_index(f), [f], (lambda f=f: compute(f))) for f in files]
    return run_shards(
        "locate-error", dst, jobs, config_hash(cfg, CONFIG_KEYS), CONFIG_KEYS, run.root,
        force=force, worker=worker, headline={"label": "salvaged", "num": "salvaged", "den": "failed"},
        quiet=quiet,
    )
