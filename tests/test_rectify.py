"""rectify: spliced rows keep the parent's tokens exactly, verify, and join the batch; the LUFFY and
GRPO controls write the same schema; each algorithm's candidate rows (the replacement table) and the
one accept step."""

import random

import polars as pl
import pytest

from scope_cli.core.config import Config
from scope_cli.models.tiny import build_arith_tokenizer, init_tiny_policy
from scope_cli.schema import RECTIFIED
from scope_cli.core.files import read_stage, read_stage_df
from scope_cli.tasks import arith
from scope_rows import (
    PROBLEM, RIGHT, RIGHT_2, TRUNCATED, WRONG_ANSWER, WRONG_AT_0, WRONG_AT_1, arith_row, group,
    make_run, write_verified,
)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return init_tiny_policy(tmp_path_factory.mktemp("policy") / "tiny", layers=1)


def groups():
    tok = build_arith_tokenizer()
    mixed = group(tok, PROBLEM, [RIGHT, WRONG_AT_1, WRONG_ANSWER, TRUNCATED, RIGHT_2, WRONG_AT_0])
    all_wrong = group(tok, "3+4+2", ["3+4=7;7+2=8;\\boxed{8}", "3+4=8;8+2=0;\\boxed{0}", "3+4=7;7+2=9"])
    return mixed + all_wrong


def run_round(tmp_path, policy, overrides=(), rows=None):
    from stages.locate_error import locate_error
    from stages.prm_score import prm_score
    from stages.rectify import rectify

    run = make_run(tmp_path / "run", policy, list(overrides))
    write_verified(run, 1, [rows or groups()])
    prm_score(run, 1, quiet=True)
    locate_error(run, 1, quiet=True)
    rectify(run, 1, quiet=True)
    return run


def check_texts(df: pl.DataFrame, guide: str, tok=None):
    """New rows read as text: kept_text is the decode of the kept tokens and kept_text + guide_text is
    the response (the tokenizers here round-trip); `policy` names the guide; policy rows have none."""
    tok = tok or build_arith_tokenizer()
    for row in df.filter(pl.col("origin") != "policy").iter_rows(named=True):
        k = row["offpolicy_start"]
        assert row["kept_text"] == (tok.decode(row["response_ids"][:k]) if k else "")
        assert row["kept_text"] + row["guide_text"] == row["response"]
        assert tok.encode(row["guide_text"], add_special_tokens=False) == row["response_ids"][k:]
        assert row["policy"] == guide
    policy_rows = df.filter(pl.col("origin") == "policy")
    assert policy_rows["kept_text"].null_count() == policy_rows["guide_text"].null_count() == policy_rows.height
    assert (policy_rows["policy"] == "policy-000").all()


def check_spliced_rows(df: pl.DataFrame, origin="rectified"):
    """Every new row's first offpolicy_start tokens are its parent's, exactly, and it verified."""
    new = df.filter(pl.col("origin") == origin)
    parents = df.filter(pl.col("origin") == "policy")
    assert new.height > 0
    check_texts(df, "oracle:arith" if origin == "rectified" else "reference")
    for row in new.iter_rows(named=True):
        parent = parents.filter((pl.col("prompt_id") == row["prompt_id"])
                                & (pl.col("sample_idx") == row["parent_sample_idx"])).row(0, named=True)
        k = row["offpolicy_start"]
        assert row["response_ids"][:k] == parent["response_ids"][:k]
        assert row["response_logprobs"][:k] == parent["response_logprobs"][:k]
        assert all(v is None for v in row["response_logprobs"][k:])
        assert len(row["response_logprobs"]) == len(row["response_ids"]) > k
        assert row["reward"] == 1.0 and row["correct"] and row["verify_status"] == "ok"
        assert row["in_batch"] and parent["salvage"]
        # a finished guide-written row ends with the policy's eos, which train-step trains on
        assert row["finish_reason"] == "stop" and row["stop_token_id"] == build_arith_tokenizer().eos_token_id
        assert arith.first_error_step(row["problem"], row["response"]) is None
        assert row["step_token_ends"][-1] == len(row["response_ids"])
    return new


