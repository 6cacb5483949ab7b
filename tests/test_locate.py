"""locate-error: first wrong steps, the PRM noise, ProcessBench metrics and the salvage rules per
prompt group (scope_cli/locate.py, against hand-computed values), and the stage on scored rows."""

import json
from collections import Counter

import pytest

from scope_cli.locate import apply_noise, first_error, group_limit, processbench, salvage_order, select
from scope_cli.models.tiny import build_arith_tokenizer, init_tiny_policy
from scope_cli.core.files import read_stage_df
from scope_cli.sections import LocateConfig
from scope_rows import (
    PROBLEM, RIGHT, RIGHT_2, TRUNCATED, WRONG_ANSWER, WRONG_AT_0, WRONG_AT_1, group,
    make_run, write_verified,
)


# ---- first errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scores, method, threshold, want", [
    ([0.9, 0.4, 0.1], "threshold", 0.5, 1),
    ([0.9, 0.6], "threshold", 0.5, None),
    ([0.9, 0.5], "threshold", 0.5, None),  # at the threshold is not below it
    ([0.9, 0.7, 0.6], "threshold", 0.65, 2),
    ([0.9, 0.6], "threshold", 0.7, 1),
    ([0.0, 0.0], "threshold", 0.0, None),  # nothing is below 0
    ([0.9, 0.4, 0.1], "argmin", 0.5, 2),
    ([0.9, 0.6], "argmin", 0.5, 1),  # argmin always names a step
    ([0.3, 0.8, 0.3], "argmin", 0.5, 0),  # ties: the earliest
    ([], "argmin", 0.5, None),
    ([], "threshold", 0.5, None),
    (None, "threshold", 0.5, None),
])
def test_first_error(scores, method, threshold, want):
    assert first_error(scores, method, threshold) == want


# ---- noise -----------------------------------------------------------------------------------------
def seed_for(kind, scores, threshold):
    """The first row seed whose draw (p = 1) is `kind` for these scores."""
    return next(s for s in range(1000) if apply_noise(scores, 1.0, s, threshold)[1] == kind)


def test_noise_is_seeded_and_moves_or_misses_the_first_error():
    scores = [1.0, 1.0, 0.0, 0.0, 0.0]
    kinds = Counter()
    for seed in range(600):
        noisy, kind = apply_noise(scores, 0.3, seed, 0.5)
        assert (noisy, kind) == apply_noise(scores, 0.3, seed, 0.5)
        kinds[kind] += 1
        expected = {None: 2, "miss": None, "shift-": 1, "shift+": 3}[kind]
        assert first_error(noisy) == expected
    # 600 draws at p = 0.3: 180 expected, sd sqrt(600·0.3·0.7) = 11.2; the bounds are ±3.7 sd
    assert 0.23 < 1 - kinds[None] / 600 < 0.37
    assert min(kinds["miss"], kinds["shift-"], kinds["shift+"]) > 20
    # shifts never leave the steps; a row whose PRM finds no error is left alone
    for seed in range(100):
        assert apply_noise([0.0, 0.0], 1.0, seed, 0.5)[1] in ("miss", "shift+")
        assert apply_noise([0.2], 1.0, seed, 0.5)[1] == "miss"
        assert apply_noise([0.9, 0.8], 1.0, seed, 0.5) == ([0.9, 0.8], None)
    assert apply_noise(scores, 0.0, 1, 0.5) == (scores, None)


@pytest.mark.parametrize("scores, threshold, want", [
    ([0.9, 0.3, 0.2], 0.5, [0.9, 0.7, 0.8]),  # 1 - s
    ([0.9, 0.6, 0.2], 0.7, [0.9, 1 - 0.6 * 3 / 7, 1 - 0.2 * 3 / 7]),  # 52/70, 64/70: above 0.7
    ([0.1, 0.5], 0.25, [0.7, 0.5]),  # 1 - 0.1·3; 0.5 is not below 0.25 and stays
    ([0.0, 0.95], 1.0, [1.0, 1.0]),  # everything below 1 mirrors onto 1
])
def test_a_missed_error_mirrors_the_scores_below_the_threshold_above_it(scores, threshold, want):
    noisy, kind = apply_noise(scores, 1.0, seed_for("miss", scores, threshold), threshold)
    assert kind == "miss" and noisy == pytest.approx(want, rel=1e-12)  # a few float64 operations
    assert first_error(noisy, "threshold", threshold) is None


