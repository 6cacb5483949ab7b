"""Test fixtures for generation: a tiny policy fitted for a few steps on arith solutions, so that
greedy decoding writes steps, answers and EOS instead of repeating one character."""

from __future__ import annotations

import random
from pathlib import Path

from scope_cli.tasks import arith


def fit_tiny_policy(out: Path, *, steps: int = 40, seed: int = 0, lr: float = 1e-2,
                    until_well_formed: bool = False, max_steps: int = 400) -> Path:
    """init_tiny_policy, then `steps` Adam steps of teacher forcing on prompt + solution + EOS. With
    `until_well_formed`, 20 more steps at a time (up to `max_steps`) until greedy decoding of four
    probe prompts stops with a boxed answer: where a fixed step count crosses that threshold depends
    on the CPU's float order (60 steps did on one machine and not on another)."""
    import torch

    from scope_cli.models.tiny import init_tiny_policy
    from scope_cli.backends.hf import load_policy
    from scope_cli.core.policy import save_policy

    raw = init_tiny_policy(Path(out).with_name(Path(out).name + "-init"), seed=seed)
    model, tok = load_policy(raw)
    problems = arith.generate_problems(seed=seed + 100, count=256, min_operands=3, max_operands=5)
    rng = random.Random(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    torch.manual_seed(seed)
    done = 0
    while done < steps or (until_well_formed and done < max_steps and not _well_formed(model, tok)):
        for _ in range(1 if done < steps else 20):
            _fit_step(model, tok, opt, rng, problems)
            done += 1
    model.eval()
    return save_policy(model, tok, out, {"source": "fit_tiny_policy", "seed": seed, "steps": done})


def _fit_step(model, tok, opt, rng: random.Random, problems: list[dict]) -> None:
    import torch

    model.train()
    batch = rng.sample(problems, 32)
    texts = [arith.format_prompt(p["problem"]) + p["solution"] for p in batch]
    ids = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(map(len, ids))
    x = torch.full((len(ids), width), tok.pad_token_id)
    labels = torch.full((len(ids), width), -100)
    for i, row in enumerate(ids):
        x[i, :len(row)] = torch.tensor(row)
        labels[i, :len(row)] = torch.tensor(row)
    loss = model(input_ids=x, attention_mask=(labels != -100).long(), labels=labels).loss
    opt.zero_grad()
    loss.backward()
    opt.step()


def _well_formed(model, tok) -> bool:
    """Greedy decoding of four probe prompts ends with EOS right after a boxed answer."""
    import torch

    model.eval()
    with torch.no_grad():
        for prompt in arith_prompt_ids(tok, 4, seed=7):
            ids = torch.tensor([prompt])
            out = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
            if tok.eos_token_id not in out:
                return False
            text = tok.decode(out[:out.index(tok.eos_token_id)])
            if "\\boxed{" not in text or not text.endswith("}"):
                return False
    return True


def arith_prompt_ids(tokenizer, count: int, seed: int = 7) -> list[list[int]]:
    problems = arith.generate_problems(seed=seed, count=count, min_operands=3, max_operands=6)
    return [tokenizer(arith.format_prompt(p["problem"]))["input_ids"] for p in problems]