def test_scope_oracle_rectifies_salvaged_rows(tmp_path, policy):
    run = run_round(tmp_path, policy)
    df = read_stage_df(run.stage_dir(1, "rectified"))
    new = check_spliced_rows(df)
    assert new.height == 4  # two per group: the mixed group keeps two failures, all-wrong up to 2
    for row in new.iter_rows(named=True):
        parent = df.filter((pl.col("prompt_id") == row["prompt_id"]) & (pl.col("origin") == "policy")
                           & (pl.col("sample_idx") == row["parent_sample_idx"])).row(0, named=True)
        assert not parent["in_batch"]  # replace mode
        assert row["offpolicy_start"] == parent["step_token_ends"][parent["first_error_step"] - 1]
        assert row["response"].startswith(parent["response"][:row["offpolicy_start"]])
    # new sample indices are distinct and follow the group's
    for pid, g in df.group_by("prompt_id"):
        assert g["sample_idx"].n_unique() == g.height
    assert sorted(new.filter(pl.col("problem") == PROBLEM)["sample_idx"].to_list()) == [6, 7]
    # every input row is still there, as a policy row
    assert df.filter(pl.col("origin") == "policy").height == 9
    assert df.filter(pl.col("origin") == "policy")["offpolicy_start"].null_count() == 9
    manifest = read_manifest(run)
    assert manifest["summary"]["salvaged"] == 4 and manifest["summary"]["rectified"] == 4
    assert manifest["summary"]["dropped"] == 0 and 0 < manifest["summary"]["mean_kept_prefix_frac"] < 1
    # steps kept / parent steps: 2 of 3 and 1 of 3 (7+5-7), 1 of 3 and 1 of 2 (3+4+2)
    assert manifest["summary"]["mean_kept_steps_frac"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 3 + 1 / 2) / 4)
    assert manifest["headline"]["num"] == "rectified"


def read_manifest(run):
    import json

    return json.loads((run.stage_dir(1, "rectified") / "_manifest" / "shard-00000.json").read_text())


def test_augment_mode_keeps_parents_in_the_batch(tmp_path, policy):
    run = run_round(tmp_path, policy, ["rectify.mode=augment"])
    df = read_stage_df(run.stage_dir(1, "rectified"))
    check_spliced_rows(df)
    assert df["in_batch"].all()


def test_luffy_replaces_with_the_reference_and_grpo_passes_through(tmp_path, policy):
    luffy = run_round(tmp_path / "luffy", policy, ["run.algo=luffy"])
    grpo = run_round(tmp_path / "grpo", policy, ["run.algo=grpo"])
    scope = run_round(tmp_path / "scope", policy)
    tables = [read_stage(r.stage_dir(1, "rectified")) for r in (luffy, grpo, scope)]
    assert all(t.schema.equals(RECTIFIED) for t in tables)

    df = read_stage_df(luffy.stage_dir(1, "rectified"))
    ref = df.filter(pl.col("origin") == "reference")
    assert ref.height == 4
    for row in ref.iter_rows(named=True):
        assert row["offpolicy_start"] == 0 and row["kept_text"] == "" and row["guide_text"] == row["response"]
        assert all(v is None for v in row["response_logprobs"]) and row["reward"] == 1.0
        assert arith.first_error_step(row["problem"], row["response"]) is None
    # per group: the first salvaged row gets the reference, the next another correct solution
    for pid, g in ref.sort("parent_sample_idx").group_by("prompt_id", maintain_order=True):
        assert g["response"][0] == g["solution"][0] and g["response"].n_unique() == g.height == 2
    check_texts(df, "reference")
    replaced = df.filter((pl.col("origin") == "policy") & ~pl.col("in_batch"))
    assert replaced.height == 4 and not replaced["correct"].any()

    g = read_stage_df(grpo.stage_dir(1, "rectified"))
    assert g.height == 9 and (g["origin"] == "policy").all() and g["in_batch"].all()
    assert g["parent_sample_idx"].null_count() == 9


