"""The generation engines' one interface: sampling parameters, completions, the conventions both keep.

    backend = open_backend("hf", policy_dir)                  # or "vllm", or "auto"
    outs = backend.generate(prompt_ids, seeds, Sampling(temperature=1.0, max_tokens=64))
    outs[i].response_ids, outs[i].response_logprobs, outs[i].finish_reason, outs[i].text
    backend.reload(next_policy_dir)                            # new weights into the live engine
    backend.close()

`generate` takes token ids (a prompt, or a prompt followed by a prefix of a response to continue), one
seed per row and the sampling parameters, and returns per row the sampled token ids, their log-probs
under the distribution actually sampled (after temperature, top-k and top-p; greedy rows: the model's
own distribution), "stop" or "length", the end-of-sequence token sampled (or None) and the text. The same ids, seeds and parameters give the same
rows however the rows are batched, sharded or resumed. Conventions, identical in both backends:

- an end-of-sequence token ends a row with "stop" and is left out of `response_ids` and the text;
  `stop_token_id` records which one (a policy may have several: Qwen's <|im_end|> and <|endoftext|>),
  None for rows ended by a stop string or cut at max_tokens;
- a stop string ends a row with "stop" after the token that completes it; that token stays;
- reaching `max_tokens` (or the model's length limit) ends a row with "length";
- `text` is ``decode(response_ids)`` with special tokens skipped (scope_cli.backends.steps.decode).

The engines: ``hf`` (scope_cli/backends/generation.py) and ``vllm`` (scope_cli/backends/vllm.py);
`open_backend` in generation.py picks one.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


from scope_cli.errors import ScopeError

Progress = Callable[[int, int], None]  # (rows finished, tokens sampled) since the last call


class GenerationError(ScopeError):
    """A backend that cannot run here, or inputs it cannot take: one line."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_tokens: int = 64
    stop: tuple[str, ...] = ()


@dataclass
class Completion:
    response_ids: list[int]
    response_logprobs: list[float]
    finish_reason: str  # stop | length
    text: str
    stop_token_id: int | None = None  # the sampled end-of-sequence token (not in response_ids)


class GenerationBackend(Protocol):
    name: str
    tokenizer: Any
    policy: Path  # the policy folder whose weights are loaded
    max_model_len: int

    def generate(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], sampling: Sampling,
                 progress: Progress | None = None) -> list[Completion]: ...

    def reload(self, policy_dir: Path) -> None: ...

    def close(self) -> None: ...


# ---- shared helpers ----------------------------------------------------------------------------------
def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(name: str) -> str:
    """hf | vllm for a configured name (auto: vllm only where CUDA and vllm both exist)."""
    if name == "auto":
        import torch

        return "vllm" if torch.cuda.is_available() and vllm_available() else "hf"
    if name not in ("hf", "vllm"):
        raise GenerationError(f"generate.backend: expected hf, vllm or auto, got {name!r}")
    if name == "vllm" and not vllm_available():
        raise GenerationError("generate.backend=vllm but vllm is not installed (CPU: `make setup-vllm`; "
                              "GPU: pip install -e '.[gpu]'), or use generate.backend=hf")
    return name


def encode_prompt(tokenizer: Any, text: str, limit: int | None = None) -> list[int] | None:
    """Prompt token ids as the tokenizer adds special tokens by default for its model family; a text
    that already starts with the BOS token (a chat template wrote it) does not get a second one.

    With `limit` (the model's context), a text certainly longer than that is not tokenized at all
    (None): it has at least len(text) / (longest vocabulary entry) tokens. The bound is taken 4x wider
    so that a normaliser that drops characters cannot fool it. Tokenizing a 10 MB line costs GBs of
    memory and tens of seconds, only to be skipped."""
    if limit is not None and len(text) > 4 * limit * max_token_chars(tokenizer):
        return None
    bos = getattr(tokenizer, "bos_token", None)
    add = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add)["input_ids"])


def max_token_chars(tokenizer: Any) -> int:
    """The longest vocabulary entry in characters (byte-level BPE spells each byte as one character,
    so this bounds the text one token can cover), computed once per tokenizer."""
    cached = getattr(tokenizer, "_scope_max_token_chars", None)
    if cached is None:
        cached = max((len(t) for t in tokenizer.get_vocab()), default=1)
        try:
            tokenizer._scope_max_token_chars = cached
        except AttributeError:  # a tokenizer that takes no new attributes: recomputed next time
            pass
    return max(int(cached), 1)


def eos_token_ids(policy_dir: Path, tokenizer: Any) -> set[int]:
    """The tokenizer's EOS plus generation_config.json's eos_token_id(s), as vLLM uses them."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = Path(policy_dir) / "generation_config.json"
    if gen.exists():
        from scope_cli.errors import JsonFileError, read_json_object

        eos = read_json_object(gen, fix="fix or remove the file").get("eos_token_id")
        eos = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
            raise JsonFileError(f"{gen}: eos_token_id: expected token ids (integers), got {eos!r}")
        ids.update(eos)
    return ids


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    from scope_cli.backends.steps import decode as decode_response

    return decode_response(tokenizer, list(ids))
