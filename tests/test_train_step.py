"""train-step: one round end to end on a hand-built rectified table, resuming across rounds, the
batch's masks and advantages, bucketed log-probs, and the SFT bootstrap (short version)."""

import json
import subprocess
import sys

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file
from train_helpers import build_round, make_run, rectified_rows, write_rectified

from scope_cli.core.config import ConfigError
from scope_cli.errors import ScopeError
from scope_cli.models.tiny import init_tiny_policy
from scope_cli.backends.hf import load_policy
from scope_cli.core.policy import policy_info
from scope_cli.core.runs import Run
from scope_cli.core.policy import policy_complete
from scope_cli.schema import RECTIFIED, TRAIN_METRICS, conform
from scope_cli.cli.status import run_status
from scope_cli.backends.training import (
    TrainError,
    init_dist,
    load_train_state,
    make_optimizer,
    plan_microbatches,
    response_logits,
    save_train_state,
    token_logprobs,
)
from stages.train_step import build_batch, train_step

SCOPE = [sys.executable, "-m", "scope_cli.cli.app"]


@pytest.fixture(scope="module")
def round1(tmp_path_factory):
    """A run with policy-000 and round 1's rectified batch, trained once."""
    run = make_run(tmp_path_factory.mktemp("r") / "run", ["train.warmup_updates=6"])
    build_round(run, 1)
    result = train_step(run, 1, quiet=True)
    return run, result