def test_rectify_rows_splices_at_token_level_through_a_merging_bpe():
    """With a BPE whose tokens cross step separators, the kept prefix is still the parent's own
    tokens and the seam text (the rest of the kept step) comes from the guide."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from scope_cli.backends.guide import OracleGuide
    from scope_cli.backends.steps import align_steps
    from stages.rectify import rectify_rows

    rng = random.Random(0)
    corpus = [arith.reference_solution(arith.make_problem(rng, 4), rng) for _ in range(300)]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")

    problem = "6-6-8-7"
    rows = []
    for i, response in enumerate(["6-6=0;0-8=2;2-7=5;\\boxed{5}", "6-6=0;0-8=2;2-7=4;\\boxed{4}"]):
        row = arith_row(tok, problem, response, i)
        al = align_steps(arith, tok, row["response_ids"])
        first = arith.first_error_step(problem, response)
        row.update(steps=al.steps, step_token_ends=al.step_token_ends,
                   step_scores=[1.0] * len(al.steps), first_error_step=first,
                   salvage=first is not None)
        rows.append(row)
    parent = rows[1]
    cut = parent["step_token_ends"][1]
    assert tok.decode(parent["response_ids"][:cut]) != "6-6=0;0-8=2;"  # the separator merged away

    def exact(rs):
        return [{"pred": arith.extract_answer(r["response"]), "verify_status": "ok",
                 "correct": arith.first_error_step(r["problem"], r["response"]) is None,
                 "reward": 1.0} for r in rs]

    cfg = Config()
    out, counts = rectify_rows(rows, cfg, 1, tok, OracleGuide(), exact)
    assert counts["rectified"] == 1
    new = out[-1]
    assert new["origin"] == "rectified" and new["offpolicy_start"] == cut
    assert new["response_ids"][:cut] == parent["response_ids"][:cut]
    assert new["response"].startswith("6-6=0;0-8=2;") and new["response"].endswith("\\boxed{5}")
    # the kept text ends where the kept tokens do, inside the separator-merged seam
    assert new["kept_text"] == tok.decode(parent["response_ids"][:cut]) != "6-6=0;0-8=2;"
    assert new["kept_text"] + new["guide_text"] == new["response"]
    assert new["policy"] == "oracle:arith" and out[1]["kept_text"] is None
    assert [r["in_batch"] for r in out] == [True, False, True]


def test_cli_runs_the_three_stages(tmp_path, policy):
    from typer.testing import CliRunner

    from scope_cli.cli.app import app

    run = make_run(tmp_path / "run", policy)
    write_verified(run, 1, [groups()])
    cli = CliRunner()
    for command in ("prm-score", "locate-error", "rectify"):
        result = cli.invoke(app, [command, "--run", str(run.root), "--round", "1", "--quiet"])
        assert result.exit_code == 0, result.output
    result = cli.invoke(app, ["prm-score", "--run", str(run.root), "--round", "1",
                              "--eval-against", "rule"])
    assert result.exit_code == 0 and '"f1": 1.0' in result.output
    result = cli.invoke(app, ["rectify", "--run", str(run.root), "--round", "2"])
    assert result.exit_code == 2 and "no shards" in result.output
    assert read_stage_df(run.stage_dir(1, "rectified")).filter(pl.col("origin") == "rectified").height == 4


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
SHIPPED_POLICY = ROOT / "data/policies/arith-tiny"
SHIPPED_GUIDE = ROOT / "data/policies/arith-guide"
SHIPPED_PRM = ROOT / "data/prms/arith-tiny-prm"


def test_scope_with_the_learned_prm_noise_and_the_model_guide(tmp_path):
    """The miniature for real: the shipped learned PRM (hf backend) with noise 0.3 locates the
    errors, the shipped arith-guide continues the kept prefixes through the generation backend."""
    run = run_round(tmp_path, SHIPPED_POLICY, [
        "prm.backend=hf", f"prm.path={SHIPPED_PRM}", "prm.noise=0.3", "rectify.guide=model",
        f"rectify.guide_path={SHIPPED_GUIDE}", "rectify.max_tries=4", "locate.max_per_group=3"])
    scored = read_stage_df(run.stage_dir(1, "scored"))
    assert scored.filter(~pl.col("correct"))["step_scores"].null_count() == 0
    df = read_stage_df(run.stage_dir(1, "rectified"))
    new = df.filter(pl.col("origin") == "rectified")
    summary = read_manifest(run)["summary"]
    assert summary["rectified"] + summary["dropped"] == summary["salvaged"] > 0
    assert new.height == summary["rectified"] > 0
    for row in new.iter_rows(named=True):  # the guide's text, tokenized, after the parent's tokens
        parent = df.filter((pl.col("prompt_id") == row["prompt_id"]) & (pl.col("origin") == "policy")
                           & (pl.col("sample_idx") == row["parent_sample_idx"])).row(0, named=True)
        k = row["offpolicy_start"]
        assert 0 < k < len(row["response_ids"]) and row["response_ids"][:k] == parent["response_ids"][:k]
        assert row["reward"] == 1.0 and row["correct"] and not parent["in_batch"]
        assert all(v is None for v in row["response_logprobs"][k:])
    check_texts(df, "arith-guide")


class WrongGuide:
    """Always continues with a wrong answer."""

    max_tries = 99

    def name(self, row):
        return "wrong"

    def __init__(self):
        self.calls = []

    def continue_(self, requests, attempt=0):
        from scope_cli.backends.guide import GuideOutput

        self.calls.append((attempt, len(requests)))
        return [GuideOutput("\\boxed{0}", "stop") for _ in requests]


def test_failed_continuations_are_retried_then_dropped(tmp_path, policy):
    from stages.rectify import rectify_rows
    from stages.locate_error import locate_table
    from stages.prm_score import score_table
    from scope_cli.backends.prm import RulePrm

    cfg = Config()
    cfg.rectify.max_tries = 3
    tok = build_arith_tokenizer()
    table, _ = score_table(__import__("scope_rows").verified_table(groups()), cfg, tok, RulePrm())
    rows = locate_table(table, cfg)[0].to_pylist()

    def check(rs):
        return [{"pred": arith.extract_answer(r["response"]), "verify_status": "ok",
                 "correct": arith.extract_answer(r["response"]) == r["answer"],
                 "reward": 0.0} for r in rs]

    guide = WrongGuide()
    out, counts = rectify_rows(rows, cfg, 1, tok, guide, check)
    assert guide.calls == [(0, 4), (1, 4), (2, 4)]
    assert counts["dropped"] == 4 and counts["rectified"] == 0 and counts["tries"] == 12
    assert len(out) == len(rows) and all(r["in_batch"] for r in out)


def test_model_guide_prompts(tmp_path):
    from scope_cli.backends.guide import GuideRequest, ModelGuide, attempt_seed

    cfg = Config()
    cfg.rectify.guide_path = str(SHIPPED_GUIDE)
    guide = ModelGuide(cfg.rectify, cfg.generate)
    row = arith_row(build_arith_tokenizer(), PROBLEM, WRONG_AT_1, 1)
    req = GuideRequest(row=row, kept_steps=["7+5=2"], kept_text="7+5=2;", prefix_text="7+5=2;", seed=11)
    assert guide.prompt(req) == "7+5-7\n7+5=2;"
    guide.sees_reference = True
    assert guide.prompt(req) == row["solution"] + "\n7+5-7\n7+5=2;"
    outs = guide.continue_([req, req], attempt=1)
    assert outs[0] == outs[1]  # one seed per request and attempt, whatever the batch
    assert attempt_seed(11, 0) == 11 and attempt_seed(11, 1) != attempt_seed(11, 2)
    guide.close()


def test_new_rows_longer_than_the_policys_budget_are_dropped():
    from scope_cli.backends.guide import OracleGuide
    from scope_cli.backends.prm import RulePrm
    from stages.locate_error import locate_table
    from stages.prm_score import score_table
    from stages.rectify import rectify_rows

    cfg = Config()
    cfg.generate.max_tokens = 14  # shorter than any complete solution of 7+5-7 (15 tokens)
    tok = build_arith_tokenizer()
    table, _ = score_table(__import__("scope_rows").verified_table(groups()), cfg, tok, RulePrm())
    rows = locate_table(table, cfg)[0].to_pylist()

    def exact(rs):
        return [{"pred": arith.extract_answer(r["response"]), "verify_status": "ok", "reward": 1.0,
                 "correct": arith.first_error_step(r["problem"], r["response"]) is None} for r in rs]

    out, counts = rectify_rows(rows, cfg, 1, tok, OracleGuide(), exact)
    mixed = [r for r in out if r["problem"] == PROBLEM]
    assert not [r for r in mixed if r["origin"] == "rectified"]
    assert counts["too_long"] >= 2 and counts["dropped"] >= 2
    assert all(r["in_batch"] for r in mixed)


def test_oracle_gives_no_continuation_after_a_wrong_kept_step():
    """A PRM that puts the first error too late leaves a wrong step in the kept prefix: the oracle
    cannot continue it to a right answer, so it returns nothing to add (rectify drops the row)."""
    from scope_cli.backends.guide import GuideRequest, OracleGuide

    row = {"problem": "7+5-7", "task": "arith"}
    wrong = GuideRequest(row, ["7+5=3"], "7+5=3;", "7+5=3;", seed=1)
    right = GuideRequest(row, ["7+5=2"], "7+5=2;", "7+5=2;", seed=1)
    out_wrong, out_right = OracleGuide().continue_([wrong, right])
    assert out_wrong.text == ""
    assert out_right.text == "2-7=5;\\boxed{5}"


# ---- the replacement table: one row per algorithm ---------------------------------------------------
def located_rows(cfg, tok, rows=None):
    from scope_cli.backends.prm import RulePrm
    from stages.locate_error import locate_table
    from stages.prm_score import score_table

    table, _ = score_table(__import__("scope_rows").verified_table(rows or groups()), cfg, tok, RulePrm())
    return locate_table(table, cfg)[0].to_pylist()


def exact(rows):
    return [{"pred": arith.extract_answer(r["response"]), "verify_status": "ok", "reward": 1.0,
             "correct": arith.first_error_step(r["problem"], r["response"]) is None} for r in rows]


@pytest.mark.parametrize("algo, origin, counters", [
    ("grpo", None, {"salvaged": 0, "rectified": 0, "reference": 0, "tries": 0, "dropped": 0}),
    ("vppo", None, {"salvaged": 0, "rectified": 0, "reference": 0, "tries": 0, "dropped": 0}),
    ("luffy", "reference", {"salvaged": 4, "rectified": 0, "reference": 4, "tries": 0, "dropped": 0}),
    ("scope", "rectified", {"salvaged": 4, "rectified": 4, "reference": 0, "tries": 4, "dropped": 0}),
    ("luffy_matched", "guided", {"salvaged": 4, "rectified": 0, "guided": 4, "tries": 4, "dropped": 0}),
])
def test_each_algorithm_makes_its_own_candidate_rows(algo, origin, counters):
    """grpo: none; luffy: the reference solution, whole; scope: the kept prefix + the guide's text;
    luffy_matched: the guide's whole solution."""
    from scope_cli.backends.guide import OracleGuide
    from scope_cli.core.replacements import REPLACEMENTS
    from stages.rectify import rectify_rows

    assert set(REPLACEMENTS) == {"grpo", "luffy", "scope", "luffy_matched", "vppo"}
    cfg = Config()
    cfg.run.algo = algo
    tok = build_arith_tokenizer()
    rows = located_rows(cfg, tok)
    guided = REPLACEMENTS[algo] is not None and REPLACEMENTS[algo].guided
    out, counts = rectify_rows(rows, cfg, 1, tok, OracleGuide() if guided else None, exact)
    new = [r for r in out if r["origin"] != "policy"]
    assert [r["origin"] for r in new] == [origin] * len(new)
    assert {k: counts[k] for k in counters} == counters and len(out) == len(rows) + len(new)
    for r in new:
        assert (r["offpolicy_start"] == 0) == (algo in ("luffy", "luffy_matched"))
    assert counts["mean_kept_steps_frac"] == (pytest.approx(11 / 24) if algo == "scope" else None)


