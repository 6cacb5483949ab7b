import pytest

from scope_cli.tasks import choice, get_task, math, prompt_text, task_for_source


@pytest.mark.parametrize(
    "response, letter",
    [
        ("so the answer is \\boxed{C}", "C"),
        ("\\boxed{(B)}", "B"),
        ("The answer is (D).", "D"),
        ("Answer: A", "A"),
        ("I think B... no. The answer is **C**", "C"),
        ("no letter here", None),
        ("\\boxed{A} but wait \\boxed{B}", "B"),
    ],
)
def test_choice_extracts_the_last_explicit_letter(response, letter):
    assert choice.extract_answer(response) == letter


def test_choice_check():
    assert choice.check("(b)", "B")
    assert not choice.check("B", "C")
    assert not choice.check("B", None)
    with pytest.raises(ValueError, match="not an option letter"):
        choice.check("42", "A")


@pytest.mark.parametrize(
    "source, task",
    [("arith", "arith"), ("math", "math"), ("ARC-Challenge", "choice"), ("gpqa_diamond", "choice"),
     ("mmlu_pro", "choice"), ("math500", "math"), (None, "math")],
)
def test_task_for_source(source, task):
    assert task_for_source(source, "math") == task


def test_math_steps_and_boxed():
    text = "First.\n\nSecond step\nstill second.\n\n\n\\boxed{\\frac{1}{2}}"
    assert math.step_texts(text) == ["First.", "Second step\nstill second.", "\\boxed{\\frac{1}{2}}"]
    spans = math.split_steps(text)
    assert "".join(text[a:b] for a, b in spans) == text  # spans tile the response
    assert math.extract_answer(text) == "\\frac{1}{2}"
    assert math.extract_answer("\\boxed{1") is None
    assert math.extract_answer("nothing") is None


class _ChatTokenizer:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"


def test_prompt_text_uses_the_chat_template_when_there_is_one():
    row = {"task": "math", "problem": "1+1?", "messages": None}
    assert prompt_text(row).startswith("Question: 1+1?")
    assert prompt_text(row, _ChatTokenizer()).startswith("user:1+1?\nPlease reason step by step")
    row["messages"] = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert prompt_text(row, _ChatTokenizer()) == "system:s|user:u|assistant:"
    assert prompt_text({"task": "arith", "problem": "1+2", "messages": None}) == "1+2\n"
    assert get_task("choice") is choice
    with pytest.raises(ValueError, match="unknown task"):
        get_task("chess")