def test_round_writes_policy_state_metrics_and_manifest(round1):
    run, result = round1
    assert result["updates"] == 4 and result["dropped_groups"] == 0
    p1 = run.policy_dir(1)
    assert policy_complete(p1)
    assert sorted(p.name for p in p1.iterdir()) == sorted([
        "config.json", "generation_config.json", "model.safetensors", "scope-policy.json",
        "tokenizer.json", "tokenizer_config.json"])  # only model files: no optimizer state
    assert policy_info(p1)["round"] == 1 and policy_info(p1)["parent"] == "policy-000"
    a, b = load_file(run.policy_dir(0) / "model.safetensors"), load_file(p1 / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    load_policy(p1)  # loads back

    state = run.train_dir(1) / "state"
    assert sorted(p.name for p in state.iterdir()) == ["optimizer.safetensors", "rng.safetensors",
                                                        "trainer.json"]
    assert json.loads((state / "trainer.json").read_text())["updates"] == 4

    metrics = pl.read_parquet(run.train_dir(1) / "metrics.parquet")
    assert metrics.columns == TRAIN_METRICS.names
    assert metrics["update"].to_list() == [1, 2, 3, 4]
    assert metrics["lr"].to_list() == pytest.approx([1e-3 / 6, 2e-3 / 6, 3e-3 / 6, 4e-3 / 6])
    # the first minibatch is scored by the same weights that computed the old log-probs
    assert metrics["mean_ratio"][0] == pytest.approx(1.0, abs=1e-5)
    assert metrics["clip_fraction"][0] == 0.0
    assert (metrics["offpolicy_tokens"].sum() > 0) and (metrics["onpolicy_tokens"].sum() > 0)
    assert 0 < metrics["mean_offpolicy_prob"].drop_nulls().min() < 1
    assert metrics["kl"].null_count() == 4  # kl_coef 0: not computed
    assert np.isfinite(metrics["grad_norm"].to_numpy()).all()

    man = json.loads((run.train_dir(1) / "_manifest" / "shard-00000.json").read_text())
    assert man["timings"]["seconds_per_update"] > 0 and man["world_size"] == 1
    assert next(r for r in run_status(run.root) if r["stage"] == "train")["shards"] == 1


def test_finished_round_is_skipped_and_force_recomputes(round1):
    run, _ = round1
    marker = (run.policy_dir(1) / "scope-policy.json").stat().st_mtime_ns
    assert train_step(run, 1, quiet=True)["skipped"] is True
    assert (run.policy_dir(1) / "scope-policy.json").stat().st_mtime_ns == marker
    before = load_file(run.policy_dir(1) / "model.safetensors")
    assert train_step(run, 1, force=True, quiet=True)["skipped"] is False
    after = load_file(run.policy_dir(1) / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # deterministic on CPU


def test_next_round_continues_optimizer_and_schedule(round1, tmp_path):
    import shutil

    src, _ = round1
    run = Run.open(shutil.copytree(src.root, tmp_path / "run"))
    build_round(run, 2, seed=1)
    train_step(run, 2, quiet=True)
    state = run.train_dir(2) / "state"
    assert json.loads((state / "trainer.json").read_text())["updates"] == 8
    opt = load_file(state / "optimizer.safetensors")
    steps = {k: v.item() for k, v in opt.items() if k.endswith(".step")}
    assert steps and set(steps.values()) == {8.0}  # Adam's step counts continue across rounds
    metrics = pl.read_parquet(run.train_dir(2) / "metrics.parquet")
    assert metrics["update"].to_list() == [5, 6, 7, 8]
    assert metrics["lr"].to_list() == pytest.approx([5e-3 / 6, 1e-3, 1e-3, 1e-3])  # warm-up ends at 6
    # round 2 continued round 1's second moments: v_8 = β2^4·v_4 + (1-β2)·Σ β2^k g² >= β2^4·v_4
    first = load_file(src.train_dir(1) / "state" / "optimizer.safetensors")
    for key in (k for k in first if k.endswith("exp_avg_sq")):
        assert (opt[key] >= 0.999 ** 4 * first[key] * (1 - 1e-6)).all(), key


def test_optimizer_state_round_trip_continues_exactly(tmp_path):
    """Save after two steps, reload into a fresh model and optimizer: the third step is identical."""
    init_tiny_policy(tmp_path / "p", seed=3)
    d = init_dist("cpu")

    def step(model, opt, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 18, (4, 10), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    model, _ = load_policy(tmp_path / "p")
    opt = make_optimizer(model, 1e-3, [0.9, 0.999], 0.0)
    step(model, opt, 0)
    step(model, opt, 1)
    save_train_state(tmp_path / "state", model, opt, {"updates": 2}, d)
    model2, _ = load_policy(tmp_path / "p")
    model2.load_state_dict(model.state_dict())
    opt2 = make_optimizer(model2, 1e-3, [0.9, 0.999], 0.0)
    assert load_train_state(tmp_path / "state", model2, opt2) == {"updates": 2}
    step(model, opt, 2)
    step(model2, opt2, 2)
    for (n, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), n
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[p2]["exp_avg_sq"])
        assert opt2.state[p2]["step"].item() == 3


def test_missing_previous_state_is_refused(round1, tmp_path):
    import shutil

    run = Run.open(shutil.copytree(round1[0].root, tmp_path / "run"))
    shutil.rmtree(run.train_dir(1) / "state")
    build_round(run, 2)
    with pytest.raises(TrainError, match="train state of round 1 missing"):
        train_step(run, 2, quiet=True)


def test_sampling_with_top_p_or_top_k_is_refused(tmp_path):
    """RL sampling must be the plain softmax at the temperature: refused when the config is loaded,
    before any stage runs (reliability/test_values.py covers the CLI)."""
    run = make_run(tmp_path / "run")
    for bad in ("generate.top_p=0.9", "generate.top_k=5"):
        with pytest.raises(ConfigError, match="top_p=1 and top_k=0"):
            Run.open(run.root, None, [bad], force=True)


# ---- the batch: masks, advantages, what is left out --------------------------------------------
@pytest.fixture(scope="module")
def table(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("b") / "run")
    rows = rectified_rows(run, 1, n_prompts=2, mode="augment")
    return run, rows


def _batch(run, rows, *overrides):
    from scope_cli.core.config import load_config

    cfg = load_config(None, ["generate.temperature=1.0", *overrides])
    tbl = conform(pa.Table.from_pylist(rows, schema=RECTIFIED), RECTIFIED)
    return build_batch(tbl, cfg, "policy-000", 256)


def test_augment_parent_trains_from_its_first_error(table):
    run, rows = table
    parent = next(r for r in rows if r["salvage"])
    child = next(r for r in rows if r["origin"] == "rectified" and r["prompt_id"] == parent["prompt_id"])
    start = parent["step_token_ends"][0]  # first_error_step 1: step 1 starts at step 0's end
    batch, _ = _batch(run, rows, "rectify.mode=augment")
    trained = {tuple(b.response): b for b in batch}
    p, c = trained[tuple(parent["response_ids"])], trained[tuple(child["response_ids"])]
    assert p.on.tolist() == [i >= start for i in range(len(parent["response_ids"]))]
    assert not p.off.any() and p.adv < 0
    assert c.on.sum() == child["offpolicy_start"] == start and c.off.sum() == len(child["response_ids"]) - start
    assert c.adv > 0
    # in replace mode the same rows train the parent in full (rectify would mark it in_batch=false)
    batch, _ = _batch(run, rows, "rectify.mode=replace")
    assert {tuple(b.response): b for b in batch}[tuple(parent["response_ids"])].on.all()


def test_vppo_trains_failed_rows_from_their_first_error(table):
    """run.algo = vppo: the same rows and advantages as grpo; a failed row with a located first
    wrong step trains only from it (its verified prefix is not penalised), every other row whole."""
    run, rows = table
    rows = [dict(r, in_batch=True, salvage=False) for r in rows if r["origin"] == "policy"]
    vppo, vppo_counts = _batch(run, rows, "run.algo=vppo")
    grpo, grpo_counts = _batch(run, rows, "run.algo=grpo")
    assert vppo_counts == grpo_counts and [b.adv for b in vppo] == [b.adv for b in grpo]
    by_ids = {tuple(r["response_ids"]): r for r in rows}
    masked = 0
    for v, g in zip(vppo, grpo):
        row = by_ids[tuple(v.response)]
        assert g.on.all() and not v.off.any()
        fe = row["first_error_step"]
        start = row["step_token_ends"][fe - 1] if v.adv < 0 and fe else 0
        assert v.on.tolist() == [i >= start for i in range(len(v.response))]
        masked += start > 0
    assert masked >= 2  # each prompt's "bad" row (wrong at step 1) keeps its step 0 unpenalised


def test_vppo_is_in_the_train_step_hash_only_where_it_changes_the_batch():
    from scope_cli.core.config import load_config
    from stages.train_step import CONFIG_KEYS, config_keys

    assert config_keys(load_config(None, ["run.algo=scope"])) == CONFIG_KEYS
    assert config_keys(load_config(None, ["run.algo=vppo"])) == [*CONFIG_KEYS, "run.algo"]


def test_rows_out_of_batch_unverified_and_flat_groups(table):
    run, rows = table
    rows = [dict(r) for r in rows]
    first = rows[0]["prompt_id"]
    for r in rows:
        if r["prompt_id"] != first:
            r["reward"] = 1.0  # the second group: all rewards equal -> dropped
    rows[1]["verify_status"] = "timeout"
    rows[1]["reward"] = 1.0  # a timeout counts as reward 0 whatever was written
    rows[2]["in_batch"] = False
    _, counts = _batch(run, rows, "rectify.mode=augment")
    assert counts["dropped_groups"] == 1 and counts["unverified_rows"] == 1
    group = [r for r in rows if r["prompt_id"] == first]
    assert counts["rows_trained"] == len(group) - 1
    _, counts2 = _batch(run, rows, "rectify.mode=augment", "train.drop_unverified=true")
    assert counts2["unverified_dropped"] == 1 and counts2["rows_trained"] == len(group) - 2


def test_rows_from_another_policy_are_refused(table):
    run, rows = table
    rows = [dict(r, policy="policy-007") for r in rows]
    with pytest.raises(TrainError, match="sampled by policy-007"):
        _batch(run, rows)


# ---- bucketing -----------------------------------------------------------------------------------
def test_bucketed_logprobs_equal_one_row_at_a_time(tmp_path):
    model, tok = load_policy(init_tiny_policy(tmp_path / "p", seed=2))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 18, (int(n),), generator=g).tolist() for n in (4, 9, 6, 12, 5)]
    responses = [torch.randint(3, 20, (int(n),), generator=g).tolist() for n in (20, 3, 11, 7, 1)]
    with torch.no_grad():
        logits, targets, mask = response_logits(model, prompts, responses, tok.pad_token_id, "cpu")
        batched = token_logprobs(logits, targets, 0.7)
        for b, (p, r) in enumerate(zip(prompts, responses)):
            one = token_logprobs(*response_logits(model, [p], [r], tok.pad_token_id, "cpu")[:2], 0.7)
            torch.testing.assert_close(batched[b, : len(r)], one[0], atol=1e-5, rtol=0)
            assert mask[b].sum() == len(r)