def test_references_are_made_once_and_a_missing_one_is_counted_not_dropped():
    """A wrong reference is not asked for again (it would be the same); a prompt without one
    gets no candidate."""
    from stages.rectify import rectify_rows

    cfg = Config()
    cfg.run.algo = "luffy"
    tok = build_arith_tokenizer()
    rows = located_rows(cfg, tok)
    for r in rows:
        if r["problem"] == "3+4+2":
            r["solution"] = None
    calls = []

    def wrong(rs):
        calls.append(len(rs))
        return [{"pred": None, "verify_status": "ok", "reward": 0.0, "correct": False} for _ in rs]

    out, counts = rectify_rows(rows, cfg, 1, tok, None, wrong)
    assert calls == [2] and counts["no_reference"] == 2 and counts["dropped"] == 2
    assert counts["reference"] == 0 and len(out) == len(rows) and all(r["in_batch"] for r in out)


# ---- luffy_matched: scope's rows, the guide's whole solution ----------------------------------------
def partly_qualifying_groups():
    """Groups where not every failure qualifies for salvage: early failures (first error at step 0,
    or at step 1 when two kept steps are asked for) come first by sample_idx, so picking by
    sample_idx (luffy) and by the PRM's longest prefix (scope) give different rows."""
    tok = build_arith_tokenizer()
    mixed = group(tok, PROBLEM, [WRONG_AT_0, RIGHT, WRONG_AT_0, WRONG_AT_1, WRONG_ANSWER, RIGHT_2])
    # 4+3-2-5 = 0: failures with first errors at steps 0, 1, 3 (the boxed answer), 2
    all_wrong = group(tok, "4+3-2-5", ["4+3=8;8-2=6;6-5=1;\\boxed{1}", "4+3=7;7-2=4;4-5=9;\\boxed{9}",
                                       "4+3=7;7-2=5;5-5=0;\\boxed{1}", "4+3=7;7-2=5;5-5=1;\\boxed{1}"])
    return mixed + all_wrong


