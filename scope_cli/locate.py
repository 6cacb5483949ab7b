"""Locating errors and choosing the rows to salvage, as small pure functions: a row's first wrong step
from its PRM scores, the PRM noise of the miniature, ProcessBench-style agreement with exact labels,
and the per-group selection of failed rows that rectify replaces. stages/prm_score.py and
stages/locate_error.py compose them; tests/test_locate.py checks each against hand-computed values.

Conventions. Step scores are P(step correct), one per step, in step order; steps are 0-based. A step
is wrong when its score is below the threshold (`locate.threshold`, 0.5 by default); a row's first
error is None when it has no scores or no step is below it (threshold method).
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

from scope_cli.sections import LocateConfig


# ---- first errors ----------------------------------------------------------------------------------
def first_error(scores: list[float] | None, method: str = "threshold", threshold: float = 0.5) -> int | None:
    """0-based first wrong step: the first score below `threshold` (threshold), or the lowest-scored
    step (argmin: the verifier already says the row is wrong; ties go to the earliest step). None when
    there are no scores, or (threshold) when every step is at or above it."""
    if not scores:
        return None
    if method == "argmin":
        low = min(scores)
        return scores.index(low)
    for i, s in enumerate(scores):
        if s < threshold:
            return i
    return None


def apply_noise(scores: list[float], p: float, seed: int, threshold: float) -> tuple[list[float], str | None]:
    """With probability p (drawn from the row's seed), perturb a row whose PRM finds a wrong step (a
    score below `threshold`): miss it, or shift the first error one step earlier or later. Returns
    the scores and what was done (None, "miss", "shift-", "shift+").

      miss    every score s below the threshold t is mirrored above it, 1 - s·(1-t)/t
              ([0, t) onto (t, 1]; at t = 0.5 this is 1 - s); the others stay
      shift±  the score list moves by one step (clamped at the ends), so the first error does too

    A shift that would leave the steps is not drawn; a one-step row can only be missed."""
    if p <= 0 or not scores:
        return scores, None
    rng = random.Random(f"prm-noise\x00{int(seed)}")
    if rng.random() >= p:
        return scores, None
    e = first_error(scores, "threshold", threshold)
    if e is None:
        return scores, None
    n = len(scores)
    kinds = ["miss"] + (["shift-"] if e - 1 >= 0 else []) + (["shift+"] if e + 1 < n else [])
    kind = rng.choice(kinds)
    if kind == "miss":  # threshold > 0 here: a score below it was found
        mirror = (1.0 - threshold) / threshold
        return [s if s >= threshold else 1.0 - s * mirror for s in scores], kind
    d = 1 if kind == "shift+" else -1
    return [scores[min(max(i - d, 0), n - 1)] for i in range(n)], kind


def processbench(pred: list[int | None], label: list[int | None]) -> dict[str, Any]:
    """ProcessBench-style agreement of predicted and labelled first errors (None: no error).

    accuracy on erroneous samples (pred == label among labelled errors), on correct samples (pred is
    None among label None), their harmonic mean (f1), and first-error exact match over all samples;
    None where a metric has no samples."""
    if len(pred) != len(label):
        raise ValueError("pred and label differ in length")
    err = [p == lab for p, lab in zip(pred, label) if lab is not None]
    cor = [p is None for p, lab in zip(pred, label) if lab is None]
    acc_err = sum(err) / len(err) if err else None
    acc_cor = sum(cor) / len(cor) if cor else None
    if acc_err is None or acc_cor is None:
        f1 = None  # undefined without both kinds of sample
    else:
        f1 = 2 * acc_err * acc_cor / (acc_err + acc_cor) if (acc_err + acc_cor) > 0 else 0.0
    exact = sum(p == lab for p, lab in zip(pred, label)) / len(pred) if pred else None
    return {"samples": len(pred), "erroneous": len(err), "correct": len(cor),
            "acc_erroneous": acc_err, "acc_correct": acc_cor, "f1": f1, "exact_match": exact}


# ---- rows to salvage -------------------------------------------------------------------------------
# the algorithms (run.algo) that salvage by the PRM's first error (the same rows for both)
SALVAGE_BY_PREFIX = ("scope", "luffy_matched")


def uses_prm(algo: str) -> bool:
    """Whether run.algo needs step scores (prm-score loads a PRM, locate-error finds first errors):
    the algorithms that salvage by them, and vppo, which masks a failed row's verified prefix."""
    return algo in SALVAGE_BY_PREFIX or algo == "vppo"