def test_plan_microbatches_bounds_padded_tokens():
    lengths = [10, 50, 30, 30, 5, 45]
    plan = plan_microbatches(lengths, 100)
    assert sorted(i for b in plan for i in b) == list(range(6))
    assert all(len(b) * max(lengths[i] for i in b) <= 100 or len(b) == 1 for b in plan)
    assert plan[0] == [1, 5]  # longest first
    assert plan_microbatches([300], 100) == [[0]]


# ---- SFT bootstrap -----------------------------------------------------------------------------------
def test_sft_command_short_version(tmp_path):
    """The rebuild command, cut to a few steps (target 0 is reached at the first evaluation)."""
    out = tmp_path / "tiny"
    proc = subprocess.run(
        [*SCOPE, "train-step", "--objective", "sft", "--out", str(out), "--set", "sft.steps=4",
         "--set", "sft.eval_every=2", "--set", "sft.target_accuracy=0.0", "--set", "sft.monitor_size=8",
         "--set", "sft.train_size=200", "--set", "sft.batch_size=8"],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert policy_complete(out)
    info = policy_info(out)
    assert info["source"] == "sft" and info["step"] == 2 and info["monitor_size"] == 8
    _, tok = load_policy(out)
    assert tok.convert_ids_to_tokens(tok("\\boxed{")["input_ids"]) == ["\\boxed{"]


def test_sft_unreached_target_is_one_line(tmp_path):
    from scope_cli.core.config import load_config
    from scope_cli.models.sft import SftError, sft

    cfg = load_config(None, ["sft.steps=2", "sft.eval_every=1", "sft.monitor_size=4",
                             "sft.train_size=50", "sft.batch_size=4", "sft.target_accuracy=0.99"])
    with pytest.raises(SftError, match="reached only"):
        sft(cfg, tmp_path / "x", quiet=True)
    assert not (tmp_path / "x").exists()


def test_sft_excludes_exactly_the_prepared_eval_sets():
    from scope_cli.core.config import load_config
    from scope_cli.models.sft import eval_problems
    from stages.prepare import build_tables

    cfg = load_config(None, ["prepare.train_size=300", "prepare.eval_size=50", "prepare.ood_size=20"])
    _, evals, _ = build_tables(cfg)
    assert eval_problems(cfg) == {r["problem"] for rows in evals.values() for r in rows}


# ---- options ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, updates", [
    (["train.advantage=grpo_split", "train.aggregation=seq-mean-token-mean"], 4),
    (["train.advantage=drgrpo", "train.aggregation=seq-mean-token-sum-norm", "train.offpolicy_loss=nll"], 4),
    (["train.kl_coef=0.1", "train.tis_cap=2.0", "train.minibatches=2", "train.ppo_epochs=2"], 4),
    (["train.activation_checkpointing=true", "train.micro_batch_tokens=64", "rectify.mode=augment"], 4),
    (["train.packing=on", "train.logprob_chunks=on", "train.logprob_chunk_tokens=5", "train.kl_coef=0.05",
      "train.tis_cap=2.0", "train.micro_batch_tokens=64", "train.activation_checkpointing=true"], 4),
], ids=["grpo_split", "drgrpo-nll", "kl-tis-epochs", "checkpointing-micro", "packed-chunked-kl-tis"])
def test_options_train_a_round(tmp_path, overrides, updates):
    run = make_run(tmp_path / "run", overrides)
    build_round(run, 1, n_prompts=2)
    result = train_step(run, 1, quiet=True)
    assert result["updates"] == updates
    m = pl.read_parquet(run.train_dir(1) / "metrics.parquet")
    assert np.isfinite(m["loss"].to_numpy()).all() and np.isfinite(m["grad_norm"].to_numpy()).all()
    if "train.kl_coef=0.1" in overrides:
        assert m["kl"][0] == pytest.approx(0.0, abs=1e-6)  # policy-000 is the policy at update 1
        assert (m["kl"].to_numpy() >= 0).all() and m["kl"][3] > 0
        assert m["epoch"].to_list() == [0, 0, 1, 1]
        assert m["mean_ratio"][2] != pytest.approx(1.0, abs=1e-7)  # epoch 2 sees moved weights


