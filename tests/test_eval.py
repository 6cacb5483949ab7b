"""eval on a tiny random policy and a tiny prepared arith run: tables, summary, resume, seeds."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scope_cli.core.config import load_config
from scope_cli.core.runs import training_metrics
from scope_cli.models.tiny import init_tiny_policy
from scope_cli.core.policy import copy_policy
from scope_cli.core.runs import Run, row_seed
from scope_cli.metrics import sampled_metrics
from scope_cli.schema import EVAL_SUMMARY, TRAIN_METRICS, conform
from scope_cli.tasks import get_task
from scope_cli.core.files import write_parquet_atomic
from scope_cli.cli.status import headline, stage_summary
from stages.eval import EVAL_SAMPLES, EVAL_SEED_ROUND, EvalError, evaluate, should_eval
from stages.prepare import prepare


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    policy = init_tiny_policy(root / "base", seed=3)
    run = Run.open(root / "run", overrides=[
        f"policy.path={policy}", "prepare.train_size=16", "prepare.eval_size=6", "prepare.ood_size=4",
        "eval.limit=3", "eval.n_samples=16", "eval.max_tokens=6", "verify.workers=1",
        "generate.prompts_per_round=16", "generate.prompts_per_shard=16",
    ], create=True)
    prepare(run, quiet=True)
    return run


def test_eval_writes_tables_and_summary(tiny_run):
    run = tiny_run
    result = evaluate(run, 0, quiet=True)
    out = run.eval_dir(0)
    assert out == run.root / "round-000" / "eval" and result["dir"] == out
    assert result["computed"] == ["heldout", "ood"]

    summary = pq.read_table(out / "summary.parquet")
    assert summary.schema == EVAL_SUMMARY
    rows = summary.to_pylist()
    assert {r["eval_set"] for r in rows} == {"heldout", "ood"}
    assert {r["round"] for r in rows} == {0} and {r["policy"] for r in rows} == {"policy-000"}
    metrics = {(r["eval_set"], r["metric"]): r["value"] for r in rows}
    for name in ("greedy_acc", "avg@1", "pass@1", "pass@4", "pass@8", "maj@4", "maj@8", "distinct-1",
                 "distinct-2", "prompts"):
        assert ("heldout", name) in metrics, name
    assert metrics[("heldout", "prompts")] == 3
    pass_k = [metrics[("heldout", f"pass@{k}")] for k in (1, 4, 8)]
    assert 0.0 <= pass_k[0] <= pass_k[1] <= pass_k[2] <= 1.0
    assert metrics[("heldout", "pass@1")] == pytest.approx(metrics[("heldout", "avg@1")])
    # the diversity measures over correct samples sit next to distinct-n, as the samples give them
    sampled_rows = pq.read_table(out / "heldout-sampled.parquet").to_pylist()
    again = sampled_metrics(sampled_rows, get_task, ks=run.config.eval.ks)
    for name in ("distinct_correct@4", "distinct_correct@8", "strategy_entropy[all]"):
        assert metrics[("heldout", name)] == again[name], name
    assert 0.0 <= metrics[("heldout", "distinct_correct@4")] <= metrics[("heldout", "distinct_correct@8")] <= 8

    greedy = pq.read_table(out / "heldout-greedy.parquet")
    sampled = pq.read_table(out / "heldout-sampled.parquet")
    assert greedy.schema == EVAL_SAMPLES and greedy.num_rows == 3
    assert sampled.num_rows == 3 * 16
    s = sampled.to_pylist()
    assert sorted({r["sample_idx"] for r in s}) == list(range(16))
    assert all(r["seed"] == row_seed(run.config.run.seed, EVAL_SEED_ROUND, r["prompt_id"], r["sample_idx"])
               for r in s)
    assert all(r["response_tokens"] <= 6 and r["verify_status"] in ("ok", "no_answer") for r in s)
    # a random policy rarely answers; every failure of arith has a located first error
    assert all(r["first_error_step"] is not None for r in s if not r["correct"])
    g = greedy.to_pylist()
    assert metrics[("heldout", "greedy_acc")] == pytest.approx(sum(r["correct"] for r in g) / 3)
    later = [r["first_error_step"] >= 1 for r in s if not r["correct"]]
    assert metrics[("heldout", "later_error_share")] == pytest.approx(sum(later) / len(later))

    # scope status reads the headline from the manifests: greedy accuracy of the first set
    totals = stage_summary(out)
    assert totals["shards"] == 2
    assert headline(totals).startswith(f"heldout greedy acc {metrics[('heldout', 'greedy_acc')]:.3f}")

    # a rerun skips done sets and writes the same summary
    before = (out / "summary.parquet").read_bytes()
    again = evaluate(run, 0, quiet=True)
    assert again["computed"] == [] and again["skipped"] == ["heldout", "ood"]
    assert (out / "summary.parquet").read_bytes() == before

    # a set whose per-sample table is gone is computed again, to the same rows (per-row seeds)
    (out / "ood-sampled.parquet").unlink()
    ood_greedy = pq.read_table(out / "ood-greedy.parquet")
    third = evaluate(run, 0, quiet=True)
    assert third["computed"] == ["ood"]
    assert pq.read_table(out / "ood-greedy.parquet").equals(ood_greedy)
    assert (out / "summary.parquet").read_bytes() == before


def test_eval_split_over_workers_and_training_table(tiny_run):
    run = tiny_run
    copy_policy(run.policy_dir(0), run.policy_dir(1), {"round": 1})
    updates = [{"round": 1, "update": u, "entropy": 1.0, "mean_ratio": 1.0, "clip_fraction": 0.0,
                "dropped_groups": 0} for u in (1, 2, 3)]
    write_parquet_atomic(conform(pa.Table.from_pylist(updates), TRAIN_METRICS),
                         run.train_dir(1) / "metrics.parquet")
    first = evaluate(run, 1, worker=(0, 2), quiet=True)
    assert first["computed"] == ["heldout"] and first["summary"] is None
    assert not (run.eval_dir(1) / "summary.parquet").exists()
    second = evaluate(run, 1, worker=(1, 2), quiet=True)
    assert second["computed"] == ["ood"] and second["summary"] == run.eval_dir(1) / "summary.parquet"
    assert {r["policy"] for r in pq.read_table(second["summary"]).to_pylist()} == {"policy-001"}
    train = pq.read_table(run.eval_dir(1) / "training.parquet").to_pylist()
    assert {(r["eval_set"], r["metric"]): r["value"] for r in train}[("train", "update")] == 3
    # the same weights and seeds as round 0: the same samples
    evaluate(run, 0, quiet=True)  # done already when the tests run in order
    assert (pq.read_table(run.eval_dir(1) / "heldout-sampled.parquet").column("response")
            .equals(pq.read_table(run.eval_dir(0) / "heldout-sampled.parquet").column("response")))


def test_eval_refuses_missing_policy_and_set(tiny_run, tmp_path):
    with pytest.raises(Exception, match="policy-004"):
        evaluate(tiny_run, 4, quiet=True)
    other = Run(tiny_run.root, load_config(overrides=["eval.sets=heldout,nope"]))
    with pytest.raises(EvalError, match="nope"):
        evaluate(other, 0, quiet=True)


def test_should_eval():
    cfg = load_config(overrides=["eval.every=3"])
    assert [r for r in range(8) if should_eval(cfg, r, last_round=7)] == [0, 3, 6, 7]
    assert should_eval(load_config(), 5, last_round=9)


def test_training_metrics_from_hand_built_tables(tmp_path):
    run = Run.open(tmp_path / "run", create=True)
    verified = pa.table({
        "prompt_id": ["a"] * 4 + ["b"] * 4 + ["c"] * 4,
        "correct": [True, True, True, True, False, False, False, False, True, False, False, True],
    })
    write_parquet_atomic(verified, run.stage_dir(1, "verified") / "shard-00000.parquet")
    write_parquet_atomic(pa.table({"salvage": [True, False, None, True]}),
                         run.stage_dir(1, "located") / "shard-00000.parquet")
    write_parquet_atomic(pa.table({"origin": ["policy", "rectified", "rectified", "reference"],
                                   "in_batch": [False, True, True, True]}),
                         run.stage_dir(1, "rectified") / "shard-00000.parquet")
    updates = [{"round": 1, "update": u, "entropy": e, "mean_ratio": 1.0, "clip_fraction": c,
                "dropped_groups": 2} for u, e, c in ((5, 1.0, 0.1), (6, 0.5, 0.3))]
    write_parquet_atomic(conform(pa.Table.from_pylist(updates), TRAIN_METRICS),
                         run.train_dir(1) / "metrics.parquet")
    m = training_metrics(run, 1)
    assert m["rollout_acc"] == pytest.approx(6 / 12)
    assert m["all_right_share"] == pytest.approx(1 / 3) and m["all_wrong_share"] == pytest.approx(1 / 3)
    assert m["salvaged"] == 2 and m["rectified"] == 2 and m["reference"] == 1 and m["batch_rows"] == 3
    assert m["update"] == 6 and m["updates"] == 2 and m["dropped_groups"] == 2
    assert m["entropy"] == pytest.approx(0.75) and m["clip_fraction"] == pytest.approx(0.2)
    assert m["mean_ratio"] == 1.0
    assert training_metrics(run, 2) == {}
