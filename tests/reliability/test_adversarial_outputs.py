"""Adversarial model outputs through verify, step splitting and the PRM: no steps, 10k steps, 1 MB
responses, deeply nested LaTeX, exponent towers, NUL bytes. Each finishes in bounded time (the
pytest timeouts below; no timing is asserted) and ends in a recorded status: a verify_status, a
score list of the right length, or an unscored row that the manifest counts.

Exponent towers, unbalanced braces and 100 kB answers inside the verifier pool itself are in
tests/test_verify.py::test_adversarial_inputs_end_as_timeout_or_error.
"""

from __future__ import annotations

import json
import random
import shutil

import pyarrow as pa
import pytest
from rel_helpers import REPO, copy_run
from typer.testing import CliRunner

from scope_cli.cli.app import app
from scope_cli.backends.prm import PrmItem, RulePrm
from scope_cli.backends.verifier import STATUSES, Verifier
from scope_cli.core.config import Config
from scope_cli.models.tiny import build_arith_tokenizer
from scope_cli.core.runs import Run
from scope_cli.schema import ROLLOUTS, conform
from scope_cli.core.files import read_stage, shard_path, write_parquet_atomic
from scope_cli.backends.steps import align_steps
from scope_cli.tasks import arith, math

NESTED = "\\frac{" * 5000 + "1" + "}" * 5000
MATH_OUTPUTS = {
    "no steps": "",
    "10k steps": "x = 1\n\n" * 10_000 + "\\boxed{3}",
    "1 MB": "7" * 1_000_000 + "\n\n\\boxed{" + "3" * 100_000 + "}",
    "nested LaTeX": f"We get\n\n\\boxed{{{NESTED}}}",
    "exponent tower": "So\n\n\\boxed{9^{9^{9^{9^{9^{9}}}}}}",
    "NUL bytes": "1+2=3\x00\n\n\x00\\boxed{3\x00}\x00",
}
ARITH_OUTPUTS = {  # what the tiny arith policy can write (its alphabet)
    "no steps": "",
    "10k steps": "1+1=2;" * 10_000,
    "1 MB": "9" * 1_000_000,
    "nested boxed": "\\boxed{" * 5000 + "}" * 5000,
    "right": "1-2=9;9+4=3;\\boxed{3}",
}


