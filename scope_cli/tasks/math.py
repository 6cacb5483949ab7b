"""Real math problems: steps separated by blank lines, answers in \\boxed{}, checked by math-verify.

There is no exact step checker or solver for real math: a PRM locates errors and a model guides.
"""

from __future__ import annotations

import re

NAME = "math"
STEP_SEPARATOR = "\n\n"
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
first_error_step = None  # no exact checker: use a PRM
solve_from = None  # no exact solver: use a model guide


def split_steps(response: str) -> list[tuple[int, int]]:
    """Character spans of each step; a step's span includes the blank line(s) that end it."""
    spans = []
    start = 0
    for m in re.finditer(r"\n\n+", response):
        if m.start() > start:
            spans.append((start, m.end()))
        start = m.end()
    if start < len(response) and response[start:].strip():
        spans.append((start, len(response)))
    return spans


def step_texts(response: str) -> list[str]:
    return [response[a:b].strip("\n") for a, b in split_steps(response)]


def canonical_solution(response: str) -> str:
    """Whitespace-normalised text: distinct texts count as distinct solutions."""
    return " ".join(response.split())


def format_prompt(problem: str) -> str:
    """The raw template, for base models without a chat template."""
    return f"Question: {problem}\n{INSTRUCTION}\nAnswer:"


def user_message(problem: str) -> str:
    return f"{problem}\n{INSTRUCTION}"


def extract_answer(response: str) -> str | None:
    """The contents of the last \\boxed{...} with balanced braces, None when there is none."""
    i = response.rfind("\\boxed")
    if i < 0:
        return None
    j = response.find("{", i)
    if j < 0:
        return None
    depth = 0
    for k in range(j, len(response)):
        if response[k] == "{":
            depth += 1
        elif response[k] == "}":
            depth -= 1
            if depth == 0:
                return response[j + 1:k]
    return None
