"""generate: the hf backend's sampling contract and the stage (shards, seeds, resume after a kill)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from gen_helpers import arith_prompt_ids
from scope_cli.backends.generation import HFBackend, pick_tokens, row_uniforms, top_k_top_p
from scope_cli.backends.engine import Sampling, encode_prompt, resolve_backend
from scope_cli.core.runs import Run, row_seed
from scope_cli.schema import ROLLOUTS
from scope_cli.core.files import list_shard_files, read_stage
from scope_cli.backends.steps import decode

SCOPE = str(Path(sys.executable).with_name("scope"))


@pytest.fixture(scope="module")
def hf(fitted_policy):
    return HFBackend(fitted_policy, batch_size=64)


def as_tuples(outs):
    return [(o.response_ids, o.response_logprobs, o.finish_reason, o.text) for o in outs]


# ---- the backend -----------------------------------------------------------------------------------
def test_rows_do_not_depend_on_batching(hf):
    prompts = arith_prompt_ids(hf.tokenizer, 12)
    seeds = list(range(100, 112))
    sampling = Sampling(temperature=1.0, max_tokens=40)
    whole = hf.generate(prompts, seeds, sampling)
    assert as_tuples(hf.generate(prompts, seeds, sampling)) == as_tuples(whole)  # same inputs, same rows
    hf.batch_size = 5
    try:
        pieces = hf.generate(prompts[::-1], seeds[::-1], sampling)[::-1]
    finally:
        hf.batch_size = 64
    for a, b in zip(whole, pieces):  # other batch mates and padding: the same tokens
        assert a.response_ids == b.response_ids and a.finish_reason == b.finish_reason
        assert a.response_logprobs == pytest.approx(b.response_logprobs, abs=1e-5)
    assert len({tuple(o.response_ids) for o in whole}) > 6  # seeds give different samples


def test_logprobs_are_under_the_sampled_distribution(hf):
    """Each reported log-prob equals a full forward pass over prompt + response, processed the same
    way (temperature, top-k, top-p): the KV cache, left padding and sampling agree."""
    prompts = arith_prompt_ids(hf.tokenizer, 6)
    sampling = Sampling(temperature=0.7, top_k=8, top_p=0.9, max_tokens=30)
    outs = hf.generate(prompts, list(range(6)), sampling)
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([prompt + out.response_ids])
        with torch.no_grad():
            logits = hf.model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
        processed = top_k_top_p(logits / sampling.temperature, sampling.top_k, sampling.top_p)
        expected = processed.log_softmax(-1).gather(1, torch.tensor(out.response_ids)[:, None])[:, 0]
        assert out.response_logprobs == pytest.approx(expected.tolist(), abs=1e-4)
        assert all(torch.isfinite(expected))  # nothing outside top-k / top-p was drawn


def test_eos_stop_strings_and_length(hf):
    prompts = arith_prompt_ids(hf.tokenizer, 8)
    eos = hf.tokenizer.eos_token_id
    outs = hf.generate(prompts, list(range(8)), Sampling(temperature=1.0, max_tokens=48))
    assert any(o.finish_reason == "stop" for o in outs)
    for o in outs:
        assert eos not in o.response_ids
        assert o.text == decode(hf.tokenizer, o.response_ids)
        assert len(o.response_ids) == len(o.response_logprobs)
        assert o.finish_reason == "stop" or len(o.response_ids) == 48
    short = hf.generate(prompts, list(range(8)), Sampling(temperature=1.0, max_tokens=3))
    for o, full in zip(short, outs):  # a shorter budget cuts the same sample
        assert o.response_ids == full.response_ids[:3]
        cut = len(full.response_ids) > 3 or full.finish_reason == "length"
        assert o.finish_reason == ("length" if cut else "stop")
    stopped = hf.generate(prompts, list(range(8)), Sampling(temperature=1.0, max_tokens=48, stop=(";",)))
    for o, full in zip(stopped, outs):
        if ";" in full.text:  # ends after the token that completes the stop string, which stays
            assert o.finish_reason == "stop" and o.text == full.text[:full.text.index(";") + 1]
        else:
            assert o.response_ids == full.response_ids


def test_stop_token_id_is_the_sampled_eos(hf, fitted_policy, tmp_path):
    """stop_token_id records which eos ended a row (none for a stop string or max_tokens); with two
    eos ids, a row ends on whichever it samples first."""
    import json
    import shutil

    prompts = arith_prompt_ids(hf.tokenizer, 8)
    eos = hf.tokenizer.eos_token_id
    outs = hf.generate(prompts, list(range(8)), Sampling(temperature=1.0, max_tokens=48))
    assert {o.stop_token_id for o in outs if o.finish_reason == "stop"} == {eos}
    assert all(o.stop_token_id is None for o in outs if o.finish_reason == "length")
    stopped = hf.generate(prompts, list(range(8)), Sampling(temperature=1.0, max_tokens=48, stop=(";",)))
    assert all(o.stop_token_id is None for o in stopped if ";" in o.text)

    semi = hf.tokenizer.convert_tokens_to_ids(";")  # a second eos id: arith rows sample it often
    policy = shutil.copytree(fitted_policy, tmp_path / "two-eos")
    gen = json.loads((policy / "generation_config.json").read_text())
    (policy / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [eos, semi]}))
    two = HFBackend(policy).generate(prompts, list(range(8)), Sampling(temperature=1.0, max_tokens=48))
    assert any(o.stop_token_id == semi for o in two)
    for o, full in zip(two, outs):  # the same draws, cut at the first of the two
        if semi in full.response_ids:
            cut = full.response_ids.index(semi)
            assert (o.response_ids, o.finish_reason, o.stop_token_id) == (full.response_ids[:cut], "stop", semi)
        else:
            assert (o.response_ids, o.finish_reason, o.stop_token_id) == (
                full.response_ids, full.finish_reason, full.stop_token_id)


def test_greedy_ignores_seeds(hf):
    prompts = arith_prompt_ids(hf.tokenizer, 4)
    greedy = Sampling(temperature=0, max_tokens=40)
    a, b = hf.generate(prompts, [1, 2, 3, 4], greedy), hf.generate(prompts, [9, 8, 7, 6], greedy)
    assert as_tuples(a) == as_tuples(b)
    assert all(o.finish_reason == "stop" and "\\boxed{" in o.text for o in a)


def test_sampler_rules():
    seeds = torch.arange(5).numpy().astype("uint64")
    u = row_uniforms(seeds, 3)
    assert ((u >= 0) & (u < 1)).all() and len(set(u.tolist())) == 5
    assert (row_uniforms(seeds, 3) == u).all() and not (row_uniforms(seeds, 4) == u).any()
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(top_k_top_p(logits, 2, 1.0)).tolist() == [[False, False, True, True, True]]
    # top-p keeps the smallest set reaching p: p(0)=0.64, p(0)+p(1)=0.88
    assert torch.isinf(top_k_top_p(logits, 0, 0.8)).tolist() == [[False, False, True, True, True]]
    assert torch.isinf(top_k_top_p(logits, 0, 0.5)).tolist() == [[False, True, True, True, True]]
    # a distribution with one token of mass always gives it, whatever the uniform
    tokens, lps = pick_tokens(torch.tensor([[0.0, 50.0, 0.0]] * 5), seeds, 0, Sampling(top_k=1))
    assert tokens.tolist() == [1] * 5 and lps.tolist() == [0.0] * 5


def test_backend_choice_and_prompt_encoding(hf):
    assert resolve_backend("hf") == "hf"
    if not torch.cuda.is_available():
        assert resolve_backend("auto") == "hf"
    assert encode_prompt(hf.tokenizer, "1+2\n") == hf.tokenizer("1+2\n")["input_ids"]


# ---- the stage -------------------------------------------------------------------------------------
def make_run(root: Path, policy: Path, *extra: str) -> Run:
    overrides = [f"policy.path={policy}", "prepare.train_size=64", "prepare.eval_size=4",
                 "prepare.ood_size=4", "generate.prompts_per_round=6", "generate.prompts_per_shard=2",
                 "generate.n=3", "generate.max_tokens=40", "verify.workers=1", *extra]
    from stages.prepare import prepare

    run = Run.open(root, overrides=overrides, create=True)
    prepare(run, quiet=True)
    return run


def stage_files(run: Run, round_: int, folder: str = "rollouts") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in list_shard_files(run.stage_dir(round_, folder))}


def test_generate_then_verify(tmp_path, fitted_policy):
    from stages.generate import generate
    from stages.verify import verify

    run = make_run(tmp_path / "run", fitted_policy)
    result = generate(run, 1, quiet=True)
    assert result.computed == [0, 1, 2]
    table = read_stage(run.stage_dir(1, "rollouts"))
    assert table.schema == ROLLOUTS and table.num_rows == 6 * 3
    rows = table.to_pylist()
    ids = run.round_prompt_ids(1)
    assert [r["prompt_id"] for r in rows] == [pid for pid in ids for _ in range(3)]
    assert [r["sample_idx"] for r in rows] == [0, 1, 2] * 6
    tokenizer = HFBackend(fitted_policy).tokenizer
    for r in rows:
        assert r["seed"] == row_seed(run.config.run.seed, 1, r["prompt_id"], r["sample_idx"])
        assert r["policy"] == "policy-000" and r["prompt_text"] == r["problem"] + "\n"
        assert r["prompt_ids"] == tokenizer(r["prompt_text"])["input_ids"]
        assert r["response"] == decode(tokenizer, r["response_ids"])
        assert r["stop_token_id"] == (tokenizer.eos_token_id if r["finish_reason"] == "stop" else None)
    first = pq.read_table(run.stage_dir(1, "rollouts") / "shard-00000.parquet")
    assert set(first.column("prompt_id").to_pylist()) == set(ids[:2])  # whole prompt groups per shard

    verify(run, 1, quiet=True)
    verified = read_stage(run.stage_dir(1, "verified"))
    statuses = set(verified.column("verify_status").to_pylist())
    assert statuses <= {"ok", "no_answer"} and "ok" in statuses
    assert generate(run, 1, quiet=True).skipped_done == [0, 1, 2]


def test_shard_groups_keep_prompt_groups_whole():
    from stages.generate import shard_groups

    # a prompt drawn twice in one round (the slice crosses an epoch) gets fresh sample indexes
    assert shard_groups(["a", "b", "a", "c"], 3, 4) == [[("a", 0), ("b", 0), ("a", 4)], [("c", 0)]]


def test_sharded_workers_write_the_same_files(tmp_path, fitted_policy):
    from stages.generate import generate

    one = make_run(tmp_path / "one", fitted_policy)
    two = make_run(tmp_path / "two", fitted_policy)
    generate(one, 1, quiet=True)
    assert generate(two, 1, worker=(1, 2), quiet=True).computed == [1]
    assert generate(two, 1, worker=(0, 2), quiet=True).computed == [0, 2]
    assert stage_files(one, 1) == stage_files(two, 1)


@pytest.mark.timeout(300)
def test_killed_generate_resumes_to_identical_files(tmp_path, fitted_policy):
    """`scope generate` killed once its first shard lands; the rerun computes only the missing
    shards, and the files equal an uninterrupted run's."""
    from stages.generate import generate

    extra = ["generate.prompts_per_round=12", "generate.prompts_per_shard=1", "generate.n=8",
             "generate.max_tokens=64"]
    whole = make_run(tmp_path / "whole", fitted_policy, *extra)
    generate(whole, 1, quiet=True)
    killed = make_run(tmp_path / "killed", fitted_policy, *extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [SCOPE, "generate", "--run", str(killed.root), "--round", "1", "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rollouts = killed.stage_dir(1, "rollouts")
    while not (rollouts / "_manifest" / "shard-00000.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [p.name for p in list_shard_files(rollouts)]
    assert 1 <= len(done) < 12, done
    manifests = rollouts / "_manifest"
    before = {name: (manifests / name.replace(".parquet", ".json")).read_bytes() for name in done}

    rerun = subprocess.run(cmd[:-1], env=env, capture_output=True, text=True, check=True)
    computed = {int(line.split()[4]) for line in rerun.stderr.splitlines()
                if line.startswith("generate: round 1: shard ")}
    assert computed == {i for i in range(12) if f"shard-{i:05d}.parquet" not in done}
    assert f"generate: round 1: {len(done)} of 12 shards done earlier; computing {12 - len(done)}" in rerun.stderr
    assert "12/12 shards" in rerun.stderr
    for name in done:  # finished shards were skipped, not recomputed
        assert (manifests / name.replace(".parquet", ".json")).read_bytes() == before[name]
    assert stage_files(killed, 1) == stage_files(whole, 1)
    assert not [p for p in rollouts.iterdir() if p.name.endswith(".tmp")]

    out = subprocess.run([SCOPE, "verify", "--run", str(killed.root), "--round", "1"], env=env,
                         capture_output=True, text=True, check=True)
    assert "12/12 shards, 96 rows" in out.stderr and "items/s" in out.stderr
    status = subprocess.run([SCOPE, "status", "--run", str(killed.root)], env=env, capture_output=True,
                            text=True, check=True)
    assert "verified" in status.stdout and "acc" in status.stdout