def replaced(df):
    return sorted(df.filter((pl.col("origin") == "policy") & ~pl.col("in_batch"))
                  .select("prompt_id", "sample_idx").iter_rows())


@pytest.mark.parametrize("min_prefix_steps, expected", [
    (1, {PROBLEM: [3, 4], "4+3-2-5": [2, 3]}),  # longest prefix first: f = 2, 1 | f = 3, 2
    (2, {PROBLEM: [4], "4+3-2-5": [2, 3]}),  # only f >= 2 qualifies: one row of the mixed group
])
def test_luffy_matched_replaces_exactly_the_rows_scope_replaces(tmp_path, policy, min_prefix_steps, expected):
    """Where not every failure qualifies, luffy_matched and scope replace the same (prompt_id,
    sample_idx) rows (plain luffy does not); luffy_matched's rows are the guide's whole solutions
    (offpolicy_start 0, nothing kept), verified correct, and differ from one another."""
    from scope_rows import prompt_id

    rows = partly_qualifying_groups()
    over = [f"locate.min_prefix_steps={min_prefix_steps}"]
    runs = {algo: run_round(tmp_path / algo, policy, [f"run.algo={algo}", *over], rows)
            for algo in ("scope", "luffy_matched", "luffy")}
    dfs = {algo: read_stage_df(r.stage_dir(1, "rectified")) for algo, r in runs.items()}
    want = sorted((prompt_id(p), i) for p, idx in expected.items() for i in idx)
    assert replaced(dfs["scope"]) == replaced(dfs["luffy_matched"]) == want
    assert replaced(dfs["luffy"]) != want  # lowest sample_idx first: the early failures
    # the PRM ran for luffy_matched as for scope
    scored = read_stage_df(runs["luffy_matched"].stage_dir(1, "scored"))
    assert scored.filter(~pl.col("correct"))["step_scores"].null_count() == 0

    df = dfs["luffy_matched"]
    new = df.filter(pl.col("origin") == "guided")
    assert new.height == len(want) and not df.filter(pl.col("origin") == "rectified").height
    assert sorted(new.select("prompt_id", "parent_sample_idx").iter_rows()) == want
    check_texts(df, "oracle:arith")
    eos = build_arith_tokenizer().eos_token_id
    for row in new.iter_rows(named=True):
        assert row["offpolicy_start"] == 0 and row["kept_text"] == "" and row["guide_text"] == row["response"]
        assert all(v is None for v in row["response_logprobs"])
        assert row["correct"] and row["reward"] == 1.0 and row["verify_status"] == "ok"
        assert arith.first_error_step(row["problem"], row["response"]) is None
        assert row["finish_reason"] == "stop" and row["stop_token_id"] == eos
    # each row has its own seed, and the oracle's solutions differ within a group where they can
    # (7+5-7 has two orders, 4+3-2-5 six)
    for pid, g in new.group_by("prompt_id"):
        assert g["seed"].n_unique() == g["response"].n_unique() == g.height
    summary = read_manifest(runs["luffy_matched"])["summary"]
    assert summary["guided"] == new.height == summary["salvaged"] and summary["rectified"] == 0


