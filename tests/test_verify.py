"""verify: math-verify in a killable pool (equivalences, adversarial inputs) and the verify stage."""

import json

import pyarrow as pa
import pytest

from scope_cli.backends.verifier import Verdict, Verifier, reward, wrap_gold
from scope_cli.core.config import Config
from scope_cli.schema import ROLLOUTS, VERIFIED, conform
from scope_cli.cli.status import headline, stage_summary

# (gold, pred, correct): gold first, as math-verify needs it
EQUIVALENT = [
    ("1/2", "\\frac{1}{2}", True),
    ("\\frac12", "0.5", True),
    ("0.5", "\\dfrac{1}{2}", True),
    ("3", "x=3", True),
    ("x=3", "3", True),
    ("[0,1)", "[0,1)", True),
    ("(0,1]", "\\left(0,1\\right]", True),
    ("10", "10 \\text{ cm}", True),
    ("10\\text{ cm}", "10", True),
    ("7", "07", True),
    ("12", "12.0", True),
    ("-3", "- 3", True),
    ("\\sqrt{2}", "2^{1/2}", True),
    ("1,2", "\\{1,2\\}", True),
    ("\\frac{1}{3}", "0.3333333", True),
    ("$\\frac{3}{4}$", "0.75", True),
    ("\\boxed{5}", "5", True),
]
NOT_EQUIVALENT = [
    ("5", "6", False),
    ("[0,1)", "(0,1)", False),
    ("\\frac{1}{3}", "0.333", False),
    ("2", "-2", False),
    ("x=3", "4", False),
    ("1/2", "\\frac{2}{1}", False),
    ("100", "10", False),
]
# adversarial predictions: each must end as timeout or error (or a plain wrong answer), never hang
ADVERSARIAL = [
    "9^{9^{9^{9}}}",  # an exponent tower: sympy evaluates it in C
    "2^{2^{2^{2^{2^{2}}}}}",
    "{" * 5000 + "1",  # unbalanced braces
    "\\frac{" * 3000,
    "x" * 100_000,  # a 100 kB string
    "1+" * 50_000 + "1",
]


@pytest.fixture(scope="module")
def pool():
    with Verifier(workers=2, timeout=1.0) as v:
        yield v


@pytest.mark.parametrize("gold,pred,expected", EQUIVALENT + NOT_EQUIVALENT)
def test_math_verify_table(pool, gold, pred, expected):
    (verdict,) = pool.check([(gold, pred)])
    assert verdict == Verdict("ok", expected)


def test_batch_keeps_input_order(pool):
    pairs = [(g, p) for g, p, _ in EQUIVALENT + NOT_EQUIVALENT] * 3
    verdicts = pool.check(pairs)
    assert [v.correct for v in verdicts] == [c for _, _, c in EQUIVALENT + NOT_EQUIVALENT] * 3
    assert pool.check(pairs) == verdicts  # deterministic


def test_missing_answer_and_bad_gold(pool):
    assert pool.check([("3", None), ("3", ""), ("3", "  ")]) == [Verdict("no_answer", False)] * 3
    # a gold answer that does not parse is an error, never correct, even when the strings match
    assert pool.check([("\\frac{", "\\frac{"), ("", "3")]) == [Verdict("error", False)] * 2


@pytest.mark.timeout(120)
def test_adversarial_inputs_end_as_timeout_or_error(pool):
    pairs = [("3", pred) for pred in ADVERSARIAL] + [("3", "3")]
    verdicts = pool.check(pairs)
    assert verdicts[-1] == Verdict("ok", True)
    for pred, v in zip(ADVERSARIAL, verdicts):
        assert not v.correct, pred[:20]
        assert v.status in ("timeout", "error", "ok"), pred[:20]
    # the towers cannot be evaluated within a second: they time out rather than hang
    assert verdicts[0].status == "timeout" and verdicts[1].status == "timeout"
    # the pool survives killed workers and keeps answering
    assert pool.check([("1/2", "0.5")]) == [Verdict("ok", True)]


def test_wrap_gold():
    assert wrap_gold("3") == "\\boxed{3}"
    assert wrap_gold(" \\frac{1}{2} ") == "\\boxed{\\frac{1}{2}}"
    assert wrap_gold("$x$") == "$x$"
    assert wrap_gold("\\boxed{4}") == "\\boxed{4}"


def test_reward_shaping():
    ok, wrong, none = Verdict("ok", True), Verdict("ok", False), Verdict("no_answer", False)
    assert reward(ok, "stop") == 1.0 and reward(wrong, "stop") == 0.0 and reward(none, "stop") == 0.0
    assert reward(none, "stop", format_reward=-0.5) == -0.5
    assert reward(ok, "length", truncation_penalty=0.25) == 0.75
    assert reward(Verdict("timeout", False), "stop", format_reward=-0.5) == 0.0


