"""Bad input: each case ends in a one-line error that names the file, column or key and what was
expected, exit code 2, and nothing already done is lost; prompts too long for the model are skipped
and counted instead.

Covered elsewhere and not repeated here: a dataset row without an answer, conflicting duplicate
problems, non-UTF-8 JSONL, bad JSON lines, empty problems (tests/test_prepare.py::
test_bad_jsonl_is_one_line, ::test_conflicting_duplicates_name_both_sources); config typos, zero or
negative n and bad values (tests/test_config.py::test_bad_overrides_name_the_key, ::
test_toml_typo_and_bad_file); a changed config on an existing run (tests/test_runs.py::
test_run_config_is_fixed_at_creation, tests/test_prepare.py::test_cli_prepare_status_and_errors);
unreadable shards and missing or mistyped columns at the read_shard level (tests/test_shards.py::
test_read_shard_errors_are_one_line).
"""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rel_helpers import POLICY, TINY, cli, copy_run, data_files, one_line_error

from scope_cli.core.runs import Run
from scope_cli.schema import VERIFIED
from scope_cli.core.files import list_shard_files, manifest_path, read_stage, shard_path, write_parquet_atomic


def snapshot(root) -> dict[str, str]:
    return data_files(root)


def hand_made(stage_dir, tables: list[pa.Table]) -> None:
    """A stage folder written by hand (no manifests, no locks): taken as it is."""
    shutil.rmtree(stage_dir, ignore_errors=True)
    for i, table in enumerate(tables):
        write_parquet_atomic(table, shard_path(stage_dir, i))


# ---- shards ------------------------------------------------------------------------------------------
def test_truncated_shard_is_named_and_nothing_is_lost(reference, tmp_path):
    root = copy_run(reference["root"], tmp_path / "run")
    run = Run.open(root)
    shutil.rmtree(run.stage_dir(1, "verified"))
    bad = shard_path(run.stage_dir(1, "rollouts"), 1)
    bad.write_bytes(bad.read_bytes()[:300])
    before = snapshot(root)
    res = cli("verify", "--round", "1", "--run", str(root))
    one_line_error(res, "round-001/rollouts: 3 of 4 shards finished", "shard-00001.parquet",
                   f"run `scope generate --round 1 --run {root}`")
    assert snapshot(root) == before
    # the named command repairs it: only the damaged shard is computed again
    res = cli("generate", "--round", "1", "--run", str(root))
    assert res.exit_code == 0 and "generate: round 1: shard 1 (" in res.output and "shard 0 (" not in res.output
    assert cli("verify", "--round", "1", "--run", str(root), "--quiet").exit_code == 0
    ref = data_files(reference["root"])
    assert {k: v for k, v in data_files(root).items() if k in ref} == ref


@pytest.mark.parametrize("content, message", [
    (b"", "not a readable Parquet file"),
    (b"PAR1 this is not parquet", "not a readable Parquet file"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "not a readable Parquet file"),
])
def test_non_parquet_shard(reference, tmp_path, content, message):
    root = copy_run(reference["root"], tmp_path / "run")
    verified = Run.open(root).stage_dir(1, "verified")
    good = pq.read_table(shard_path(verified, 0))
    hand_made(verified, [good, good])
    shard_path(verified, 1).write_bytes(content)
    shutil.rmtree(Run.open(root).stage_dir(1, "scored"))
    one_line_error(cli("prm-score", "--round", "1", "--run", str(root), "--quiet"),
                   "verified/shard-00001.parquet", message)
    assert list_shard_files(Run.open(root).stage_dir(1, "scored"))[0].name == "shard-00000.parquet"


@pytest.mark.parametrize("change, message", [
    (lambda t: t.drop_columns(["reward"]), "missing columns reward (written by verify)"),
    (lambda t: t.drop_columns(["response_ids", "answer"]),
     "missing columns answer, response_ids (written by generate, prepare)"),
    (lambda t: t.set_column(t.schema.get_field_index("correct"), "correct",
                            pa.array(["yes"] * t.num_rows)), "column correct has type string, expected bool"),
])
def test_missing_or_mistyped_columns(reference, tmp_path, change, message):
    root = copy_run(reference["root"], tmp_path / "run")
    verified = Run.open(root).stage_dir(1, "verified")
    hand_made(verified, [change(pq.read_table(shard_path(verified, 0)))])
    shutil.rmtree(Run.open(root).stage_dir(1, "scored"))
    one_line_error(cli("prm-score", "--round", "1", "--run", str(root)),
                   "verified/shard-00000.parquet", message)