# ---- luffy: never two copies of one trace in a group --------------------------------------------------
def test_luffy_gives_a_group_distinct_solutions_or_one():
    """The group's first salvaged row gets the reference; the next ones other correct orders from the
    solver, drawn from their own seeds (the same every time); a problem with one solution (its two
    terms read the same: +2, +2) gets it once and the second row stays (same_reference)."""
    from stages.rectify import rectify_rows

    cfg = Config()
    cfg.run.algo = "luffy"
    cfg.locate.max_per_group = 3
    tok = build_arith_tokenizer()
    rows = (group(tok, "1+2-3+4", ["1+2=4;\\boxed{5}", "1+2=3;3-3=0;\\boxed{0}", "1+4=6;\\boxed{6}"])
            + group(tok, "3+2+2", ["3+2=6;\\boxed{6}", "3+2=5;5+2=8;\\boxed{8}"]))
    located = located_rows(cfg, tok, rows)
    out, counts = rectify_rows(located, cfg, 1, tok, None, exact)
    again, _ = rectify_rows(located_rows(cfg, tok, rows), cfg, 1, tok, None, exact)
    assert out == again
    new = [r for r in out if r["origin"] == "reference"]
    assert [(r["problem"], r["parent_sample_idx"]) for r in new] == [
        ("1+2-3+4", 0), ("1+2-3+4", 1), ("1+2-3+4", 2), ("3+2+2", 0)]
    long = [r["response"] for r in new if r["problem"] == "1+2-3+4"]
    assert long[0] == rows[0]["solution"] and len(set(long)) == 3
    assert all(arith.first_error_step(r["problem"], r["response"]) is None for r in new)
    assert counts["same_reference"] == 1 and counts["reference"] == 4 and counts["dropped"] == 0
    assert [r["in_batch"] for r in out if r["problem"] == "3+2+2" and r["origin"] == "policy"] == [False, True]


