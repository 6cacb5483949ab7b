import random

import pytest

from scope_cli.tasks import arith


@pytest.mark.parametrize(
    "problem, response, expected",
    [
        ("7+5-7", "7-7=0;0+5=5;\\boxed{5}", None),  # any order is right
        ("7+5-7", "7+5=2;2-7=5;\\boxed{5}", None),
        ("7+5-7", "7+5=3;3-7=6;\\boxed{6}", 0),  # wrong result
        ("7+5-7", "5+5=0;0-7=3;\\boxed{3}", 0),  # wrong left operand
        ("7+5-7", "7+5=2;2+5=7;\\boxed{7}", 1),  # term used twice
        ("7+5-7", "7+5=2;\\boxed{2}", 1),  # answer before all terms
        ("7+5-7", "7+5=2;2-7=5;\\boxed{4}", 2),  # wrong boxed value
        ("7+5-7", "7+5=2;2-7=5;", 1),  # stopped early: the last step is wrong
        ("7+5-7", "7+5=2;2-7", 1),  # truncated mid-step
        ("7+5-7", "", 0),
        ("7+5-7", "7+5=2;2-7=5;\\boxed{5};3", 2),  # text after the answer
        ("1+1+1", "1+1=2;2+1=3;\\boxed{3}", None),  # repeated terms
    ],
)
def test_first_error_step(problem, response, expected):
    assert arith.first_error_step(problem, response) == expected


def test_solver_continues_any_correct_prefix():
    rng = random.Random(0)
    for _ in range(200):
        problem = arith.make_problem(rng, rng.randint(3, 8))
        solution = arith.reference_solution(problem, rng)
        assert arith.first_error_step(problem, solution) is None
        steps = arith.step_texts(solution)
        for k in range(len(steps)):
            prefix = steps[:k]
            cont = arith.solve_from(problem, prefix, rng)
            full = (arith.join_steps(prefix) + ";" if prefix else "") + cont
            assert arith.first_error_step(problem, full) is None


def test_solver_refuses_a_wrong_prefix():
    with pytest.raises(ValueError, match="not a correct step"):
        arith.solve_from("7+5-7", ["7+5=3"], random.Random(0))


def test_generator_is_seeded_distinct_and_excludes():
    a = arith.generate_problems(3, 300, 3, 6)
    b = arith.generate_problems(3, 300, 3, 6)
    assert a == b
    problems = [r["problem"] for r in a]
    assert len(set(problems)) == 300
    assert {r["difficulty"] for r in a} == {3, 4, 5, 6}
    c = arith.generate_problems(4, 100, 3, 6, exclude=set(problems))
    assert not set(problems) & {r["problem"] for r in c}
    for r in a:
        assert r["answer"] == str(arith.evaluate(r["problem"]))
        assert arith.extract_answer(r["solution"]) == r["answer"]
    with pytest.raises(ValueError, match="could not draw"):
        arith.generate_problems(0, 5000, 2, 2)  # only 200 two-operand problems exist


def test_canonical_solution_and_steps():
    assert arith.canonical_solution("7-7=0;0+5=5;\\boxed{5}") == "-7,+5"
    assert arith.split_steps("7-7=0;0+5=5;\\boxed{5}") == [(0, 6), (6, 12), (12, 21)]
    assert arith.split_steps("7-7=0;") == [(0, 6)]
    assert arith.step_texts("") == []
    assert set(arith.ALPHABET) >= set("".join(arith.step_texts("7-7=0;0+5=5")))
