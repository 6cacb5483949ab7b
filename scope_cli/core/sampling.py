"""Sampling a batch of prompts: the one way generate and eval draw answers from a policy.

Each answer has its own seed, row_seed(run seed, round, prompt_id, sample_idx), so any batching,
sharding or resume draws the same tokens. A prompt that leaves no room under the model's length limit
gets no answers (the caller counts it); one certainly longer than the context is not even tokenized.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from scope_cli.backends.engine import Completion, GenerationBackend, Sampling, encode_prompt
from scope_cli.core.runs import row_seed
from scope_cli.tasks import prompt_text


@dataclass
class Answer:
    prompt: dict[str, Any]  # the prompt's row
    sample_idx: int
    seed: int
    prompt_text: str
    prompt_ids: list[int]
    out: Completion


def sample_prompts(engine: GenerationBackend, prompts: Sequence[dict[str, Any]], starts: Sequence[int],
                   n: int, seed: int, round_: int, sampling: Sampling,
                   progress: Callable[[int, int], None] | None = None) -> list[Answer]:
    """n answers per prompt (sample indexes start..start+n-1), in prompt order."""
    texts = [prompt_text(row, engine.tokenizer) for row in prompts]
    encoded = [encode_prompt(engine.tokenizer, t, engine.max_model_len) for t in texts]
    plan = [(i, start + k) for i, start in enumerate(starts) for k in range(n)
            if encoded[i] is not None and len(encoded[i]) < engine.max_model_len]
    if not plan:
        return []
    seeds = [row_seed(seed, round_, prompts[i]["prompt_id"], idx) for i, idx in plan]
    outs = engine.generate([encoded[i] for i, _ in plan], seeds, sampling, progress)
    return [Answer(prompts[i], idx, s, texts[i], encoded[i], o)  # type: ignore[arg-type]
            for (i, idx), s, o in zip(plan, seeds, outs)]
