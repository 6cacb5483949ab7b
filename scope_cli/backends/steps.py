"""Steps and tokens: where each step of a response ends in its token ids.

A task splits a response's text into steps (`task.split_steps`: character spans, each including the
separator that ends it). SCOPE keeps a policy's own correct prefix at token level, so every step needs
the token index where it ends in ``response_ids`` (exclusive), such that the first ``k`` steps are
always an exact token prefix of the response:

    step_token_ends[j] = the largest t such that decode(response_ids[:t]) is a prefix of the response
                         text no longer than the end of step j (its separator included).

BPE tokens can merge across a separator (``";3"``, ``".\\n\\nThe"``); then the cut falls at the last
token boundary before the step's end, and the characters of step j that share a token with step j+1
belong to the next part. Rectify keeps ``response_ids[:step_token_ends[k-1]]`` untouched (the policy's
own tokens, never re-tokenized) and appends the guide's text tokenized separately: that seam may be
tokenized differently from how the policy would have written the same characters (a non-canonical
tokenization at one point), which is harmless for training and visible in ``offpolicy_start``.

The response text is ``decode(response_ids)`` with special tokens skipped. Token end offsets come
from the tokenizer's streaming decoder (`tokenizers.decoders.DecodeStream`, which holds back tokens
that end inside a multi-byte character); the result is checked against a full decode, and every cut
that is used is checked again with ``decode(response_ids[:t])``, stepping back to an earlier boundary
when a tokenizer's decode is not local. A tokenizer without a fast backend falls back to decoding
every prefix (exact, quadratic).

Time stays bounded on degenerate responses (thousands of steps): cuts are found by a forward scan
from the previous cut, and the re-check decodes at most CHECK_TOKENS tokens per response in all;
past that the streaming offsets, already matched against the full decode, are used as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

CHECK_TOKENS = 1 << 21  # tokens decoded per response to re-check cuts (see the module docstring)


@dataclass
class StepAlignment:
    text: str  # decode(response_ids), special tokens skipped
    steps: list[str]  # the task's step texts (separators stripped)
    spans: list[tuple[int, int]]  # character spans of the steps in `text` (separators included)
    step_token_ends: list[int]  # exclusive token index where each step ends


def decode(tokenizer: Any, ids: list[int]) -> str:
    """The response text of token ids: what generate stores in `response`."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def token_char_ends(tokenizer: Any, ids: list[int], text: str | None = None) -> list[int | None]:
    """For each token i, len(decode(ids[:i+1])) where that prefix decodes to a clean prefix of the
    text; None where it ends inside a character (a multi-byte character split across tokens)."""
    ids = list(ids)
    full = decode(tokenizer, ids) if text is None else text
    ends = _stream_ends(tokenizer, ids, full)
    if ends is None:
        ends = _exact_ends(tokenizer, ids, full)
    return ends


def _stream_ends(tokenizer: Any, ids: list[int], full: str) -> list[int | None] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return None
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:  # pragma: no cover - tokenizers < 0.21
        return None
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    stream = DecodeStream(skip_special_tokens=True)
    ends: list[int | None] = []
    chunks: list[str] = []
    pos = 0
    pending = False
    for token in ids:
        chunk = stream.step(backend, int(token))
        if not chunk:
            # nothing new: a token inside a multi-byte character, or one that decodes to nothing
            # (a skipped special token). Only the first kind leaves the text mid-character.
            pending = pending or int(token) not in special
            ends.append(None if pending else pos)
            continue
        chunks.append(chunk)
        pos += len(chunk)
        pending = False
        ends.append(pos)
    return ends if "".join(chunks) == full else None


def _exact_ends(tokenizer: Any, ids: list[int], full: str) -> list[int | None]:
    ends: list[int | None] = []
    for i in range(len(ids)):
        prefix = decode(tokenizer, ids[: i + 1])
        ends.append(len(prefix) if full.startswith(prefix) and not prefix.endswith("\ufffd") else None)
    return ends


def cut_at(tokenizer: Any, ids: list[int], full: str, ends: list[int | None], char_end: int,
           start: int = 0, check: bool = True) -> int:
    """The largest token count t >= start whose prefix decodes to full[:c] with c <= char_end.
    The clean ends (not None) never decrease, so the scan goes forward from `start` and stops at the
    first one past char_end."""
    best = start
    for t in range(start, len(ids)):
        e = ends[t]
        if e is not None:
            if e > char_end:
                break
            best = t + 1
    if not check:
        return best
    # check the cut with a real decode; step back while the tokenizer's decode is not local there
    while best > start:
        e = ends[best - 1]
        if e is not None and decode(tokenizer, ids[:best]) == full[:e]:
            return best
        best -= 1
    return start


def align_steps(task: ModuleType, tokenizer: Any, response_ids: list[int]) -> StepAlignment:
    """Split decode(response_ids) into the task's steps and find each step's token end."""
    ids = [int(t) for t in response_ids]
    text = decode(tokenizer, ids)
    spans = task.split_steps(text)
    steps = task.step_texts(text)
    ends = token_char_ends(tokenizer, ids, text)
    token_ends: list[int] = []
    prev = checked = 0
    for j, (_, char_end) in enumerate(spans):
        if j == len(spans) - 1 and char_end == len(text):
            t = len(ids)  # the last step owns every remaining token (a trailing eos included)
        else:
            t = cut_at(tokenizer, ids, text, ends, char_end, start=prev, check=checked < CHECK_TOKENS)
            checked += t
        token_ends.append(t)
        prev = t
    return StepAlignment(text=text, steps=steps, spans=list(spans), step_token_ends=token_ends)


def load_policy_tokenizer(path: Any, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a policy folder, as generate loads it (the one that wrote response_ids)."""
    from transformers import AutoTokenizer

    from scope_cli.backends.hf import quiet_transformers

    quiet_transformers()
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
