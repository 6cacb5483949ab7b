"""Eval metrics against values computed by hand."""

import math

import pytest

from scope_cli.metrics import (
    answer_key, distinct_n, distinct_n_within, distinct_ratio, diversity_units, entropy_bits,
    expected_distinct, greedy_metrics, later_error_share, maj_at_k, majority_correct, pass_at_k,
    sampled_metrics, summary_table,
)
from scope_cli.schema import EVAL_SUMMARY
from scope_cli.tasks import arith, get_task
from scope_cli.tasks import math as math_task


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # 1 - 3/4
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(16, 1, 8) == pytest.approx(0.5)  # 1 - 6435/12870
    assert pass_at_k(16, 0, 8) == 0.0
    assert pass_at_k(16, 16, 1) == 1.0
    # n - c < k: every subset of k holds a correct sample
    assert pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(16, 10, 8) == 1.0
    # pass@1 is the fraction correct
    assert pass_at_k(16, 5, 1) == pytest.approx(5 / 16)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_majority_vote_ties_count_wrong():
    assert majority_correct([("3", True), ("3", True), ("5", False)]) is True
    assert majority_correct([("5", False), ("5", False), ("3", True)]) is False
    assert majority_correct([("3", True), ("5", False)]) is False  # tie
    assert majority_correct([("3", True), ("3", True), ("5", False), ("5", False)]) is False  # tie
    assert majority_correct([(None, False), (None, False), ("3", True)]) is True  # no answer: no vote
    assert majority_correct([(None, False), (None, False)]) is False


def test_maj_at_k_averages_disjoint_blocks():
    votes = [("3", True), ("3", True), ("5", False), ("5", False),  # block 1: tie -> wrong
             ("3", True), ("3", True), ("3", True), ("5", False)]  # block 2: 3 wins -> right
    assert maj_at_k(votes, 4) == pytest.approx(0.5)
    assert maj_at_k(votes, 8) == 1.0  # 5 votes for 3, 3 for 5
    assert maj_at_k(votes, 1) == pytest.approx(5 / 8)  # maj@1 is avg@1
    assert maj_at_k(votes, 3) == 1.0  # blocks (3,3,5) and (5,3,3); the last two samples are unused
    with pytest.raises(ValueError):
        maj_at_k(votes, 9)


def test_answer_key_normalises():
    assert answer_key(arith, " 7 ") == "7"
    assert answer_key(math_task, "\\dfrac{1}{2}") == answer_key(math_task, "\\frac{1}{2}")
    assert answer_key(math_task, "\\left( 1, 2 \\right)") == "(1,2)"
    assert answer_key(math_task, None) is None
    assert answer_key(math_task, "  ") is None


def test_distinct_solution_normalisation():
    assert distinct_ratio(1, 4) == 0.0  # four copies of one solution
    assert distinct_ratio(4, 4) == 1.0  # all different
    assert distinct_ratio(2, 3) == pytest.approx(0.5)
    assert distinct_ratio(3, 5) == pytest.approx(0.5)
    assert distinct_ratio(1, 1) is None  # fewer than two correct: undefined
    assert distinct_ratio(0, 0) is None


def test_distinct_n_counts_units_not_characters():
    lists = [["a", "b", "a"], ["a", "b"]]
    assert distinct_n(lists, 1) == pytest.approx(2 / 5)  # a b a a b
    assert distinct_n(lists, 2) == pytest.approx(2 / 3)  # (a,b) (b,a) (a,b)
    assert distinct_n([["a"]], 2) is None
    # arith counts steps, other tasks words
    assert diversity_units(arith, "7-4=3;3+5=8;\\boxed{8}") == ["7-4=3", "3+5=8", "\\boxed{8}"]
    assert diversity_units(math_task, "so x = 2\n\nthus") == ["so", "x", "=", "2", "thus"]


