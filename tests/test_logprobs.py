"""Chunked log-probs and packed micro-batches (scope_cli/backends/logprobs.py) against the whole-logits, padded
path train-step uses on CPU: same log-probs, loss, metrics and gradients within float32 rounding.

Tolerances: the paths compute the same float32 sums in other orders (a [chunk, V] or [N, V] product
instead of [rows · width, V], a block-causal mask instead of padding). Each log-prob is a
log-softmax of ~300 logits of order 1, so its rounding is a few ulps of its magnitude (~6): 2e-5 is
~25 ulps. Gradients are sums over ~40 tokens of such terms: compared to 1e-5 of their largest value.
"""

import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from scope_cli.core.config import Config
from scope_cli.backends.logprobs import (
    chunkable,
    packed_inputs,
    padded_inputs,
    plan_packed,
    response_logprobs,
)
from scope_cli.core.train_batch import Row
from scope_cli.core.train_update import Mode, fixed_logprobs, microbatch_loss, resolve_mode
from scope_cli.backends.training import Dist, TrainError, response_logits, token_logprobs

VOCAB = 300
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=True))
    m.config.use_cache = False
    return m


def make_rows(seed: int = 0) -> list[Row]:
    """Rows of unequal prompt and response lengths, each half on-policy, half off-policy."""
    rng = np.random.default_rng(seed)
    rows = []
    for p, n in [(5, 20), (9, 3), (4, 11), (12, 7), (3, 1)]:
        on, off = np.zeros(n, bool), np.zeros(n, bool)
        on[: n // 2], off[n // 2:] = True, True
        row = Row(rng.integers(3, VOCAB, p).tolist(), rng.integers(3, VOCAB, n).tolist(),
                  float(rng.normal()), on, off, rng.normal(-5, 1, n).astype(np.float32))
        row.old_logp = rng.normal(-5, 1, n).astype(np.float32)
        row.ref_logp = rng.normal(-5, 1, n).astype(np.float32)
        rows.append(row)
    return rows


def loss_and_grads(model, rows, cfg, mode):
    model.zero_grad(set_to_none=True)
    weights = [1.0 / sum(r.tokens for r in rows)] * len(rows)
    with mode.precision(CPU):
        loss, stats = microbatch_loss(model, rows, weights, cfg, 0, CPU, mode)
    loss.backward()
    return loss.item(), stats, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_chunked_logprobs_equal_whole_logits(model):
    rows = make_rows()
    prompts, responses = [r.prompt for r in rows], [r.response for r in rows]
    with torch.no_grad():
        logits, targets, mask = response_logits(model, prompts, responses, 0, CPU)
        whole = token_logprobs(logits, targets, 0.7)[mask]
        lsm = torch.log_softmax(logits / 0.7, -1)
        want_ent = -(lsm.exp() * lsm).sum(-1)[mask]
    for inputs in (padded_inputs(prompts, responses, 0), packed_inputs(prompts, responses)):
        for chunk in (1, 3, 7, 1000):
            logp, ent = response_logprobs(model, inputs, 0.7, chunk, entropy=True)
            torch.testing.assert_close(logp, whole, rtol=0, atol=2e-5)
            torch.testing.assert_close(ent, want_ent, rtol=0, atol=2e-5)
        logp, _ = response_logprobs(model, inputs, 0.7, 0)  # whole logits of the picked positions
        torch.testing.assert_close(logp, whole, rtol=0, atol=2e-5)


@pytest.mark.parametrize("options", [
    {},
    {"train.kl_coef": 0.1, "train.tis_cap": 2.0, "train.offpolicy_loss": "nll"},
], ids=["default-terms", "kl-tis-nll"])
@pytest.mark.parametrize("mode", [Mode(chunk=1), Mode(chunk=4), Mode(chunk=1000), Mode(packed=True),
                                  Mode(packed=True, chunk=5)],
                         ids=["chunk1", "chunk4", "chunk1000", "packed", "packed-chunk5"])
def test_loss_metrics_and_gradients_equal_the_padded_whole_path(model, mode, options):
    cfg = Config()
    cfg.generate.temperature = 0.7
    for key, value in options.items():
        setattr(cfg.train, key.split(".")[1], value)
    rows = make_rows()
    want_loss, want_stats, want_grads = loss_and_grads(model, rows, cfg, Mode())
    loss, stats, grads = loss_and_grads(model, rows, cfg, mode)
    assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-7)
    for key in ("on", "off", "tokens", "clipped"):
        assert stats[key] == want_stats[key], key
    for key in ("ratio", "prob", "entropy", "kl"):
        assert stats[key] == pytest.approx(want_stats[key], rel=1e-5, abs=1e-6), key
    for name, g in want_grads.items():
        scale = g.abs().max().item()
        torch.testing.assert_close(grads[name], g, rtol=0, atol=1e-5 * scale + 1e-12, msg=name)


