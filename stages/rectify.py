"""rectify: write the round's training batch, splicing guide continuations onto salvaged rollouts.

    scope rectify --run NAME --round R [--shard-index I --num-shards K]

Reads round-R/located/, writes round-R/rectified/ (schema RECTIFIED), shard N from shard N: every
input row, plus one new row per salvaged row whose replacement verified. What replaces a salvaged
row depends on run.algo (the table REPLACEMENTS in scope_cli/core/replacements.py: how each
algorithm makes candidate rows; one accept step, `admit`, for all):

- scope: a rectified row = the parent's own tokens ``response_ids[:step_token_ends[f-1]]`` (f = its
  first_error_step; never re-tokenized) + the guide's continuation tokenized with the policy's
  tokenizer (scope_cli/backends/guide.py: rectify.guide = oracle | model; the splicing is
  scope_cli/core/splice.py). ``offpolicy_start`` is where the guide tokens begin,
  ``response_logprobs`` keeps the parent's values on the prefix and is null on guide tokens,
  ``origin = "rectified"``, ``policy`` names the guide ("oracle:<task>" or the model guide's folder
  name); ``kept_text`` and ``guide_text`` hold the two parts as text. The seam may be tokenized
  non-canonically (see scope_cli/backends/steps.py). A model guide's continuation that fails
  re-verification is retried up to rectify.max_tries times (new seeds), then dropped and counted.
- luffy_matched: the rows scope salvages (locate-error selects them alike) and scope's guide, but the
  guide writes the whole solution from the problem alone (an empty kept prefix: the oracle's
  solution from its row's seed, never a copy of one its group got where the task has another; the
  model guide's sample of the prompt): ``offpolicy_start = 0``,
  ``origin = "guided"``, ``policy`` names the guide, ``kept_text = ""``, logprobs all null; retried
  and dropped as scope's. The control that differs from scope only in the kept prefix.
- luffy: the reference solution (the prompt's `solution`) as a whole trajectory:
  ``offpolicy_start = 0``, ``origin = "reference"``, ``policy = "reference"``, ``kept_text = ""``,
  logprobs all null. A prompt without one is counted and its row kept as it is. A group never gets
  two copies of one trace: its second and later salvaged rows get other correct solutions from the
  task's solver (arith: another order of the terms, drawn from the new row's seed), or, where the
  task has no solver or no other solution, nothing (counted: same_reference; the row stays).
- grpo, vppo: pass-through (origin policy, in_batch true; vppo's first_error_step goes on to train-step).

New rows get ``sample_idx`` = (the group's largest sample_idx + 1 + k) and ``parent_sample_idx``;
their verify columns are recomputed (the task's answer check, the verify section's reward rules);
steps/step_token_ends are recomputed on the new tokens, step_scores and first_error_step are null;
``stop_token_id`` is the policy's EOS for a finished new row (a guide's own EOS, or none for a
reference, is not the policy's to learn), null for one cut at its length limit.
A new row joins only when it verifies (correct) and fits the policy's response budget
(generate.max_tokens trained tokens, the eos it ends with included, so at most max_tokens - 1 ids
for a finished row: train-step sees no longer rows than generate writes); else it is
retried (model guide) or dropped and counted. rectify.mode = replace (the parent gets
``in_batch = false``) or augment (both stay; train-step trains the parent only from its first wrong
step). Policy rows have origin "policy", parent_sample_idx, offpolicy_start, kept_text and
guide_text null. A new row follows its parent in the table.

Summary counters (manifest): salvaged, rectified (new rows that verified and joined), reference,
guided (luffy_matched's rows that joined), dropped, too_long, no_reference, same_reference, tries,
disagreements (failed rows whose PRM found no wrong step), and how much of its parent a rectified row kept: kept_prefix_frac_sum (tokens kept / parent tokens)
and kept_steps_frac_sum (steps kept / parent steps), summed over rectified rows (so shards add up),
and their means per shard, mean_kept_prefix_frac and mean_kept_steps_frac.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from scope_cli.backends.steps import load_policy_tokenizer
from scope_cli.backends.verifier import verify_rows
from scope_cli.core.config import Config, config_hash
from scope_cli.core.files import read_shard, shard_index
from scope_cli.core.resources import StageResources, own_or_shared
from scope_cli.core.runs import Run, row_seed
from scope_cli.core.shards import ShardJob, StageResult, complete_shards, engine_versions, run_shards
from scope_cli.core.replacements import REPLACEMENTS, Salvaged
from scope_cli.schema import LOCATED, RECTIFIED

CONFIG_KEYS = ["rectify", "run.algo", "run.seed", "verify", "generate.backend", "generate.dtype",
               "generate.max_tokens", "generate.stop"]

# rows -> their verify columns (pred, correct, reward, verify_status)
Verifies = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


def admit(candidates: dict[int, dict[str, Any]], verifier: Verifies, limit: int,
          accepted: dict[int, dict[str, Any]], counts: dict[str, Any]) -> list[int]:
    """The one accept step: re-verify the candidates; one that is right and within the policy's
    response budget goes into `accepted`; the others' row indexes are returned. The budget is
    `limit` trained tokens, as generate's rows: response_ids plus the eos a finished row trains on
    (stop_token_id), so a row that ends with eos holds at most limit - 1 ids."""
    rejected = []
    for (i, cand), cols in zip(candidates.items(), verifier(list(candidates.values()))):
        cand.update(cols)
        long = len(cand["response_ids"]) + (cand["stop_token_id"] is not None) > limit
        counts["too_long"] += long
        if cand["correct"] and not long:
            accepted[i] = cand
        else:
            rejected.append(i)
    return rejected


def rectify_rows(rows: list[dict[str, Any]], cfg: Config, round_: int, tokenizer: Any, guide: Any,
                 verifier: Verifies | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The training batch of a located shard (see the module docstring). `verifier(rows)` returns
    the verify columns (pred, correct, reward, verify_status) for rows with task, answer, response
    and finish_reason."""
    replacement = REPLACEMENTS[cfg.run.algo]
    counts: dict[str, Any] = {"rows_in": len(rows), "salvaged": 0, "rectified": 0, "reference": 0,
                              "guided": 0, "dropped": 0, "no_reference": 0, "same_reference": 0, "too_long": 0, "tries": 0,
                              "disagreements": 0,
                              "kept_prefix_frac_sum": 0.0, "kept_steps_frac_sum": 0.0}
    for row in rows:
        if (not row["correct"] and row.get("step_scores") and row.get("first_error_step") is None):
            counts["disagreements"] += 1

    # new rows follow their group's sample indexes; each has a seed of its own
    next_idx: dict[str, int] = defaultdict(int)
    for row in rows:
        next_idx[row["prompt_id"]] = max(next_idx[row["prompt_id"]], row["sample_idx"] + 1)
    salvaged = [i for i, row in enumerate(rows) if row.get("salvage") and replacement is not None]
    counts["salvaged"] = len(salvaged)
    new_idx = {}
    for i in salvaged:
        pid = rows[i]["prompt_id"]
        new_idx[i] = next_idx[pid]
        next_idx[pid] += 1
    seeds = {i: row_seed(cfg.run.seed, round_, rows[i]["prompt_id"], new_idx[i]) for i in salvaged}

    # candidates, accepted or retried (a guide's) or dropped
    accepted: dict[int, dict[str, Any]] = {}
    if salvaged:
        made = Salvaged(rows, new_idx, seeds, tokenizer, guide, cfg.generate.stop, counts)
        tries = 1
        if replacement.guided:
            tries = min(cfg.rectify.max_tries, getattr(guide, "max_tries", cfg.rectify.max_tries))
        pending = salvaged
        for attempt in range(tries):
            if not pending:
                break
            candidates = replacement.make(made, pending, attempt)
            # new rows are held to the policy's own response budget (trained tokens, eos included)
            pending = admit(candidates, verifier, cfg.generate.max_tokens, accepted, counts)
        counts["dropped"] = len(pending)

    for i, cand in accepted.items():  # how much of its parent a spliced row kept: tokens, steps
        if cand["origin"] == "rectified":
            parent_tokens, parent_steps = len(rows[i]["response_ids"] or []), len(rows[i]["steps"] or [])
            counts["kept_prefix_frac_sum"] += cand["offpolicy_start"] / max(parent_tokens, 1)
            counts["kept_steps_frac_sum"] += rows[i]["first_error_step"] / max(parent_steps, 1)
    counts["rectified"] = sum(cand["origin"] == "rectified" for cand in accepted.values())
    counts["reference"] = sum(cand["origin"] == "reference" for cand in accepted.values())
    counts["guided"] = sum(cand["origin"] == "guided" for cand in accepted.values())
    out: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        replaced = i in accepted and cfg.rectify.mode == "replace"
        out.append({**row, "origin": "policy", "in_batch": not replaced, "parent_sample_idx": None,
                    "offpolicy_start": None, "kept_text": None, "guide_text": None})
        if i in accepted:
            out.append(accepted[i])
    n_new = counts["rectified"]
    counts["mean_kept_prefix_frac"] = counts["kept_prefix_frac_sum"] / n_new if n_new else None
    counts["mean_kept_steps_frac"] = counts["kept_steps_frac_sum"] / n_new if n_new else None
    counts["rows_out"] = len(out)
    return out, counts


