"""Watching a run: live curves (TensorBoard event files from the stages' Parquet, never a point twice),
logs that survive a pipe, stages that say what they skipped or resumed, hints that name the run, eval's
progress, one torch thread setting for every command, `scope config`, `scope round --dry-run`,
`scope --version` and flags that read as flags."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from scope_cli.core import loggers
from scope_cli.cli.app import app
from scope_cli.core.runs import Run

TINY = ["prepare.train_size=64", "prepare.eval_size=12", "prepare.ood_size=6", "generate.prompts_per_round=4",
        "generate.prompts_per_shard=2", "generate.n=4", "generate.max_tokens=40", "eval.n_samples=4",
        "eval.ks=[1, 4]", "eval.sampled_limit=3", "eval.max_tokens=40", "verify.workers=1", "eval.every=2",
        "train.minibatches=2", "run.keep_state=0"]
ARM = [*TINY, "run.algo=scope", "run.seed=0"]  # what `scope compare --name w --algos scope` sets
NAME = "w-scope-s0"
cli = CliRunner()


def sets(overrides: list[str]) -> list[str]:
    return [x for item in overrides for x in ("--set", item)]


def scope(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`scope ARGS` in a fresh process, stdout and stderr piped (not a terminal)."""
    done = subprocess.run([sys.executable, "-m", "scope_cli.cli.app", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=900)
    assert not check or done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """A run brought to round 2 by `scope round` with its output piped, named as `scope compare`
    names an arm."""
    runs = tmp_path_factory.mktemp("watching") / "runs"
    env = {"SCOPE_RUNS_DIR": str(runs), "COLUMNS": "80"}
    scope("prepare", "--run", NAME, *sets(ARM), "--quiet", env=env)
    done = scope("round", "2", "--run", NAME, env=env)
    return {"root": runs / NAME, "runs": runs, "env": env, "output": done.stdout + done.stderr}


def copy_of(watched, tmp_path) -> Run:
    root = tmp_path / "copy"
    shutil.copytree(watched["root"], root)
    return Run.open(root)


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files in `folder`, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(root: Path) -> dict[str, list[tuple[int, float]]]:
    """The points the Parquet files say a run's curves hold (float32, as TensorBoard stores them)."""
    out: dict[str, list[tuple[int, float]]] = {}
    updates = {0: 0}
    for r in (1, 2):
        rows = pq.read_table(root / f"round-{r:03d}" / "train" / "metrics.parquet").to_pylist()
        updates[r] = max(row["update"] for row in rows)
        for row in rows:
            for k, v in row.items():
                if k not in ("round", "update", "epoch", "minibatch") and v is not None:
                    out.setdefault(f"train/{k}", []).append((row["update"], float(np.float32(v))))
    for r in (0, 2):  # eval.every = 2: the base, and the last round
        for row in pq.read_table(root / f"round-{r:03d}" / "eval" / "summary.parquet").to_pylist():
            out.setdefault(f"eval/{row['eval_set']}/{row['metric']}", []).append(
                (updates[r], float(np.float32(row["value"]))))
        training = root / f"round-{r:03d}" / "eval" / "training.parquet"
        for row in (pq.read_table(training).to_pylist() if training.exists() else []):
            out.setdefault(f"round/{row['metric']}", []).append((updates[r], float(np.float32(row["value"]))))
    return out


def no_duplicate_steps(curves: dict[str, list[tuple[int, float]]]) -> bool:
    return all(len({s for s, _ in points}) == len(points) for points in curves.values())


# ---- live curves -------------------------------------------------------------------------------------
def test_event_files_hold_every_metric_of_the_parquet_at_its_update(watched):
    folder = watched["root"] / "tensorboard"
    assert sorted(p.name for p in folder.glob("events.out.tfevents.*")) == [
        "events.out.tfevents.r00000.2-eval", "events.out.tfevents.r00001.1-train",
        "events.out.tfevents.r00002.1-train", "events.out.tfevents.r00002.2-eval"]
    got, want = scalars(folder), expected(watched["root"])
    assert got == want
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4]  # the global update count
    assert [s for s, _ in got["eval/heldout/greedy_acc"]] == [0, 4]
    assert any("[difficulty=" in tag for tag in got)