def test_empty_shard_passes_through(reference, tmp_path):
    """A shard with the right columns and no rows is data, not an error: it flows through every
    stage as an empty shard beside the others."""
    root = copy_run(reference["root"], tmp_path / "run")
    run = Run.open(root)
    rollouts = pq.read_table(shard_path(run.stage_dir(1, "rollouts"), 0))
    hand_made(run.stage_dir(1, "rollouts"), [rollouts, rollouts.slice(0, 0)])
    for stage in ("verified", "scored", "located", "rectified"):
        shutil.rmtree(run.stage_dir(1, stage))
    for stage in ("verify", "prm-score", "locate-error", "rectify"):
        res = cli(stage, "--round", "1", "--run", str(root), "--quiet")
        assert res.exit_code == 0, res.output
    rectified = run.stage_dir(1, "rectified")
    assert pq.read_table(shard_path(rectified, 1)).num_rows == 0
    assert read_stage(rectified).num_rows == pq.read_table(shard_path(rectified, 0)).num_rows


# ---- order of stages ----------------------------------------------------------------------------------
@pytest.mark.parametrize("stage, message", [
    ("verify", "round-001/rollouts: no shards (run `scope generate --round 1 --run {root}` first)"),
    ("prm-score", "round-001/verified: no shards (run `scope verify --round 1 --run {root}` first)"),
    ("locate-error", "round-001/scored: no shards (run `scope prm-score --round 1 --run {root}` first)"),
    ("rectify", "round-001/located: no shards (run `scope locate-error --round 1 --run {root}` first)"),
    ("train-step", "round-001/rectified: no shards (run `scope rectify --round 1 --run {root}` first)"),
])
def test_stage_before_its_input_exists(prepared, tmp_path, stage, message):
    """The hint names the command that writes the input, with this run: pasted, it targets it."""
    root = copy_run(prepared, tmp_path / "run")
    before = snapshot(root)
    one_line_error(cli(stage, "--round", "1", "--run", str(root)), message.format(root=root))
    assert snapshot(root) == before


def test_later_round_and_eval_before_their_policy(prepared, tmp_path):
    root = copy_run(prepared, tmp_path / "run")
    one_line_error(cli("generate", "--round", "2", "--run", str(root)),
                   "policy-001: policy missing or incomplete", f"run `scope round 1 --run {root}` first")
    one_line_error(cli("eval", "--round", "1", "--run", str(root)), "policy-001: policy missing or incomplete")
    one_line_error(cli("status", "--run", str(tmp_path / "nowhere")), "no run here")


@pytest.mark.parametrize("stage, upstream, writer", [
    ("verify", "rollouts", "scope generate --round 1"),
    ("locate-error", "scored", "scope prm-score --round 1"),
    ("train-step", "rectified", "scope rectify --round 1"),
])
def test_stage_refuses_a_partly_done_upstream(reference, tmp_path, stage, upstream, writer):
    """The upstream stage was interrupted (shard 2 has no manifest): the stage refuses instead of
    processing 3 shards as if they were all, and writes nothing."""
    root = copy_run(reference["root"], tmp_path / "run")
    run = Run.open(root)
    downstream = {"verify": "verified", "locate-error": "located", "train-step": "train"}[stage]
    shutil.rmtree(run.root / "round-001" / downstream)
    if stage == "train-step":
        shutil.rmtree(run.policy_dir(1))
    manifest_path(run.stage_dir(1, upstream), 2).unlink()
    before = snapshot(root)
    one_line_error(cli(stage, "--round", "1", "--run", str(root)),
                   f"round-001/{upstream}: 3 of 4 shards finished", "shard-00002.parquet",
                   f"{writer} --run {root}")
    assert snapshot(root) == before
    assert not (run.root / "round-001" / downstream).exists() or not list_shard_files(
        run.root / "round-001" / downstream)


def test_changed_shard_count_leaves_no_stale_shards(reference, tmp_path):
    """--force with generate.prompts_per_shard doubled: generate now writes 2 shards and removes the
    old 3 and 4, so verify reads exactly the new ones (not 2 new + 2 stale: duplicated prompts)."""
    root = copy_run(reference["root"], tmp_path / "run")
    run = Run.open(root)
    res = cli("generate", "--round", "1", "--run", str(root), "--quiet", "--force",
              "--set", "generate.prompts_per_shard=4")
    assert res.exit_code == 0, res.output
    assert [p.name for p in list_shard_files(run.stage_dir(1, "rollouts"))] == [
        "shard-00000.parquet", "shard-00001.parquet"]
    assert cli("verify", "--round", "1", "--run", str(root), "--quiet").exit_code == 0
    verified = read_stage(run.stage_dir(1, "verified"), VERIFIED)
    assert verified.num_rows == 8 * 4
    assert len(set(zip(verified.column("prompt_id").to_pylist(),
                       verified.column("sample_idx").to_pylist()))) == 32


