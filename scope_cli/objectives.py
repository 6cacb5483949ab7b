"""The RL objective as small pure functions: rewards, group advantages, per-token losses, aggregation,
the learning-rate schedule. stages/train_step.py composes them; tests/test_objectives.py checks each
against hand-computed numbers.

Conventions. A row is one response; its tokens are the response tokens (the prompt is never trained).
`logp` is the log-probability of a response token under logits / T (T: the sampling temperature), the
same for the old policy, the new policy and the off-policy π. Arrays of advantages are per row;
per-token tensors are [rows, tokens] with a 0/1 mask.

Per-token loss terms (the loss is their weighted sum, see `token_weights`):
  on-policy   -min(r·A, clip(r, 1-ε_low, 1+ε_high)·A),  r = exp(logp - logp_old)   (PPO / DAPO clip)
  off-policy  -A·π/(π+γ),  π = exp(logp)   (LUFFY's shaped weight: behaviour prob taken as 1, no clip)
              or -A·logπ with offpolicy_loss = "nll" (no shaping, for ablations)
  KL          kl_coef · (exp(ref - logp) - (ref - logp) - 1)  (k3 estimator, to policy-000; off by default)
"""

from __future__ import annotations

import math

import numpy as np
import torch

UNVERIFIED = ("timeout", "error")


