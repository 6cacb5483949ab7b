"""Multiple-choice rows (task `choice`: ARC-c, GPQA, MMLU-Pro) are checked by option letter, not by
math-verify, in verify, eval and rectify."""

import pyarrow as pa
import pytest

from scope_cli.backends.verifier import Verdict, Verifier, check_answers
from scope_cli.core.config import Config
from scope_cli.schema import ROLLOUTS, VERIFIED, conform


class RecordingVerifier:
    """Stands in for the math-verify pool: records what reaches it, says every answer is correct."""

    def __init__(self):
        self.seen = []

    def check(self, pairs):
        self.seen.extend(pairs)
        return [Verdict("ok", True) for _ in pairs]


def rollouts(rows):
    base = {"problem": "q", "data_source": "arc_c", "sample_idx": 0, "response_ids": [],
            "response_logprobs": [], "finish_reason": "stop", "policy": "policy-000"}
    return conform(pa.Table.from_pylist([{**base, "prompt_id": f"p{i}", "seed": i, **r}
                                         for i, r in enumerate(rows)]), ROLLOUTS)


def test_choice_rows_never_reach_math_verify():
    pool = RecordingVerifier()
    verdicts = check_answers(pool, ["choice", "choice", "choice", "choice", "math"],
                             [("B", "B"), ("(B)", "C"), ("B", None), ("12", "A"), ("3", "3")])
    assert verdicts == [Verdict("ok", True), Verdict("ok", False), Verdict("no_answer", False),
                        Verdict("error", False), Verdict("ok", True)]
    assert pool.seen == [("3", "3")]  # only the math row went to the pool
    with pytest.raises(ValueError, match="2 tasks but 1 answer pairs"):
        check_answers(pool, ["choice", "math"], [("B", "B")])


def test_verify_stage_checks_choice_rows_by_letter():
    from stages.verify import verify_table

    table = rollouts([
        {"task": "choice", "answer": "B", "response": "The options differ.\n\nThe answer is (B)."},
        {"task": "choice", "answer": "(B)", "response": "So it must be \\boxed{C}."},
        {"task": "choice", "answer": "b", "response": "Answer: B"},
        {"task": "choice", "answer": "D", "response": "I cannot tell."},
        {"task": "choice", "answer": "42", "response": "\\boxed{A}"},  # gold is not a letter
        {"task": "math", "answer": "1/2", "response": "\\boxed{0.5}", "data_source": "math500"},
    ])
    with Verifier(workers=1, timeout=5.0) as pool:
        out, summary = verify_table(table, pool, Config())
    assert out.schema == VERIFIED
    assert out.column("pred").to_pylist() == ["B", "C", "B", None, "A", "0.5"]
    assert out.column("correct").to_pylist() == [True, False, True, False, False, True]
    assert out.column("verify_status").to_pylist() == ["ok", "ok", "ok", "no_answer", "error", "ok"]
    assert out.column("reward").to_pylist() == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert summary["correct"] == 3 and summary["error"] == 1 and summary["no_answer"] == 1


def test_eval_and_rectify_check_choice_rows_by_letter():
    from scope_cli.backends.verifier import verify_rows
    from stages.eval import check

    rows = [{"task": "choice", "answer": "C", "response": "The answer is (C)", "problem": "q"},
            {"task": "choice", "answer": "C", "response": "The answer is (A)", "problem": "q"}]
    pool = RecordingVerifier()
    checked = check([dict(r) for r in rows], pool, Config().verify)
    assert [(r["pred"], r["correct"], r["verify_status"]) for r in checked] == [
        ("C", True, "ok"), ("A", False, "ok")]
    cols = verify_rows(pool, [{**r, "finish_reason": "stop"} for r in rows], Config().verify)
    assert [(c["pred"], c["correct"], c["reward"]) for c in cols] == [("C", True, 1.0), ("A", False, 0.0)]
    assert pool.seen == []