# ---- config -------------------------------------------------------------------------------------------
def test_config_errors_on_the_command_line(reference, tmp_path):
    root = copy_run(reference["root"], tmp_path / "run")
    before = snapshot(root)
    one_line_error(cli("verify", "--round", "1", "--run", str(root), "--set", "verify.timeout=9",
                       "--set", "run.algo=grpo"),
                   'these keys differ: run.algo "scope" -> "grpo", verify.timeout 5.0 -> 9.0', "--force")
    one_line_error(cli("verify", "--round", "1", "--run", str(root), "--set", "verify.timout=9"),
                   "unknown key 'timout'", "did you mean 'verify.timeout'?")
    assert snapshot(root) == before
    fresh = tmp_path / "fresh"
    for bad, message in (("generate.n=0", "generate.n: got 0, expected an integer >= 1"),
                         ("generate.n=-4", "generate.n: got -4, expected an integer >= 1"),
                         ("generate.n=four", "expected an integer, got 'four'")):
        one_line_error(cli("prepare", "--run", str(fresh), "--set", bad), message)
    assert not fresh.exists()  # a refused config creates nothing


# ---- policies ------------------------------------------------------------------------------------------
def test_policy_folder_without_tokenizer(reference, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(POLICY, broken)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (broken / name).unlink()
    root = copy_run(reference["root"], tmp_path / "run")
    one_line_error(cli("eval", "--run", str(root), "--policy", str(broken)), "broken: no tokenizer files")
    # as the base policy: prepare refuses it, naming policy.path, and leaves no run behind
    fresh = tmp_path / "fresh"
    settings = [x for item in [*TINY, f"policy.path={broken}"] for x in ("--set", item)]
    one_line_error(cli("prepare", "--run", str(fresh), "--quiet", *settings), "policy.path:",
                   "broken: no tokenizer files")
    assert not fresh.exists()


# ---- datasets ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows, message", [
    ([{"problem": "1+2", "answer": "3", "task": "../../etc"}], "row 0: field task: unknown task '../../etc'"),
    ([{"problem": "what is 1+2?", "answer": "3", "task": "arith"}],
     "row 0: field problem: 'what is 1+2?' is not an arith problem"),
    ([{"problem": b"1+\xff2", "answer": "3"}], "row 0: field problem: not valid UTF-8 text"),
    ([{"problem": "1+2", "answer": None}], "row 0: missing field answer"),
])
def test_bad_parquet_dataset_rows(tmp_path, rows, message):
    src = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    settings = [x for item in [*TINY, f"prepare.source={src}", "task.name=arith"] for x in ("--set", item)]
    one_line_error(cli("prepare", "--run", str(tmp_path / "run"), "--quiet", *settings), "data.parquet", message)
    assert not (tmp_path / "run" / "prompts").exists()


def test_prompts_longer_than_the_context_are_skipped_and_counted(tmp_path):
    """With a context of 9 tokens, arith prompts of 5+ operands do not fit: generate and eval skip
    them, count them in the manifests and say so; the others are sampled as usual."""
    root = tmp_path / "run"
    settings = [x for item in [*TINY, "generate.max_model_len=9", "generate.prompts_per_round=16",
                               "generate.prompts_per_shard=4"] for x in ("--set", item)]
    assert cli("prepare", "--run", str(root), "--quiet", *settings).exit_code == 0
    run = Run.open(root)
    res = cli("generate", "--round", "1", "--run", str(root))
    assert res.exit_code == 0, res.output
    rows = read_stage(run.stage_dir(1, "rollouts")).to_pylist()
    ids = run.round_prompt_ids(1)
    prompts = {r["prompt_id"]: r for r in read_stage(run.prompts_dir).to_pylist()}
    fits = [pid for pid in ids if len(prompts[pid]["problem"]) + 1 < 9]
    assert 0 < len(fits) < len(ids)  # some fit, some do not
    assert sorted({r["prompt_id"] for r in rows}) == sorted(set(fits))
    assert all(len(r["prompt_ids"]) < 9 for r in rows)
    skipped = sum(json.loads(p.read_text())["summary"]["prompt_too_long"]
                  for p in (run.stage_dir(1, "rollouts") / "_manifest").glob("*.json"))
    assert skipped == len(ids) - len(fits)
    assert f"{skipped} prompts skipped as longer than the model's context" in " ".join(res.output.split())
    res = cli("eval", "--round", "0", "--run", str(root), "--quiet")
    assert res.exit_code == 0, res.output
    counted = [json.loads(p.read_text())["summary"]["prompt_too_long"]
               for p in (run.eval_dir(0) / "_manifest").glob("shard-*.json")]
    assert sum(counted) > 0
