"""locate-error: first wrong steps and the salvage rules per prompt group."""

import json

import pytest

from scope_cli.core.config import Config
from scope_cli.models.tiny import build_arith_tokenizer, init_tiny_policy
from scope_cli.core.files import read_stage_df
from scope_rows import (
    PROBLEM, RIGHT, RIGHT_2, TRUNCATED, WRONG_ANSWER, WRONG_AT_0, WRONG_AT_1, group,
    make_run, write_verified,
)
from stages.locate_error import group_limit, select


def cfg_with(**keys):
    cfg = Config()
    for dotted, value in keys.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


def row(pid, idx, correct, scores):
    return {"prompt_id": pid, "sample_idx": idx, "correct": correct, "step_scores": scores}


def rule_scores(n, first):
    return [1.0] * n if first is None else [1.0] * first + [0.0] * (n - first)


def salvaged(rows, cfg):
    firsts, salvage, counts = select(rows, cfg)
    return [r["sample_idx"] for r, s in zip(rows, salvage) if s], firsts, counts


def test_all_correct_group_salvages_nothing():
    rows = [row("a", i, True, None) for i in range(4)]
    got, firsts, counts = salvaged(rows, Config())
    assert got == [] and firsts == [None] * 4
    assert counts["groups_all_correct"] == 1 and counts["failed"] == 0


def test_mixed_group_takes_longest_prefixes_and_keeps_one_failure():
    rows = [row("a", 0, True, None),
            row("a", 1, False, rule_scores(4, 1)),
            row("a", 2, False, rule_scores(4, 3)),
            row("a", 3, False, rule_scores(4, 2)),
            row("a", 4, False, rule_scores(4, 0))]  # first error at step 0: nothing to keep
    got, firsts, counts = salvaged(rows, Config())
    assert firsts == [None, 1, 3, 2, 0]
    assert sorted(got) == [2, 3]  # max_per_group=2, longest correct prefix first
    assert counts["groups_mixed"] == 1 and counts["salvaged"] == 2 and counts["located"] == 4
    # with only two eligible failures and a correct row, one failure stays unrectified
    rows2 = [row("b", 0, True, None), row("b", 1, False, rule_scores(3, 2)),
             row("b", 2, False, rule_scores(3, 1))]
    assert salvaged(rows2, Config())[0] == [1]


def test_keep_one_failure_counts_every_failure_not_only_eligible_ones():
    # two failures, one not eligible (error at step 0): salvaging the other still leaves a failure
    rows = [row("a", 0, True, None), row("a", 1, False, rule_scores(3, 2)),
            row("a", 2, False, rule_scores(3, 0))]
    assert salvaged(rows, Config())[0] == [1]


def test_all_wrong_group_salvages_up_to_the_limit():
    rows = [row("a", i, False, rule_scores(3, 1 + i % 2)) for i in range(5)]
    got, _, counts = salvaged(rows, Config())
    assert sorted(got) == [1, 3]  # errors at step 2 first; ties by sample_idx
    assert counts["groups_all_wrong"] == 1
    assert len(salvaged(rows, cfg_with(locate__max_per_group=8))[0]) == 5


def test_augment_mode_does_not_keep_a_failure_back():
    rows = [row("a", 0, True, None), row("a", 1, False, rule_scores(3, 2))]
    assert salvaged(rows, Config())[0] == []
    assert salvaged(rows, cfg_with(rectify__mode="augment"))[0] == [1]


def test_min_prefix_steps():
    rows = [row("a", i, False, rule_scores(4, i)) for i in range(4)]
    assert sorted(salvaged(rows, cfg_with(locate__max_per_group=4))[0]) == [1, 2, 3]
    assert sorted(salvaged(rows, cfg_with(locate__max_per_group=4, locate__min_prefix_steps=0))[0]) \
        == [0, 1, 2, 3]
    assert sorted(salvaged(rows, cfg_with(locate__max_per_group=4, locate__min_prefix_steps=3))[0]) == [3]


def test_disagreements_are_counted_not_salvaged_by_default():
    rows = [row("a", 0, False, [0.9, 0.8]), row("a", 1, False, [0.9, 0.2]), row("a", 2, False, [])]
    got, firsts, counts = salvaged(rows, Config())
    assert got == [1] and firsts == [None, 1, None]
    assert counts["disagreements"] == 1 and counts["no_steps"] == 1
    got, firsts, _ = salvaged(rows, cfg_with(locate__salvage_disagreement=True))
    assert sorted(got) == [0, 1] and firsts[0] == 1  # the last step


def test_argmin_locates_the_lowest_score():
    rows = [row("a", 0, False, [0.9, 0.7, 0.6, 0.8])]
    assert salvaged(rows, Config())[1] == [None]
    got, firsts, _ = salvaged(rows, cfg_with(locate__method="argmin"))
    assert firsts == [2] and got == [0]


def test_luffy_selects_the_same_number_from_all_failures():
    rows = [row("a", 0, True, None),
            row("a", 1, False, None), row("a", 2, False, None), row("a", 3, False, None)]
    luffy = cfg_with(run__algo="luffy")
    assert salvaged(rows, luffy)[0] == [1, 2]  # any failure: no PRM, no first error needed
    scope_rows = [row("a", 0, True, None)] + [row("a", i, False, rule_scores(3, 1)) for i in (1, 2, 3)]
    assert len(salvaged(scope_rows, Config())[0]) == len(salvaged(rows, luffy)[0])
    all_wrong = [row("b", i, False, None) for i in range(3)]
    assert salvaged(all_wrong, luffy)[0] == [0, 1]
    two = [row("c", 0, True, None), row("c", 1, False, None), row("c", 2, False, None)]
    assert salvaged(two, luffy)[0] == [1]  # keeps one failure, as scope does


def test_grpo_salvages_nothing():
    rows = [row("a", 0, False, rule_scores(3, 2)), row("a", 1, False, rule_scores(3, 1))]
    assert salvaged(rows, cfg_with(run__algo="grpo"))[0] == []


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