@pytest.mark.parametrize("scores, threshold, kind, want", [
    ([0.9, 0.6, 0.2], 0.7, "shift+", [0.9, 0.9, 0.6]),
    ([0.9, 0.6, 0.2], 0.7, "shift-", [0.6, 0.2, 0.2]),
    ([0.9, 0.9, 0.2], 0.5, "shift-", [0.9, 0.2, 0.2]),
])
def test_a_shift_moves_the_scores_one_step(scores, threshold, kind, want):
    assert apply_noise(scores, 1.0, seed_for(kind, scores, threshold), threshold) == (want, kind)


def test_noise_finds_errors_at_the_threshold_not_at_one_half():
    """[0.9, 0.6] has no wrong step at 0.5 and one at 0.7 (step 1): only then is it perturbed, and
    a shift later is possible only where the error is not on the last step ([0.9, 0.6, 0.2]: step 2
    at 0.5, step 1 at 0.7)."""
    for seed in range(50):
        assert apply_noise([0.9, 0.6], 1.0, seed, 0.5) == ([0.9, 0.6], None)
        assert apply_noise([0.9, 0.6], 1.0, seed, 0.7)[1] in ("miss", "shift-")
    kinds = {t: {apply_noise([0.9, 0.6, 0.2], 1.0, s, t)[1] for s in range(200)} for t in (0.5, 0.7)}
    assert kinds == {0.5: {"miss", "shift-"}, 0.7: {"miss", "shift-", "shift+"}}


def test_at_one_half_a_miss_is_max_s_1_minus_s_exactly():
    """The mirror at 0.5 is (1 - 0.5) / 0.5 = 1.0 exactly, so 1 - s·1.0 is the same float as
    max(s, 1 - s) for every score below 0.5: runs at the default threshold keep their bytes."""
    scores = [0.5, 0.4999999999999999, 0.3, 0.1234567, 1e-9, 0.0, 0.7777, 0.5000000000000001]
    noisy, kind = apply_noise(scores, 1.0, seed_for("miss", scores, 0.5), 0.5)
    assert kind == "miss" and noisy == [max(s, 1.0 - s) for s in scores]


