"""Tasks: data + answer check + step split (+ an optional exact step checker and solver).

A task is a module with the same names: NAME, STEP_SEPARATOR, split_steps, step_texts,
canonical_solution, format_prompt, extract_answer, first_error_step (or None), solve_from (or None);
optionally check(answer, pred) -> bool where the answer is not checked by math-verify (choice).
A row's task is its `task` column; `data_source` picks one when a source names none.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from scope_cli.tasks import arith, choice, math

TASKS: dict[str, ModuleType] = {"arith": arith, "math": math, "choice": choice}

# data_source names (as in the usual eval suites) that are multiple-choice sets
CHOICE_SOURCES = ("arc", "gpqa", "mmlu")


def get_task(name: str) -> ModuleType:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}") from None


def task_for_source(data_source: str | None, default: str) -> str:
    """The task for a row of a prepared dataset, from its data_source when that names one."""
    source = (data_source or "").lower()
    if source in TASKS:
        return source
    if any(name in source for name in CHOICE_SOURCES):
        return "choice"
    return default


def prompt_text(row: dict[str, Any], tokenizer: Any = None) -> str:
    """The text the policy continues: the tokenizer's chat template where it has one, else the task's
    raw template."""
    task = get_task(row["task"])
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if template:
        messages = row.get("messages")
        if not messages:
            content = task.user_message(row["problem"]) if hasattr(task, "user_message") else row["problem"]
            messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
        )
    return task.format_prompt(row["problem"])
