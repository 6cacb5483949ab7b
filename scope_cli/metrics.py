"""Evaluation and training metrics: pure functions over per-sample rows, plus one reader of a round's
stage tables.

Sampled metrics take the n samples of each prompt (n = `eval.n_samples`):

- avg@1: the mean correctness of all samples;
- pass@k: the unbiased estimator 1 - C(n-c, k) / C(n, k) per prompt (c correct of n), averaged;
- maj@k: majority vote over the normalised answers of k samples, averaged over the n // k disjoint
  blocks of k consecutive samples (by sample_idx); samples without an answer do not vote; a tie for
  the most votes counts wrong;
- distinct solutions: among a prompt's correct samples, the number of distinct canonical solutions
  (`task.canonical_solution`), raw and normalised as (distinct - 1) / (correct - 1) over prompts
  with at least two correct samples (0: all the same, 1: all different);
- distinct-n: unique n-grams / all n-grams over a prompt's samples, averaged over prompts; the units
  are steps for arith and whitespace-separated words otherwise (never characters). Over all samples it
  moves with where errors fall (failures that share a long correct prefix repeat its n-grams), so three
  measures follow that failures cannot move, each on every prompt of the set whatever the arm:
- distinct-n[correct]: distinct-n over correct samples only, pooled over all prompts: the sum over
  prompts of a prompt's unique n-grams (n-grams of different prompts never count as repeats) divided
  by the sum of its n-grams. A prompt without a correct sample adds nothing to either sum, so the
  prompt set is every prompt of the set for every arm (no per-arm average over a subset);
- distinct_correct@k: the expected number of distinct correct solutions among k samples drawn without
  replacement from a prompt's n, averaged over ALL prompts (0 where none is correct). Unbiased like
  pass@k: a distinct solution held by m of the n samples appears among k with probability
  1 - C(n-m, k) / C(n, k); the expectation is the sum of that over distinct solutions. k = 1 is avg@1,
  so only k >= 2 is reported;
- strategy_entropy (arith): the entropy in bits of a prompt's correct solutions' strategies, where a
  strategy is the order in which a solution's steps apply the signed terms (each step
  `left<sign><digit>=result` applies the term <sign><digit>; `task.canonical_solution`, e.g. '+5,-7'):
  log2(number of strategies) when all are equally common, 0 when one strategy or one correct sample.
  `strategy_entropy` averages prompts with at least one correct sample (a set that differs by arm);
  `strategy_entropy[all]` averages every prompt with 0 where none is correct (the same set for every
  arm: it is the one to compare arms on);
- pair_differ_probability (used by bench/diversity_common.py, not an eval row): the chance that two
  correct solutions of a prompt differ, estimated without bias at any number of correct samples; the
  script averages it over the prompts on which every arm has at least two correct samples, one
  prompt set for all arms, so neither accuracy nor where errors fall can move it;
- later-error share: of the failures an exact step checker located, the share whose first wrong
  step is not the first step (index >= 1).

`scope_cli.core.runs.training_metrics` reads what a round's stages wrote (verified/, located/, rectified/,
train/metrics.parquet) into one flat dict; `summary_table` turns a dict into EVAL_SUMMARY rows.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pyarrow as pa

from scope_cli.schema import EVAL_SUMMARY, conform

DISTINCT_NS = (1, 2)


# ---- single estimators -----------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt with c correct of n samples: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: need 0 <= correct <= samples, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k: need 1 <= k <= samples, got k={k}, n={n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(votes: Sequence[tuple[str | None, bool]]) -> bool:
    """Whether the most common answer of `votes` [(normalised answer, correct)] is correct.

    Votes without an answer (None) do not count; no votes or a tie for the most votes is wrong. An
    answer is correct when any sample that gave it was verified correct.
    """
    counts = Counter(key for key, _ in votes if key is not None)
    if not counts:
        return False
    ranked = counts.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return False
    winner = ranked[0][0]
    return any(ok for key, ok in votes if key == winner)


def maj_at_k(votes: Sequence[tuple[str | None, bool]], k: int) -> float:
    """maj@k of one prompt's samples (in sample order): the mean of `majority_correct` over the
    len(votes) // k disjoint blocks of k consecutive samples."""
    blocks = len(votes) // k
    if k < 1 or blocks == 0:
        raise ValueError(f"maj@k: need 1 <= k <= samples, got k={k}, samples={len(votes)}")
    return sum(majority_correct(votes[b * k:(b + 1) * k]) for b in range(blocks)) / blocks


def distinct_ratio(distinct: int, correct: int) -> float | None:
    """(distinct - 1) / (correct - 1): 0 when every correct solution is the same, 1 when all differ;
    None with fewer than two correct solutions."""
    if correct < 2:
        return None
    if not 1 <= distinct <= correct:
        raise ValueError(f"distinct solutions: need 1 <= distinct <= correct, got {distinct}, {correct}")
    return (distinct - 1) / (correct - 1)


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(token_lists: Iterable[Sequence[str]], n: int) -> float | None:
    """Unique n-grams / all n-grams over several token lists; None when there is no n-gram."""
    grams = [g for tokens in token_lists for g in ngrams(tokens, n)]
    if not grams:
        return None
    return len(set(grams)) / len(grams)


