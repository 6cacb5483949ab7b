"""Response log-probs at scale: packed micro-batches and chunked lm_head + log-softmax.

Two independent choices (config train.packing, train.logprob_chunks; both `auto`: on with CUDA, off on
CPU, where the old path keeps earlier results byte-identical):

Packing. A micro-batch's rows go into the model as one sequence, prompt + response after prompt +
response, with position ids restarting at 0 for each row and no attention mask. transformers reads
such position ids as packed sequences (`masking_utils.find_packed_sequence_indices`: a new row starts
wherever the position does not grow by 1) and builds a block-causal mask, so a token attends only to
its own row's earlier tokens, through sdpa, eager or flex attention alike (flash-attention is not
needed). No padding: the micro-batch costs its real tokens. Without packing, rows are right-padded to
the micro-batch's longest row (training.response_logits; length buckets keep the padding small).

Chunks. The model's last hidden states are computed once; the output projection (lm_head), the
log-softmax at temperature T and the pick of each response token's log-prob then run over chunks of
`chunk` response tokens, so the largest temporary is a [chunk, vocabulary] float32 pair, never the
[tokens, vocabulary] logits (5-10 GB at 16k tokens and Qwen's 151,936 tokens). Only response
positions are projected. For training, `fused_loss` goes one step further, as Liger's fused linear
cross-entropy does: the RL loss is a sum of per-token terms, so dLoss/dlogp of a chunk's tokens is known
as soon as their log-probs are, and the chunk's gradients (hidden states, lm_head weight) are computed
there and then; the backward pass only hands them on, and no chunk is ever recomputed. The projection
runs inside the model's own forward (its lm_head's forward is swapped for the chunked one for the
call), so DDP and FSDP2 see an ordinary forward and backward.

Precision: chunks compute the projection in the autocast dtype when autocast is on (else the weight's
dtype) and the log-softmax in float32, as the whole-logits path does; weight gradients accumulate in
float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from scope_cli.backends.training import token_logprobs, unwrap


# ---- micro-batch inputs -----------------------------------------------------------------------------
@dataclass
class Inputs:
    """One micro-batch as model inputs: `index` picks, from the [rows · width] hidden states, the
    position that predicts each response token (rows in order, tokens in order); `targets` are those
    tokens."""

    input_ids: torch.Tensor  # [B, width]
    position_ids: torch.Tensor | None  # [B, width]; None: 0..width-1 in every row
    index: torch.Tensor  # [N]
    targets: torch.Tensor  # [N]
    lengths: list[int]  # response tokens per row (sum N)

    def to(self, device) -> "Inputs":
        pos = None if self.position_ids is None else self.position_ids.to(device)
        return Inputs(self.input_ids.to(device), pos, self.index.to(device), self.targets.to(device),
                      self.lengths)


def padded_inputs(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Inputs:
    """Rows right-padded to the longest (no attention mask: causal attention never lets a token see
    the pads after it)."""
    full = [p + r for p, r in zip(prompts, responses)]
    width = max(len(f) for f in full)
    ids = torch.full((len(full), width), pad_id, dtype=torch.long)
    index = []
    for b, (p, f) in enumerate(zip(prompts, full)):
        ids[b, : len(f)] = torch.tensor(f, dtype=torch.long)
        index.append(torch.arange(len(p) - 1, len(f) - 1) + b * width)
    return Inputs(ids, None, torch.cat(index), _targets(responses), [len(r) for r in responses])


def packed_inputs(prompts: list[list[int]], responses: list[list[int]]) -> Inputs:
    """Rows concatenated into one sequence, position ids restarting at 0 for each."""
    ids, pos, index, offset = [], [], [], 0
    for p, r in zip(prompts, responses):
        n = len(p) + len(r)
        ids.extend(p + r)
        pos.append(torch.arange(n))
        index.append(torch.arange(offset + len(p) - 1, offset + n - 1))
        offset += n
    return Inputs(torch.tensor([ids], dtype=torch.long), torch.cat(pos)[None], torch.cat(index),
                  _targets(responses), [len(r) for r in responses])


def _targets(responses: list[list[int]]) -> torch.Tensor:
    return torch.tensor([t for r in responses for t in r], dtype=torch.long)


def plan_packed(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Packed micro-batches: indices longest first, cut so that each micro-batch's total tokens stay
    within `max_tokens` (at least one row per micro-batch)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    total = 0
    for i in order:
        if cur and total + lengths[i] > max_tokens:
            batches.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += lengths[i]
    if cur:
        batches.append(cur)
    return batches


# ---- the chunked projection ----------------------------------------------------------------------------
def chunkable(model) -> str | None:
    """Why the chunked path cannot serve `model`, or None. It computes logits as lm_head(hidden): a
    model whose forward does more to them (Gemma-2's final soft-capping) or whose head is not a
    plain linear layer needs the whole-logits path."""
    inner = unwrap(model)
    head = inner.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or getattr(inner.config, "final_logit_softcapping", None):
        return f"{type(inner).__name__}'s logits are not a plain linear projection of its hidden states"
    return None


def _chunk_logsoftmax(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      temperature: float) -> torch.Tensor:
    """log softmax(hidden @ weight.T + bias) / T) in float32, [chunk, V]."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    """-Σ p·log p per row without a second [chunk, V] temporary."""
    return -torch.bmm(logp.exp()[:, None, :], logp[:, :, None]).view(-1)


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    kind = weight.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype


def chunked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     targets: torch.Tensor, temperature: float, chunk: int,
                     entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs [N] (and entropies) of `targets` with no gradient, `chunk` tokens at a time."""
    dtype = _compute_dtype(weight)
    n = hidden.shape[0]
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    ent = torch.empty_like(logp) if entropy else None
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        for s in range(0, n, chunk):
            lsm = _chunk_logsoftmax(hidden[s: s + chunk].to(dtype), w, b, temperature)
            logp[s: s + chunk] = lsm.gather(1, targets[s: s + chunk, None]).squeeze(1)
            if ent is not None:
                ent[s: s + chunk] = _entropy(lsm)
    return logp, ent


