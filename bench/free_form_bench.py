"""verify.extract: how often each answer-extraction mode agrees with a hand label.

    .venv/bin/python bench/free_form_bench.py

Reads the hand-labelled answer sets in tests/fixtures/ (each row: response, gold, correct = the hand
label, and a `kind` or the prompt style that produced it):

- free-form-answers.jsonl: answers written for the test (plain text, LaTeX without a box, boxed,
  distractor numbers, no answer);
- smollm2-free-form.jsonl: SmolLM2-135M-Instruct's own answers to the 16 shipped word problems
  (data/fixtures/smollm2-math*.jsonl), labelled by reading each response: the policy folder `make
  smollm2` builds, through the hf generation backend in float32, up to 160 tokens, greedy and at
  temperature 0.7 (seed 1000 + the problem's index), with the shipped one-shot prompt that asks for
  \\boxed{} and with the bare question (chat template, user message only); each row says which.

Checks every response as the math task does, with verify.extract = boxed and = auto (the verify
stage's pool and rules), and prints a markdown table: rows where the mode's verdict equals the hand
label, in all and per kind, and how many of the rows right by hand each mode scores correct.
Asserts nothing.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ["free-form-answers.jsonl", "smollm2-free-form.jsonl"]


def agreement(rows: list[dict], verifier) -> dict[str, dict[str, tuple[int, int]]]:
    """{group: {mode: (agreeing rows, rows, right-by-hand rows it scores correct)}} with group "all"
    and one per kind."""
    from scope_cli.backends.verifier import check_responses

    out: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0, 0]))
    for mode in ("boxed", "auto"):
        verdicts = check_responses(verifier, ["math"] * len(rows), [r["gold"] for r in rows],
                                   [r["response"] for r in rows], mode)
        for row, v in zip(rows, verdicts):
            for group in ("all", row.get("kind") or row.get("prompt")):
                out[group][mode][0] += v.correct == row["correct"]
                out[group][mode][1] += 1
                out[group][mode][2] += v.correct and row["correct"]
    return {g: {m: tuple(c) for m, c in modes.items()} for g, modes in out.items()}


def main() -> None:
    from scope_cli.backends.verifier import Verifier

    print("| answers | rows | right by hand | boxed agrees | auto agrees | right ones boxed credits "
          "| right ones auto credits |")
    print("|---|---|---|---|---|---|---|")
    with Verifier(workers=1, timeout=5.0) as verifier:
        for name in FIXTURES:
            rows = [json.loads(line) for line in (ROOT / "tests/fixtures" / name).read_text().splitlines()
                    if line.strip()]
            table = agreement(rows, verifier)
            for group, modes in table.items():
                sub = [r for r in rows if group in ("all", r.get("kind") or r.get("prompt"))]
                right = sum(r["correct"] for r in sub)
                cells = [f"{a}/{n} ({a / n:.0%})" for a, n, _ in (modes["boxed"], modes["auto"])]
                cells += [f"{c}/{right}" for _, _, c in (modes["boxed"], modes["auto"])]
                label = f"**{name}**" if group == "all" else group
                print(f"| {label} | {len(sub)} | {right} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