def test_shared_prefixes_fool_distinct_2_not_the_correct_measures():
    """The issue's case: two samples sharing 4 steps then differing score 0.625 on distinct-2 (5 unique
    of 8 step pairs), two diverging at step 0 score 1.0."""
    shared = [["s1", "s2", "s3", "s4", "a5"], ["s1", "s2", "s3", "s4", "b5"]]
    apart = [["a1", "a2", "a3", "a4", "a5"], ["b1", "b2", "b3", "b4", "b5"]]
    assert distinct_n(shared, 2) == pytest.approx(5 / 8)
    assert distinct_n(apart, 2) == 1.0
    # as two distinct solutions (multiplicity 1 each of n = 2) or two strategies, both are the same
    assert expected_distinct([1, 1], 2, 2) == expected_distinct([1, 1], 2, 2) == 2.0
    assert entropy_bits([1, 1]) == 1.0


def test_distinct_n_within_pools_prompts_without_cross_prompt_repeats():
    # prompt A: (x,y) (y,z) | (x,y): 2 unique of 3; prompt B repeats A's pair but that is not a repeat:
    # (x,y): 1 of 1; prompt C has no correct sample (no lists) and adds nothing
    groups = [[["x", "y", "z"], ["x", "y"]], [["x", "y"]], []]
    assert distinct_n_within(groups, 2) == pytest.approx(3 / 4)
    assert distinct_n_within(groups, 1) == pytest.approx((3 + 2) / (5 + 2))
    assert distinct_n_within([[], [["a"]]], 2) is None  # no pair anywhere


@pytest.mark.parametrize("mults, n, k, expected", [
    ([], 8, 4, 0.0),  # nothing correct
    ([8], 8, 1, 1.0),  # one solution held by every sample
    ([8], 8, 8, 1.0),
    ([1, 1], 2, 2, 2.0),
    ([1], 4, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    ([2, 1], 4, 2, (1 - 1 / 6) + (1 - 3 / 6)),  # C(2,2)=1, C(3,2)=3 over C(4,2)=6
    ([2, 1], 4, 1, 3 / 4),  # k = 1: the fraction correct (avg@1)
    ([3, 1, 1], 8, 8, 3.0),  # k = n: the number of distinct correct solutions
    ([1, 1, 1, 1], 8, 4, 4 * (1 - 35 / 70)),  # C(7,4) = 35, C(8,4) = 70
])
def test_expected_distinct_hand_values(mults, n, k, expected):
    assert expected_distinct(mults, n, k) == pytest.approx(expected)


def test_expected_distinct_rejects_bad_counts():
    with pytest.raises(ValueError):
        expected_distinct([3, 2], 4, 2)  # 5 correct of 4
    with pytest.raises(ValueError):
        expected_distinct([1], 4, 5)
    with pytest.raises(ValueError):
        expected_distinct([0], 4, 2)


@pytest.mark.parametrize("counts, bits", [
    ([], 0.0), ([5], 0.0), ([1, 1], 1.0), ([1, 1, 1, 1], 2.0), ([2, 1, 1], 1.5),
    ([3, 1], -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))),  # 0.8113
])
def test_entropy_bits_hand_values(counts, bits):
    assert entropy_bits(counts) == pytest.approx(bits)


def test_later_error_share():
    assert later_error_share([0, 2, None, 1, 0]) == pytest.approx(0.5)  # located: 0 2 1 0
    assert later_error_share([None, None]) is None
    assert later_error_share([3]) == 1.0


def _row(prompt_id, idx, problem, answer, response, difficulty):
    task = get_task("arith")
    pred = task.extract_answer(response)
    return {
        "prompt_id": prompt_id, "sample_idx": idx, "task": "arith", "response": response, "pred": pred,
        "correct": pred == answer, "difficulty": difficulty,
        "canonical_solution": task.canonical_solution(response),
        "first_error_step": task.first_error_step(problem, response),
    }


