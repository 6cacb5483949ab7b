"""Dynamic sampling (generate.oversample): a round's own slice stays what it is, the extra prompts
depend on (seed, round) alone and never repeat a prompt of the round, and train-step trains the first
prompts_per_round groups with signal in the round's prompt order."""

import pyarrow as pa
import pytest

from scope_cli.core.config import load_config
from scope_cli.core.runs import RunError, extra_prompts, round_slice
from scope_cli.core.train_batch import build_batch
from scope_cli.backends.training import TrainError
from scope_cli.schema import RECTIFIED, conform

IDS = [f"p{i:03d}" for i in range(40)]


def test_extra_prompts_follow_the_rounds_own_slice():
    own = round_slice(IDS, 7, 3, 8)
    extra = extra_prompts(IDS, own, 7, 3, 16)
    assert len(extra) == 16 and len(set(extra)) == 16 and not set(extra) & set(own)
    assert extra == extra_prompts(IDS, own, 7, 3, 16)  # (seed, round) alone
    assert extra != extra_prompts(IDS, own, 7, 4, 16) and extra != extra_prompts(IDS, own, 8, 3, 16)
    assert extra_prompts(IDS, own, 7, 3, 0) == []
    assert extra_prompts(IDS, own, 7, 3, 32)[:16] == extra  # a larger factor only adds prompts
    with pytest.raises(RunError, match=r"generate.prompts_per_round × generate.oversample: got 41, "
                                       r"expected at most the 40"):
        extra_prompts(IDS, own, 7, 3, 33)


def group(pid, rewards):
    """A prompt group of policy rows with the given rewards (2-token responses)."""
    return [{"prompt_id": pid, "sample_idx": i, "prompt_ids": [1, 2], "response": "x", "response_ids": [3, 4],
             "response_logprobs": [-0.5, -0.5], "finish_reason": "length", "policy": "policy-000",
             "reward": r, "verify_status": "ok", "origin": "policy", "in_batch": True}
            for i, r in enumerate(rewards)]


def batch(rows, order, *overrides):
    cfg = load_config(None, ["generate.temperature=1.0", "generate.prompts_per_shard=2", *overrides])
    table = conform(pa.Table.from_pylist(rows, schema=RECTIFIED), RECTIFIED)
    return build_batch(table, cfg, "policy-000", 256, None, order)


def test_the_first_groups_with_signal_train():
    rows = group("a", [1, 1]) + group("b", [0, 1]) + group("c", [0, 0]) + group("d", [1, 0]) + group("e", [0, 1])
    order = ["c", "e", "a", "d", "b"]  # the round's order: own slice [c, e], then the extras
    trained, counts = batch(rows, order, "generate.prompts_per_round=2", "generate.oversample=3")
    assert len(trained) == 4 and counts["surplus_groups"] == 1  # e and d train; b is surplus
    assert counts["dropped_groups"] == 2  # a and c: all rewards equal
    # without dynamic sampling every group with signal trains, and there is no surplus count
    trained, counts = batch(rows, None, "generate.prompts_per_round=2")
    assert len(trained) == 6 and "surplus_groups" not in counts


def test_dynamic_sampling_needs_the_rounds_order():
    with pytest.raises(TrainError, match="prompt order"):
        batch(group("a", [0, 1]), None, "generate.prompts_per_round=2", "generate.oversample=2")


def test_a_round_with_dynamic_sampling(tmp_path):
    """grpo with oversample 2 through the stages: rollouts hold the round's own slice and as many
    extra prompts; train-step trains the first prompts_per_round groups with signal."""
    import json

    import polars as pl

    from scope_cli.core.files import manifest_path, read_stage
    from scope_cli.core.runs import Run
    from stages.generate import generate
    from stages.locate_error import locate_error
    from stages.prepare import prepare
    from stages.prm_score import prm_score
    from stages.rectify import rectify
    from stages.train_step import train_step
    from stages.verify import verify

    run = Run.open(tmp_path / "run", overrides=[
        "run.algo=grpo", "prepare.train_size=32", "prepare.eval_size=4", "prepare.ood_size=4",
        "generate.prompts_per_round=4", "generate.prompts_per_shard=2", "generate.oversample=2",
        "generate.n=4", "generate.max_tokens=40", "verify.workers=1", "train.minibatches=1"], create=True)
    prepare(run, quiet=True)
    order = run.round_prompt_ids(1)
    assert len(order) == 8 and order[:4] == round_slice(run.prompt_ids(), run.config.run.seed, 1, 4)
    for stage in (generate, verify, prm_score, locate_error, rectify, train_step):
        stage(run, 1, quiet=True)
    verified = pl.from_arrow(read_stage(run.stage_dir(1, "verified")))
    assert verified["prompt_id"].unique().sort().to_list() == sorted(order)
    spread = verified.group_by("prompt_id").agg((pl.col("reward").max() > pl.col("reward").min()).alias("signal"))
    signal = set(spread.filter(pl.col("signal"))["prompt_id"].to_list())
    summary = json.loads(manifest_path(run.train_dir(1), 0).read_text())["summary"]
    assert summary["surplus_groups"] == max(len(signal) - 4, 0) and summary["dropped_groups"] == 8 - len(signal)
    assert summary["groups"] - summary["dropped_groups"] - summary["surplus_groups"] == min(len(signal), 4)
