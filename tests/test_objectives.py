"""The RL objective's pure functions against hand-computed numbers."""

import math

import numpy as np
import pytest
import torch

from scope_cli import objectives as obj

S3 = math.sqrt(1 / 3)  # sample std (ddof=1) of [1, 0, 0, 1] and of [1, 0, 0]


# ---- rewards ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("drop, keep", [(False, [True, True, True, True]), (True, [True, False, True, False])])
def test_unverified_rows_get_zero_or_are_dropped(drop, keep):
    r, k, n = obj.effective_rewards([1.0, 1.0, None, 0.5], ["ok", "timeout", "no_answer", "error"], drop)
    assert r.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert k.tolist() == keep
    assert n == 2


# ---- advantages -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, rewards, policy, expected", [
    # (r - mean) / std: mean 0.5, std sqrt(1/3)
    ("grpo", [1, 0, 0, 1], [1, 1, 1, 1], [0.5 / S3, -0.5 / S3, -0.5 / S3, 0.5 / S3]),
    # r - mean
    ("drgrpo", [1, 0, 0, 1], [1, 1, 1, 1], [0.5, -0.5, -0.5, 0.5]),
    # policy rows [1, 0, 0]: mean 1/3, std sqrt(1/3); the off-policy row uses the same statistics
    ("grpo_split", [1, 0, 0, 1], [1, 1, 1, 0], [(2 / 3) / S3, -(1 / 3) / S3, -(1 / 3) / S3, (2 / 3) / S3]),
    # all-wrong policy rows + one rectified: policy std 0 -> the whole group's std (0.5), policy mean 0
    ("grpo_split", [0, 0, 0, 1], [1, 1, 1, 0], [0.0, 0.0, 0.0, 2.0]),
    # grpo on the same group for comparison: mean 0.25, std 0.5
    ("grpo", [0, 0, 0, 1], [1, 1, 1, 0], [-0.5, -0.5, -0.5, 1.5]),
    # a single policy row: no policy std -> the group's std (sqrt(1/3)); the mean is that row's reward
    ("grpo_split", [1, 0, 0], [1, 0, 0], [0.0, -1 / S3, -1 / S3]),
])
def test_group_advantages(mode, rewards, policy, expected):
    adv, dropped = obj.group_advantages(rewards, ["g"] * len(rewards), policy, mode, eps=0.0)
    np.testing.assert_allclose(adv, expected, rtol=1e-12)
    assert not dropped.any()


def test_eps_in_the_denominator():
    adv, _ = obj.group_advantages([1, 0], ["g", "g"], [1, 1], "grpo", eps=0.1)
    s = math.sqrt(0.5)
    np.testing.assert_allclose(adv, [0.5 / (s + 0.1), -0.5 / (s + 0.1)])


@pytest.mark.parametrize("mode", ["grpo", "drgrpo", "grpo_split"])
def test_all_equal_group_is_zero_and_dropped(mode):
    rewards = [0.3, 0.3, 0.3, 1.0, 0.0, 1.0, 1.0]
    groups = ["a", "a", "a", "b", "b", "c", "c"]
    adv, dropped = obj.group_advantages(rewards, groups, [1] * 7, mode, eps=0.0)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]  # exactly zero, not 1e-17 / eps
    assert adv[5:].tolist() == [0.0, 0.0]
    assert dropped.tolist() == [True, True, True, False, False, True, True]
    assert adv[3] > 0 > adv[4]


def test_groups_are_independent_and_order_free():
    adv, _ = obj.group_advantages([1, 5, 0, 7], ["a", "b", "a", "b"], [1] * 4, "drgrpo")
    assert adv.tolist() == [0.5, -1.0, -0.5, 1.0]


# ---- masks -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("first_error, ends, start", [
    (None, [3, 6, 9], 0), (0, [3, 6, 9], 0), (1, [3, 6, 9], 3), (2, [3, 6, 9], 6), (2, None, 0),
])
def test_loss_start_is_the_first_wrong_token(first_error, ends, start):
    assert obj.loss_start(first_error, ends) == start


