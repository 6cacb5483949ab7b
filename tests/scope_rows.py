"""Hand-built arith rows and runs for the prm-score / locate-error / rectify tests.

Rows conform to scope_cli.schema.VERIFIED: a response text is tokenized with the arith tokenizer (no
eos: generate leaves it out of response_ids), the verify columns follow the answer check (the boxed
value against the answer), and the seed is the run's row seed, as generate and verify write them.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa

from scope_cli.core.runs import Run, row_seed
from scope_cli.schema import VERIFIED
from scope_cli.core.files import shard_path, write_parquet_atomic
from scope_cli.tasks import arith


def prompt_id(problem: str) -> str:
    import hashlib

    return hashlib.sha256(f"arith\x00{problem}".encode()).hexdigest()[:16]


def arith_row(tok, problem: str, response: str, sample_idx: int, *, seed: int = 0, round_: int = 1,
              finish_reason: str = "stop", solution: str | None = "auto") -> dict:
    pid = prompt_id(problem)
    answer = str(arith.evaluate(problem))
    if solution == "auto":
        solution = arith.reference_solution(problem, random.Random(problem))
    ids = tok.encode(response, add_special_tokens=False)  # generate leaves the eos out
    pred = arith.extract_answer(response)
    correct = pred == answer
    prompt = arith.format_prompt(problem)
    return {
        "prompt_id": pid, "problem": problem, "messages": None, "answer": answer,
        "solution": solution, "data_source": "arith", "task": "arith",
        "difficulty": len(problem) // 2 + 1, "extra_info": None,
        "sample_idx": sample_idx, "prompt_text": prompt,
        "prompt_ids": tok.encode(prompt, add_special_tokens=False), "response": response,
        "response_ids": ids, "response_logprobs": [-0.25 - 0.01 * i for i in range(len(ids))],
        "finish_reason": finish_reason, "policy": "policy-000",
        "seed": row_seed(seed, round_, pid, sample_idx),
        "pred": pred, "correct": correct, "reward": 1.0 if correct else 0.0,
        "verify_status": "ok" if pred is not None else "no_answer",
    }


def group(tok, problem: str, responses: list[str], **kw) -> list[dict]:
    return [arith_row(tok, problem, r, i, **kw) for i, r in enumerate(responses)]


def verified_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=VERIFIED)


def make_run(root: Path, policy: Path, overrides: list[str] | None = None) -> Run:
    """A run folder with policy-000 copied from `policy` (no prompts: stages here read round files)."""
    from scope_cli.core.policy import copy_policy

    run = Run.open(root, None, [f"policy.path={policy}", *(overrides or [])], create=True)
    copy_policy(policy, run.policy_dir(0), {"round": 0})
    return run


def write_verified(run: Run, round_: int, shards: list[list[dict]]) -> None:
    for i, rows in enumerate(shards):
        write_parquet_atomic(verified_table(rows), shard_path(run.stage_dir(round_, "verified"), i))


# Responses for the problem 7+5-7 (answer 5)
PROBLEM = "7+5-7"
RIGHT = "7+5=2;2-7=5;\\boxed{5}"
RIGHT_2 = "7-7=0;0+5=5;\\boxed{5}"
WRONG_AT_1 = "7+5=2;2-7=4;\\boxed{4}"  # first error: step 1
WRONG_AT_0 = "7+5=3;3-7=6;\\boxed{6}"  # first error: step 0
WRONG_ANSWER = "7+5=2;2-7=5;\\boxed{4}"  # first error: step 2 (the boxed value)
TRUNCATED = "7+5=2;2-"  # first error: step 1 (cut off)
NO_ANSWER = "7+5=2;2-7=5"  # first error: step 1 (stopped before the answer)
