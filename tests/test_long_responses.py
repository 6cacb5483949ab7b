"""Long responses (the GPU presets sample up to 8192 tokens): train-step's token-budgeted micro-batches,
activation checkpointing, packed rows with chunked log-probs, and the PRM's token-budgeted batches,
give the same result as one big batch. A tiny model on CPU with a 2k-token response stands in for the
real size."""

import random

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from scope_cli.models.tiny import build_arith_tokenizer, tiny_config
from scope_cli.core.policy import save_policy
from scope_cli.core.runs import Run
from scope_cli.schema import RECTIFIED, conform
from scope_cli.core.files import write_parquet_atomic
from scope_cli.tasks import arith
from train_helpers import assert_adam_updates_agree

LONG = 2000  # response tokens of the longest row (the arith tokenizer is one token per character)


def long_response(rng: random.Random, tokens: int) -> str:
    """A wrong arith-looking response of about `tokens` characters (its content is not checked)."""
    steps = []
    while sum(len(s) + 1 for s in steps) < tokens - 12:
        steps.append(f"{rng.randint(0, 9)}+{rng.randint(0, 9)}={rng.randint(0, 9)}")
    return arith.join_steps(steps)


@pytest.fixture(scope="module")
def long_policy(tmp_path_factory):
    """A tiny Llama whose positions reach past the longest row."""
    from transformers import LlamaForCausalLM

    tok = build_arith_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(tok, layers=2, max_positions=4096))
    return save_policy(model, tok, tmp_path_factory.mktemp("p") / "long", {"source": "test"})


def long_rows(tok) -> list[dict]:
    """Two prompt groups; one holds a 2k-token row and a rectified child whose guide tokens start
    1.5k tokens in (on- and off-policy tokens in one long row)."""
    rng = random.Random(0)
    rows = []
    for g, lengths in enumerate(([LONG, 300, 40], [500, 60, 25])):
        prompt_text = arith.format_prompt(f"{g}+1")
        prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        for k, n in enumerate(lengths):
            text = long_response(rng, n)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            rows.append({"prompt_id": f"p{g}", "sample_idx": k, "problem": f"{g}+1", "answer": "1",
                         "task": "arith", "data_source": "arith", "prompt_text": prompt_text,
                         "prompt_ids": prompt_ids, "response": text, "response_ids": ids,
                         "response_logprobs": [-1.0] * len(ids), "finish_reason": "length",
                         "policy": "policy-000", "seed": k, "reward": float(k == 1), "correct": k == 1,
                         "verify_status": "ok", "origin": "policy", "in_batch": True})
        child = dict(rows[-3], sample_idx=3, origin="rectified", parent_sample_idx=0,
                     offpolicy_start=len(rows[-3]["response_ids"]) * 3 // 4, reward=1.0, correct=True)
        child["response_logprobs"] = (rows[-3]["response_logprobs"][:child["offpolicy_start"]]
                                      + [None] * (len(child["response_ids"]) - child["offpolicy_start"]))
        rows.append(child)
    return rows


def train_once(tmp_path, name: str, policy, overrides: list[str]) -> dict[str, torch.Tensor]:
    from scope_cli.core.policy import copy_policy
    from stages.train_step import train_step

    run = Run.open(tmp_path / name, None, ["generate.max_tokens=2048", "train.minibatches=1",
                                           "train.lr=1e-3", *overrides], create=True)
    copy_policy(policy, run.policy_dir(0), {"round": 0})
    tok = build_arith_tokenizer()
    rows = long_rows(tok)
    assert max(len(r["response_ids"]) for r in rows) >= LONG - 12
    table = conform(pa.Table.from_pylist(rows, schema=RECTIFIED), RECTIFIED)
    write_parquet_atomic(table, run.stage_dir(1, "rectified") / "shard-00000.parquet")
    result = train_step(run, 1, quiet=True)
    assert result["updates"] == 1 and result["rows_trained"] == 8
    return load_file(run.policy_dir(1) / "model.safetensors")


def test_micro_batches_and_checkpointing_do_not_change_a_long_update(tmp_path, long_policy):
    from scope_cli.backends.training import plan_microbatches

    lengths = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in long_rows(build_arith_tokenizer())]
    assert len(plan_microbatches(lengths, 2100)) >= 4  # the long rows go one or two at a time
    whole = train_once(tmp_path, "whole", long_policy, ["train.micro_batch_tokens=100000"])
    split = train_once(tmp_path, "split", long_policy, ["train.micro_batch_tokens=2100"])
    ckpt = train_once(tmp_path, "ckpt", long_policy, ["train.micro_batch_tokens=2100",
                                                      "train.activation_checkpointing=true"])
    # the GPU path: rows packed without padding, log-probs in chunks of 300 response tokens
    packed = train_once(tmp_path, "packed", long_policy, ["train.micro_batch_tokens=2100",
                                                          "train.packing=on", "train.logprob_chunks=on",
                                                          "train.logprob_chunk_tokens=300"])
    before = load_file(long_policy / "model.safetensors")
    assert any(not torch.equal(before[k], whole[k]) for k in whole)  # the update did something
    # one Adam step at lr 1e-3, summed in another order: see assert_adam_updates_agree
    assert_adam_updates_agree(split, whole, lr=1e-3)
    assert_adam_updates_agree(ckpt, split, lr=1e-3)
    assert_adam_updates_agree(packed, whole, lr=1e-3)


def test_token_batches_respect_both_budgets():
    from scope_cli.backends.prm import token_batches

    lengths = [5000, 30, 8000, 40, 2000, 35, 9000]
    batches = token_batches(lengths, max_rows=3, max_tokens=8192)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 8192  # an overlong row goes alone
    assert [6] in batches and [2] in batches  # 9000 and 8000: alone


def test_prm_token_budget_gives_the_same_scores(tmp_path):
    from scope_cli.backends.prm import HFPrm, PrmItem
    from scope_cli.models.prm_train import init_tiny_prm

    folder = init_tiny_prm(tmp_path / "prm", seed=2)
    rng = random.Random(1)
    responses = [long_response(rng, n) for n in (180, 20, 90, 200, 40, 130)]
    items = [PrmItem(p, arith.format_prompt(p), arith.step_texts(r), r)
             for p, r in zip(["1+2", "3+4", "5-1", "2+2", "9-3", "7+1"], responses)]
    big = HFPrm(folder, "qwen", batch_size=64, batch_tokens=1 << 20).score(items)
    small = HFPrm(folder, "qwen", batch_size=64, batch_tokens=400).score(items)
    assert [len(s) for s in small] == [len(i.steps) for i in items]
    for a, b in zip(big, small):
        assert a == pytest.approx(b, abs=1e-5)