TokenLoss = Callable[[torch.Tensor, slice], torch.Tensor]  # (log-probs of tokens[sl], sl) -> scalar loss


class _FusedLoss(torch.autograd.Function):
    """Σ_chunks token_loss(logp[chunk]) with the gradients computed chunk by chunk in the forward pass
    (d logp_i / d z_i = onehot(target_i) - softmax(z_i), z = logits / T). Also returns the log-probs
    and entropies (no gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk, token_loss):
        dtype = _compute_dtype(weight)
        n = hidden.shape[0]
        dev = hidden.device
        logp = torch.empty(n, dtype=torch.float32, device=dev)
        ent = torch.empty_like(logp)
        grad_h = torch.empty_like(hidden)
        grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=dev)
                  if ctx.needs_input_grad[1] else None)
        grad_b = (torch.zeros(bias.shape, dtype=torch.float32, device=dev)
                  if bias is not None and ctx.needs_input_grad[2] else None)
        total = torch.zeros((), dtype=torch.float32, device=dev)
        with torch.autocast(dev.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            for s in range(0, n, chunk):
                sl = slice(s, min(s + chunk, n))
                h, t = hidden[sl].to(dtype), targets[sl]
                lsm = _chunk_logsoftmax(h, w, b, temperature)
                lp = lsm.gather(1, t[:, None]).squeeze(1)
                p = lsm.exp()
                ent[sl] = -torch.bmm(p[:, None, :], lsm[:, :, None]).view(-1)
                del lsm
                with torch.enable_grad():
                    x = lp.detach().requires_grad_()
                    loss = token_loss(x, sl)
                    (g,) = torch.autograd.grad(loss, x)
                total += loss.detach().float()
                logp[sl] = lp
                # dLoss/dz = g·(onehot - p), and z = logits / T
                grad_z = p.mul_(-g[:, None])
                grad_z.index_put_((torch.arange(len(t), device=dev), t), g, accumulate=True)
                if temperature != 1.0:
                    grad_z.div_(temperature)
                grad_logits = grad_z.to(dtype)
                del p, grad_z
                grad_h[sl] = (grad_logits @ w).to(hidden.dtype)
                if grad_w is not None:
                    _add_product(grad_w, grad_logits.T, h)
                if grad_b is not None:
                    grad_b += grad_logits.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(logp, ent)
        return total, logp, ent

    @staticmethod
    def backward(ctx, grad_total, _grad_logp, _grad_ent):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = grad_h * grad_total.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad_total).to(ctx.weight_dtype)
        gb = None if grad_b is None else (grad_b * grad_total).to(ctx.bias_dtype)
        return gh, gw, gb, None, None, None, None


_GEMM_INTO_FP32 = [True]  # addmm with out_dtype works here (cleared on the first failure)


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in place, acc float32: no [V, H] temporary. bf16 operands on CUDA: one cuBLAS GEMM
    with float32 output accumulating into acc (addmm's out_dtype); elsewhere, or where that kernel is
    missing, the product in the operands' dtype (as autocast's weight gradients), then added."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _GEMM_INTO_FP32[0]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            _GEMM_INTO_FP32[0] = False
    acc += a @ b


# ---- through the model's forward ---------------------------------------------------------------------
@contextlib.contextmanager
def _head_replaced(model, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """For one call of the model: its lm_head returns fn(its input, the last hidden states) instead
    of logits. Inside the model's forward, so FSDP2 has gathered the
    head's weight and DDP tracks the call."""
    head = unwrap(model).get_output_embeddings()
    head.forward = fn  # an instance attribute shadows the class's forward for this module only
    try:
        yield
    finally:
        del head.forward