def test_a_rerun_a_forced_recompute_and_a_changed_round_write_no_point_twice(watched, tmp_path):
    run = copy_of(watched, tmp_path)
    folder = run.root / "tensorboard"
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    res = cli.invoke(app, ["round", "2", "--run", str(run.root)])
    assert res.exit_code == 0, res.output
    res = cli.invoke(app, ["train-step", "--round", "2", "--run", str(run.root), "--force", "--quiet"])
    assert res.exit_code == 0, res.output  # same inputs, same metrics bytes: nothing to rewrite
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()} == before
    # round 2's metrics changed (as a recompute with another config would): its file is replaced
    path = run.train_dir(2) / "metrics.parquet"
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index("loss"), "loss",
                             pa.array([1.5, 2.5], pa.float64()))
    pq.write_table(table, path)
    assert loggers.log_rounds(run) == ["r00002.1-train", "r00002.2-eval"]  # the eval's step source too
    got = scalars(folder)
    assert got["train/loss"][2:] == [(3, 1.5), (4, 2.5)]
    assert no_duplicate_steps(got) and set(got) == set(expected(run.root))
    assert loggers.log_rounds(run) == []


def test_a_round_killed_between_its_event_file_and_the_record_resumes_without_duplicates(watched, tmp_path):
    """SIGKILL right after round 2's train event file is renamed into place, before `_logged.json`
    records it; the rerun rewrites the same file, and the curves equal the uninterrupted run's."""
    sys.path.insert(0, str(Path(__file__).parent / "reliability"))
    from rel_helpers import run_plan

    run = copy_of(watched, tmp_path)
    for path in (run.policy_dir(2), run.train_dir(2), run.eval_dir(2)):
        shutil.rmtree(path)  # as if round 2 had stopped before its train-step
    for name in ("r00002.1-train", "r00002.2-eval"):
        (run.root / "tensorboard" / f"events.out.tfevents.{name}").unlink()
    ledger = run.root / "tensorboard" / "_logged.json"
    ledger.write_text(json.dumps({k: v for k, v in json.loads(ledger.read_text()).items() if "r00002" not in k}))
    args = ["round", "2", "--run", str(run.root), "--quiet"]
    # events from the train file's temporary: its open and creation, its rename, then the record's first
    kill = {"after": r"^tensorboard/\.r00002\.1-train\.tmp@", "at": 4}
    killed = run_plan(run.root, [{"args": args, "kill": kill}], tmp_path / "plan")[0]
    assert killed["status"] == "killed" and killed["kill"]["path"] == "tensorboard", killed
    assert (run.root / "tensorboard" / "events.out.tfevents.r00002.1-train").exists(), killed
    assert "r00002.1-train" not in json.loads(ledger.read_text())
    res = cli.invoke(app, args)
    assert res.exit_code == 0, res.output
    got = scalars(run.root / "tensorboard")
    assert no_duplicate_steps(got) and got == scalars(watched["root"] / "tensorboard")
    assert not [p for p in (run.root / "tensorboard").iterdir() if ".tmp@" in p.name]


def test_wandb_gets_each_round_once_and_a_missing_package_is_one_line(watched, tmp_path, monkeypatch):
    run = copy_of(watched, tmp_path)
    run.config.run.loggers = ["wandb"]
    calls = []

    class FakeRun:
        def define_metric(self, name, **kw):
            calls.append(("define_metric", name, kw))

        def log(self, values):
            calls.append(("log", values))

        def finish(self):
            calls.append(("finish",))

    class FakeWandb:
        @staticmethod
        def init(**kw):
            calls.append(("init", kw))
            return FakeRun()

    real_find_spec = loggers.importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec",
                        lambda name: object() if name == "wandb" else real_find_spec(name))
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    assert loggers.log_rounds(run) == ["r00000.2-eval", "r00001.1-train", "r00002.1-train", "r00002.2-eval"]
    init = calls[0][1]
    assert init["mode"] == "offline" and init["resume"] == "allow" and init["dir"] == str(run.root)
    logged = [c[1] for c in calls if c[0] == "log"]
    assert [v["update"] for v in logged] == [0, 1, 2, 3, 4, 4]  # in update order, eval after its updates
    losses = [row["loss"] for r in (1, 2)
              for row in pq.read_table(run.train_dir(r) / "metrics.parquet").to_pylist()]
    assert [v["train/loss"] for v in logged if "train/loss" in v] == losses
    calls.clear()
    assert loggers.log_rounds(run) == [] and calls == []  # recorded: never sent twice
    monkeypatch.setattr(loggers.importlib.util, "find_spec",
                        lambda name: None if name == "wandb" else real_find_spec(name))
    with pytest.raises(loggers.LoggerError, match=r"run.loggers: 'wandb' is listed but the wandb package"):
        loggers.log_rounds(run)