def distinct_n_within(groups: Iterable[Iterable[Sequence[str]]], n: int) -> float | None:
    """Distinct-n pooled over groups (prompts): the sum of each group's unique n-grams over the sum of
    its n-grams (an n-gram repeated in another group is not a repeat). None when there is no n-gram."""
    unique = total = 0
    for token_lists in groups:
        grams = [g for tokens in token_lists for g in ngrams(tokens, n)]
        unique += len(set(grams))
        total += len(grams)
    return unique / total if total else None


def pair_differ_probability(multiplicities: Sequence[int]) -> float | None:
    """The chance that two correct solutions of a prompt differ (Gini-Simpson diversity of its
    strategies), estimated without bias from c = sum(multiplicities) correct samples:
    1 - sum_i m_i (m_i - 1) / (c (c - 1)). Its expectation does not depend on c (unlike distinct-n or
    the entropy of c samples, which move with how many are correct); None with fewer than two."""
    if any(m < 1 for m in multiplicities):
        raise ValueError(f"pair_differ_probability: need multiplicities >= 1, got {list(multiplicities)}")
    c = sum(multiplicities)
    if c < 2:
        return None
    return 1.0 - sum(m * (m - 1) for m in multiplicities) / (c * (c - 1))


def expected_distinct(multiplicities: Sequence[int], n: int, k: int) -> float:
    """Expected number of distinct solutions among k of n samples drawn without replacement, where
    distinct solution i is held by multiplicities[i] samples: sum_i 1 - C(n - m_i, k) / C(n, k).
    Samples outside `multiplicities` (wrong ones) fill the rest of the n."""
    if not 1 <= k <= n:
        raise ValueError(f"distinct@k: need 1 <= k <= samples, got k={k}, n={n}")
    if any(m < 1 for m in multiplicities) or sum(multiplicities) > n:
        raise ValueError(f"distinct@k: need multiplicities >= 1 summing to at most {n}, got {list(multiplicities)}")
    return sum(1.0 - math.comb(n - m, k) / math.comb(n, k) for m in multiplicities)


def entropy_bits(counts: Iterable[int]) -> float:
    """Entropy in bits of the empirical distribution with these counts; 0 for no counts."""
    kept = [c for c in counts if c > 0]
    total = sum(kept)
    return -sum(c / total * math.log2(c / total) for c in kept) if total else 0.0


def later_error_share(first_error_steps: Iterable[int | None]) -> float | None:
    """Of failures with a located first wrong step (None: not located), the share past step index 0."""
    located = [s for s in first_error_steps if s is not None]
    if not located:
        return None
    return sum(s >= 1 for s in located) / len(located)