def _hidden_at(inputs: Inputs) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda h: h.reshape(-1, h.shape[-1]).index_select(0, inputs.index)


def _call(model, inputs: Inputs):
    return model(input_ids=inputs.input_ids, position_ids=inputs.position_ids, logits_to_keep=0,
                 use_cache=False)


def response_logprobs(model, inputs: Inputs, temperature: float, chunk: int,
                      entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs [N] of the response tokens under logits / T (and their entropies), no
    gradient. chunk = 0: whole logits of the response positions at once."""
    with torch.no_grad():
        if not chunk:
            return whole_logprobs(model, inputs, temperature, entropy)
        out: dict[str, torch.Tensor | None] = {}
        pick = _hidden_at(inputs)

        def head_fn(h: torch.Tensor) -> torch.Tensor:
            head = unwrap(model).get_output_embeddings()
            out["logp"], out["ent"] = chunked_logprobs(pick(h), head.weight, head.bias, inputs.targets,
                                                       temperature, chunk, entropy)
            return out["logp"]

        with _head_replaced(model, head_fn):
            _call(model, inputs)
        return out["logp"], out["ent"]


def whole_logprobs(model, inputs: Inputs, temperature: float,
                   entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs [N] from the whole [N, V] logits of the response positions (with gradient
    when enabled); entropies without gradient."""
    out: dict[str, torch.Tensor] = {}
    pick = _hidden_at(inputs)

    def head_fn(h: torch.Tensor) -> torch.Tensor:
        head = unwrap(model).get_output_embeddings()
        out["logits"] = torch.nn.functional.linear(pick(h), head.weight, head.bias)
        return out["logits"]

    if isinstance(unwrap(model).get_output_embeddings(), torch.nn.Linear):
        with _head_replaced(model, head_fn):
            _call(model, inputs)
        logits = out["logits"]
    else:  # any other head: its logits at every position, then the picked ones
        full = _call(model, inputs).logits
        logits = full.reshape(-1, full.shape[-1]).index_select(0, inputs.index)
    logp = token_logprobs(logits, inputs.targets, temperature)
    ent = None
    if entropy:
        with torch.no_grad():
            from scope_cli.objectives import entropy as entropy_of

            ent = entropy_of(logits / temperature)
    return logp, ent


def fused_loss(model, inputs: Inputs, temperature: float, chunk: int,
               token_loss: TokenLoss) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Σ token_loss over chunks, with gradient; log-probs [N]; entropies [N]) through the model's
    forward, chunked: see the module docstring."""
    out: dict[str, torch.Tensor] = {}
    pick = _hidden_at(inputs)

    def head_fn(h: torch.Tensor) -> torch.Tensor:
        head = unwrap(model).get_output_embeddings()
        loss, out["logp"], out["ent"] = _FusedLoss.apply(pick(h), head.weight, head.bias, inputs.targets,
                                                         temperature, chunk, token_loss)
        return loss

    with _head_replaced(model, head_fn):
        loss = _call(model, inputs).logits
    return loss, out["logp"], out["ent"]
