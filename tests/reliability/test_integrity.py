"""Every finished byte verified: a damaged file of a run is named, with the command that recomputes it,
by `scope status` and by the next command that reads it; that command restores the original bytes.

Also: random bytes of a shard's size are recomputed, not taken as done; a manifest that is JSON but not
a manifest is named by readers and recomputed by its writer; eval's summary and training tables are
one unit; a pruning killed mid-way is finished by the next `scope round`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil

import pytest
from rel_helpers import copy_run, data_files, one_line_error, run_plan, temporaries
from typer.testing import CliRunner

from scope_cli.cli.app import app
from scope_cli.cli.rounds import eval_done
from scope_cli.core.runs import Run


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def flip_bit(path) -> None:
    """One bit of the file's middle byte flipped in place (same size)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    with open(path, "r+b") as fh:
        fh.write(data)


def status_problems(root) -> tuple[int, list[str]]:
    res = cli("status", "--run", root)
    return res.exit_code, [line for line in res.output.splitlines() if line.startswith("damaged:")]


def assert_same_as(reference, root) -> None:
    """Every Parquet and safetensors file of the reference is back, byte for byte."""
    ref = data_files(reference)
    assert {k: v for k, v in data_files(root).items() if k in ref} == ref
    assert temporaries(root) == []


REPORT = ["report", "{root}", "--out", "{tmp}/report"]
# (damaged file, the command that reads it next (None: only users read it), the repair)
FILES = [
    ("prompts/shard-00000.parquet", ["generate", "--round", "1"], "scope prepare"),
    ("eval-sets/heldout.parquet", ["eval", "--round", "1"], "scope prepare"),
    ("policy-000/model.safetensors", ["generate", "--round", "1", "--force"], "scope prepare"),
    ("round-001/rollouts/shard-00001.parquet", ["verify", "--round", "1"], "scope generate --round 1"),
    ("round-001/verified/shard-00002.parquet", ["prm-score", "--round", "1"], "scope verify --round 1"),
    ("round-001/scored/shard-00000.parquet", ["locate-error", "--round", "1"], "scope prm-score --round 1"),
    ("round-001/located/shard-00003.parquet", ["rectify", "--round", "1"], "scope locate-error --round 1"),
    ("round-001/rectified/shard-00001.parquet", ["train-step", "--round", "1"], "scope rectify --round 1"),
    ("round-001/train/metrics.parquet", ["eval", "--round", "1"], "scope train-step --round 1"),
    ("round-001/train/state/optimizer.safetensors", ["round", "2"], "scope train-step --round 1"),
    ("policy-001/model.safetensors", ["generate", "--round", "2"], "scope train-step --round 1"),
    ("round-001/eval/shard-00000.parquet", None, "scope eval --round 1"),
    ("round-001/eval/heldout-greedy.parquet", None, "scope eval --round 1"),
    ("round-001/eval/summary.parquet", REPORT, "scope eval --round 1"),
    ("round-001/eval/training.parquet", REPORT, "scope eval --round 1"),
]


@pytest.mark.parametrize("rel, reader, repair", FILES, ids=[f[0] for f in FILES])
def test_a_flipped_bit_is_named_and_its_command_restores_the_bytes(reference, tmp_path, rel, reader, repair):
    root = copy_run(reference["root"], tmp_path / "run")
    assert status_problems(root) == (0, [])
    flip_bit(root / rel)

    code, problems = status_problems(root)
    assert code == 1 and len(problems) == 1, problems
    repair = f"{repair} --run {root}"  # the hint aims at this run
    assert f"{root / rel}: content differs from its manifest (sha256); run `{repair}`" in problems[0]

    if reader is not None:
        args = [a.format(root=root, tmp=tmp_path) for a in reader]
        res = cli(*args, *([] if args[0] == "report" else ["--run", root, "--quiet"]))
        one_line_error(res, f"{root / rel}: content differs from its manifest (sha256)", f"run `{repair}`")

    command = shlex.split(re.search(r"run `scope ([^`]+)`", problems[0]).group(1))
    assert cli(*command, "--quiet").exit_code == 0
    assert_same_as(reference["root"], root)
    assert status_problems(root) == (0, [])
    assert cli("status", "--run", root, "--verify").exit_code == 0