def test_sampled_metrics_on_a_hand_built_table():
    a, b = "1+2+3", "9-1-1-5"
    assert arith.evaluate(a) == 6 and arith.evaluate(b) == 2
    rows = [
        _row("A", 0, a, "6", "1+2=3;3+3=6;\\boxed{6}", 3),
        _row("A", 1, a, "6", "1+3=4;4+2=6;\\boxed{6}", 3),
        _row("A", 2, a, "6", "1+2=3;3+3=6;\\boxed{6}", 3),
        _row("A", 3, a, "6", "1+2=3;3+3=5;\\boxed{5}", 3),
        _row("B", 0, b, "2", "", 4),
        _row("B", 1, b, "2", "9-1=8;8-1=4;\\boxed{4}", 4),
        _row("B", 2, b, "2", "9-1=8;8-1=4;\\boxed{4}", 4),
        _row("B", 3, b, "2", "9-1=8;8-1=7;7-5=2;\\boxed{3}", 4),
    ]
    assert [r["first_error_step"] for r in rows] == [None, None, None, 1, 0, 1, 1, 3]
    m = sampled_metrics(rows[::-1], get_task, ks=(1, 2, 4, 8))  # row order must not matter
    assert m["samples_per_prompt"] == 4
    assert m["avg@1"] == pytest.approx(3 / 8)
    assert m["pass@1"] == pytest.approx((3 / 4 + 0) / 2)
    assert m["pass@2"] == pytest.approx((1 + 0) / 2)  # A: n-c = 1 < 2
    assert m["pass@4"] == pytest.approx(0.5)
    assert "pass@8" not in m and "maj@8" not in m  # k > n
    # maj@4: A votes 6,6,6,5 -> right; B votes 4,4,3 (empty response has no vote) -> wrong
    assert m["maj@4"] == pytest.approx(0.5)
    # maj@2: A blocks (6,6) right, (6,5) tie; B blocks (-,4) wrong, (4,3) tie
    assert m["maj@2"] == pytest.approx((0.5 + 0) / 2)
    assert m["avg@1[difficulty=3]"] == pytest.approx(3 / 4)
    assert m["avg@1[difficulty=4]"] == 0.0
    # A: 3 correct, 2 distinct orders (+2,+3 and +3,+2); B has none correct
    assert m["distinct_correct"] == 2.0
    assert m["distinct_correct_norm"] == pytest.approx(0.5)
    # distinct-1 over steps: A 7 unique of 12, B 6 unique of 10
    assert m["distinct-1"] == pytest.approx((7 / 12 + 6 / 10) / 2)
    # distinct-2: A 6 unique of 8 step pairs, B 5 unique of 7
    assert m["distinct-2"] == pytest.approx((6 / 8 + 5 / 7) / 2)
    # failures' first errors: 1 | 0, 1, 1, 3 -> 4 of 5 after the first step
    assert m["later_error_share"] == pytest.approx(0.8)
    # correct samples only (A's rows 0-2; B none): steps 1+2=3 3+3=6 \boxed{6} twice, 1+3=4 4+2=6 \boxed{6}
    # -> 5 unique of 9 steps (\boxed{6} is shared); pairs 4 unique of 6
    assert m["distinct-1[correct]"] == pytest.approx(5 / 9)
    assert m["distinct-2[correct]"] == pytest.approx(4 / 6)
    # A: orders +2,+3 (x2) and +3,+2 (x1) of n = 4; B: 0
    assert m["distinct_correct@2"] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6) + 0) / 2)
    assert m["distinct_correct@4"] == pytest.approx((2 + 0) / 2)
    assert "distinct_correct@1" not in m  # that is avg@1
    h = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # 0.918 bits
    assert m["strategy_entropy"] == pytest.approx(h)  # over A only
    assert m["strategy_entropy[all]"] == pytest.approx(h / 2)  # B counts 0