@pytest.mark.parametrize("adv, first_error, ends, start", [
    (-0.8, 2, [3, 7, 12], 7),  # failed, step 2 wrong: steps 0-1 (tokens 0..6) are not penalised
    (-0.8, 1, [3, 7, 12], 3),
    (-0.8, 0, [3, 7, 12], 0),  # step 0 wrong: nothing verified, the whole row is penalised
    (-0.8, None, [3, 7, 12], 0),  # no wrong step located (PRM and verifier disagree): as grpo
    (-0.8, 1, [], 0),  # no steps known
    (0.9, None, [3, 7], 0),  # a correct row: as grpo
    (0.9, 1, [3, 7], 0),  # a positive advantage is never masked
    (0.0, 1, [3, 7], 0),
])
def test_verified_prefix_start(adv, first_error, ends, start):
    """VPPO: a row with a negative advantage trains from its first wrong step on."""
    assert obj.verified_prefix_start(adv, first_error, ends) == start


def test_vppo_masked_row_weights():
    """A failed row of 6 tokens whose first 4 are verified trains 2 tokens: with token-mean over a
    minibatch with a correct row of 4 tokens, each trained token weighs 1/6 (not 1/10)."""
    start = obj.verified_prefix_start(-1.0, 2, [2, 4, 6])
    on, _ = obj.token_masks(6, None, start)
    assert start == 4 and on.astype(int).tolist() == [0, 0, 0, 0, 1, 1]
    w = obj.token_weights("token-mean", [int(on.sum()), 4], 6, 2, 1)
    assert w.tolist() == [1 / 6, 1 / 6]


@pytest.mark.parametrize("length, off_start, start, on, off", [
    (6, None, 0, [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]),  # a policy row
    (6, 4, 0, [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1]),  # rectified: prefix on-policy, guide off
    (5, 0, 0, [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]),  # reference (LUFFY): all off-policy
    (6, None, 3, [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]),  # augment parent: from its first error
])
def test_token_masks(length, off_start, start, on, off):
    a, b = obj.token_masks(length, off_start, start)
    assert a.astype(int).tolist() == on and b.astype(int).tolist() == off


# ---- on-policy: clipped ratio --------------------------------------------------------------------
@pytest.mark.parametrize("adv, ratio, loss, clipped, grad", [
    (1.0, 1.1, -1.1, False, -1.1),  # inside [0.8, 1.28]: -r·A, d/dlogp = -r·A
    (1.0, 1.5, -1.28, True, 0.0),  # above 1 + clip_high with A > 0: clipped, no gradient
    (1.0, 0.5, -0.5, False, -0.5),  # below 1 - clip_low with A > 0: the unclipped term is smaller
    (-1.0, 0.5, 0.8, True, 0.0),  # below 1 - clip_low with A < 0: clipped
    (-1.0, 1.5, 1.5, False, 1.5),  # above with A < 0: unclipped
    (-2.0, 0.9, 1.8, False, 1.8),
])
def test_ppo_clip_loss(adv, ratio, loss, clipped, grad):
    logp = torch.tensor([math.log(ratio)], dtype=torch.float64, requires_grad=True)
    out, r, c = obj.ppo_clip_loss(logp, torch.zeros(1, dtype=torch.float64),
                                  torch.tensor([adv], dtype=torch.float64), 0.2, 0.28)
    out.sum().backward()
    assert out.item() == pytest.approx(loss)
    assert r.item() == pytest.approx(ratio)
    assert bool(c.item()) is clipped
    assert logp.grad.item() == pytest.approx(grad)


# ---- off-policy: shaped weight ---------------------------------------------------------------------
@pytest.mark.parametrize("prob, adv, loss, grad", [
    # -A·π/(π+γ); d/dlogp = -A·γ·π/(π+γ)²
    (0.5, 2.0, -2 * 0.5 / 0.6, -2 * 0.1 * 0.5 / 0.36),
    (0.9, 2.0, -1.8, -2 * 0.1 * 0.9 / 1.0),
    (0.01, 1.0, -0.01 / 0.11, -0.1 * 0.01 / 0.11 ** 2),
    (0.5, -1.0, 0.5 / 0.6, 0.1 * 0.5 / 0.36),
])
def test_shaped_offpolicy_loss_and_gradient(prob, adv, loss, grad):
    logp = torch.tensor([math.log(prob)], dtype=torch.float64, requires_grad=True)
    out, p = obj.shaped_offpolicy_loss(logp, torch.tensor([adv], dtype=torch.float64), 0.1)
    out.sum().backward()
    assert out.item() == pytest.approx(loss)
    assert p.item() == pytest.approx(prob)
    assert logp.grad.item() == pytest.approx(grad)