def test_loggers_are_checked_as_config(tmp_path):
    res = cli.invoke(app, ["config", "--set", "run.loggers=[\"tensorbord\"]"])
    assert res.exit_code == 2
    assert "run.loggers: expected a list of tensorboard, wandb, got 'tensorbord'" in res.output
    res = cli.invoke(app, ["config", "--set", "run.loggers=[]", "--changed"])
    assert res.exit_code == 0 and 'loggers = []  # default: ["tensorboard"] (op)' in res.output


# ---- logs that survive a pipe; saying what happened --------------------------------------------------------
def test_piped_lines_are_whole_and_bracketed_names_survive(watched):
    assert "train-step: round 2: 2 updates" in watched["output"]  # the round's own output, piped
    run_arg = ["--run", NAME]
    done = scope("generate", "--round", "1", *run_arg, "--force", env=watched["env"])  # COLUMNS=80
    summary = [line for line in done.stderr.splitlines() if line.startswith("generate: round 1: 2/2 shards")]
    assert len(summary) == 1 and len(summary[0]) > 80 and summary[0].endswith("tokens/s"), done.stderr
    done = scope("compare", "--name", "w", "--algos", "scope", "--seeds", "1", "--rounds", "2", *sets(TINY),
                 env=watched["env"])
    table = [line for line in done.stdout.splitlines() if "[difficulty=" in line]
    assert table and all(line.startswith("| heldout | ") or line.startswith("| ood | ") for line in table)
    assert (watched["runs"] / "w-compare" / "table.md").read_text().count("[difficulty=") == len(table)


def test_stages_say_what_they_skipped_resumed_and_name_the_run_in_hints(watched, tmp_path):
    run = copy_of(watched, tmp_path)
    r = ["--run", str(run.root)]
    res = cli.invoke(app, ["verify", "--round", "1", *r])
    assert res.exit_code == 0 and "verify: round 1: 2 shards done earlier, skipped" in res.output
    assert "items/s" not in res.output  # no earlier run's summary shown as if new
    (run.stage_dir(1, "scored") / "_manifest" / "shard-00001.json").unlink()
    res = cli.invoke(app, ["prm-score", "--round", "1", *r])
    assert res.exit_code == 0 and "prm-score: round 1: 1 of 2 shards done earlier; computing 1" in res.output
    res = cli.invoke(app, ["train-step", "--round", "1", *r])
    assert "train-step: round 1: done earlier, skipped (policy-001)" in res.output
    res = cli.invoke(app, ["eval", "--round", "0", *r])
    assert "eval: round 0: 2 shards done earlier, skipped" in res.output
    res = cli.invoke(app, ["prepare", *r])
    assert f"prepare: {run.root}: done earlier, skipped" in res.output
    res = cli.invoke(app, ["verify", "--round", "1", *r, "--set", "verify.timeout=3", "--set", "generate.n=3"])
    assert res.exit_code == 2
    assert "these keys differ: generate.n 4 -> 3, verify.timeout 5.0 -> 3.0 (rerun with --force" in res.output
    shutil.rmtree(run.stage_dir(1, "located"))
    res = cli.invoke(app, ["rectify", "--round", "1", *r])
    assert res.exit_code == 2
    assert f"(run `scope locate-error --round 1 --run {run.root}` first)" in res.output


# ---- progress and threads ---------------------------------------------------------------------------
def test_eval_shows_answers_done_per_set_and_mode(watched, tmp_path, monkeypatch):
    import stages.eval as eval_stage
    from scope_cli.console import rows_task

    bars = []

    def recording(progress, description, total):
        task, update = rows_task(progress, description, total)
        bars.append({"description": description, "total": total, "done": 0})

        def counted(rows, tokens):
            bars[-1]["done"] += rows
            update(rows, tokens)

        return task, counted

    monkeypatch.setattr(eval_stage, "rows_task", recording)
    run = Run.open(watched["root"])
    eval_stage.evaluate(run, 0, out_dir=tmp_path / "eval", quiet=True)
    assert [(b["description"], b["total"], b["done"]) for b in bars] == [
        ("eval policy-000 heldout: greedy answers (12 problems × 1)", 12, 12),
        ("eval policy-000 heldout: sampled answers (3 problems × 4)", 12, 12),
        ("eval policy-000 ood: greedy answers (6 problems × 1)", 6, 6),
        ("eval policy-000 ood: sampled answers (3 problems × 4)", 12, 12)]