# ---- ProcessBench ----------------------------------------------------------------------------------
def test_processbench_metrics():
    labels = [None, None, 1, 2, 0]
    preds = [None, 3, 1, 1, 0]
    m = processbench(preds, labels)
    assert m["samples"] == 5 and m["erroneous"] == 3 and m["correct"] == 2
    assert m["acc_correct"] == 0.5 and m["acc_erroneous"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert m["exact_match"] == pytest.approx(3 / 5)
    assert processbench(labels, labels)["f1"] == 1.0


@pytest.mark.parametrize("preds, labels, acc_err, acc_cor, f1, exact", [
    ([1, None], [0, 2], 0.0, None, None, 0.0),  # no correct samples: f1 undefined
    ([None, 2], [None, None], None, 0.5, None, 0.5),  # no erroneous samples
    ([2, 0], [None, 1], 0.0, 0.0, 0.0, 0.0),  # both accuracies 0
    ([], [], None, None, None, None),
])
def test_processbench_edges(preds, labels, acc_err, acc_cor, f1, exact):
    m = processbench(preds, labels)
    assert (m["acc_erroneous"], m["acc_correct"], m["f1"], m["exact_match"]) == (acc_err, acc_cor, f1, exact)


def test_processbench_refuses_lists_of_different_lengths():
    with pytest.raises(ValueError, match="differ in length"):
        processbench([None], [None, 1])


# ---- rows to salvage -------------------------------------------------------------------------------
def row(pid, idx, correct, scores):
    return {"prompt_id": pid, "sample_idx": idx, "correct": correct, "step_scores": scores}


def rule_scores(n, first):
    return [1.0] * n if first is None else [1.0] * first + [0.0] * (n - first)


def salvaged(rows, algo="scope", mode="replace", seed=0, round_=0, **locate):
    firsts, salvage, counts = select(rows, LocateConfig(**locate), algo, mode, seed, round_)
    return [r["sample_idx"] for r, s in zip(rows, salvage) if s], firsts, counts


def test_all_correct_group_salvages_nothing():
    rows = [row("a", i, True, None) for i in range(4)]
    got, firsts, counts = salvaged(rows)
    assert got == [] and firsts == [None] * 4
    assert counts["groups_all_correct"] == 1 and counts["failed"] == 0


def test_mixed_group_takes_longest_prefixes_and_keeps_one_failure():
    rows = [row("a", 0, True, None),
            row("a", 1, False, rule_scores(4, 1)),
            row("a", 2, False, rule_scores(4, 3)),
            row("a", 3, False, rule_scores(4, 2)),
            row("a", 4, False, rule_scores(4, 0))]  # first error at step 0: nothing to keep
    got, firsts, counts = salvaged(rows)
    assert firsts == [None, 1, 3, 2, 0]
    assert sorted(got) == [2, 3]  # max_per_group=2, longest correct prefix first
    assert counts["groups_mixed"] == 1 and counts["salvaged"] == 2 and counts["located"] == 4
    # with only two eligible failures and a correct row, one failure stays unrectified
    rows2 = [row("b", 0, True, None), row("b", 1, False, rule_scores(3, 2)),
             row("b", 2, False, rule_scores(3, 1))]
    assert salvaged(rows2)[0] == [1]


def test_keep_one_failure_counts_every_failure_not_only_eligible_ones():
    # two failures, one not eligible (error at step 0): salvaging the other still leaves a failure
    rows = [row("a", 0, True, None), row("a", 1, False, rule_scores(3, 2)),
            row("a", 2, False, rule_scores(3, 0))]
    assert salvaged(rows)[0] == [1]


def test_all_wrong_group_salvages_up_to_the_limit():
    rows = [row("a", i, False, rule_scores(3, 1 + i % 2)) for i in range(5)]
    got, _, counts = salvaged(rows)
    assert sorted(got) == [1, 3]  # errors at step 2 first; ties by sample_idx
    assert counts["groups_all_wrong"] == 1
    assert len(salvaged(rows, max_per_group=8)[0]) == 5


def test_augment_mode_does_not_keep_a_failure_back():
    rows = [row("a", 0, True, None), row("a", 1, False, rule_scores(3, 2))]
    assert salvaged(rows)[0] == []
    assert salvaged(rows, mode="augment")[0] == [1]


def test_min_prefix_steps():
    rows = [row("a", i, False, rule_scores(4, i)) for i in range(4)]
    assert sorted(salvaged(rows, max_per_group=4)[0]) == [1, 2, 3]
    assert sorted(salvaged(rows, max_per_group=4, min_prefix_steps=0)[0]) \
        == [0, 1, 2, 3]
    assert sorted(salvaged(rows, max_per_group=4, min_prefix_steps=3)[0]) == [3]


def test_disagreements_are_counted_not_salvaged_by_default():
    rows = [row("a", 0, False, [0.9, 0.8]), row("a", 1, False, [0.9, 0.2]), row("a", 2, False, [])]
    got, firsts, counts = salvaged(rows)
    assert got == [1] and firsts == [None, 1, None]
    assert counts["disagreements"] == 1 and counts["no_steps"] == 1
    got, firsts, _ = salvaged(rows, salvage_disagreement=True)
    assert sorted(got) == [0, 1] and firsts[0] == 1  # the last step


def test_the_threshold_decides_where_the_first_error_is():
    rows = [row("a", 0, False, [0.9, 0.6, 0.9]), row("a", 1, False, [0.8, 0.8, 0.4])]
    got, firsts, counts = salvaged(rows)
    assert firsts == [None, 2] and got == [1] and counts["disagreements"] == 1
    got, firsts, counts = salvaged(rows, threshold=0.7)
    assert firsts == [1, 2] and got == [0, 1] and counts["disagreements"] == 0


def test_argmin_locates_the_lowest_score():
    rows = [row("a", 0, False, [0.9, 0.7, 0.6, 0.8])]
    assert salvaged(rows)[1] == [None]
    got, firsts, _ = salvaged(rows, method="argmin")
    assert firsts == [2] and got == [0]


def test_luffy_selects_the_same_number_from_all_failures():
    rows = [row("a", 0, True, None),
            row("a", 1, False, None), row("a", 2, False, None), row("a", 3, False, None)]
    assert salvaged(rows, "luffy")[0] == [1, 2]  # any failure: no PRM, no first error needed
    scope_rows = [row("a", 0, True, None)] + [row("a", i, False, rule_scores(3, 1)) for i in (1, 2, 3)]
    assert len(salvaged(scope_rows)[0]) == len(salvaged(rows, "luffy")[0])
    all_wrong = [row("b", i, False, None) for i in range(3)]
    assert salvaged(all_wrong, "luffy")[0] == [0, 1]
    two = [row("c", 0, True, None), row("c", 1, False, None), row("c", 2, False, None)]
    assert salvaged(two, "luffy")[0] == [1]  # keeps one failure, as scope does


def test_grpo_salvages_nothing():
    rows = [row("a", 0, False, rule_scores(3, 2)), row("a", 1, False, rule_scores(3, 1))]
    assert salvaged(rows, "grpo")[0] == []


@pytest.mark.parametrize("n_failed,n_correct,mode,want", [
    (0, 8, "replace", 0), (1, 7, "replace", 0), (3, 5, "replace", 2), (2, 6, "replace", 1),
    (8, 0, "replace", 2), (1, 0, "replace", 1), (1, 7, "augment", 1),
])
def test_group_limit(n_failed, n_correct, mode, want):
    assert group_limit(n_failed, n_correct, 2, mode) == want


def test_locate_stage_on_scored_rows(tmp_path):
    from stages.locate_error import locate_error
    from stages.prm_score import prm_score

    policy = init_tiny_policy(tmp_path / "policy", layers=1)
    tok = build_arith_tokenizer()
    run = make_run(tmp_path / "run", policy)
    g1 = group(tok, PROBLEM, [RIGHT, WRONG_AT_1, WRONG_ANSWER, TRUNCATED, RIGHT_2, WRONG_AT_0])
    g2 = group(tok, "3+4+2", ["3+4=7;7+2=8;\\boxed{8}", "3+4=8;8+2=0;\\boxed{0}", "3+4=7;7+2=9"])
    write_verified(run, 1, [g1 + g2])
    prm_score(run, 1, quiet=True)
    assert locate_error(run, 1, quiet=True).computed == [0]
    df = read_stage_df(run.stage_dir(1, "located"))
    got = {(r["problem"], r["sample_idx"]): (r["first_error_step"], r["salvage"])
           for r in df.iter_rows(named=True)}
    # mixed group: errors at steps 1, 2, 1, 0; the two longest prefixes (ties: lower sample_idx)
    assert got[(PROBLEM, 2)] == (2, True) and got[(PROBLEM, 1)] == (1, True)
    assert got[(PROBLEM, 3)] == (1, False) and got[(PROBLEM, 5)] == (0, False)
    assert got[(PROBLEM, 0)] == (None, False)
    # all-wrong group (3+4+2 = 9, every row fails): the two with an error at step >= 1
    assert got[("3+4+2", 0)] == (1, True) and got[("3+4+2", 2)] == (1, True)
    assert got[("3+4+2", 1)] == (0, False)
    manifest = json.loads((run.stage_dir(1, "located") / "_manifest" / "shard-00000.json").read_text())
    assert manifest["summary"]["salvaged"] == 4 and manifest["summary"]["groups_all_wrong"] == 1


# ---- locate.order: the order qualifying rows are salvaged in ----------------------------------------
FIRSTS = {0: 1, 1: 3, 2: 2, 3: 3, 4: 1}  # row index -> first wrong step; sample_idx = 10 + row index


@pytest.mark.parametrize("order, seed, round_, pid, expected", [
    ("longest", 0, 1, "a", [1, 3, 2, 0, 4]),  # step 3 (ties: lower sample_idx), step 2, step 1
    ("longest", 7, 2, "b", [1, 3, 2, 0, 4]),  # longest ignores the seed
    # random: rows in sample_idx order shuffled by random.Random("salvage\0<seed>\0<round>\0<pid>")
    ("random", 0, 1, "a", [2, 0, 4, 3, 1]),
    ("random", 0, 2, "a", [4, 0, 3, 1, 2]),  # another round
    ("random", 7, 1, "a", [3, 1, 0, 4, 2]),  # another run.seed
    ("random", 0, 1, "b", [3, 4, 1, 2, 0]),  # another prompt
])
def test_salvage_order(order, seed, round_, pid, expected):
    sample_idx = {i: 10 + i for i in FIRSTS}
    assert salvage_order(FIRSTS, sample_idx, order, seed, round_, pid) == expected
    backwards = dict(reversed(list(FIRSTS.items())))  # the rows' order in the table does not matter
    assert salvage_order(backwards, sample_idx, order, seed, round_, pid) == expected


def test_random_order_salvages_the_first_qualifying_rows_of_the_shuffle():
    rows = [row("a", 10 + i, False, rule_scores(4, f)) for i, f in FIRSTS.items()]
    rows.append(row("a", 15, False, rule_scores(4, 0)))  # nothing to keep: never a candidate
    assert sorted(salvaged(rows, round_=1)[0]) == [11, 13]  # longest: the step-3 errors
    assert sorted(salvaged(rows, round_=1, order="random")[0]) == [10, 12]  # rows 2, 0 of the shuffle
    assert sorted(salvaged(rows, round_=2, order="random")[0]) == [10, 14]  # rows 4, 0
    for algo in ("scope", "luffy_matched"):  # the same rows for both; luffy keeps its own rule
        assert sorted(salvaged(rows, algo, round_=2, order="random")[0]) == [10, 14]
    assert sorted(salvaged(rows, "luffy", round_=2, order="random")[0]) == [10, 11]
    for algo in ("grpo", "vppo"):  # nothing salvaged; the first errors are still found (vppo's use)
        got, firsts, _ = salvaged(rows, algo, order="random")
        assert got == [] and firsts == [*FIRSTS.values(), 0]
