"""Splicing: a salvaged row's kept prefix and the new rows rectify writes (stages/rectify.py).

The kept prefix of a row whose first wrong step is f is its own tokens ``response_ids[:step_token_ends
[f-1]]`` (never re-tokenized; the seam may be a non-canonical tokenization, see
scope_cli/backends/steps.py); `splice_request` also gives the guide its text (the kept steps, the kept
text and the decode of the kept tokens). `new_row` builds a new row of the batch from its parent, the
kept tokens and a guide's text in the policy's tokens (`guide_tokens`): steps recomputed on the new
tokens, the parent's log-probs on the prefix and null after it, the policy's EOS as stop_token_id
where the row finished by itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from scope_cli.backends.guide import GuideOutput, GuideRequest
from scope_cli.backends.steps import align_steps, decode
from scope_cli.core.files import ShardError
from scope_cli.tasks import get_task


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
