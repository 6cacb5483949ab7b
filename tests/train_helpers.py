"""Builds a run with a hand-made round-R/rectified/ table for train-step tests.

Each prompt group holds rollouts sampled from the tiny policy (top_p=1, no top_k), one correct
solution, one solution that goes wrong at step 1 (the failed parent) and its rectified child: the
parent's correct first step followed by the oracle's continuation (off-policy from the step boundary).
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import torch

from scope_cli.models.tiny import init_tiny_policy
from scope_cli.backends.hf import load_policy
from scope_cli.core.runs import Run
from scope_cli.schema import RECTIFIED, conform
from scope_cli.core.files import write_parquet_atomic
from scope_cli.tasks import arith
from scope_cli.backends.training import response_logits, token_logprobs

BASE = ["generate.temperature=1.0", "train.lr=0.001", "train.threads=1"]


def make_run(root: Path, overrides: list[str] = (), seed: int = 0) -> Run:
    run = Run.open(root, None, [*BASE, *overrides], create=True)
    init_tiny_policy(run.policy_dir(0), seed=seed)
    return run


def wrong_at_step_1(problem: str, rng: random.Random) -> str:
    """A solution whose step 0 is right and step 1 has a wrong result."""
    steps = arith.step_texts(arith.reference_solution(problem, rng))
    left, rest = steps[1].split("=")
    steps[1] = f"{left}={(int(rest) + 1) % 10}"
    return arith.join_steps(steps)


def step_token_ends(tok, response: str) -> list[int]:
    return [len(tok(response[:end], add_special_tokens=False)["input_ids"])
            for _, end in arith.split_steps(response)]


def rectified_rows(run: Run, round_: int, n_prompts: int = 4, n_samples: int = 3,
                   mode: str = "replace", seed: int = 0, max_new_tokens: int = 12) -> list[dict]:
    """The rows of a rectified table for round `round_`, rollouts sampled from policy-(R-1)."""
    policy = run.policy_dir(round_ - 1)
    model, tok = load_policy(policy)
    rng = random.Random(seed)
    problems = arith.generate_problems(seed, n_prompts, 3, 5)
    eos = tok.eos_token_id
    rows = []
    for p_i, prob in enumerate(problems):
        base = {"prompt_id": f"p{p_i:03d}", "problem": prob["problem"], "answer": prob["answer"],
                "solution": prob["solution"], "task": "arith", "data_source": "arith",
                "prompt_text": arith.format_prompt(prob["problem"]), "policy": policy.name}
        prompt_ids = tok(base["prompt_text"], add_special_tokens=False)["input_ids"]
        torch.manual_seed(seed * 1000 + p_i)
        with torch.no_grad():
            gen = model.generate(torch.tensor([prompt_ids] * n_samples), do_sample=True, top_k=0,
                                 top_p=1.0, temperature=1.0, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos, pad_token_id=tok.pad_token_id)
        sampled = []
        for seq in gen[:, len(prompt_ids):].tolist():
            ids = seq[: seq.index(eos) + 1] if eos in seq else seq
            sampled.append(("sampled", ids))
        good = arith.reference_solution(prob["problem"], rng)
        bad = wrong_at_step_1(prob["problem"], rng)
        texts = [*sampled, ("good", tok(good, add_special_tokens=False)["input_ids"] + [eos]),
                 ("bad", tok(bad, add_special_tokens=False)["input_ids"] + [eos])]
        responses = [ids for _, ids in texts]
        logits, targets, _ = response_logits(model, [prompt_ids] * len(responses), responses,
                                                tok.pad_token_id, torch.device("cpu"))
        logps = token_logprobs(logits, targets, 1.0)
        for s_i, ((kind, ids), lp) in enumerate(zip(texts, logps)):
            text = tok.decode(ids, skip_special_tokens=True)
            correct = arith.first_error_step(prob["problem"], text) is None
            fe = None if correct else arith.first_error_step(prob["problem"], text)
            rows.append({**base, "sample_idx": s_i, "prompt_ids": prompt_ids, "response": text,
                         "response_ids": ids, "response_logprobs": lp[: len(ids)].tolist(),
                         "finish_reason": "stop" if ids and ids[-1] == eos else "length",
                         "seed": seed, "pred": arith.extract_answer(text), "correct": correct,
                         "reward": float(correct),
                         "verify_status": "ok" if arith.extract_answer(text) else "no_answer",
                         "steps": arith.step_texts(text), "step_token_ends": step_token_ends(tok, text),
                         "first_error_step": fe, "salvage": kind == "bad", "origin": "policy",
                         "in_batch": not (kind == "bad" and mode == "replace"),
                         "parent_sample_idx": None, "offpolicy_start": None})
        # the rectified child of the failed parent: its correct step 0, then the oracle
        parent = rows[-1]
        prefix_steps = parent["steps"][:1]
        cont = arith.solve_from(prob["problem"], prefix_steps, rng)
        prefix_ids = parent["response_ids"][: parent["step_token_ends"][0]]
        guide_ids = tok(cont, add_special_tokens=False)["input_ids"] + [eos]
        text = arith.join_steps(prefix_steps) + arith.STEP_SEPARATOR + cont
        rows.append({**base, "sample_idx": len(texts), "prompt_ids": prompt_ids, "response": text,
                     "response_ids": prefix_ids + guide_ids,
                     "response_logprobs": parent["response_logprobs"][: len(prefix_ids)]
                     + [None] * len(guide_ids),
                     "finish_reason": "stop", "seed": seed, "pred": arith.extract_answer(text),
                     "correct": True, "reward": 1.0, "verify_status": "ok",
                     "steps": arith.step_texts(text), "step_token_ends": step_token_ends(tok, text),
                     "first_error_step": None, "salvage": False, "origin": "rectified",
                     "in_batch": True, "parent_sample_idx": parent["sample_idx"],
                     "offpolicy_start": len(prefix_ids)})
    return rows


def write_rectified(run: Run, round_: int, rows: list[dict], shards: int = 2) -> None:
    """Write rows as `shards` shards (whole prompt groups per shard)."""
    ids = sorted({r["prompt_id"] for r in rows})
    for s in range(shards):
        part = [r for r in rows if ids.index(r["prompt_id"]) % shards == s]
        table = conform(pa.Table.from_pylist(part, schema=RECTIFIED), RECTIFIED)
        write_parquet_atomic(table, run.stage_dir(round_, "rectified") / f"shard-{s:05d}.parquet")


def build_round(run: Run, round_: int, **kw) -> None:
    write_rectified(run, round_, rectified_rows(run, round_, **kw))


def assert_adam_updates_agree(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], lr: float,
                              updates: int = 1, tight: float = 0.01, loose_share: float = 0.001) -> None:
    """Weights after the same Adam updates computed two ways (float sums in another order: micro-
    batches, processes, another CPU's vector width) agree as far as the maths allows.

    Adam's first step moves a weight by lr·m/(sqrt(v)+eps) ≈ lr·sign(grad), whatever the gradient's
    size, so a weight can differ by at most 2·lr per update (a near-zero gradient whose sign flips);
    for any gradient well above eps the reordered sums change the step by a relative ~1e-6. So every
    element must agree within 2·lr·updates (+ float32 rounding of the weight itself), and all but a
    `loose_share` of them within `tight` of one step.
    """
    assert sorted(got) == sorted(want)
    total = loose = 0
    worst = 0.0
    for name in want:
        a, b = got[name].double(), want[name].double()
        rounding = 2 * torch.finfo(torch.float32).eps * torch.maximum(a.abs(), b.abs())
        diff = (a - b).abs() - rounding
        worst = max(worst, diff.max().item())
        loose += int((diff > tight * lr).sum())
        total += diff.numel()
    assert worst <= 2 * lr * updates, f"a weight differs by {worst:.3g} > 2·lr·updates = {2 * lr * updates:.3g}"
    assert loose <= loose_share * total, (f"{loose} of {total} weights differ by more than {tight:.0%} of "
                                          f"an Adam step (allowed {loose_share:.1%})")