def test_every_command_that_runs_a_model_sets_torch_threads(watched, tmp_path):
    """In a fresh interpreter: an in-process vLLM CPU engine (opened by other tests in this process)
    replaces torch.set_num_threads with a no-op, so the check cannot run here."""
    run = copy_of(watched, tmp_path)
    check = f"""
import torch
from scope_cli.cli.app import open_run
torch.set_num_threads(2)
open_run({str(run.root)!r}, None, ["train.threads=1"], force=False)
assert torch.get_num_threads() == 1, torch.get_num_threads()
torch.set_num_threads(2)
open_run({str(run.root)!r}, None, ["train.threads=0"], force=False)  # 0: torch's own default
assert torch.get_num_threads() == 2, torch.get_num_threads()
"""
    res = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


# ---- config, dry run, version, flags ---------------------------------------------------------------------
def test_config_prints_the_runs_config_marking_what_differs_from_the_defaults(watched):
    res = cli.invoke(app, ["config", "--run", str(watched["root"])])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"# the config of {watched['root']}\n[run]\n")
    assert "\nn = 4  # default: 8\n" in res.output and "\ntemperature = 1.0\n" in res.output
    assert "\nworkers = 1  # default: 2 (op)\n" in res.output
    changed = cli.invoke(app, ["config", "--run", str(watched["root"]), "--changed"]).output
    assert "temperature" not in changed and "[task]" not in changed and "n = 4  # default: 8" in changed
    assert "# default" not in cli.invoke(app, ["config"]).output  # the defaults themselves


def test_dry_run_lists_each_stage_and_runs_and_imports_nothing_heavy(watched, tmp_path):
    run = copy_of(watched, tmp_path)
    shutil.rmtree(run.policy_dir(2))
    shutil.rmtree(run.train_dir(2))
    (run.stage_dir(2, "scored") / "_manifest" / "shard-00001.json").unlink()
    config = (run.root / "config.toml").read_bytes()
    files = sorted(str(p) for p in run.root.rglob("*"))
    code = ("import sys; from scope_cli.cli.app import app; app(sys.argv[1:], standalone_mode=False); "
            "print('heavy:', sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, "round", "3", "--run", str(run.root), "--dry-run",
                           "--set", "verify.workers=2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [" ".join(line.split()) for line in done.stdout.splitlines()]
    assert lines == [
        f"{run.root}: round 3, dry run (nothing is run)",
        "round 0 all done", "round 1 all done",
        "round 2 generate done (2 shards)", "round 2 verify done (2 shards)",
        "round 2 prm-score 1 of 2 shards done; would compute 1", "round 2 locate-error would run",
        "round 2 rectify would run", "round 2 train-step would run", "round 2 eval would run",
        "round 3 generate would run (after round 2)", "round 3 verify would run",
        "round 3 prm-score would run", "round 3 locate-error would run", "round 3 rectify would run",
        "round 3 train-step would run", "round 3 eval would run",
        "heavy: []"]
    assert (run.root / "config.toml").read_bytes() == config  # not even the operational --set
    assert sorted(str(p) for p in run.root.rglob("*")) == files
    res = cli.invoke(app, ["round", "3", "--run", str(run.root), "--dry-run", "--set", "generate.n=3"])
    assert res.exit_code == 2 and "these keys differ: generate.n 4 -> 3 (rerun with --force" in res.output


def test_version_and_boolean_flags_read_as_flags():
    from scope_cli import __version__

    res = cli.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output == f"scope-rl {__version__}\n"
    for command in ([], ["round"], ["generate"], ["eval"]):
        res = cli.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0 and "--help" in res.output
        assert "<bool>" not in res.output, res.output
    assert "--force " in cli.invoke(app, ["round", "--help"], env={"COLUMNS": "200"}).output
