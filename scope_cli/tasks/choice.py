"""Multiple-choice questions (ARC-c, GPQA-diamond, MMLU-Pro): the answer is a letter.

The response's letter is the last of: ``\\boxed{X}``, ``answer is (X)`` / ``answer: X``; the check is
letter equality (no math-verify). Steps are blank-line separated like real math.
"""

from __future__ import annotations

import re

from scope_cli.tasks.math import canonical_solution, split_steps, step_texts  # noqa: F401  (same steps)

NAME = "choice"
STEP_SEPARATOR = "\n\n"
INSTRUCTION = "Answer with the letter of the correct option, within \\boxed{}."
first_error_step = None
solve_from = None

_PATTERNS = (
    re.compile(r"\\boxed\{\s*\(?([A-Z])\)?\s*\}"),
    re.compile(r"[Aa]nswer\s*(?:is|:)?\s*:?\s*\(?\*{0,2}([A-Z])\b"),
)


def extract_answer(response: str) -> str | None:
    """The chosen letter, or None. Looks at the last match of the most explicit pattern."""
    for pattern in _PATTERNS:
        found = pattern.findall(response)
        if found:
            return found[-1]
    return None


def normalise_gold(answer: str) -> str | None:
    """A gold answer as a letter: 'B', '(B)', 'b' -> 'B'; anything else None (an error to verify)."""
    m = re.fullmatch(r"\s*\(?([A-Za-z])\)?\s*", answer or "")
    return m.group(1).upper() if m else None


def check(answer: str, pred: str | None) -> bool:
    gold = normalise_gold(answer)
    if gold is None:
        raise ValueError(f"gold answer {answer!r} is not an option letter")
    return pred is not None and pred.upper() == gold


def format_prompt(problem: str) -> str:
    return f"Question: {problem}\n{INSTRUCTION}\nAnswer:"


def user_message(problem: str) -> str:
    return f"{problem}\n{INSTRUCTION}"
