"""Step/token alignment: a prefix of k steps is always an exact token prefix of the response."""

import random

import pytest

from scope_cli.backends.steps import align_steps, decode, token_char_ends
from scope_cli.tasks import arith, math


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE trained here on arith solutions and math text: its merges cross the step
    separators (';3', '.\\n\\nThen') and it splits some multi-byte characters across tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [arith.reference_solution(arith.make_problem(rng, 5), rng) for _ in range(300)]
    corpus += ["So x = 2.\n\nThen y = 3.\n\nThus \\boxed{5}."] * 20
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")


def check_alignment(task, tok, ids):
    al = align_steps(task, tok, ids)
    assert al.text == decode(tok, ids)
    assert len(al.step_token_ends) == len(al.steps) == len(al.spans)
    assert al.step_token_ends == sorted(al.step_token_ends)
    ends = token_char_ends(tok, ids, al.text)
    for (_, char_end), t in zip(al.spans, al.step_token_ends):
        prefix = decode(tok, ids[:t])
        # an exact token prefix that decodes to a text prefix ending at or before the step's end ...
        assert al.text.startswith(prefix) and len(prefix) <= char_end
        # ... and the longest such: the next token boundary that is a clean cut passes the end
        later = [e for e in ends[t:] if e is not None]
        assert not later or later[0] > char_end or t == len(ids)
    return al


def test_separators_merge_into_tokens(bpe):
    rng = random.Random(1)
    merged = 0
    for _ in range(40):
        text = arith.reference_solution(arith.make_problem(rng, rng.randint(3, 6)), rng)
        ids = bpe.encode(text) + [bpe.eos_token_id]
        pieces = [bpe.decode([i]) for i in ids]
        merged += sum(";" in p and p != ";" for p in pieces)
        al = check_alignment(arith, bpe, ids)
        assert al.steps == arith.step_texts(text)
        assert al.step_token_ends[-1] == len(ids)  # the last step owns the trailing eos
    assert merged > 0, "the fixture's BPE should merge separators with neighbouring characters"


def test_cut_falls_before_a_merged_separator(bpe):
    text = "6-6=0;0-0=0;0-8=2;\\boxed{2}"
    ids = bpe.encode(text)
    pieces = [bpe.decode([i]) for i in ids]
    assert any(p.startswith("0;") or p.endswith(";0") or p == "0;0" for p in pieces), pieces
    al = check_alignment(arith, bpe, ids)
    first = decode(bpe, ids[:al.step_token_ends[0]])
    assert "6-6=0;".startswith(first)  # the step's text up to the token the separator shares


def test_math_steps_and_multibyte_characters(bpe):
    text = "So x = 2π.\n\nThen y = é3.\n\nThus \\boxed{5}."
    ids = bpe.encode(text)
    assert any(e is None for e in token_char_ends(bpe, ids)), "a character split across tokens"
    al = check_alignment(math, bpe, ids)
    assert al.steps == ["So x = 2π.", "Then y = é3.", "Thus \\boxed{5}."]
    for t in al.step_token_ends:
        assert "\ufffd" not in decode(bpe, ids[:t])


def test_character_tokenizer_cuts_exactly_after_each_separator():
    from scope_cli.models.tiny import build_arith_tokenizer

    tok = build_arith_tokenizer()
    text = "7-4=3;3+5=8;\\boxed{8}"
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    al = check_alignment(arith, tok, ids)
    assert [decode(tok, ids[:t]) for t in al.step_token_ends] == [
        "7-4=3;", "7-4=3;3+5=8;", "7-4=3;3+5=8;\\boxed{8}"]
    assert al.step_token_ends == [6, 12, len(ids)]


def test_truncated_and_empty_responses():
    from scope_cli.models.tiny import build_arith_tokenizer

    tok = build_arith_tokenizer()
    ids = tok.encode("7-4=3;3+", add_special_tokens=False)
    al = check_alignment(arith, tok, ids)
    assert al.steps == ["7-4=3", "3+"] and al.step_token_ends == [6, 8]
    empty = align_steps(arith, tok, [])
    assert empty.steps == [] and empty.step_token_ends == []
