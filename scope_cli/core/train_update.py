"""train-step's updates: old (and reference) log-probs of fixed policies, and one optimizer update.

    mode = resolve_mode(cfg, d, model)       # precision, packing, chunked log-probs for this device
    old = fixed_logprobs(model, rows, d, T, pad_id, micro_batch_tokens(cfg, d), mode)
    stats = update(model, opt, rows, d, cfg, pad_id, lr, mode)

An update: every process takes its share of the minibatch's rows (sorted by length, dealt
round-robin), cuts it into micro-batches (length buckets, or packed sequences), and accumulates
Σ weight·loss_token over them (token weights from train.aggregation over the whole minibatch, token
counts summed over processes); then gradient clipping and one AdamW step. Per-token terms
(scope_cli/objectives.py): PPO clip on on-policy tokens (with truncated importance weights under
train.tis_cap), LUFFY's shaped -A·π/(π+γ) (or -A·logπ) on off-policy tokens, k3 KL to policy-000
under train.kl_coef.

Two ways to the log-probs (scope_cli/backends/logprobs.py): the whole-logits path on right-padded length
buckets (`response_logits`; the CPU default, unchanged from earlier releases, byte for byte), and
the path for large vocabularies and long rows: packed rows and/or chunked lm_head + log-softmax, where
the loss is computed chunk by chunk together with its gradient. Both compute the same values within
float rounding (tests/test_logprobs.py). bf16 compute runs under torch.autocast (or FSDP2's mixed
precision on GPUs), with float32 weights and optimizer moments.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from scope_cli import objectives as obj
from scope_cli.core.config import Config
from scope_cli.backends.logprobs import (
    chunkable,
    fused_loss,
    packed_inputs,
    padded_inputs,
    plan_packed,
    response_logprobs,
    whole_logprobs,
)
from scope_cli.core.train_batch import Row
from scope_cli.backends.training import (
    Dist,
    TrainError,
    all_reduce,
    is_fsdp,
    plan_microbatches,
    response_logits,
    token_logprobs,
    use_bf16,
)


# ---- how to compute -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mode:
    """train.mixed_precision, packing and logprob_chunks resolved for a device and model."""

    autocast: bool = False  # compute under torch.autocast(bfloat16) (FSDP on a GPU: its own policy)
    packed: bool = False  # rows packed into one sequence; else right-padded length buckets
    chunk: int = 0  # response tokens per lm_head chunk; 0: whole logits

    @property
    def whole_padded(self) -> bool:
        return not self.packed and not self.chunk

    def precision(self, device: torch.device):
        return (torch.autocast(device.type, dtype=torch.bfloat16) if self.autocast
                else contextlib.nullcontext())


def _choice(value: str, cuda: bool) -> bool:
    return value == "on" or (value == "auto" and cuda)


def resolve_mode(cfg: Config, d: Dist, model) -> Mode:
    """auto: bf16, packing and chunks on with CUDA; on CPU the whole-logits fp32 path of earlier
    releases. Chunks need a model whose logits are lm_head(hidden): `on` refuses another, `auto`
    falls back to whole logits."""
    t = cfg.train
    cuda = d.device.type == "cuda"
    bf16 = use_bf16(t.mixed_precision, d.device)
    chunks = _choice(t.logprob_chunks, cuda)
    if chunks and (reason := chunkable(model)):
        if t.logprob_chunks == "on":
            raise TrainError(f"train.logprob_chunks=on: {reason}; set train.logprob_chunks=off")
        chunks = False
    # FSDP2 on a GPU computes in bf16 through its MixedPrecisionPolicy (training.wrap_model)
    autocast = bf16 and not (is_fsdp(model) and cuda)
    chunk = t.logprob_chunk_tokens or (2048 if cuda else 256)
    return Mode(autocast=autocast, packed=_choice(t.packing, cuda), chunk=chunk if chunks else 0)


def micro_batch_tokens(cfg: Config, d: Dist) -> int:
    """train.micro_batch_tokens, or where it is 0: 16384 on a GPU, 1024 on a CPU, where micro-batches
    that short (less padding, activations that stay in cache) made the tiny policies' updates 20-25%
    and their old log-probs 45-50% faster than one micro-batch per update (docs/PERFORMANCE.md)."""
    return cfg.train.micro_batch_tokens or (16384 if d.device.type == "cuda" else 1024)


def plan(mode: Mode, lengths: list[int], max_tokens: int) -> list[list[int]]:
    return (plan_packed if mode.packed else plan_microbatches)(lengths, max_tokens)


def _inputs(mode: Mode, prompts, responses, pad_id: int, device):
    made = packed_inputs(prompts, responses) if mode.packed else padded_inputs(prompts, responses, pad_id)
    return made.to(device)


# ---- log-probs of fixed policies (old, reference) ---------------------------------------------------
def fixed_logprobs(model, rows: list[Row], d: Dist, temperature: float, pad_id: int,
                   max_tokens: int, mode: Mode = Mode()) -> list[np.ndarray]:
    """Per-row response log-probs under logits / T with no gradient, each process computing a share
    and the results summed over processes (so every process holds all of them)."""
    offsets = np.cumsum([0] + [len(r.response) for r in rows])
    flat = torch.zeros(int(offsets[-1]), dtype=torch.float64)
    mine = [i for k, i in enumerate(sorted(range(len(rows)), key=lambda i: -rows[i].length))
            if k % d.world == d.rank]
    batches = [[mine[j] for j in b] for b in plan(mode, [rows[i].length for i in mine], max_tokens)]
    steps = int(all_reduce(torch.tensor(float(len(batches))), d, "max").item())
    with torch.no_grad(), mode.precision(d.device):
        for k in range(steps):
            b = batches[k] if k < len(batches) else []
            prompts = [rows[i].prompt for i in b] or [[pad_id]]
            responses = [rows[i].response for i in b] or [[pad_id]]
            if mode.whole_padded:
                logits, targets, _ = response_logits(model, prompts, responses, pad_id, d.device)
                logp = token_logprobs(logits, targets, temperature).double().cpu()
                for j, i in enumerate(b):
                    flat[offsets[i]: offsets[i + 1]] = logp[j, : len(rows[i].response)]
                continue
            inputs = _inputs(mode, prompts, responses, pad_id, d.device)
            logp = response_logprobs(model, inputs, temperature, mode.chunk)[0].double().cpu()
            for i, part in zip(b, logp.split(inputs.lengths)):
                flat[offsets[i]: offsets[i + 1]] = part
    flat = all_reduce(flat, d)
    return [flat[offsets[i]: offsets[i + 1]].numpy().astype(np.float32) for i in range(len(rows))]


# ---- one optimizer update ---------------------------------------------------------------------------
STATS = ("loss", "on", "off", "ratio", "clipped", "prob", "entropy", "kl", "tokens")


def token_terms(logp, old, adv, on, off, engine, ref, t):
    """Per-token loss (PPO clip on `on`, the off-policy term on `off`, KL on both) and the terms the
    metrics need: (loss, ratio, clipped, π, kl). Elementwise: [rows, T] grids or flat [N] alike."""
    on_loss, ratio, clipped = obj.ppo_clip_loss(logp, old, adv, t.clip_low, t.clip_high)
    if t.tis_cap > 0:
        on_loss = on_loss * obj.tis_weights(old, engine, t.tis_cap)
    if t.offpolicy_loss == "shaped":
        off_loss, prob = obj.shaped_offpolicy_loss(logp, adv, t.offpolicy_gamma)
    else:
        off_loss, prob = obj.nll_offpolicy_loss(logp, adv), logp.exp()
    tok_loss = torch.where(on, on_loss, 0.0) + torch.where(off, off_loss, 0.0)
    kl = torch.zeros_like(logp)
    if t.kl_coef > 0:
        kl = obj.kl_k3(logp, ref)
        tok_loss = tok_loss + t.kl_coef * torch.where(on | off, kl, 0.0)
    return tok_loss, ratio, clipped, prob, kl


def _stats(loss, on, off, ratio, clipped, prob, ent, kl) -> dict[str, float]:
    f = (on | off).float()
    return {"loss": loss.item(), "on": on.sum().item(), "off": off.sum().item(),
            "ratio": (ratio * on).sum().item(), "clipped": (clipped & on).sum().item(),
            "prob": (prob * off).sum().item(), "entropy": (ent * f).sum().item(),
            "kl": (kl * f).sum().item(), "tokens": f.sum().item()}


def microbatch_loss(model, rows: list[Row], weights: list[float], cfg: Config, pad_id: int,
                    device, mode: Mode = Mode()) -> tuple[torch.Tensor, dict[str, float]]:
    """Σ weight·loss over the trained tokens of `rows`, and sums for the metrics."""
    if not rows:  # keeps processes in step: a forward/backward that changes nothing
        logits, _, _ = response_logits(model, [[pad_id]], [[pad_id]], pad_id, device)
        return logits.sum() * 0.0, dict.fromkeys(STATS, 0.0)
    if mode.whole_padded:
        return _padded_loss(model, rows, weights, cfg, pad_id, device)
    return _flat_loss(model, rows, weights, cfg, pad_id, device, mode)


def _padded_loss(model, rows, weights, cfg, pad_id, device):
    """Whole logits of right-padded rows, per-token terms on [rows, T] grids."""
    t = cfg.train
    logits, targets, mask = response_logits(model, [r.prompt for r in rows],
                                            [r.response for r in rows], pad_id, device)
    logp = token_logprobs(logits, targets, cfg.generate.temperature)

    def grid(values, fill=0.0, dtype=torch.float32):
        g = torch.full(mask.shape, fill, dtype=dtype)
        for b, v in enumerate(values):
            g[b, : len(v)] = torch.as_tensor(v, dtype=dtype)
        return g.to(device)

    on, off = grid([r.on for r in rows], False, torch.bool), grid([r.off for r in rows], False, torch.bool)
    old = grid([r.old_logp for r in rows])
    adv = torch.tensor([r.adv for r in rows], dtype=torch.float32, device=device)[:, None]
    w = torch.tensor(weights, dtype=torch.float32, device=device)[:, None]
    engine = grid([r.engine_logp for r in rows], float("nan")) if t.tis_cap > 0 else None
    ref = grid([r.ref_logp for r in rows]) if t.kl_coef > 0 else None
    tok_loss, ratio, clipped, prob, kl = token_terms(logp, old, adv, on, off, engine, ref, t)
    loss = (tok_loss * w).sum()
    with torch.no_grad():
        ent = obj.entropy(logits / cfg.generate.temperature)
        return loss, _stats(loss, on, off, ratio, clipped, prob, ent, kl)


def _flat_loss(model, rows, weights, cfg, pad_id, device, mode: Mode):
    """Packed and/or chunked: per-token terms on flat [N] tensors (rows in order)."""
    t = cfg.train
    n = [len(r.response) for r in rows]

    def flat(values, dtype=torch.float32):
        return torch.as_tensor(np.concatenate(values), dtype=dtype).to(device)

    on, off = flat([r.on for r in rows], torch.bool), flat([r.off for r in rows], torch.bool)
    old = flat([r.old_logp for r in rows])
    adv = flat([np.full(k, r.adv) for k, r in zip(n, rows)])
    w = flat([np.full(k, x) for k, x in zip(n, weights)])
    engine = flat([r.engine_logp for r in rows]) if t.tis_cap > 0 else None
    ref = flat([r.ref_logp for r in rows]) if t.kl_coef > 0 else None
    inputs = _inputs(mode, [r.prompt for r in rows], [r.response for r in rows], pad_id, device)
    temperature = cfg.generate.temperature

    def loss_of(logp: torch.Tensor, sl: slice = slice(None)) -> torch.Tensor:
        part = [None if x is None else x[sl] for x in (old, adv, on, off, engine, ref)]
        return (token_terms(logp, *part, t)[0] * w[sl]).sum()

    if mode.chunk:
        loss, logp, ent = fused_loss(model, inputs, temperature, mode.chunk, loss_of)
    else:
        logp, ent = whole_logprobs(model, inputs, temperature, entropy=True)
        loss = loss_of(logp)
    with torch.no_grad():
        _, ratio, clipped, prob, kl = token_terms(logp.detach(), old, adv, on, off, engine, ref, t)
        return loss, _stats(loss, on, off, ratio, clipped, prob, ent, kl)


def update(model, opt, rows: list[Row], d: Dist, cfg: Config, pad_id: int, lr: float,
           mode: Mode | None = None) -> dict[str, float]:
    """One optimizer update on a minibatch (every process passes the whole minibatch's rows and
    trains its share: rows sorted by length, dealt round-robin). mode: resolve_mode's by default."""
    t = cfg.train
    mode = mode or resolve_mode(cfg, d, model)
    order = sorted(range(len(rows)), key=lambda i: (-rows[i].length, i))
    mine = [rows[i] for k, i in enumerate(order) if k % d.world == d.rank]
    # the minibatch's token and sequence counts, summed over processes
    counts = all_reduce(torch.tensor([sum(r.tokens for r in mine), sum(r.tokens > 0 for r in mine)],
                                     dtype=torch.float64), d)
    weights = obj.token_weights(t.aggregation, [r.tokens for r in mine], int(counts[0]),
                                int(counts[1]), cfg.generate.max_tokens)
    batches = plan(mode, [r.length for r in mine], micro_batch_tokens(cfg, d))
    steps = int(all_reduce(torch.tensor(float(len(batches))), d, "max").item())
    sums = dict.fromkeys(STATS, 0.0)
    for k in range(steps):
        b = batches[k] if k < len(batches) else []
        last = k == steps - 1
        if is_fsdp(model):
            model.set_requires_gradient_sync(last)
        sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
        with sync:
            with mode.precision(d.device):
                loss, stats = microbatch_loss(model, [mine[i] for i in b], [weights[i] for i in b],
                                              cfg, pad_id, d.device, mode)
            # DDP and FSDP average gradients over processes; the loss is already a global sum
            (loss * d.world).backward()
        for key in STATS:
            sums[key] += stats[key]
    for group in opt.param_groups:
        group["lr"] = lr
    # train.grad_clip = 0: no clipping (the norm is still measured and logged)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    opt.step()
    opt.zero_grad(set_to_none=True)
    total = dict(zip(STATS, all_reduce(torch.tensor([sums[k] for k in STATS]), d).tolist()))
    total["grad_norm"] = float(grad_norm)
    per_rank = torch.zeros(d.world, dtype=torch.float64)
    per_rank[d.rank] = sums["tokens"]
    total["rank_tokens"] = [int(x) for x in all_reduce(per_rank, d).tolist()]
    return total
