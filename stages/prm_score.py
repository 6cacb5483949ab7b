"""prm-score: split each rollout into steps and score them with a process reward model (PRM).

    scope prm-score --run NAME --round R [--shard-index I --num-shards K]
    scope prm-score --run NAME --round R --eval-against rule      # measure the PRM against the rule

Reads round-R/verified/ and writes round-R/scored/ (schema SCORED), shard N from shard N. Columns:

- ``steps`` (the task's step texts) and ``step_token_ends`` (exclusive token index in response_ids
  where each step ends, so the first k steps are an exact token prefix; see scope_cli/backends/steps.py):
  filled for every row when run.algo=scope, luffy_matched or vppo (a tokenizer pass, cheap), so users can
  inspect any row.
- ``step_scores``: P(step correct) from prm.backend (rule | hf | vllm) for the failed rows
  (prm.score=failed, the default: only they are candidates for rectification) or for all rows
  (prm.score=all); null for rows not scored.
- prm.noise = p: with probability p per row (drawn from the row's seed) a row whose PRM finds a wrong
  step (a score below locate.threshold) has it missed or moved one step (scope_cli/locate.py
  `apply_noise`): the miniature's way to study a PRM that points at the wrong step.

With run.algo = grpo or luffy nothing here is needed (`uses_prm`, scope_cli/locate.py): rows pass
through with the three columns null and no PRM is loaded. The steps are split on decode(response_ids)
with the policy's tokenizer (the input policy of the round), the text generate stored as `response`.

`--eval-against rule` scores every row of round-R/verified/ (failed and correct) with the configured
PRM (noise included) and with the task's exact checker, and writes ProcessBench-style metrics
(accuracy on erroneous and on correct samples, their harmonic mean f1, first-error exact match) to
round-R/prm-eval-rule.json. The predicted first error follows locate.method / locate.threshold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from scope_cli.backends.prm import PrmError, PrmItem
from scope_cli.core.config import Config, config_hash
from scope_cli.core.resources import StageResources, own_or_shared
from scope_cli.core.runs import Run
from scope_cli.schema import SCORED, VERIFIED, conform
from scope_cli.core.shards import ShardJob, StageResult, complete_shards, engine_versions, run_shards
from scope_cli.core.files import read_shard, shard_index, write_json_atomic
from scope_cli.backends.steps import align_steps, load_policy_tokenizer
from scope_cli.locate import apply_noise, first_error, processbench, uses_prm
from scope_cli.tasks import get_task

CONFIG_KEYS = ["prm", "run.algo"]


def config_keys(cfg: Config) -> list[str]:
    """CONFIG_KEYS, and locate.threshold where it changes the scores written (prm.noise > 0: what the
    noise calls a row's first error); with no noise it moves only the summary's errors_found."""
    return CONFIG_KEYS + ["locate.threshold"] if cfg.prm.noise > 0 else CONFIG_KEYS


def policy_tokenizer(run: Run, round_: int) -> Any:
    """The tokenizer of the policy that wrote round R's rollouts (policy-(R-1))."""
    return load_policy_tokenizer(run.input_policy(round_), run.config.policy.trust_remote_code)


def item_of(row: dict[str, Any], steps: list[str], text: str) -> PrmItem:
    task = get_task(row["task"])
    return PrmItem(problem=row["problem"], prompt=task.format_prompt(row["problem"]), steps=steps,
                   text=text, task=row["task"])


def score_table(table: pa.Table, cfg: Config, tokenizer: Any, scorer: Any) -> tuple[pa.Table, dict[str, Any]]:
    """Add steps, step_token_ends and step_scores to a verified table (see the module docstring).
    errors_found counts scored rows with a step below locate.threshold."""
    n = table.num_rows
    summary: dict[str, Any] = {"rows": n, "failed": 0, "scored": 0, "errors_found": 0, "no_steps": 0,
                               "unaligned": 0, "noise_miss": 0, "noise_shift": 0}
    correct = table.column("correct").to_pylist()
    summary["failed"] = sum(1 for c in correct if not c)
    if not uses_prm(cfg.run.algo):
        return conform(table, SCORED), summary
    ids_col = table.column("response_ids").to_pylist()
    rows = table.select(["problem", "task", "seed"]).to_pylist()
    texts: list[str] = []
    steps_col: list[list[str]] = []
    ends_col: list[list[int]] = []
    for row, ids in zip(rows, ids_col):
        al = align_steps(get_task(row["task"]), tokenizer, ids or [])
        texts.append(al.text)
        steps_col.append(al.steps)
        ends_col.append(al.step_token_ends)
    wanted = [i for i in range(n) if cfg.prm.score == "all" or not correct[i]]
    threshold = cfg.locate.threshold
    scores_col: list[list[float] | None] = [None] * n
    items = [item_of(rows[i], steps_col[i], texts[i]) for i in wanted]
    for i, scores in zip(wanted, scorer.score(items) if items else []):
        if not steps_col[i]:
            summary["no_steps"] += 1
        if scores is None:
            summary["unaligned"] += 1
            continue
        scores, kind = apply_noise(scores, cfg.prm.noise, rows[i]["seed"] or 0, threshold)
        if kind == "miss":
            summary["noise_miss"] += 1
        elif kind is not None:
            summary["noise_shift"] += 1
        scores_col[i] = [float(s) for s in scores]
        summary["scored"] += 1
        summary["errors_found"] += first_error(scores, "threshold", threshold) is not None
    out = table
    for name, values in (("steps", steps_col), ("step_token_ends", ends_col),
                         ("step_scores", scores_col)):
        if name in out.column_names:
            out = out.drop_columns([name])
        out = out.append_column(name, pa.array(values, SCORED.field(name).type))
    return conform(out, SCORED), summary


def prm_score(run: Run, round_: int, *, force: bool = False, worker: tuple[int, int] = (0, 1),
              quiet: bool = False, resources: StageResources | None = None) -> StageResult:
    cfg = run.config
    src, dst = run.stage_dir(round_, "verified"), run.stage_dir(round_, "scored")
    files = complete_shards(src, run.command(f"verify --round {round_}"))
    tokenizer: list[Any] = []

    def compute(res: StageResources, path: Path):
        table = read_shard(path, VERIFIED)
        if not uses_prm(cfg.run.algo):
            return score_table(table, cfg, None, None)
        if not tokenizer:
            tokenizer.append(policy_tokenizer(run, round_))
        return score_table(table, cfg, tokenizer[0], res.prm())

    with own_or_shared(cfg, resources) as res:
        jobs = [ShardJob(shard_index(f), [f], (lambda f=f: compute(res, f))) for f in files]
        return run_shards(
            "prm-score", dst, jobs, config_hash(cfg, config_keys(cfg)), config_keys(cfg), run.root,
            engines=engine_versions("pyarrow", "torch", "transformers", "tokenizers", "vllm"),
            force=force, worker=worker,
            headline={"label": "error found", "num": "errors_found", "den": "scored"}, quiet=quiet,
        )


def eval_against_rule(run: Run, round_: int) -> dict[str, Any]:
    """ProcessBench-style metrics of the configured PRM against the task's exact checker on every
    row of round-R/verified/; written to round-R/prm-eval-rule.json and returned."""
    from scope_cli.backends.prm import rule_scores
    from scope_cli.core.files import read_stage

    cfg = run.config
    table = read_stage(run.stage_dir(round_, "verified"), VERIFIED)
    tokenizer = policy_tokenizer(run, round_)
    rows = table.select(["problem", "task", "seed", "response_ids"]).to_pylist()
    items, labels, seeds = [], [], []
    skipped = 0
    for row in rows:
        task = get_task(row["task"])
        if getattr(task, "first_error_step", None) is None:
            raise PrmError(f"--eval-against rule needs a task with an exact step checker; task "
                           f"{task.NAME} has none")
        al = align_steps(task, tokenizer, row["response_ids"] or [])
        if not al.steps:
            skipped += 1
            continue
        items.append(item_of(row, al.steps, al.text))
        # the exact checker's 0/1 scores: its first 0 is the label, whatever locate.threshold says
        exact = rule_scores(task, row["problem"], al.text, len(al.steps))
        labels.append(first_error(exact, "threshold", 0.5))
        seeds.append(row["seed"] or 0)
    preds = []
    with StageResources(cfg) as res:  # the PRM, closed at the end
        scored = res.prm().score(items)
    for scores, seed in zip(scored, seeds):
        if scores is None:
            preds.append(None)
            continue
        scores, _ = apply_noise(scores, cfg.prm.noise, seed, cfg.locate.threshold)
        preds.append(first_error(scores, cfg.locate.method, cfg.locate.threshold))
    metrics = processbench(preds, labels)
    report = {"round": round_, "prm": {k: cfg.get(f"prm.{k}") for k in ("backend", "path",
                                                                            "convention", "noise")},
              "locate": {"method": cfg.locate.method, "threshold": cfg.locate.threshold},
              "skipped_no_steps": skipped, **metrics}
    write_json_atomic(report, run.round_dir(round_) / "prm-eval-rule.json")
    return report


def print_eval(report: dict[str, Any]) -> None:
    from scope_cli.console import make_console

    console = make_console()
    console.print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                              for k, v in report.items()}, indent=1))