def group_limit(n_failed: int, n_correct: int, max_per_group: int, mode: str) -> int:
    """How many failed rows of a group may be salvaged: at most max_per_group; in replace mode a group
    with correct rows keeps one failure (else every advantage of the group would be zero)."""
    limit = min(max_per_group, n_failed)
    if mode == "replace" and n_correct > 0:
        limit = min(limit, n_failed - 1)
    return max(limit, 0)


def salvage_order(firsts: dict[int, int], sample_idx: dict[int, int], order: str, seed: int = 0,
                  round_: int = 0, prompt_id: str = "") -> list[int]:
    """One group's qualifying failed rows (row index -> first wrong step, row index -> sample_idx) in
    the order they are salvaged (locate.order): longest, the longest correct prefix first (ties:
    lower sample_idx); random, the rows in sample_idx order shuffled by an rng seeded from
    (run.seed, round, prompt_id), so every arm of a seed draws the same order for a group."""
    rows = sorted(firsts, key=lambda i: sample_idx[i])
    if order == "random":
        random.Random(f"salvage\x00{int(seed)}\x00{int(round_)}\x00{prompt_id}").shuffle(rows)
        return rows
    return sorted(rows, key=lambda i: (-firsts[i], sample_idx[i]))


def select(rows: list[dict[str, Any]], locate: LocateConfig, algo: str, mode: str, seed: int = 0,
           round_: int = 0) -> tuple[list[int | None], list[bool], dict[str, int]]:
    """first_error_step and salvage for each row, and the summary counters. `rows`: dicts with
    prompt_id, sample_idx, correct and step_scores; `algo`: run.algo; `mode`: rectify.mode; `seed`
    and `round_` (run.seed, the round) seed locate.order = random.

    Per prompt group: scope and luffy_matched salvage failed rows whose first error is at step >=
    min_prefix_steps, in `salvage_order` (locate.order: longest correct prefix first, or random);
    luffy the same number from all failed rows, lowest sample_idx first; grpo and vppo none (vppo
    uses the first errors alone). A failed row with scores but no wrong step is a disagreement:
    salvaged (its first error put at the last step) only with salvage_disagreement."""
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
        firsts[i] = first_error(scores, locate.method, locate.threshold)
        if not failed:
            continue
        if not scores:
            counts["no_steps"] += 1
        elif firsts[i] is None:
            counts["disagreements"] += 1
            if locate.salvage_disagreement:
                firsts[i] = len(scores) - 1
        counts["located"] += firsts[i] is not None
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[row["prompt_id"]].append(i)
    for members in groups.values():
        failed = [i for i in members if not rows[i]["correct"]]
        n_correct = len(members) - len(failed)
        kind = "all_correct" if not failed else ("all_wrong" if n_correct == 0 else "mixed")
        counts[f"groups_{kind}"] += 1
        if algo not in (*SALVAGE_BY_PREFIX, "luffy") or not failed:
            continue  # grpo, vppo: nothing to salvage
        limit = group_limit(len(failed), n_correct, locate.max_per_group, mode)
        if algo in SALVAGE_BY_PREFIX:
            qualify = {i: firsts[i] for i in failed
                       if firsts[i] is not None and firsts[i] >= locate.min_prefix_steps}
            pool = salvage_order(qualify, {i: rows[i]["sample_idx"] for i in qualify}, locate.order,
                                 seed, round_, rows[members[0]]["prompt_id"])
        else:  # luffy: any failure
            pool = sorted(failed, key=lambda i: rows[i]["sample_idx"])
        for i in pool[:limit]:
            salvage[i] = True
    counts["salvaged"] = sum(salvage)
    return firsts, salvage, counts