def test_nll_offpolicy_loss():
    logp = torch.tensor([math.log(0.5)], dtype=torch.float64, requires_grad=True)
    out = obj.nll_offpolicy_loss(logp, torch.tensor([2.0], dtype=torch.float64))
    out.sum().backward()
    assert out.item() == pytest.approx(2 * math.log(2))
    assert logp.grad.item() == pytest.approx(-2.0)


def test_tis_weights_truncate_and_ignore_unknown():
    old = torch.log(torch.tensor([0.5, 0.5, 0.5]))
    engine = torch.tensor([math.log(0.25), math.log(0.5), float("nan")])
    assert obj.tis_weights(old, engine, 1.5).tolist() == pytest.approx([1.5, 1.0, 1.0])


def test_kl_k3_and_entropy():
    kl = obj.kl_k3(torch.tensor([math.log(0.5), 0.3]), torch.tensor([math.log(0.25), 0.3]))
    assert kl.tolist() == pytest.approx([0.5 + math.log(2) - 1, 0.0])
    assert obj.entropy(torch.zeros(1, 2)).item() == pytest.approx(math.log(2))
    assert obj.entropy(torch.tensor([[0.0, -1e9]])).item() == pytest.approx(0.0)


# ---- aggregation -------------------------------------------------------------------------------------
LOSS = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", (1 + 2 + 3 + 4) / 4),
    ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + 4 / 1) / 2),
    ("seq-mean-token-sum-norm", ((1 + 2 + 3) / 4 + 4 / 4) / 2),  # norm_len 4
])
def test_aggregation_modes(mode, expected):
    assert obj.aggregate(LOSS, MASK, mode, norm_len=4).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_token_weights_split_over_processes_sum_to_the_whole(mode):
    """Two processes holding one row each, with global counts, give the one-process loss."""
    tokens = MASK.sum(-1).tolist()
    parts = []
    for rank in (0, 1):
        w = obj.token_weights(mode, [tokens[rank]], global_tokens=4, global_seqs=2, norm_len=4)
        parts.append(float((LOSS[rank] * MASK[rank]).sum()) * w[0])
    assert sum(parts) == pytest.approx(obj.aggregate(LOSS, MASK, mode, norm_len=4).item())


def test_rows_without_trained_tokens_do_not_count():
    w = obj.token_weights("seq-mean-token-mean", [3, 0, 1], global_tokens=4, global_seqs=2, norm_len=4)
    assert w.tolist() == pytest.approx([1 / 6, 0.0, 1 / 2])


# ---- learning rate -----------------------------------------------------------------------------------
@pytest.mark.parametrize("update, warmup, total, expected", [
    (0, 4, 0, 0.25), (3, 4, 0, 1.0), (10, 4, 0, 1.0),  # warm-up, then constant
    (4, 4, 14, 1.0), (9, 4, 14, 0.1 + 0.45 * (1 + math.cos(math.pi / 2))), (14, 4, 14, 0.1),
    (20, 4, 14, 0.1), (0, 0, 10, 1.0),
])
def test_lr_schedule(update, warmup, total, expected):
    assert obj.lr_at(update, 1.0, warmup, total, 0.1) == pytest.approx(expected)


@pytest.mark.parametrize("order, signal, wanted, kept", [
    (["a", "b", "c", "d"], {"b", "c", "d"}, 2, ["b", "c"]),    # "a" has no signal: skipped, not counted
    (["a", "b", "c", "d"], {"d", "a"}, 3, ["a", "d"]),         # fewer with signal than wanted: all of them
    (["d", "c", "b", "a"], {"a", "b", "c", "d"}, 2, ["d", "c"]),  # the round's order, not the ids' order
    (["a", "b"], set(), 2, []),
])
def test_first_groups_with_signal(order, signal, wanted, kept):
    assert obj.first_groups_with_signal(order, signal, wanted) == kept
