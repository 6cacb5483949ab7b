"""Guides: who writes the correct continuation of a salvaged rollout's kept prefix.

A guide has a `name(row)`, which rectify writes into a rectified row's `policy` column, and receives
`GuideRequest`s (the parent row, the kept steps, the kept text) and returns, for
each, the text that follows ``prefix_text`` — the decode of the policy's kept tokens
``response_ids[:offpolicy_start]`` — and how it finished ("stop" or "length"). Rectify tokenizes that
text with the policy's tokenizer and appends it to the kept tokens.

- ``oracle``: the task's exact solver (`task.solve_from`, arith): the rest of the kept step (the
  characters the token cut left out, e.g. a separator merged into the next token) followed by a
  correct continuation in a random order drawn from the request's seed. Always right.
- ``model``: an LM (rectify.guide_path, e.g. data/policies/arith-guide) through the generation
  backend (generate.backend, dtype, batch_size, gpu_memory_utilization and max_model_len; vLLM
  tensor parallelism from rectify.guide_tensor_parallel_size, so a guide larger than the policy can
  span several GPUs), continuing the problem's prompt (the guide's own chat template, else the task's
  raw one) followed by prefix_text, sampled at rectify.guide_temperature for at most rectify.max_tokens.
  With rectify.guide_sees_reference, the reference solution comes first: inside the user message
  where the guide has a chat template, else as a line before the raw prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from scope_cli.errors import ScopeError
from scope_cli.sections import GenerateConfig, RectifyConfig
from scope_cli.tasks import get_task, prompt_text


class GuideError(ScopeError):
    """A guide that cannot run for this task or config: one line."""


@dataclass
class GuideRequest:
    row: dict[str, Any]  # the parent row (problem, task, messages, solution, ...)
    kept_steps: list[str]  # the parent's correct steps that are kept (task step texts)
    kept_text: str  # the parent's text through the end of its last kept step (separator included)
    prefix_text: str  # decode(response_ids[:offpolicy_start]): a prefix of kept_text
    seed: int  # the rectified row's seed; attempt k samples with a seed derived from it


@dataclass
class GuideOutput:
    text: str  # what follows prefix_text
    finish_reason: str  # stop | length


class OracleGuide:
    """The task's exact solver as the guide."""

    max_tries = 1  # the solver is always right: retrying changes nothing

    def name(self, row: dict[str, Any]) -> str:
        """What a rectified row's `policy` column says wrote its continuation."""
        return f"oracle:{row['task']}"

    def continue_(self, requests: list[GuideRequest], attempt: int = 0) -> list[GuideOutput]:
        out = []
        for req in requests:
            task = get_task(req.row["task"])
            if getattr(task, "solve_from", None) is None:
                raise GuideError(f"rectify.guide=oracle needs a task with an exact solver; task "
                                 f"{task.NAME} has none (use rectify.guide=model)")
            rng = random.Random(f"oracle\x00{req.seed}\x00{attempt}")
            try:
                rest = task.solve_from(req.row["problem"], req.kept_steps, rng)
            except ValueError:
                # the kept prefix holds a wrong step (a PRM that put the first error too late): no
                # continuation can be right, so none is given; rectify drops the row and counts it
                out.append(GuideOutput(req.kept_text[len(req.prefix_text):], "stop"))
                continue
            out.append(GuideOutput(req.kept_text[len(req.prefix_text):] + rest, "stop"))
        return out


def guide_prompt(row: dict[str, Any], tokenizer: Any, sees_reference: bool) -> str:
    """The guide's prompt for a row (without the kept prefix)."""
    reference = row.get("solution") if sees_reference else None
    if not reference:
        return prompt_text(row, tokenizer)
    task = get_task(row["task"])
    if getattr(tokenizer, "chat_template", None):
        problem = task.user_message(row["problem"]) if hasattr(task, "user_message") else row["problem"]
        content = f"{problem}\n\nA reference solution:\n{reference}"
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return reference + "\n" + task.format_prompt(row["problem"])


class ModelGuide:
    """An LM guide (rectify.guide_path) sampled through the generation backend (generate.backend)."""

    def __init__(self, r: RectifyConfig, g: GenerateConfig, trust_remote_code: bool = False):
        """The guide of `r` (rectify.guide_path, its sampling and tries) on the engine `g` names
        (generate.backend, dtype, batch size, memory, length limit)."""
        from pathlib import Path

        from scope_cli.backends.generation import open_backend
        from scope_cli.backends.engine import Sampling

        self.backend = open_backend(
            g.backend, Path(r.guide_path), dtype=g.dtype, batch_size=g.batch_size,
            tensor_parallel_size=r.guide_tensor_parallel_size, gpu_memory_utilization=g.gpu_memory_utilization,
            max_model_len=g.max_model_len, trust_remote_code=trust_remote_code)
        self.sampling = Sampling(temperature=r.guide_temperature, max_tokens=r.max_tokens)
        self.sees_reference = r.guide_sees_reference
        self.max_tries = r.max_tries
        self.folder = Path(r.guide_path).resolve().name

    def name(self, row: dict[str, Any]) -> str:
        """What a rectified row's `policy` column says wrote its continuation: the guide's folder."""
        return self.folder

    def prompt(self, req: GuideRequest) -> str:
        """What the guide continues: its prompt for the problem, then the policy's kept text."""
        return guide_prompt(req.row, self.backend.tokenizer, self.sees_reference) + req.prefix_text

    def continue_(self, requests: list[GuideRequest], attempt: int = 0) -> list[GuideOutput]:
        from scope_cli.backends.engine import encode_prompt

        tok = self.backend.tokenizer
        prompts = [encode_prompt(tok, self.prompt(req)) for req in requests]
        seeds = [attempt_seed(req.seed, attempt) for req in requests]
        # a prompt with no room under the guide's length limit gets an empty continuation, which
        # fails re-verification and is dropped (counted) like any wrong one
        fits = [i for i, p in enumerate(prompts) if len(p) < self.backend.max_model_len]
        out = [GuideOutput("", "length")] * len(requests)
        if fits:
            outs = self.backend.generate([prompts[i] for i in fits], [seeds[i] for i in fits], self.sampling)
            for i, o in zip(fits, outs):
                out[i] = GuideOutput(o.text, o.finish_reason)
        return out

    def close(self) -> None:
        self.backend.close()


def attempt_seed(seed: int, attempt: int) -> int:
    """The sampling seed of a request's k-th attempt (attempt 0: the row's own seed)."""
    if attempt == 0:
        return int(seed)
    import hashlib

    blob = f"guide\x00{int(seed)}\x00{attempt}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") >> 1
