"""The embedded task: chains of single-digit operands with + and -, evaluated mod 10.

A problem is e.g. ``7+5-7-8-4+5``. A solution starts from the first operand and applies the remaining
signed terms one per step, in ANY order, each step written ``left<sign><digit>=result`` (mod 10) and
ended by ``;``; the last step is the answer ``\\boxed{N}``::

    7-4=3;3+5=8;8+5=3;3-7=6;6-8=8;\\boxed{8}

Many orders are correct, so distinct correct solutions measure diversity. Every step can be checked
exactly (`first_error_step`), and an exact solver continues any correct prefix (`solve_from`, the
oracle guide). The answer still goes through math-verify, like real math.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import Any

NAME = "arith"
STEP_SEPARATOR = ";"
BOXED = "\\boxed{"
# Every character a prompt or response of this task can contain (the tiny tokenizer's alphabet).
ALPHABET = "0123456789+-=;\n"
_STEP = re.compile(r"^([0-9])([+-])([0-9])=([0-9])$")
_ANSWER = re.compile(r"^\\boxed\{([0-9])\}$")
_PROBLEM = re.compile(r"^[0-9]([+-][0-9])+$")


# ---- problems --------------------------------------------------------------------------------------
def parse_problem(problem: str) -> tuple[int, list[tuple[str, int]]]:
    """'7+5-7' -> (7, [('+', 5), ('-', 7)])."""
    if not _PROBLEM.match(problem):
        raise ValueError(f"not an arith problem: {problem!r}")
    terms = [(problem[i], int(problem[i + 1])) for i in range(1, len(problem), 2)]
    return int(problem[0]), terms


def apply(value: int, sign: str, digit: int) -> int:
    return (value + digit) % 10 if sign == "+" else (value - digit) % 10


def evaluate(problem: str) -> int:
    value, terms = parse_problem(problem)
    for sign, digit in terms:
        value = apply(value, sign, digit)
    return value


def make_problem(rng: random.Random, operands: int) -> str:
    text = str(rng.randrange(10))
    for _ in range(operands - 1):
        text += rng.choice("+-") + str(rng.randrange(10))
    return text


def generate_problems(seed: int, count: int, min_operands: int, max_operands: int,
                      exclude: set[str] | None = None) -> list[dict[str, Any]]:
    """`count` distinct problems, operand counts uniform in [min, max], none in `exclude`."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows = []
    attempts = 0
    while len(rows) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise ValueError(
                f"could not draw {count} distinct arith problems with {min_operands}-{max_operands} "
                "operands; lower the size or widen the operand range"
            )
        operands = rng.randint(min_operands, max_operands)
        problem = make_problem(rng, operands)
        if problem in seen:
            continue
        seen.add(problem)
        rows.append({
            "problem": problem,
            "answer": str(evaluate(problem)),
            "solution": reference_solution(problem, rng),
            "difficulty": operands,
        })
    return rows


# ---- solutions ---------------------------------------------------------------------------------------
def format_step(left: int, sign: str, digit: int) -> str:
    return f"{left}{sign}{digit}={apply(left, sign, digit)}"


def answer_step(value: int) -> str:
    return f"{BOXED}{value}}}"


def join_steps(steps: list[str]) -> str:
    return STEP_SEPARATOR.join(steps)


def reference_solution(problem: str, rng: random.Random) -> str:
    """A correct solution applying the terms in a random order."""
    return solve_from(problem, [], rng)


def solve_from(problem: str, prefix_steps: list[str], rng: random.Random) -> str:
    """The exact solver (oracle guide): the continuation of a correct prefix of steps.

    Returns the text that follows ``join_steps(prefix_steps) + ";"`` (or the whole solution when the
    prefix is empty): the remaining terms in a random order, then the answer.
    """
    value, terms = parse_problem(problem)
    remaining = Counter(terms)
    for i, step in enumerate(prefix_steps):
        m = _STEP.match(step)
        term = (m.group(2), int(m.group(3))) if m else None
        if not m or int(m.group(1)) != value or remaining[term] == 0 or int(m.group(4)) != apply(value, *term):
            raise ValueError(f"prefix step {i} ({step!r}) is not a correct step of {problem}")
        remaining[term] -= 1
        value = apply(value, *term)
    todo = list(remaining.elements())
    todo.sort()
    rng.shuffle(todo)
    steps = []
    for sign, digit in todo:
        steps.append(format_step(value, sign, digit))
        value = apply(value, sign, digit)
    steps.append(answer_step(value))
    return join_steps(steps)


def split_steps(response: str) -> list[tuple[int, int]]:
    """Character spans (start, end) of each step; a step's span includes its trailing separator.

    The text after the last separator is a step only when it is not empty.
    """
    spans = []
    start = 0
    while True:
        cut = response.find(STEP_SEPARATOR, start)
        if cut < 0:
            if start < len(response):
                spans.append((start, len(response)))
            return spans
        spans.append((start, cut + 1))
        start = cut + 1


def step_texts(response: str) -> list[str]:
    return [response[a:b].rstrip(STEP_SEPARATOR) for a, b in split_steps(response)]


def first_error_step(problem: str, response: str) -> int | None:
    """0-based index of the first wrong step, None when the whole solution is right.

    A step is right when its left operand equals the running value, its term is one not yet used and
    its result is right. The answer step must come after all terms and equal the value. A response
    that does not end with a right answer step (truncated, or stopped early) has a wrong last step;
    an empty response is wrong at step 0.
    """
    value, terms = parse_problem(problem)
    remaining = Counter(terms)
    steps = step_texts(response)
    if not steps:
        return 0
    for i, step in enumerate(steps):
        m = _STEP.match(step)
        if m:
            term = (m.group(2), int(m.group(3)))
            if int(m.group(1)) != value or remaining[term] == 0 or int(m.group(4)) != apply(value, *term):
                return i
            remaining[term] -= 1
            value = apply(value, *term)
            continue
        a = _ANSWER.match(step)
        if a and sum(remaining.values()) == 0 and int(a.group(1)) == value and i == len(steps) - 1:
            return None
        return i
    return len(steps) - 1  # every step right but no answer: the response stopped early


def canonical_solution(response: str) -> str:
    """The order in which a solution applies its terms ('+5,-7,...'): distinct orders = distinct
    solutions."""
    order = []
    for step in step_texts(response):
        m = _STEP.match(step)
        if m:
            order.append(m.group(2) + m.group(3))
    return ",".join(order)


def format_prompt(problem: str) -> str:
    """The raw prompt the tiny policy sees: the problem and a newline."""
    return problem + "\n"


def extract_answer(response: str) -> str | None:
    """The text inside the last \\boxed{...}, for display; verification goes through math-verify."""
    i = response.rfind(BOXED)
    if i < 0:
        return None
    j = response.find("}", i)
    return response[i + len(BOXED): j] if j >= 0 else None
