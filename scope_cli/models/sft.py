"""SFT bootstrap: train a tiny arith policy from scratch on reference solutions, keep the first
checkpoint that reaches a target greedy accuracy.

    scope train-step --objective sft --out data/policies/arith-tiny
    scope train-step --objective sft --out data/policies/arith-guide --set sft.target_accuracy=0.9

No run folder is needed: problems come from `arith.generate_problems` with `sft.seed` (operand
counts `sft.min_operands`..`sft.max_operands`); the held-out and out-of-distribution eval problems
that `scope prepare` draws under the same `[prepare]` config are excluded, and so is a monitor set
of `sft.monitor_size` problems on which greedy accuracy is measured every `sft.eval_every` steps.
Each step draws `sft.batch_size` training problems with a freshly ordered reference solution (the
terms in a random order), so the policy learns many correct orders, not one. The loss is the token
mean of -log p over the completion (solution + eos) only; the prompt is `arith.format_prompt`.

Learning is abrupt (accuracy sits near zero for ~300 steps, then climbs from 0.2 to 0.6 within 25
steps), hence the dense evaluation: every `sft.eval_every` steps, and every step once accuracy reaches
`sft.dense_from` × the target. The first evaluated checkpoint with accuracy >= `sft.target_accuracy` is
saved to `--out` (a policy folder, atomically) and training stops. Greedy accuracy = the greedy
response is right at every step (`arith.first_error_step(problem, response) is None`), which implies
that its final \\boxed{} value equals the answer.

Rebuilding the shipped policies (the two commands above; CPU, one thread `train.threads = 1`):
arith-tiny reaches 0.40 at about step 340 (~0.18 s/step, under 2 minutes with evaluation), arith-guide
0.90 at about step 400. "Reproduces" means the rebuild reaches its target; bytes may differ across
machines and torch builds.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from scope_cli.core.config import Config
from scope_cli.errors import ScopeError
from scope_cli.models.tiny import build_arith_tokenizer, tiny_config
from scope_cli.backends.hf import count_parameters
from scope_cli.core.policy import save_policy
from scope_cli.tasks import arith
from scope_cli.backends.training import make_optimizer, response_logits, set_threads, token_logprobs


class SftError(ScopeError):
    """The SFT run could not reach its target: one line with what it reached."""


def eval_problems(cfg: Config) -> set[str]:
    """The problems `scope prepare` puts in the held-out and OOD eval sets for the built-in arith task
    under this config's [prepare] section (same seeds, sizes and exclusions as prepare's)."""
    p = cfg.prepare
    used = {r["problem"] for r in arith.generate_problems(p.seed, p.train_size, p.min_operands,
                                                          p.max_operands, set())}
    heldout = {r["problem"] for r in arith.generate_problems(p.seed + 1, p.eval_size, p.min_operands,
                                                             p.max_operands, used)}
    ood = {r["problem"] for r in arith.generate_problems(p.seed + 2, p.ood_size, p.ood_min_operands,
                                                         p.ood_max_operands, used | heldout)}
    return heldout | ood


@torch.no_grad()
def greedy_responses(model, tok, problems: list[str], max_new_tokens: int,
                     batch_size: int = 256) -> list[str]:
    """Greedy completions of `arith.format_prompt(problem)` (left-padded batches), eos stripped."""
    model.eval()
    out = []
    for i in range(0, len(problems), batch_size):
        enc = tok([arith.format_prompt(p) for p in problems[i: i + batch_size]], return_tensors="pt",
                  padding=True, padding_side="left", add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out.extend(tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    model.train()
    return out


def greedy_report(model, tok, problems: list[str], max_new_tokens: int) -> dict[str, Any]:
    """Greedy accuracy on `problems` and where the wrong responses first go wrong (step index)."""
    responses = greedy_responses(model, tok, problems, max_new_tokens)
    errors = [arith.first_error_step(p, r) for p, r in zip(problems, responses)]
    wrong = [e for e in errors if e is not None]
    return {
        "accuracy": sum(e is None for e in errors) / max(len(problems), 1),
        "first_error_step": dict(sorted(Counter(wrong).items())),
        "wrong_after_first_step": sum(e > 0 for e in wrong) / max(len(wrong), 1),
    }


def sft(cfg: Config, out: Path, *, quiet: bool = False) -> dict[str, Any]:
    """Train from scratch until greedy monitor accuracy reaches `sft.target_accuracy`; save to `out`."""
    from transformers import LlamaForCausalLM

    from scope_cli.console import make_console
    from scope_cli.backends.hf import quiet_transformers

    console = make_console(stderr=True, quiet=quiet)
    s = cfg.sft
    set_threads(cfg.train.threads)
    quiet_transformers()
    start = time.perf_counter()

    # data: monitor set and training pool, both disjoint from the run's eval sets
    held = eval_problems(cfg)
    monitor = [r["problem"] for r in arith.generate_problems(s.seed + 1, s.monitor_size,
                                                             s.min_operands, s.max_operands, held)]
    pool = [r["problem"] for r in arith.generate_problems(s.seed, s.train_size, s.min_operands,
                                                          s.max_operands, held | set(monitor))]
    tok = build_arith_tokenizer()
    prompt_ids = dict(zip(pool, tok([arith.format_prompt(p) for p in pool],
                                    add_special_tokens=False)["input_ids"]))

    # model and optimizer
    torch.manual_seed(s.seed)
    model = LlamaForCausalLM(tiny_config(tok, hidden_size=s.hidden_size, layers=s.layers,
                                         heads=s.heads, intermediate_size=s.intermediate_size))
    model.train()
    opt = make_optimizer(model, s.lr, cfg.train.betas, cfg.train.weight_decay)
    rng = random.Random(s.seed + 2)
    console.print(f"sft: {count_parameters(model):,} parameters, {len(pool)} training problems, "
                  f"{len(monitor)} monitor problems, target greedy accuracy {s.target_accuracy}")

    curve: list[tuple[int, float]] = []
    report: dict[str, Any] = {}
    train_seconds = 0.0
    for step in range(1, s.steps + 1):
        t0 = time.perf_counter()
        problems = [pool[rng.randrange(len(pool))] for _ in range(s.batch_size)]
        solutions = [arith.reference_solution(p, rng) for p in problems]
        completions = [ids + [tok.eos_token_id] for ids in
                       tok(solutions, add_special_tokens=False)["input_ids"]]
        logits, targets, mask = response_logits(model, [prompt_ids[p] for p in problems], completions,
                                                tok.pad_token_id, torch.device("cpu"))
        logp = token_logprobs(logits, targets, 1.0)
        loss = -(logp * mask).sum() / mask.sum()
        for group in opt.param_groups:
            group["lr"] = s.lr * min(1.0, step / max(s.warmup_steps, 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or float("inf"))  # 0: none
        opt.step()
        train_seconds += time.perf_counter() - t0

        dense = bool(curve) and curve[-1][1] >= s.dense_from * s.target_accuracy
        if dense or step % s.eval_every == 0 or step == s.steps:
            report = greedy_report(model, tok, monitor, s.max_new_tokens)
            curve.append((step, report["accuracy"]))
            console.print(f"sft: step {step} loss {loss.item():.4f} greedy accuracy "
                          f"{report['accuracy']:.3f}")
            if report["accuracy"] >= s.target_accuracy:
                info = {
                    "source": "sft", "step": step, "monitor_accuracy": report["accuracy"],
                    "target_accuracy": s.target_accuracy, "monitor_size": len(monitor),
                    "first_error_step": {str(k): v for k, v in report["first_error_step"].items()},
                    "wrong_after_first_step": report["wrong_after_first_step"],
                    "sft": cfg.get("sft"), "parameters": count_parameters(model),
                    "excluded_eval_sets": cfg.get("prepare"),  # the [prepare] whose eval sets it left out
                    "torch": torch.__version__,
                }
                save_policy(model, tok, out, info)
                seconds = time.perf_counter() - start
                console.print(f"sft: saved {out} (step {step}, greedy accuracy "
                              f"{report['accuracy']:.3f}, {seconds:.0f}s)")
                return {**info, "seconds": seconds, "seconds_per_step": train_seconds / step,
                        "curve": curve}
    raise SftError(
        f"sft: greedy accuracy reached only {max(a for _, a in curve):.3f} after {s.steps} steps "
        f"(target sft.target_accuracy={s.target_accuracy}); raise sft.steps or sft.lr"
    )