def test_a_batch_with_no_signal_keeps_the_policy(tmp_path):
    run = make_run(tmp_path / "run")
    rows = [dict(r, reward=0.0) for r in rectified_rows(run, 1, n_prompts=2)]
    write_rectified(run, 1, rows)
    result = train_step(run, 1, quiet=True)
    assert result["updates"] == 0 and result["dropped_groups"] == 2
    a, b = load_file(run.policy_dir(0) / "model.safetensors"), load_file(run.policy_dir(1) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert pl.read_parquet(run.train_dir(1) / "metrics.parquet").height == 0
    build_round(run, 2)  # the next round still finds its state
    assert train_step(run, 2, quiet=True)["updates"] == 4


def test_done_round_stays_done_after_pruning_but_not_after_new_input(round1, tmp_path):
    import shutil

    run = Run.open(shutil.copytree(round1[0].root, tmp_path / "run"))
    build_round(run, 2, seed=1)
    train_step(run, 2, quiet=True)
    other = rectified_rows(run, 2, seed=5)
    shutil.rmtree(run.train_dir(1) / "state")  # what run.keep_state prunes
    shutil.rmtree(run.policy_dir(1))  # what run.keep_policies prunes
    assert train_step(run, 2, quiet=True)["skipped"] is True
    write_rectified(run, 2, other)  # a changed rectified batch: round 2 is no longer done
    with pytest.raises(ScopeError, match="policy-001"):
        train_step(run, 2, quiet=True)


@pytest.mark.parametrize(
    "response, finish, text, stop, expected",
    [
        ([5, 6], "stop", "ab", [], [5, 6, 2]),  # eos sampled, left out of response_ids: trained
        ([5, 6, 2], "stop", "ab", [], [5, 6, 2]),  # already there: kept once
        ([5, 6], "length", "ab", [], [5, 6]),  # truncated: no eos was sampled
        ([5, 6], "stop", "a;;", [";;"], [5, 6]),  # stopped by a stop string: no eos
        ([], "stop", "", [], [2]),  # an immediate eos
    ],
)
def test_with_eos(response, finish, text, stop, expected):
    from scope_cli.core.train_batch import with_eos

    assert with_eos(response, finish, text, 2, stop) == expected


@pytest.mark.parametrize(
    "response, finish, text, stop_id, expected",
    [
        ([5, 6], "stop", "ab", 7, [5, 6, 7]),  # the sampled eos (not the tokenizer's, 2) is trained
        ([5, 6], "stop", "ab", 2, [5, 6, 2]),
        ([5, 6, 7], "stop", "ab", 7, [5, 6, 7]),  # already there: kept once
        ([5, 6], "length", "ab", None, [5, 6]),  # cut at max_tokens: nothing sampled
        ([5, 6], "stop", "a;;", None, [5, 6]),  # a stop string: no eos
        ([5, 6], "stop", "ab", None, [5, 6, 2]),  # a run without the column: the tokenizer's eos
    ],
)
def test_trained_tokens(response, finish, text, stop_id, expected):
    from scope_cli.core.train_batch import trained_tokens

    assert trained_tokens(response, finish, text, stop_id, 2, [";;"]) == expected


def test_batch_trains_the_sampled_eos_and_old_runs_keep_the_tokenizers(table, tmp_path):
    """A row's stop_token_id is what it trains on; a rectified shard written before the column
    existed reads without error and trains the tokenizer's eos after every finished row, as before."""
    import pyarrow.parquet as pq

    from scope_cli.core.files import read_stage
    from scope_cli.core.train_batch import NEEDED

    run, rows = table
    eos = load_policy(run.policy_dir(0))[1].eos_token_id
    other = eos + 5  # stands for a second eos id of the policy
    stripped = [dict(r, response_ids=[t for t in r["response_ids"] if t != eos]) for r in rows]
    finished = [r for r in stripped if r["finish_reason"] == "stop"]
    assert finished
    marked = [dict(r, stop_token_id=other if r["finish_reason"] == "stop" else None) for r in stripped]
    new, _ = _batch(run, marked, "rectify.mode=augment")
    assert sum(b.response[-1] == other for b in new) == len(finished)

    old_tbl = conform(pa.Table.from_pylist(stripped, schema=RECTIFIED), RECTIFIED).drop_columns(["stop_token_id"])
    folder = tmp_path / "rectified"
    folder.mkdir()
    pq.write_table(old_tbl, folder / "shard-00000.parquet")
    read = read_stage(folder, NEEDED)  # the missing column is not an error
    assert "stop_token_id" not in read.column_names
    from scope_cli.core.config import load_config

    cfg = load_config(None, ["generate.temperature=1.0", "rectify.mode=augment"])
    old, _ = build_batch(read, cfg, "policy-000", 256, eos)
    assert sorted(tuple(b.response) for b in old) == sorted(
        tuple(b.response[:-1] + [eos]) if b.response[-1] == other else tuple(b.response) for b in new)
    assert sum(b.response[-1] == eos for b in old) == len(finished)


def test_bf16_autocast_tracks_fp32_after_one_update(tmp_path):
    """train.mixed_precision=bf16 on a single CPU process: compute under bf16 autocast, float32
    weights and Adam moments, a float32 policy. Adam's first step moves every weight by at most lr
    (|m̂ / (√v̂ + ε)| <= 1), so two runs from the same weights differ by at most 2·lr where bf16 flips a
    small gradient's sign, and by float32 rounding where it does not."""
    from safetensors import safe_open

    lr = 1e-3
    weights, moments = {}, {}
    for precision in ("fp32", "bf16"):
        run = make_run(tmp_path / precision, ["train.minibatches=1", f"train.lr={lr}",
                                              f"train.mixed_precision={precision}"])
        build_round(run, 1, n_prompts=2)
        assert train_step(run, 1, quiet=True)["updates"] == 1
        weights[precision] = load_file(run.policy_dir(1) / "model.safetensors")
        moments[precision] = load_file(run.train_dir(1) / "state" / "optimizer.safetensors")
        with safe_open(str(run.policy_dir(1) / "model.safetensors"), framework="pt") as fh:
            assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float32}  # noqa: SIM118
    base = load_file(make_run(tmp_path / "base", []).policy_dir(0) / "model.safetensors")
    a, b = weights["fp32"], weights["bf16"]
    assert {v.dtype for k, v in moments["bf16"].items() if "exp_avg" in k} == {torch.float32}
    assert any(not torch.equal(a[k], b[k]) for k in a)  # bf16 did compute something else
    for k in a:
        assert (b[k] - base[k]).abs().max().item() <= lr * (1 + 1e-3), k  # one step of at most lr
        assert (a[k] - b[k]).abs().max().item() <= 2 * lr * (1 + 1e-3), k