@pytest.fixture(scope="module")
def bpe():
    """A small byte-level BPE (merges across separators, multi-byte characters split over tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [*MATH_OUTPUTS.values(), "Then y = 3.\n\nThus \\boxed{5}."] * 2
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator([c[:20000] for c in corpus], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")


@pytest.mark.timeout(300)
def test_verify_records_a_status_for_every_output():
    from stages.verify import verify_table

    rows = []
    for task, outputs in (("math", MATH_OUTPUTS), ("arith", ARITH_OUTPUTS)):
        for i, text in enumerate(outputs.values()):
            rows.append({"prompt_id": f"{task}{i}", "problem": "1+2" if task == "arith" else "What is 1+2?",
                         "answer": "3", "task": task, "data_source": task, "sample_idx": 0,
                         "response": text, "response_ids": [], "response_logprobs": [],
                         "finish_reason": "length", "policy": "policy-000", "seed": i})
    with Verifier(workers=1, timeout=1.0) as pool:
        out, summary = verify_table(conform(pa.Table.from_pylist(rows), ROLLOUTS), pool, Config())
    statuses = dict(zip([r["prompt_id"] for r in rows], out.column("verify_status").to_pylist()))
    assert set(statuses.values()) <= set(STATUSES)
    assert sum(summary[s] for s in STATUSES) == len(rows)
    assert statuses["math0"] == "no_answer"  # no steps, no answer
    assert statuses["math4"] == "timeout"  # the tower cannot be evaluated in time: stopped, counted
    assert statuses["math5"] == "ok"  # NUL bytes: parsed and compared (the NUL makes it wrong)
    correct = dict(zip(statuses, out.column("correct").to_pylist()))
    assert correct["math1"] and correct["arith4"]  # the right answer after 10k steps; a right answer
    assert not any(correct[k] for k in ("math2", "math3", "math4", "arith1", "arith2", "arith3"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(MATH_OUTPUTS))
def test_step_alignment_of_math_outputs(bpe, name):
    text = MATH_OUTPUTS[name]
    ids = bpe.encode(text)
    al = align_steps(math, bpe, ids)
    assert al.steps == math.step_texts(al.text)
    assert len(al.step_token_ends) == len(al.steps)
    assert al.step_token_ends == sorted(al.step_token_ends) and (not ids or al.step_token_ends[-1] <= len(ids))
    if name == "10k steps":
        assert len(al.steps) == 10_001


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(ARITH_OUTPUTS))
def test_step_alignment_and_rule_prm_of_arith_outputs(name):
    tok = build_arith_tokenizer()
    text = ARITH_OUTPUTS[name]
    al = align_steps(arith, tok, tok.encode(text, add_special_tokens=False))
    assert al.text == text and len(al.step_token_ends) == len(al.steps)
    (scores,) = RulePrm().score([PrmItem("1+2", "1+2\n", al.steps, al.text, "arith")])
    assert len(scores) == len(al.steps) and set(scores) <= {0.0, 1.0}


@pytest.mark.timeout(300)
def test_learned_prm_scores_or_leaves_unscored():
    """The shipped tiny PRM (a 256-token context) on the same outputs: scores of the right length,
    an empty list for no steps, and None (unscored, counted by prm-score) for what does not fit."""
    from scope_cli.backends.prm import HFPrm

    prm = HFPrm(REPO / "data" / "prms" / "arith-tiny-prm", "qwen", device="cpu", dtype="float32")
    texts = list(ARITH_OUTPUTS.values()) + ["1+2=3;\x00;\\boxed{3\x00}"]
    items = [PrmItem("1+2", "1+2\n", arith.step_texts(t), t, "arith") for t in texts]
    out = prm.score(items)
    assert out[0] == []  # no steps
    assert out[1] is None and out[2] is None  # 10k steps, 1 MB: longer than the PRM's context
    for item, scores in zip(items[3:], out[3:]):
        assert scores is None or (len(scores) == len(item.steps) and all(0 <= s <= 1 for s in scores))
    assert out[4] is not None


@pytest.mark.timeout(600)
def test_adversarial_rollouts_through_the_stages(reference, tmp_path):
    """A rollouts shard of adversarial arith outputs (as the policy's tokens) through verify,
    prm-score, locate-error and rectify: every stage finishes and its manifest counts what happened."""
    root = copy_run(reference["root"], tmp_path / "run")
    run = Run.open(root)
    tok = build_arith_tokenizer()
    base = read_stage(run.stage_dir(1, "rollouts")).slice(0, 1).to_pylist()[0]
    rows = []
    rng = random.Random(0)
    for k, text in enumerate(ARITH_OUTPUTS.values()):
        text = text[:200_000]  # the 1 MB case, cut: alignment and verify of 1 MB are tested above
        ids = tok.encode(text, add_special_tokens=False)
        rows.append({**base, "sample_idx": k, "response": text, "response_ids": ids,
                     "response_logprobs": [-rng.random() for _ in ids],
                     "finish_reason": "length" if len(ids) > 64 else "stop"})
    for stage in ("rollouts", "verified", "scored", "located", "rectified"):
        shutil.rmtree(run.stage_dir(1, stage))
    write_parquet_atomic(conform(pa.Table.from_pylist(rows), ROLLOUTS), shard_path(run.stage_dir(1, "rollouts"), 0))
    for stage in ("verify", "prm-score", "locate-error", "rectify"):
        res = CliRunner().invoke(app, [stage, "--round", "1", "--run", str(root), "--quiet"])
        assert res.exit_code == 0, res.output
    summary = {s: json.loads((run.stage_dir(1, s) / "_manifest" / "shard-00000.json").read_text())["summary"]
               for s in ("verified", "scored", "located", "rectified")}
    assert sum(summary["verified"][s] for s in STATUSES) == len(rows)
    assert summary["scored"]["no_steps"] == 1 and summary["scored"]["scored"] == summary["scored"]["failed"]
    rectified = read_stage(run.stage_dir(1, "rectified"))
    assert rectified.num_rows >= len(rows)
    new = [r for r in rectified.to_pylist() if r["origin"] == "rectified"]
    assert all(r["correct"] and len(r["response_ids"]) <= 64 for r in new)
