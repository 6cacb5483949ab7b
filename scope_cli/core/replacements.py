"""The replacement rows of each algorithm, as one table (`REPLACEMENTS`: run.algo -> how the candidate
rows for its salvaged rows are made), used by stages/rectify.py, which re-verifies and admits them.

- grpo, vppo: none (the batch is the rollouts; vppo masks failed rows' verified prefixes in train-step);
- luffy: the prompt's reference solution, whole (`reference_rows`);
- scope: the parent's kept prefix + the guide's continuation (`guide_continuations`);
- luffy_matched: scope's rows, the guide's whole solution (`guide_solutions`).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from scope_cli.backends.guide import GuideOutput, GuideRequest, OracleGuide
from scope_cli.core.splice import guide_tokens, new_row, splice_request
from scope_cli.tasks import get_task


@dataclass
class Salvaged:
    """A shard's rows, the new sample_idx and seed of each salvaged one, and what candidate rows are
    made with: the policy's tokenizer, the guide (scope), generate.stop; `counts`: the summary."""

    rows: list[dict[str, Any]]
    sample_idx: dict[int, int]
    seeds: dict[int, int]
    tokenizer: Any
    guide: Any
    stop: Sequence[str]
    counts: dict[str, Any]

    def new_row(self, i: int, **kw: Any) -> dict[str, Any]:
        return new_row(self.rows[i], sample_idx=self.sample_idx[i], seed=self.seeds[i],
                       tokenizer=self.tokenizer, stop=self.stop, **kw)


def other_solution(row: dict[str, Any], given: list[str], seed: int, draws: int = 64) -> str | None:
    """A correct solution of the row's problem that is none of `given`, from the task's exact solver
    (`task.solve_from` from an empty prefix: for arith another order of the terms) with an rng seeded
    from `seed`: up to `draws` draws, the first new one wins. None where the task has no solver or
    no draw is new (e.g. a problem whose terms all read the same has one solution)."""
    solve = getattr(get_task(row["task"]), "solve_from", None)
    if solve is None:
        return None
    rng = random.Random(f"reference\x00{int(seed)}")
    for _ in range(draws):
        text = solve(row["problem"], [], rng)
        if text not in given:
            return text
    return None


def reference_rows(s: Salvaged, todo: list[int], attempt: int) -> dict[int, dict[str, Any]]:
    """The prompt's reference solution as a whole trajectory (offpolicy_start 0) for the first
    salvaged row of a group; never a copy of one the group already got: its next rows get other
    correct solutions (`other_solution`, from each new row's seed), or none where the task cannot
    make one (counted: same_reference; the row stays as it was). A row whose prompt has no
    reference gets no candidate (counted: no_reference)."""
    out = {}
    given: dict[str, list[str]] = defaultdict(list)
    for i in todo:
        row = s.rows[i]
        reference = row.get("solution")
        if not reference:
            s.counts["no_reference"] += 1
            continue
        used = given[row["prompt_id"]]
        text = other_solution(row, used, s.seeds[i]) if used else reference
        if text is None:
            s.counts["same_reference"] += 1
            continue
        used.append(text)
        ids = guide_tokens(s.tokenizer, GuideOutput(text, "stop"))
        out[i] = s.new_row(i, origin="reference", ids=ids, offpolicy_start=0, finish_reason="stop",
                           guide="reference", guide_text=text)
    return out


def guide_continuations(s: Salvaged, todo: list[int], attempt: int) -> dict[int, dict[str, Any]]:
    """The parent's own tokens through its last correct step + the guide's continuation of them
    (`attempt` k: the guide samples with a seed of its own)."""
    requests = {i: splice_request(s.rows[i], s.tokenizer, s.seeds[i]) for i in todo}
    outs = s.guide.continue_([requests[i][0] for i in todo], attempt)
    s.counts["tries"] += len(todo)
    out = {}
    for i, guided in zip(todo, outs):
        cut = requests[i][1]
        ids = list(s.rows[i]["response_ids"][:cut]) + guide_tokens(s.tokenizer, guided)
        out[i] = s.new_row(i, origin="rectified", ids=ids, offpolicy_start=cut,
                           finish_reason=guided.finish_reason, guide=s.guide.name(s.rows[i]),
                           guide_text=guided.text)
    return out


def guide_solutions(s: Salvaged, todo: list[int], attempt: int) -> dict[int, dict[str, Any]]:
    """The guide's whole solution, asked as scope asks for a continuation but with nothing kept
    (`attempt` k: the guide samples with a seed of its own; each row has its own seed). The oracle
    gives a group no two copies of one solution where the task has another (`other_solution`
    from the row's seed); where it has none the copy stays, so the rows stay scope's."""
    requests = [GuideRequest(row=s.rows[i], kept_steps=[], kept_text="", prefix_text="", seed=s.seeds[i])
                for i in todo]
    outs = s.guide.continue_(requests, attempt)
    s.counts["tries"] += len(todo)
    out = {}
    given: dict[str, list[str]] = defaultdict(list)
    for i, guided in zip(todo, outs):
        used = given[s.rows[i]["prompt_id"]]
        if isinstance(s.guide, OracleGuide) and guided.text in used:
            guided = GuideOutput(other_solution(s.rows[i], used, s.seeds[i]) or guided.text, "stop")
        used.append(guided.text)
        out[i] = s.new_row(i, origin="guided", ids=guide_tokens(s.tokenizer, guided), offpolicy_start=0,
                           finish_reason=guided.finish_reason, guide=s.guide.name(s.rows[i]),
                           guide_text=guided.text)
    return out


@dataclass(frozen=True)
class Replacement:
    """How an algorithm makes the candidate rows for its salvaged rows: `make(salvaged, todo,
    attempt)` -> {row index: candidate}; `guided`: the guide writes them, so a rejected one is asked
    again (a new seed) up to rectify.max_tries times; else they are made once."""

    make: Callable[[Salvaged, list[int], int], dict[int, dict[str, Any]]]
    guided: bool


REPLACEMENTS: dict[str, Replacement | None] = {
    "grpo": None,  # no replacement rows: the batch is the rollouts
    "vppo": None,  # none either: train-step masks the failed rows' verified prefixes
    "luffy": Replacement(reference_rows, guided=False),  # the reference solution, whole
    "scope": Replacement(guide_continuations, guided=True),  # the kept prefix + the guide's continuation
    "luffy_matched": Replacement(guide_solutions, guided=True),  # scope's rows, the guide's whole solution
}