@pytest.mark.parametrize("mode", [Mode(chunk=3), Mode(packed=True), Mode(packed=True, chunk=2)])
def test_old_logprobs_equal_the_padded_whole_path(model, mode):
    rows = make_rows(1)
    want = fixed_logprobs(model, rows, Dist(), 0.7, 0, 1024)
    for max_tokens in (1024, 20):  # one micro-batch, or several (packed: total tokens <= 20)
        got = fixed_logprobs(model, rows, Dist(), 0.7, 0, max_tokens, mode)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-5)


def test_a_packed_row_sees_only_itself(model):
    """Packed with others, a row's log-probs are its log-probs alone (the block-causal mask)."""
    rows = make_rows(2)
    prompts, responses = [r.prompt for r in rows], [r.response for r in rows]
    together, _ = response_logprobs(model, packed_inputs(prompts, responses), 1.0, 4)
    for (p, r), part in zip(zip(prompts, responses), together.split([len(r) for r in responses])):
        alone, _ = response_logprobs(model, packed_inputs([p], [r]), 1.0, 4)
        torch.testing.assert_close(part, alone, rtol=0, atol=2e-5)


def test_packed_inputs_restart_positions_per_row():
    x = packed_inputs([[7, 8], [9]], [[1, 2, 3], [4]])
    assert x.input_ids.tolist() == [[7, 8, 1, 2, 3, 9, 4]]
    assert x.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    assert x.index.tolist() == [1, 2, 3, 5]  # the position before each response token
    assert x.targets.tolist() == [1, 2, 3, 4] and x.lengths == [3, 1]
    y = padded_inputs([[7, 8], [9]], [[1, 2, 3], [4]], pad_id=0)
    assert y.input_ids.tolist() == [[7, 8, 1, 2, 3], [9, 4, 0, 0, 0]]
    assert y.position_ids is None and y.index.tolist() == [1, 2, 3, 5]


@pytest.mark.parametrize("lengths, budget, expected", [
    ([10, 50, 30, 30, 5, 45], 100, [[1, 5], [2, 3, 0, 4]]),  # longest first, totals 95 and 75
    ([300], 100, [[0]]),  # a row over the budget goes alone
    ([40, 40, 40], 80, [[0, 1], [2]]),
])
def test_plan_packed_bounds_total_tokens(lengths, budget, expected):
    assert plan_packed(lengths, budget) == expected


def test_chunks_refuse_a_model_whose_logits_are_not_a_linear_head(model, monkeypatch):
    assert chunkable(model) is None
    monkeypatch.setattr(model.config, "final_logit_softcapping", 30.0, raising=False)
    assert "not a plain linear projection" in chunkable(model)
    cfg = Config()
    cfg.train.logprob_chunks = "on"
    with pytest.raises(TrainError, match="logprob_chunks=off"):
        resolve_mode(cfg, Dist(), model)
    cfg.train.logprob_chunks = "auto"  # falls back to whole logits
    assert resolve_mode(cfg, Dist(device=torch.device("cuda")), model).chunk == 0


def test_auto_keeps_the_cpu_path_and_turns_everything_on_with_cuda(model):
    cfg = Config()
    assert resolve_mode(cfg, Dist(), model) == Mode()  # fp32, padded, whole logits: earlier CPU bytes
    cuda = resolve_mode(cfg, Dist(device=torch.device("cuda")), model)
    assert cuda == Mode(autocast=True, packed=True, chunk=2048)  # logprob_chunk_tokens 0: 2048 on GPU
    for key in ("mixed_precision", "packing", "logprob_chunks"):
        setattr(cfg.train, key, "bf16" if key == "mixed_precision" else "on")
    assert resolve_mode(cfg, Dist(), model) == Mode(autocast=True, packed=True, chunk=256)
    cfg.train.logprob_chunk_tokens = 64
    assert resolve_mode(cfg, Dist(), model).chunk == 64