# ---- the stage -------------------------------------------------------------------------------------
def rollout_table(responses, answers, finish=None, task="arith"):
    n = len(responses)
    rows = [{"prompt_id": f"p{i}", "problem": "1+2", "answer": a, "task": task, "data_source": task,
             "sample_idx": 0, "response": r, "response_ids": [], "response_logprobs": [],
             "finish_reason": (finish or ["stop"] * n)[i], "policy": "policy-000", "seed": i}
            for i, (r, a) in enumerate(zip(responses, answers))]
    return conform(pa.Table.from_pylist(rows), ROLLOUTS)


def test_verify_table_columns_and_summary(pool):
    from stages.verify import verify_table

    cfg = Config()
    cfg.verify.format_reward, cfg.verify.truncation_penalty = -0.5, 0.25
    table = rollout_table(
        ["1+2=3;\\boxed{3}", "1+2=4;\\boxed{4}", "1+2=3;", "\\boxed{3}", "\\boxed{3"],
        ["3", "3", "3", "3", "3"],
        finish=["stop", "stop", "length", "length", "stop"],
    )
    out, summary = verify_table(table, pool, cfg)
    assert out.schema == VERIFIED
    assert out.column("pred").to_pylist() == ["3", "4", None, "3", None]
    assert out.column("correct").to_pylist() == [True, False, False, True, False]
    assert out.column("verify_status").to_pylist() == ["ok", "ok", "no_answer", "ok", "no_answer"]
    assert out.column("reward").to_pylist() == [1.0, 0.0, -0.75, 0.75, -0.5]
    assert summary == {"ok": 3, "no_answer": 2, "timeout": 0, "error": 0, "correct": 2, "truncated": 2}


def test_verify_stage_writes_shards_and_status(tmp_path):
    from scope_cli.core.runs import Run
    from scope_cli.core.files import read_stage, write_parquet_atomic
    from stages.verify import verify

    run = Run.open(tmp_path / "run", overrides=["verify.timeout=2"], create=True)
    rollouts = run.stage_dir(1, "rollouts")
    write_parquet_atomic(rollout_table(["\\boxed{3}", "\\boxed{5}"], ["3", "3"]),
                         rollouts / "shard-00000.parquet")
    # the math task extracts balanced braces: the whole exponent tower reaches math-verify
    tower = rollout_table(["9^{9^{9^{9}}}", "\\boxed{9^{9^{9^{9}}}}"], ["3", "3"], task="math")
    write_parquet_atomic(tower, rollouts / "shard-00001.parquet")
    result = verify(run, 1, quiet=True)
    assert result.computed == [0, 1]
    table = read_stage(run.stage_dir(1, "verified"))
    assert table.column("verify_status").to_pylist() == ["ok", "ok", "no_answer", "timeout"]
    totals = stage_summary(run.stage_dir(1, "verified"))
    assert totals["summary"]["correct"] == 1 and totals["summary"]["timeout"] == 1
    assert headline(totals) == "acc 0.250, timeout 1"
    manifest = json.loads((run.stage_dir(1, "verified") / "_manifest" / "shard-00001.json").read_text())
    assert set(manifest["summary"]) == {"ok", "no_answer", "timeout", "error", "correct", "truncated"}
    # a rerun skips the done shards
    assert verify(run, 1, quiet=True).skipped_done == [0, 1]


def _alarm_blocked(pairs, soft_seconds, extract):
    """A worker stuck where no signal reaches it (as in a C loop): only the outside limit stops it."""
    import signal

    from scope_cli.backends.verifier import _check_chunk

    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
    return _check_chunk(pairs, soft_seconds, extract)


class StuckVerifier(Verifier):
    _work = staticmethod(_alarm_blocked)


@pytest.mark.timeout(120)
def test_stuck_worker_is_killed_and_replaced():
    with StuckVerifier(workers=1, timeout=1.0) as v:
        verdicts = v.check([("3", "x" * 100_000), ("1/2", "0.5"), ("3", "3")])
        assert verdicts == [Verdict("timeout", False), Verdict("ok", True), Verdict("ok", True)]
        assert v.stats["killed"] == 1
        assert v.check([("2", "2")]) == [Verdict("ok", True)]  # a fresh worker took its place


# ---- verify.extract = auto: free-form answers -------------------------------------------------------
FIXTURES = __import__("pathlib").Path(__file__).resolve().parent / "fixtures"


def free_form_cases(name="free-form-answers.jsonl"):
    """Hand-labelled (response, gold, correct) cases; `kind` says what the answer looks like."""
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines() if line.strip()]


