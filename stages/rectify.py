"""rectify: write the round's training batch, splicing guide continuations onto salvaged rollouts.

    scope rectify --run NAME --round R [--shard-index I --num-shards K]

Reads round-R/located/, writes round-R/rectified/ (schema RECTIFIED), shard N from shard N: every
input row, plus one new row per salvaged row whose replacement verified. What replaces a salvaged
row depends on run.algo:

- scope: a rectified row = the parent's own tokens ``response_ids[:step_token_ends[f-1]]`` (f = its
  first_error_step; never re-tokenized) + the guide's continuation tokenized with the policy's
  tokenizer (scope_cli/backends/guide.py: rectify.guide = oracle | model). ``offpolicy_start`` is
  where the guide tokens begin, ``response_logprobs`` keeps the parent's values on the prefix and is
  null on guide tokens, ``origin = "rectified"``, ``policy`` names the guide ("oracle:<task>" or
  the model guide's folder name); ``kept_text`` and ``guide_text`` hold the two parts as text. The seam may be tokenized non-canonically (see
  scope_cli/backends/steps.py). A model guide's continuation that fails re-verification is retried up to
  rectify.max_tries times (new seeds), then dropped and counted.
- luffy: the reference solution (the prompt's `solution`) as a whole trajectory:
  ``offpolicy_start = 0``, ``origin = "reference"``, ``policy = "reference"``, ``kept_text = ""``,
  logprobs all null. A prompt without one is
  counted and its row kept as it is.
- grpo: pass-through (origin policy, in_batch true).

New rows get ``sample_idx`` = (the group's largest sample_idx + 1 + k) and ``parent_sample_idx``;
their verify columns are recomputed (the task's answer check, the verify section's reward rules);
steps/step_token_ends are recomputed on the new tokens, step_scores and first_error_step are null;
``stop_token_id`` is the policy's EOS for a finished new row (a guide's own EOS, or none for a
reference, is not the policy's to learn), null for one cut at its length limit.
A new row joins only when it verifies (correct) and fits the policy's response budget
(generate.max_tokens tokens, so train-step sees no longer rows than generate writes); else it is
retried (model guide) or dropped and counted. rectify.mode = replace (the parent gets
``in_batch = false``) or augment (both stay; train-step trains the parent only from its first wrong
step). Policy rows have origin "policy", parent_sample_idx, offpolicy_start, kept_text and
guide_text null. A new row
follows its parent in the table.

Summary counters (manifest): salvaged, rectified (new rows that verified and joined), reference,
dropped, too_long, no_reference, tries, disagreements (failed rows whose PRM found no wrong step),
kept_prefix_frac_sum
(tokens kept / parent tokens, summed over new rows; mean_kept_prefix_frac per shard) and
kept_steps_frac_sum.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from scope_cli.backends.guide import GuideOutput, GuideRequest
from scope_cli.backends.verifier import verify_rows
from scope_cli.core.config import config_hash
from scope_cli.core.resources import StageResources, own_or_shared
from scope_cli.core.runs import Run, row_seed
from scope_cli.schema import LOCATED, RECTIFIED
from scope_cli.core.shards import ShardJob, StageResult, complete_shards, engine_versions, run_shards
from scope_cli.core.files import ShardError, read_shard, shard_index
from scope_cli.backends.steps import align_steps, decode, load_policy_tokenizer
from scope_cli.tasks import get_task

CONFIG_KEYS = ["rectify", "run.algo", "run.seed", "verify", "generate.backend", "generate.dtype",
               "generate.max_tokens", "generate.stop"]


class RectifyError(ShardError):
    """A located row that cannot be spliced as recorded: one line naming the row."""


def _where(row: dict[str, Any]) -> str:
    return f"located row (prompt_id {row['prompt_id']}, sample_idx {row['sample_idx']})"


def splice_request(row: dict[str, Any], tokenizer: Any, seed: int) -> tuple[GuideRequest, int]:
    """The guide request for a salvaged row and the token index where the guide takes over."""
    task = get_task(row["task"])
    ids = list(row["response_ids"] or [])
    f = row["first_error_step"]
    ends = row["step_token_ends"] or []
    if f is None or not 0 <= f < len(ends):
        raise RectifyError(f"{_where(row)}: first_error_step {f} outside its {len(ends)} steps")
    cut = 0 if f == 0 else int(ends[f - 1])
    if not 0 <= cut <= len(ids):
        raise RectifyError(f"{_where(row)}: step_token_ends[{f - 1}] = {cut} outside response_ids")
    text = decode(tokenizer, ids)
    spans = task.split_steps(text)
    kept_end = 0 if f == 0 else spans[f - 1][1]
    kept_text = text[:kept_end]
    prefix_text = decode(tokenizer, ids[:cut])
    if not kept_text.startswith(prefix_text):
        raise RectifyError(f"{_where(row)}: decode(response_ids[:{cut}]) is not a prefix of its first "
                           f"{f} steps (step_token_ends from another tokenizer?)")
    kept_steps = task.step_texts(text)[:f]
    return GuideRequest(row=row, kept_steps=kept_steps, kept_text=kept_text,
                        prefix_text=prefix_text, seed=seed), cut


def guide_tokens(tokenizer: Any, out: GuideOutput) -> list[int]:
    """The guide's text in the policy's tokens. Like generate's rows, a finished row does not hold
    the end-of-sequence token (finish_reason "stop" says it ended)."""
    return list(tokenizer.encode(out.text, add_special_tokens=False))


def new_row(parent: dict[str, Any], *, origin: str, sample_idx: int, seed: int, ids: list[int],
            offpolicy_start: int, finish_reason: str, tokenizer: Any, guide: str,
            guide_text: str, stop: Sequence[str] = ()) -> dict[str, Any]:
    """A new row: `ids` = the parent's first offpolicy_start tokens + the tokens of `guide_text`,
    written by the guide named `guide` (its `policy` column). A finished one ends with the policy's own
    EOS (stop_token_id), which train-step trains on, unless a stop string (generate.stop) ended it."""
    task = get_task(parent["task"])
    lps = list(parent["response_logprobs"] or [])[:offpolicy_start] if offpolicy_start else []
    al = align_steps(task, tokenizer, ids)
    ended_by_eos = finish_reason == "stop" and not any(s and al.text.endswith(s) for s in stop)
    kept_text = decode(tokenizer, ids[:offpolicy_start]) if offpolicy_start else ""
    return {**parent, "sample_idx": sample_idx, "seed": seed, "response": al.text,
            "response_ids": ids, "policy": guide, "kept_text": kept_text, "guide_text": guide_text,
            "response_logprobs": lps + [None] * (len(ids) - offpolicy_start),
            "finish_reason": finish_reason,
            "stop_token_id": tokenizer.eos_token_id if ended_by_eos else None, "steps": al.steps,
            "step_token_ends": al.step_token_ends,
            "step_scores": None, "first_error_step": None, "salvage": False, "origin": origin,
            "in_batch": True, "parent_sample_idx": parent["sample_idx"],
            "offpolicy_start": offpolicy_start}


def rectify_rows(rows: list[dict[str, Any]], cfg: Any, round_: int, tokenizer: Any, guide: Any,
                 verifier: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The training batch of a located shard (see the module docstring). `verifier(rows)` returns
    the verify columns (pred, correct, reward, verify_status) for rows with task, answer, response
    and finish_reason."""
    algo, mode = cfg.run.algo, cfg.rectify.mode
    counts: dict[str, Any] = {"rows_in": len(rows), "salvaged": 0, "rectified": 0, "reference": 0,
                              "dropped": 0, "no_reference": 0, "too_long": 0, "tries": 0,
                              "disagreements": 0,
                              "kept_prefix_frac_sum": 0.0, "kept_steps_frac_sum": 0.0}
    for row in rows:
        if (not row["correct"] and row.get("step_scores") and row.get("first_error_step") is None):
            counts["disagreements"] += 1
    next_idx: dict[str, int] = defaultdict(int)
    for row in rows:
        next_idx[row["prompt_id"]] = max(next_idx[row["prompt_id"]], row["sample_idx"] + 1)
    salvaged = [i for i, row in enumerate(rows) if row.get("salvage") and algo != "grpo"]
    counts["salvaged"] = len(salvaged)
    new_idx = {}
    for i in salvaged:
        pid = rows[i]["prompt_id"]
        new_idx[i] = next_idx[pid]
        next_idx[pid] += 1
    seeds = {i: row_seed(cfg.run.seed, round_, rows[i]["prompt_id"], new_idx[i]) for i in salvaged}
    limit = cfg.generate.max_tokens  # new rows are held to the policy's own response budget

    accepted: dict[int, dict[str, Any]] = {}

    def admit(candidates: dict[int, dict[str, Any]]) -> list[int]:
        """Re-verify new rows; accept the right ones within the budget; return the others' indexes."""
        rejected = []
        for (i, cand), cols in zip(candidates.items(), verifier(list(candidates.values()))):
            cand.update(cols)
            long = len(cand["response_ids"]) > limit
            counts["too_long"] += long
            if cand["correct"] and not long:
                accepted[i] = cand
            else:
                rejected.append(i)
        return rejected

    if algo == "scope" and salvaged:
        requests = {}
        for i in salvaged:
            requests[i] = splice_request(rows[i], tokenizer, seeds[i])
        pending = list(salvaged)
        tries = min(cfg.rectify.max_tries, getattr(guide, "max_tries", cfg.rectify.max_tries))
        for attempt in range(tries):
            if not pending:
                break
            outs = guide.continue_([requests[i][0] for i in pending], attempt)
            counts["tries"] += len(pending)
            candidates = {}
            for i, out in zip(pending, outs):
                cut = requests[i][1]
                ids = list(rows[i]["response_ids"][:cut]) + guide_tokens(tokenizer, out)
                candidates[i] = new_row(rows[i], origin="rectified", sample_idx=new_idx[i],
                                        seed=seeds[i], ids=ids, offpolicy_start=cut,
                                        finish_reason=out.finish_reason, tokenizer=tokenizer,
                                        guide=guide.name(rows[i]), guide_text=out.text,
                                        stop=cfg.generate.stop)
            pending = admit(candidates)
        counts["dropped"] = len(pending)
        for i, cand in accepted.items():
            parent_len = max(len(rows[i]["response_ids"] or []), 1)
            counts["kept_prefix_frac_sum"] += cand["offpolicy_start"] / parent_len
            counts["kept_steps_frac_sum"] += rows[i]["first_error_step"] / max(len(rows[i]["steps"] or []), 1)
        counts["rectified"] = len(accepted)
    elif algo == "luffy" and salvaged:
        candidates = {}
        for i in salvaged:
            reference = rows[i].get("solution")
            if not reference:
                counts["no_reference"] += 1
                continue
            ids = guide_tokens(tokenizer, GuideOutput(reference, "stop"))
            candidates[i] = new_row(rows[i], origin="reference", sample_idx=new_idx[i], seed=seeds[i],
                                    ids=ids, offpolicy_start=0, finish_reason="stop",
                                    tokenizer=tokenizer, guide="reference", guide_text=reference,
                                    stop=cfg.generate.stop)
        counts["dropped"] += len(admit(candidates))
        counts["reference"] = len(accepted)

    out: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        replaced = i in accepted and mode == "replace"
        out.append({**row, "origin": "policy", "in_batch": not replaced, "parent_sample_idx": None,
                    "offpolicy_start": None, "kept_text": None, "guide_text": None})
        if i in accepted:
            out.append(accepted[i])
    n_new = counts["rectified"]
    counts["mean_kept_prefix_frac"] = counts["kept_prefix_frac_sum"] / n_new if n_new else None
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
        if cfg.run.algo == "grpo" or not any(r["salvage"] for r in rows):
            out, counts = rectify_rows(rows, cfg, round_, None, None, None)
        else:
            if not tokenizer:
                tokenizer.append(load_policy_tokenizer(run.input_policy(round_), cfg.policy.trust_remote_code))
            guide = res.guide() if cfg.run.algo == "scope" else None
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