def test_other_solution_needs_a_solver_and_a_new_trace():
    from scope_cli.core.replacements import other_solution

    row = {"task": "arith", "problem": "7+5-7"}
    first = other_solution(row, [], 3)
    second = other_solution(row, [first], 3)
    assert {first, second} == {"7+5=2;2-7=5;\\boxed{5}", "7-7=0;0+5=5;\\boxed{5}"}
    assert other_solution(row, [first, second], 3) is None  # two terms: two orders, no third
    assert other_solution({"task": "math", "problem": "1+1"}, ["2"], 3) is None  # no exact solver


@pytest.mark.parametrize("max_tokens, stop, joins", [
    (15, [], False),  # 15 ids + the eos it trains on: 16 trained tokens, one over
    (16, [], True),  # 15 ids + eos = 16: exactly the budget
    (15, ["}"], True),  # ended by a stop string: no eos trained, 15 ids fit
    (14, ["}"], False),
])
def test_new_rows_fit_the_budget_with_their_eos(max_tokens, stop, joins):
    """generate.max_tokens bounds the trained tokens of a new row (response_ids plus the eos a
    finished row trains on), as of a rollout: at most max_tokens - 1 ids where eos follows."""
    from scope_cli.backends.guide import OracleGuide
    from stages.rectify import rectify_rows

    cfg = Config()
    cfg.generate.max_tokens, cfg.generate.stop = max_tokens, stop
    tok = build_arith_tokenizer()
    rows = located_rows(cfg, tok)
    out, counts = rectify_rows(rows, cfg, 1, tok, OracleGuide(), exact)
    new = [r for r in out if r["origin"] == "rectified"]
    assert len(new) == (4 if joins else 0) and counts["too_long"] == (0 if joins else 4)
    for r in new:  # every complete solution of 7+5-7 and 3+4+2 is 15 tokens
        assert len(r["response_ids"]) == 15 and (r["stop_token_id"] is None) == bool(stop)


