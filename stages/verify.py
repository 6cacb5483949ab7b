"""verify: check each rollout's answer against the prompt's gold answer with math-verify.

    scope verify --run NAME --round R [--shard-index I --num-shards K] [--force] [--quiet]

Reads round-R/rollouts/ and writes round-R/verified/ (schema VERIFIED), shard N from shard N, adding:

- ``pred``: the answer, null when there is none. verify.extract = boxed (the default): what the row's
  task extracts (`task.extract_answer`: the last ``\\boxed{...}``); auto: what math-verify's own
  LaTeX and plain-expression extractors find in the whole response (free-form answers such as
  "Therefore, there are 29 valid strings"; see scope_cli/backends/verifier.py);
- ``verify_status``: ``ok`` (compared), ``no_answer`` (nothing to compare), ``timeout`` (the item passed
  verify.timeout seconds and was stopped from outside), ``error`` (the gold answer does not parse, or
  the parser failed);
- ``correct``: math-verify's verdict, ``verify(gold, pred)`` with the gold answer first; false unless
  the status is ok;
- ``reward``: 1 for a correct answer, else 0; verify.format_reward for a row with no answer;
  minus verify.truncation_penalty for a row cut at the length limit (both 0, off, by default).

Every answer goes through math-verify, the arithmetic task's ``\\boxed{N}`` too, in a pool of
verify.workers processes (scope_cli/backends/verifier.py), except the rows of a task with its own
answer check: multiple-choice rows (task ``choice``: ARC-c, GPQA, MMLU-Pro) compare option letters
(`task.check`), and a gold answer that is not a letter is an ``error`` row.
`verify(run, R, resources=r)` reuses the pool that `scope round` keeps for all its rounds. Each shard's manifest counts rows per status
and correct answers; `scope status` shows the accuracy and the timeouts.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from scope_cli.backends.verifier import STATUSES, Verifier, verify_rows
from scope_cli.core.config import Config, config_hash
from scope_cli.core.resources import StageResources, own_or_shared
from scope_cli.core.runs import Run
from scope_cli.schema import ROLLOUTS, VERIFIED, conform
from scope_cli.core.shards import ShardJob, StageResult, complete_shards, engine_versions, run_shards
from scope_cli.core.files import read_shard, shard_index

CONFIG_KEYS = ["verify"]  # timeout, extract, format_reward, truncation_penalty (workers: operational)


def verify_table(table: pa.Table, verifier: Verifier, cfg: Config) -> tuple[pa.Table, dict[str, Any]]:
    """A rollouts table -> (the verified table, the shard's counters)."""
    cols = verify_rows(verifier, table.select(["task", "answer", "response", "finish_reason"]).to_pylist(),
                       cfg.verify)
    out = table
    for name in ("pred", "correct", "reward", "verify_status"):
        if name in out.column_names:
            out = out.drop_columns([name])
        out = out.append_column(name, pa.array([c[name] for c in cols], VERIFIED.field(name).type))
    summary: dict[str, Any] = {s: 0 for s in STATUSES}
    for c in cols:
        summary[c["verify_status"]] += 1
    summary["correct"] = sum(c["correct"] for c in cols)
    summary["truncated"] = sum(f == "length" for f in table.column("finish_reason").to_pylist())
    return conform(out, VERIFIED), summary


def verify(run: Run, round_: int, *, force: bool = False, worker: tuple[int, int] = (0, 1),
           quiet: bool = False, resources: StageResources | None = None) -> StageResult:
    cfg = run.config
    src, dst = run.stage_dir(round_, "rollouts"), run.stage_dir(round_, "verified")
    files = complete_shards(src, run.command(f"generate --round {round_}"))
    with own_or_shared(cfg, resources) as res:
        jobs = [ShardJob(shard_index(f), [f], (lambda f=f: verify_table(read_shard(f, ROLLOUTS), res.verifier(),
                                                                         cfg)))
                for f in files]
        return run_shards(
            "verify", dst, jobs, config_hash(cfg, CONFIG_KEYS), CONFIG_KEYS, run.root,
            engines=engine_versions("pyarrow", "math-verify", "sympy", "latex2sympy2_extended"),
            force=force, worker=worker,
            headline={"label": "acc", "num": "correct", "den": "rows", "show": ["timeout", "error"]},
            quiet=quiet,
        )