def mean(values: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


# ---- task-dependent helpers -----------------------------------------------------------------------
def default_normalise(answer: str) -> str:
    """A light answer normaliser for majority voting: no spaces, `$`, `\\left`/`\\right`, spacing
    commands or trailing period; `\\dfrac`/`\\tfrac` as `\\frac`; `\\text{x}` as `x`."""
    text = answer.strip().strip("$").rstrip(".")
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    text = text.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac")
    text = text.replace("\\tfrac", "\\frac")
    text = re.sub(r"\\[,!;: ]", "", text)
    return re.sub(r"\s+", "", text)


def answer_key(task: Any, pred: str | None) -> str | None:
    """The voting key of an extracted answer: the task's `normalise_answer` where it has one."""
    if pred is None or not str(pred).strip():
        return None
    normalise: Callable[[str], str] = getattr(task, "normalise_answer", None) or default_normalise
    return normalise(str(pred)) or None


# tasks whose distinct-n counts steps rather than words, and whose canonical solution is a strategy (the
# order the terms are applied in; any order is correct)
STEP_UNIT_TASKS = ("arith",)
STRATEGY_TASKS = ("arith",)


def diversity_units(task: Any, response: str) -> list[str]:
    """The tokens of distinct-n: the task's steps for step-structured tasks, else words."""
    if task.NAME in STEP_UNIT_TASKS:
        return task.step_texts(response)
    return response.split()


# ---- one eval set -------------------------------------------------------------------------------------
def _by_prompt(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row["prompt_id"]].append(row)
    for group in groups.values():
        group.sort(key=lambda r: r["sample_idx"])
    return dict(sorted(groups.items()))


def _by_difficulty(rows: Iterable[dict[str, Any]]) -> dict[int, list[bool]]:
    out: dict[int, list[bool]] = defaultdict(list)
    for row in rows:
        if row.get("difficulty") is not None:
            out[int(row["difficulty"])].append(bool(row["correct"]))
    return dict(sorted(out.items()))


def greedy_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """From one greedy sample per prompt: accuracy, accuracy by difficulty, later-error share.

    Rows need: correct, difficulty (may be None), first_error_step (None where not located)."""
    if not rows:
        return {}
    out: dict[str, float] = {"greedy_acc": sum(bool(r["correct"]) for r in rows) / len(rows)}
    for level, oks in _by_difficulty(rows).items():
        out[f"greedy_acc[difficulty={level}]"] = sum(oks) / len(oks)
    share = later_error_share(r.get("first_error_step") for r in rows if not r["correct"])
    if share is not None:
        out["greedy_later_error_share"] = share
    return out


def sampled_metrics(rows: Sequence[dict[str, Any]], task_of: Callable[[str], Any],
                    ks: Sequence[int] = (1, 4, 8)) -> dict[str, float]:
    """From n samples per prompt: avg@1, pass@k, maj@k, accuracy by difficulty, diversity and the
    later-error share. `task_of(task_name)` returns the task module.

    Rows need: prompt_id, sample_idx, task, response, pred, correct, difficulty, canonical_solution,
    first_error_step."""
    if not rows:
        return {}
    groups = _by_prompt(rows)
    sizes = {len(g) for g in groups.values()}
    if len(sizes) != 1:
        raise ValueError(f"sampled rows: every prompt needs the same number of samples, got {sorted(sizes)}")
    (n,) = sizes
    out: dict[str, float] = {"samples_per_prompt": float(n)}
    out["avg@1"] = sum(bool(r["correct"]) for r in rows) / len(rows)
    for k in ks:
        if k <= n:
            out[f"pass@{k}"] = mean(pass_at_k(n, sum(bool(r["correct"]) for r in g), k)
                                    for g in groups.values())
    for k in ks:
        if k <= n:
            out[f"maj@{k}"] = mean(
                maj_at_k([(answer_key(task_of(r["task"]), r["pred"]), bool(r["correct"])) for r in g], k)
                for g in groups.values())
    for level, oks in _by_difficulty(rows).items():
        out[f"avg@1[difficulty={level}]"] = sum(oks) / len(oks)

    distinct, ratios = [], []
    for g in groups.values():
        solutions = [r["canonical_solution"] for r in g if r["correct"]]
        if solutions:
            distinct.append(len(set(solutions)))
            ratios.append(distinct_ratio(len(set(solutions)), len(solutions)))
    for name, value in (("distinct_correct", mean(distinct)), ("distinct_correct_norm", mean(ratios))):
        if value is not None:
            out[name] = value
    for n_gram in DISTINCT_NS:
        value = mean(distinct_n([diversity_units(task_of(r["task"]), r["response"]) for r in g], n_gram)
                     for g in groups.values())
        if value is not None:
            out[f"distinct-{n_gram}"] = value
    out.update(correct_diversity(groups, task_of, n, ks))
    share = later_error_share(r.get("first_error_step") for r in rows if not r["correct"])
    if share is not None:
        out["later_error_share"] = share
    return out


def correct_diversity(groups: dict[str, list[dict[str, Any]]], task_of: Callable[[str], Any], n: int,
                      ks: Sequence[int]) -> dict[str, float]:
    """The diversity measures over correct samples (module docstring), from n samples per prompt."""
    out: dict[str, float] = {}
    correct = {p: [r for r in g if r["correct"]] for p, g in groups.items()}
    for n_gram in DISTINCT_NS:
        value = distinct_n_within(([diversity_units(task_of(r["task"]), r["response"]) for r in rows]
                                   for rows in correct.values()), n_gram)
        if value is not None:
            out[f"distinct-{n_gram}[correct]"] = value
    solutions = {p: Counter(r["canonical_solution"] for r in rows) for p, rows in correct.items()}
    for k in ks:
        if 2 <= k <= n:
            out[f"distinct_correct@{k}"] = mean(expected_distinct(list(c.values()), n, k)
                                                for c in solutions.values())
    if all(r["task"] in STRATEGY_TASKS for g in groups.values() for r in g):
        entropies = {p: entropy_bits(c.values()) for p, c in solutions.items()}
        some = [h for p, h in entropies.items() if correct[p]]
        if some:
            out["strategy_entropy"] = mean(some)
        out["strategy_entropy[all]"] = mean(entropies.values())
    return out


def summary_table(round_: int, policy: str, eval_set: str, metrics: dict[str, float]) -> pa.Table:
    """EVAL_SUMMARY rows (long format), in the dict's order."""
    rows = [{"round": round_, "policy": policy, "eval_set": eval_set, "metric": k, "value": float(v)}
            for k, v in metrics.items()]
    return conform(pa.Table.from_pylist(rows, schema=EVAL_SUMMARY), EVAL_SUMMARY)