def test_status_verify_finds_damage_that_kept_size_and_mtime(reference, tmp_path):
    """A change that left size and modification time alone (silent corruption) is found by `--verify`
    (and by the stage that reads the file); the plain status trusts size and mtime."""
    root = copy_run(reference["root"], tmp_path / "run")
    path = root / "round-001/verified/shard-00000.parquet"
    st = os.stat(path)
    flip_bit(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert status_problems(root) == (0, [])
    res = cli("status", "--run", root, "--verify")
    assert res.exit_code == 1 and f"{path}: content differs" in res.output
    one_line_error(cli("prm-score", "--round", "1", "--run", root), f"{path}: content differs")


def test_random_bytes_of_a_shards_size_are_recomputed(reference, tmp_path):
    """A finished rollouts shard replaced by random bytes of the same size, mid-round (verify not yet
    run): `scope round` recomputes it and finishes the round with the reference's bytes."""
    root = copy_run(reference["root"], tmp_path / "run")
    for rel in ("round-001/verified", "round-001/scored", "round-001/located", "round-001/rectified",
                "round-001/train", "round-001/eval", "policy-001"):
        shutil.rmtree(root / rel)
    shard = root / "round-001/rollouts/shard-00002.parquet"
    shard.write_bytes(os.urandom(shard.stat().st_size))
    assert cli("round", "1", "--run", root, "--quiet").exit_code == 0
    assert_same_as(reference["root"], root)


@pytest.mark.parametrize("text", ["[]", "null", '"s"', '{"output": null}', "{", '{"output": {"path": '
                                  '"shard-00001.parquet", "size": 1}, "config_hash": "x"}'])
def test_a_manifest_that_is_not_a_manifest(reference, tmp_path, text):
    """Readers name the damaged manifest in one line; its writer recomputes the shard (same bytes)."""
    root = copy_run(reference["root"], tmp_path / "run")
    man = root / "round-001/rollouts/_manifest/shard-00001.json"
    man.write_text(text)
    code, problems = status_problems(root)
    assert code == 1 and len(problems) == 1 and f"{man}: " in problems[0], problems
    assert f"run `scope generate --round 1 --run {root}`" in problems[0]
    one_line_error(cli("verify", "--round", "1", "--run", root, "--force"), f"{man}: ",
                   f"run `scope generate --round 1 --run {root}`")
    res = cli("generate", "--round", "1", "--run", root)
    assert res.exit_code == 0 and "generate: round 1: shard 1 (" in res.output and "shard 0 (" not in res.output
    assert_same_as(reference["root"], root)
    assert status_problems(root) == (0, [])


@pytest.mark.parametrize("text", ["[]", "null", "{", '{"files": 3}'])
def test_a_damaged_eval_sets_manifest(reference, tmp_path, text):
    root = copy_run(reference["root"], tmp_path / "run")
    man = root / "eval-sets/_manifest.json"
    man.write_text(text)
    code, problems = status_problems(root)
    assert code == 1 and len(problems) == 1 and f"{man}: " in problems[0], problems
    one_line_error(cli("eval", "--round", "1", "--run", root, "--force"), f"{man}: ", "scope prepare")
    assert cli("prepare", "--run", root, "--quiet").exit_code == 0
    assert_same_as(reference["root"], root)
    assert status_problems(root) == (0, [])


def test_a_damaged_train_manifest(reference, tmp_path):
    """train-step's manifest `[]`: status names it; the next round's train-step refuses the state it no
    longer vouches for; train-step of its round recomputes it (same policy and state bytes)."""
    root = copy_run(reference["root"], tmp_path / "run")
    man = root / "round-001/train/_manifest/shard-00000.json"
    man.write_text("[]")
    code, problems = status_problems(root)
    assert code == 1 and f"{man}: not a manifest (a JSON array, not an object)" in problems[0], problems
    one_line_error(cli("eval", "--round", "1", "--run", root, "--force", "--quiet"), f"{man}: ",
                   "scope train-step --round 1")
    assert cli("train-step", "--round", "1", "--run", root, "--quiet").exit_code == 0
    assert_same_as(reference["root"], root)


def test_eval_killed_between_summary_and_training_table_is_finished(reference, tmp_path):
    """Killed after summary.parquet, before training.parquet: the eval does not count as done, and the
    next `scope round` writes both (the reference's bytes)."""
    root = copy_run(reference["root"], tmp_path / "run")
    shutil.rmtree(root / "round-001/eval")
    results = run_plan(root, [
        {"args": ["eval", "--round", "1", "--run", str(root), "--quiet"],
         "kill": {"after": r"^round-001/eval/\.training\.parquet\.tmp@", "at": 1}},
    ], tmp_path / "plan")
    assert results[0]["status"] == "killed", results
    assert (root / "round-001/eval/summary.parquet").exists()
    assert not (root / "round-001/eval/training.parquet").exists()
    assert not eval_done(Run.open(root), 1)
    assert cli("round", "1", "--run", root, "--quiet").exit_code == 0
    assert eval_done(Run.open(root), 1)
    assert_same_as(reference["root"], root)


def test_a_killed_pruning_is_finished_by_the_next_round(reference, tmp_path):
    """Killed right after a policy folder (then a train state) was renamed out of the way for deletion:
    the next `scope round` deletes what is left."""
    root = copy_run(reference["root"], tmp_path / "run")
    keep = ["--set", "run.keep_policies=1", "--set", "run.keep_state=1"]
    results = run_plan(root, [
        {"args": ["round", "2", "--run", str(root), "--quiet", *keep],
         "kill": {"after": r"^\.policy-001\.pruned$", "at": 1}},  # renamed; killed as its rmtree starts
        {"args": ["round", "2", "--run", str(root), "--quiet", *keep],
         "kill": {"after": r"^round-001/train/\.state\.pruned$", "at": 1}},
        {"args": ["round", "2", "--run", str(root), "--quiet", *keep]},
    ], tmp_path / "plan")
    assert [r["status"] for r in results] == ["killed", "killed", "exit"], results
    assert results[0]["kill"]["path"] == ".policy-001.pruned"
    assert results[1]["kill"]["path"] == "round-001/train/.state.pruned"
    assert results[2]["code"] == 0
    assert not (root / ".policy-001.pruned").exists()
    assert not (root / "round-001/train/.state.pruned").exists()
    assert not (root / "policy-001").exists() and not (root / "round-001/train/state").exists()
    assert temporaries(root) == []