def test_vppo_scores_and_locates_but_adds_no_rows(tmp_path, policy):
    """run.algo = vppo: prm-score and locate-error run as for scope (first errors for train-step),
    nothing is salvaged and rectify passes every row through."""
    run = run_round(tmp_path, policy, ["run.algo=vppo"])
    located = read_stage_df(run.stage_dir(1, "located"))
    failed = located.filter(~pl.col("correct"))
    assert failed["step_scores"].null_count() == 0 and failed["first_error_step"].null_count() == 0
    assert not located["salvage"].any()
    df = read_stage_df(run.stage_dir(1, "rectified"))
    assert df.height == 9 and (df["origin"] == "policy").all() and df["in_batch"].all()
    assert df["first_error_step"].to_list() == located["first_error_step"].to_list()


def test_luffy_matched_oracle_gives_a_group_no_two_copies_where_the_task_has_another():
    """An oracle that repeats itself: the group's second row gets the task's other order, the third
    (7+5-7 has only two) keeps the copy, so the rows replaced stay scope's."""
    from scope_cli.backends.guide import GuideOutput, OracleGuide
    from stages.rectify import rectify_rows

    class RepeatingOracle(OracleGuide):
        def continue_(self, requests, attempt=0):
            return [GuideOutput(RIGHT, "stop") for _ in requests]

    cfg = Config()
    cfg.run.algo, cfg.locate.min_prefix_steps, cfg.locate.max_per_group = "luffy_matched", 0, 3
    tok = build_arith_tokenizer()
    rows = located_rows(cfg, tok, [r for r in partly_qualifying_groups() if r["problem"] == PROBLEM])
    out, counts = rectify_rows(rows, cfg, 1, tok, RepeatingOracle(), exact)
    new = [r["response"] for r in out if r["origin"] == "guided"]
    assert new == [RIGHT, RIGHT_2, RIGHT] and counts["guided"] == 3