def test_auto_extraction_through_the_verify_command(tmp_path):
    """`scope verify --set verify.extract=auto` on the hand-labelled answers: math-verify's own
    extraction agrees with the hand label wherever the answer is stated last (plain text, LaTeX
    without a box, boxed); boxed mode finds no answer in any response without a box."""
    from typer.testing import CliRunner

    from scope_cli.cli.app import app
    from scope_cli.core.runs import Run
    from scope_cli.core.files import read_stage, write_parquet_atomic

    cases = free_form_cases()
    table = rollout_table([c["response"] for c in cases], [c["gold"] for c in cases], task="math")
    verdicts = {}
    for mode in ("boxed", "auto"):
        root = tmp_path / mode
        run = Run.open(root, overrides=[f"verify.extract={mode}", "verify.workers=1"], create=True)
        write_parquet_atomic(table, run.stage_dir(1, "rollouts") / "shard-00000.parquet")
        res = CliRunner().invoke(app, ["verify", "--run", str(root), "--round", "1", "--quiet"])
        assert res.exit_code == 0, res.output
        verdicts[mode] = read_stage(run.stage_dir(1, "verified")).to_pylist()
    for case, boxed, auto in zip(cases, verdicts["boxed"], verdicts["auto"]):
        where = case["response"][-60:]
        if case["kind"] in ("plain", "latex", "boxed"):
            assert auto["correct"] == case["correct"], where
        if "\\boxed" not in case["response"]:
            assert boxed["verify_status"] == "no_answer" and not boxed["correct"], where
        elif case["kind"] == "boxed":
            assert boxed["correct"] == case["correct"], where
        assert (auto["pred"] is None) == (auto["verify_status"] == "no_answer"), where
    by_text = {c["response"]: a for c, a in zip(cases, verdicts["auto"])}
    assert by_text["We count the strings one length at a time.\n\nTherefore, there are 29 valid strings."]["pred"] == "29"
    assert by_text["So the answer is $\\frac{1}{2}$."]["pred"] == "\\frac{1}{2}"
    assert by_text["I am not sure how to solve this problem."]["verify_status"] == "no_answer"
    agree = {m: sum(v["correct"] == c["correct"] for c, v in zip(cases, verdicts[m])) for m in verdicts}
    assert agree["auto"] > agree["boxed"]


def test_real_model_answers_in_both_modes(pool):
    """SmolLM2-135M-Instruct's own answers to the shipped word problems, labelled by reading them
    (bench/free_form_bench.py prints the agreement): boxed mode finds no answer without a box, auto
    credits every answer right by hand and agrees with the hand label at least as often."""
    from scope_cli.backends.verifier import check_responses

    cases = free_form_cases("smollm2-free-form.jsonl")
    golds, texts = [c["gold"] for c in cases], [c["response"] for c in cases]
    boxed = check_responses(pool, ["math"] * len(cases), golds, texts, "boxed")
    auto = check_responses(pool, ["math"] * len(cases), golds, texts, "auto")
    for case, b, a in zip(cases, boxed, auto):
        if "\\boxed" not in case["response"]:
            assert b.status == "no_answer", case["note"]
        if case["correct"]:
            assert a.correct, case["note"]
    agree = [sum(v.correct == c["correct"] for c, v in zip(cases, verdicts)) for verdicts in (boxed, auto)]
    assert agree[1] >= agree[0]


def test_auto_in_eval_and_rectify_and_choice_rows_keep_their_letters(pool):
    from scope_cli.backends.verifier import check_responses, verify_rows
    from stages.eval import check

    golds, responses = ["29", "C", "7"], ["So there are 29 valid strings.", "The answer is (C).", "I give up."]
    tasks = ["math", "choice", "math"]
    verdicts = check_responses(pool, tasks, golds, responses, "auto")
    assert [(v.status, v.correct, v.pred) for v in verdicts] == [
        ("ok", True, "29"), ("ok", True, "C"), ("no_answer", False, None)]
    boxed = check_responses(pool, tasks, golds, responses, "boxed")
    assert [(v.status, v.correct, v.pred) for v in boxed] == [
        ("no_answer", False, None), ("ok", True, "C"), ("no_answer", False, None)]
    rows = [{"task": t, "answer": g, "response": r, "problem": "p", "finish_reason": "stop"}
            for t, g, r in zip(tasks, golds, responses)]
    cfg = Config()
    assert [r["correct"] for r in check([dict(r) for r in rows], pool, cfg.verify)] == [False, True, False]
    cfg.verify.extract = "auto"
    assert [r["correct"] for r in check([dict(r) for r in rows], pool, cfg.verify)] == [True, True, False]
    assert [c["pred"] for c in verify_rows(pool, rows, cfg.verify)] == ["29", "C", None]
    with pytest.raises(ValueError, match="verify.extract must be one of boxed, auto"):
        check_responses(pool, tasks, golds, responses, "last-number")


@pytest.mark.timeout(120)
def test_auto_extraction_keeps_the_time_limits(pool):
    """Whole responses go through the same pool: adversarial text ends as timeout or error."""
    verdicts = pool.check([("3", f"The answer is ${pred}$") for pred in ADVERSARIAL[:2]]
                          + [("3", "So it is 3.")], extract="auto")
    assert verdicts[-1] == Verdict("ok", True, "3")
    assert [v.status for v in verdicts[:2]] == ["timeout", "timeout"]
    with StuckVerifier(workers=1, timeout=1.0) as v:
        out = v.check([("3", "The answer is $9^{9^{9^{9}}}$"), ("3", "There are 3 of them.")],
                      extract="auto")
        assert out == [Verdict("timeout", False), Verdict("ok", True, "3")] and v.stats["killed"] == 1