# ---- rewards and advantages ------------------------------------------------------------------------
def effective_rewards(rewards, statuses, drop_unverified: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Rewards with unverified rows (verify_status timeout/error) handled: reward 0 by default, or the
    row dropped (keep=False) with `drop_unverified`. Returns (rewards, keep, number of unverified)."""
    r = np.array([0.0 if v is None else float(v) for v in rewards], dtype=np.float64)
    bad = np.array([s in UNVERIFIED for s in statuses], dtype=bool)
    keep = ~bad if drop_unverified else np.ones(len(r), dtype=bool)
    r[bad] = 0.0
    return r, keep, int(bad.sum())


def first_groups_with_signal(order: list[str], signal: set[str], wanted: int) -> list[str]:
    """Dynamic sampling: the first `wanted` prompt groups, in the round's prompt order, among those
    with signal (rewards not all equal); the rest of the groups with signal are the surplus."""
    return [p for p in order if p in signal][:wanted]


def group_advantages(rewards, groups, is_policy, mode: str = "grpo",
                     eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt-group advantages over the whole round batch; returns (advantages, dropped) where
    dropped marks the rows of groups whose advantages are all zero (all rewards equal).

      grpo        (r - mean) / (std + eps)              over the whole group
      drgrpo      r - mean                              (Dr. GRPO: no std)
      grpo_split  (r - mean_p) / (std_p + eps)          mean and std over the group's policy rows
                                                        (LUFFY); when fewer than 2 policy rows or
                                                        std_p == 0, std_p is the whole group's std, and
                                                        with no policy row mean_p is the group's mean.
    std is the sample standard deviation (ddof=1, as torch.std in verl and TRL).
    """
    r = np.asarray(rewards, dtype=np.float64)
    groups = np.asarray(groups)
    is_policy = np.asarray(is_policy, dtype=bool)
    adv = np.zeros(len(r), dtype=np.float64)
    dropped = np.zeros(len(r), dtype=bool)
    for g in dict.fromkeys(groups.tolist()):
        idx = np.flatnonzero(groups == g)
        rg = r[idx]
        if np.ptp(rg) == 0.0:  # all equal: every advantage is exactly zero, no signal
            dropped[idx] = True
            continue
        std = rg.std(ddof=1)
        if mode == "grpo":
            adv[idx] = (rg - rg.mean()) / (std + eps)
        elif mode == "drgrpo":
            adv[idx] = rg - rg.mean()
        elif mode == "grpo_split":
            rp = rg[is_policy[idx]]
            mean_p = rp.mean() if len(rp) else rg.mean()
            std_p = rp.std(ddof=1) if len(rp) >= 2 else 0.0
            adv[idx] = (rg - mean_p) / ((std_p if std_p > 0 else std) + eps)
        else:
            raise ValueError(f"unknown advantage mode {mode!r}")
    return adv, dropped


# ---- which tokens train, and how -------------------------------------------------------------------
def loss_start(first_error_step: int | None, step_token_ends) -> int:
    """First trained token of an augment-mode parent: the start of its first wrong step, i.e. the end
    of the last correct step (step_token_ends[k-1]); 0 when step 0 is wrong or nothing is known."""
    if first_error_step is None or first_error_step <= 0 or not step_token_ends:
        return 0
    return int(step_token_ends[min(first_error_step, len(step_token_ends)) - 1])


def verified_prefix_start(adv: float, first_error_step: int | None, step_token_ends) -> int:
    """VPPO ("Save the Good Prefix"): the first trained token of a policy row. A row with a negative
    advantage and a located first wrong step trains from that step on (`loss_start`): its verified
    prefix, the steps before it, is not penalised. Any other row trains whole (0)."""
    if adv >= 0:
        return 0
    return loss_start(first_error_step, step_token_ends)


def token_masks(length: int, offpolicy_start: int | None, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(on-policy mask, off-policy mask) over a response of `length` tokens: tokens before `start` are
    not trained; tokens at or after `offpolicy_start` (when not None) are off-policy."""
    pos = np.arange(length)
    off_from = length if offpolicy_start is None else int(offpolicy_start)
    on = (pos >= start) & (pos < off_from)
    off = (pos >= max(start, off_from))
    return on, off


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip_low: float,
                  clip_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate -min(r·A, clip(r)·A); returns (loss, ratio, clipped) where clipped
    marks tokens whose clipped term is the one in force (no gradient flows through them)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -adv * ratio
    clipped_loss = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped_loss), ratio, clipped_loss > unclipped


def shaped_offpolicy_loss(logp: torch.Tensor, adv: torch.Tensor,
                          gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LUFFY's off-policy term -A·f(π), f(π) = π/(π+γ), π = exp(logp), gradient through π; no clip.
    d/dlogp = -A·γπ/(π+γ)²: small for tokens the policy already finds likely and for very unlikely
    ones. Returns (loss, π)."""
    prob = torch.exp(logp)
    return -adv * prob / (prob + gamma), prob


def nll_offpolicy_loss(logp: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """Ablation: -A·logπ (advantage-weighted log-likelihood, no shaping)."""
    return -adv * logp


def tis_weights(old_logp: torch.Tensor, engine_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights min(π_old / π_engine, cap) for the trainer/engine mismatch; NaN
    engine log-probs (unknown) give weight 1. Detached."""
    w = torch.exp(old_logp - engine_logp).clamp(max=cap)
    return torch.where(torch.isnan(engine_logp), torch.ones_like(w), w).detach()


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π || π_ref): exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(logits) over the last dimension."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ---- aggregation ----------------------------------------------------------------------------------
def token_weights(mode: str, row_tokens, global_tokens: int, global_seqs: int,
                  norm_len: int) -> np.ndarray:
    """The weight of each trained token of each row, so that loss = Σ weight·loss_token:

      token-mean                1 / (trained tokens in the whole minibatch)
      seq-mean-token-mean       1 / (rows with trained tokens · the row's trained tokens)
      seq-mean-token-sum-norm   1 / (rows with trained tokens · norm_len)   (Dr. GRPO: constant length)

    `global_tokens` and `global_seqs` count the whole minibatch over every process, so N processes
    holding parts of a minibatch give the same loss as one process holding all of it.
    """
    n = np.asarray(row_tokens, dtype=np.float64)
    w = np.zeros(len(n), dtype=np.float64)
    has = n > 0
    if mode == "token-mean":
        w[has] = 1.0 / max(global_tokens, 1)
    elif mode == "seq-mean-token-mean":
        w[has] = 1.0 / (max(global_seqs, 1) * n[has])
    elif mode == "seq-mean-token-sum-norm":
        w[has] = 1.0 / (max(global_seqs, 1) * norm_len)
    else:
        raise ValueError(f"unknown aggregation {mode!r}")
    return w


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str, norm_len: int = 1) -> torch.Tensor:
    """Aggregate a [rows, tokens] per-token loss over the masked tokens of one process's whole batch."""
    mask = mask.to(loss.dtype)
    row_tokens = mask.sum(-1)
    w = token_weights(mode, row_tokens.tolist(), int(row_tokens.sum().item()),
                      int((row_tokens > 0).sum().item()), norm_len)
    return (loss * mask * torch.as_tensor(w, dtype=loss.dtype)[:, None]).sum()


# ---- learning rate --------------------------------------------------------------------------------
def lr_at(update: int, lr: float, warmup: int, total: int, lr_min: float) -> float:
    """LR of the optimizer update with 0-based global index `update`: linear warm-up over `warmup`
    updates, then constant (total == 0) or cosine decay from lr to lr_min, reaching lr_min at
    update `total` and staying there."""
    if warmup > 0 and update < warmup:
        return lr * (update + 1) / warmup
    if total <= 0:
        return lr
    span = max(total - warmup, 1)
    t = min(max(update - warmup, 0) / span, 1.0)
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * t))
