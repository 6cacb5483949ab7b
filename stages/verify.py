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
`verify(run, R, verifier=v)` reuses a pool that `scope round` keeps for the whole round. Each shard's manifest counts rows per status
and correct answers; `scope status` shows the accuracy and the timeouts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from scope_cli.backends.verifier import STATUSES, Verifier, check_responses, reward
from scope_cli.core.config import config_hash
from scope_cli.core.runs import Run
from scope_cli.schema import ROLLOUTS, VERIFIED, conform
from scope_cli.core.shards import (
    ShardJob,
    StageResult,
    complete_shards,
    engine_versions,
    read_shard,
    run_shards,
)

CONFIG_KEYS = ["verify"]  # timeout, extract, format_reward, truncation_penalty (workers: operational)


def verify_table(table: pa.Table, verifier: Verifier, cfg: Any) -> tuple[pa.Table, dict[str, Any]]:
    """A rollouts table -> (the verified table, the shard's counters)."""
    tasks = table.column("task").to_pylist()
    responses = table.column("response").to_pylist()
    answers = table.column("answer").to_pylist()
    finish = table.column("finish_reason").to_pylist()
    verdicts = check_responses(verifier, tasks, answers, responses, cfg.verify.extract)
    preds = [v.pred for v in verdicts]
    rewards = [reward(v, f, cfg.verify.format_reward, cfg.verify.truncation_penalty)
               for v, f in zip(verdicts, finish)]
    out = table
    for name, values in (("pred", preds), ("correct", [v.correct for v in verdicts]),
                         ("reward", rewards), ("verify_status", [v.status for v in verdicts])):
        if name in out.column_names:
            out = out.drop_columns([name])
        out = out.append_column(name, pa.array(values, VERIFIED.field(name).type))
    summary: dict[str, Any] = {s: 0 for s in STATUSES}
    for v in verdicts:
        summary[v.status] += 1
    summary["correct"] = sum(v.correct for v in verdicts)
    summary["truncated"] = sum(f == "length" for f in finish)
    return conform(out, VERIFIED), summary


def verify(run: Run, round_: int, *, force: bool = False, worker: tuple[int, int] = (0, 1),
           quiet: bool = False, verifier: Verifier | None = None) -> StageResult:
    cfg = run.config
    src, dst = run.stage_dir(round_, "rollouts"), run.stage_dir(round_, "verified")
    files = complete_shards(src, run.command(f"generate --round {round_}"))
    own = verifier is None
    pool = Verifier(workers=cfg.verify.workers, timeout=cfg.verify.timeout) if own else verifier

    def compute(path: Path) -> tuple[pa.Table, dict[str, Any]]:
        return verify_table(read_shard(path, ROLLOUTS), pool, cfg)

    jobs = [ShardJob(int(f.name[6:11]), [f], (lambda f=f: compute(f))) for f in files]
    try:
        return run_shards(
            "verify", dst, jobs, config_hash(cfg, CONFIG_KEYS), CONFIG_KEYS, run.root,
            engines=engine_versions("pyarrow", "math-verify", "sympy", "latex2sympy2_extended"),
            force=force, worker=worker,
            headline={"label": "acc", "num": "correct", "den": "rows", "show": ["timeout", "error"]},
            quiet=quiet,
        )
    finally:
        if own:
            pool.close()