def rectify(run: Run, round_: int, *, force: bool = False, worker: tuple[int, int] = (0, 1),
            quiet: bool = False, resources: StageResources | None = None) -> StageResult:
    """The guide, the verifier pool and the policy's tokenizer are opened when a shard has rows to
    salvage (`resources`: those `scope round` keeps open)."""
    cfg = run.config
    src, dst = run.stage_dir(round_, "located"), run.stage_dir(round_, "rectified")
    files = complete_shards(src, run.command(f"locate-error --round {round_}"))
    tokenizer: list[Any] = []

    def compute(res: StageResources, path: Path):
        rows = read_shard(path, LOCATED).to_pylist()
        if REPLACEMENTS[cfg.run.algo] is None or not any(r["salvage"] for r in rows):
            out, counts = rectify_rows(rows, cfg, round_, None, None, None)
        else:
            if not tokenizer:
                tokenizer.append(load_policy_tokenizer(run.input_policy(round_), cfg.policy.trust_remote_code))
            guide = res.guide() if REPLACEMENTS[cfg.run.algo].guided else None
            out, counts = rectify_rows(rows, cfg, round_, tokenizer[0], guide,
                                       lambda new: verify_rows(res.verifier(), new, cfg.verify))
        return pa.Table.from_pylist(out, schema=RECTIFIED), counts

    with own_or_shared(cfg, resources) as res:
        jobs = [ShardJob(shard_index(f), [f], (lambda f=f: compute(res, f))) for f in files]
        return run_shards(
            "rectify", dst, jobs, config_hash(cfg, CONFIG_KEYS), CONFIG_KEYS, run.root,
            engines=engine_versions("pyarrow", "transformers", "tokenizers", "math-verify"),
            force=force, worker=worker,
            headline={"label": "rectified", "num": "rectified", "den": "salvaged"}, quiet=quiet,
        )