def test_where_failures_err_moves_distinct_2_only():
    """Two arms with the same correct samples on 0+1+2+3+4+5; their two failures share 4 correct steps
    in one arm and diverge at step 0 in the other. distinct-2 differs; the correct-sample measures
    do not."""
    p = "0+1+2+3+4+5"
    right = ["0+1=1;1+2=3;3+3=6;6+4=0;0+5=5;\\boxed{5}", "0+5=5;5+4=9;9+3=2;2+2=4;4+1=5;\\boxed{5}"]
    late = ["0+1=1;1+2=3;3+3=6;6+4=0;0+5=6;\\boxed{6}", "0+1=1;1+2=3;3+3=6;6+4=0;0+5=7;\\boxed{7}"]
    early = ["0+1=2;2+2=4;4+3=7;7+4=1;1+5=6;\\boxed{6}", "0+2=3;3+1=4;4+3=7;7+4=1;1+5=6;\\boxed{6}"]

    def arm(failures):
        return sampled_metrics([_row("P", i, p, "5", text, 6) for i, text in enumerate(right + failures)],
                               get_task, ks=(2, 4))

    a, b = arm(late), arm(early)
    assert [arith.first_error_step(p, t) for t in late + early] == [4, 4, 0, 0]
    assert a["avg@1"] == b["avg@1"] == 0.5
    assert a["distinct-2"] < b["distinct-2"]
    for name in ("distinct-1[correct]", "distinct-2[correct]", "distinct_correct@2", "distinct_correct@4",
                 "strategy_entropy", "strategy_entropy[all]"):
        assert a[name] == b[name], name
    assert a["distinct-2[correct]"] == 1.0  # the two correct solutions share no step pair
    assert a["distinct_correct@4"] == 2.0 and a["strategy_entropy"] == 1.0
    assert a["distinct_correct@2"] == pytest.approx(2 * (1 - 3 / 6))  # each: 1 - C(3,2)/C(4,2)


def test_sampled_metrics_needs_equal_groups():
    rows = [_row("A", 0, "1+2", "3", "", 2), _row("A", 1, "1+2", "3", "", 2), _row("B", 0, "1+2", "3", "", 2)]
    with pytest.raises(ValueError, match="same number of samples"):
        sampled_metrics(rows, get_task)


def test_greedy_metrics_and_summary_table():
    rows = [
        {"correct": True, "difficulty": 3, "first_error_step": None},
        {"correct": False, "difficulty": 3, "first_error_step": 0},
        {"correct": False, "difficulty": 5, "first_error_step": 2},
        {"correct": True, "difficulty": 5, "first_error_step": None},
    ]
    m = greedy_metrics(rows)
    assert m == {"greedy_acc": 0.5, "greedy_acc[difficulty=3]": 0.5, "greedy_acc[difficulty=5]": 0.5,
                 "greedy_later_error_share": 0.5}
    table = summary_table(2, "policy-002", "heldout", m)
    assert table.schema == EVAL_SUMMARY
    assert table.column("metric").to_pylist() == list(m)
    assert set(table.column("round").to_pylist()) == {2}
    assert math.isclose(sum(table.column("value").to_pylist()), 2.0)


@pytest.mark.parametrize("mults, expected", [
    ([1], None),                # one correct sample: no pair
    ([3], 0.0),                 # all the same solution
    ([1, 1, 1, 1], 1.0),        # all different
    ([2, 2], 1 - 4 / 12),       # 4 correct: 2 + 2 same-solution ordered pairs of 12
    ([3, 1], 1 - 6 / 12),
    ([2, 1, 1], 1 - 2 / 12),
])
def test_pair_differ_probability_hand_values(mults, expected):
    from scope_cli.metrics import pair_differ_probability

    got = pair_differ_probability(mults)
    assert got == expected if expected is None else got == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("probs, count", [((0.5, 0.5), 2), ((0.5, 0.5), 3), ((0.7, 0.2, 0.1), 4),
                                          ((0.25,) * 4, 5)])
def test_pair_differ_probability_is_unbiased_at_any_count(probs, count):
    """Enumerating every sequence of `count` correct solutions drawn from `probs`: the expectation is
    1 - sum p^2 whatever the count, where the entropy of the samples and their distinct share are not
    (the accuracy confound the measure exists to remove)."""
    import itertools
    import math

    from scope_cli.metrics import entropy_bits, pair_differ_probability

    expected_value = expected_entropy = 0.0
    for draw in itertools.product(range(len(probs)), repeat=count):
        weight = math.prod(probs[i] for i in draw)
        mults = [draw.count(i) for i in range(len(probs)) if draw.count(i)]
        expected_value += weight * pair_differ_probability(mults)
        expected_entropy += weight * entropy_bits(mults)
    assert expected_value == pytest.approx(1 - sum(p * p for p in probs), abs=1e-12)
    true_entropy = -sum(p * math.log2(p) for p in probs)
    assert expected_entropy < true_entropy - 0.05  # the plug-in entropy is biased low at small counts
