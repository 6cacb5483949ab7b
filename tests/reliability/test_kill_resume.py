"""Faults: kill -9 at random moments inside every stage, inside `scope prepare` and inside `scope round`.

Each test is a chain of attempts on one run folder (tests/reliability/fault_runner.py): an attempt is
`scope prepare` or `scope round N`, killed with SIGKILL at a moment drawn with the test's seed (the
J-th file operation of a chosen stage: from its first operation in its own folder to the next
stage's first; or of the whole round), then rerun, until an attempt finishes. The rerun always finishes, a shard (or train-step) once finished is never
recomputed (its manifest is never rewritten), no temporary file is left, and every Parquet and
safetensors file equals the uninterrupted reference run's, byte for byte (CPU, same seed).

CI runs one seed on round 1: 10 kills (prepare, each stage once, train-step twice). `make
reliability` (SCOPE_RELIABILITY=long) runs SCOPE_RELIABILITY_SEEDS seeds (default 8) on two rounds,
plus chains of kills at moments drawn over the whole round, and real `scope round` processes killed
from outside at wall-clock moments (in-process and --isolate); CI has an outside kill for generate
(tests/test_generate.py::test_killed_generate_resumes_to_identical_files).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from rel_helpers import LONG, TALLY, compare_runs, copy_run, run_plan, scope

SEEDS = list(range(int(os.environ.get("SCOPE_RELIABILITY_SEEDS", "8")))) if LONG else [0]


def stage_patterns(target: int) -> list[tuple[str, str]]:
    """(stage, regex over paths relative to the run: its own folder) in the order `scope round` meets
    them."""
    out = [("eval round 0", r"^round-000/eval(/|$)")]
    for r in range(1, target + 1):
        d = f"round-{r:03d}"
        out += [(f"{name} {r}", rf"^{d}/{folder}(/|$)") for name, folder in (
            ("generate", "rollouts"), ("verify", "verified"), ("prm-score", "scored"),
            ("locate-error", "located"), ("rectify", "rectified"), ("train-step", "train"))]
    out.append((f"eval round {target}", rf"^round-{target:03d}/eval(/|$)"))
    return out


def stage_windows(events: list[list[str]], target: int) -> list[tuple[str, str, int]]:
    """(stage, regex, n): a stage's stretch of the reference run's events runs from the first event in
    its folder to the first of the next stage; n events long."""
    import re

    firsts = []
    for name, pattern in stage_patterns(target):
        rx = re.compile(pattern)
        firsts.append((name, pattern, next(i for i, (_, path) in enumerate(events) if rx.search(path))))
    assert [i for *_, i in firsts] == sorted(i for *_, i in firsts), firsts
    ends = [i for *_, i in firsts[1:]] + [len(events)]
    return [(name, pattern, end - i) for (name, pattern, i), end in zip(firsts, ends)]


def check_chain(reference, root, results, *, every_kill_lands: bool) -> None:
    """The assertions shared by every chain, and its figures."""
    for r in results:
        assert r["status"] in ("killed", "exit"), r
        if r["status"] == "killed":
            assert r.get("signal") == signal.SIGKILL, r
        else:
            assert r["code"] == 0, f"a rerun failed: {r['args']} -> {r['code']}"
    assert results[-1]["status"] == "exit", "the last rerun must finish"
    if every_kill_lands:  # a kill aimed at a stage's own file events always finds them
        assert all(r["status"] == "killed" for r in results[:-1] if r.get("kill_spec")), results
    kills = sum(r["status"] == "killed" for r in results)
    # finished shards stay finished: no manifest seen finished after an attempt is ever rewritten
    final = results[-1]["done"]
    recomputed = sorted({m for r in results[:-1] for m, h in r["done"].items() if final.get(m) != h})
    diff = compare_runs(reference["root"], root)
    TALLY["kills"] += kills
    TALLY["resumes"] += sum(1 for prev, r in zip(results, results[1:]) if prev["status"] == "killed")
    TALLY["runs_compared"] += 1
    TALLY["files_compared"] += diff["compared"]
    TALLY["differences"] += len(diff["differ"]) + len(diff["missing"]) + len(diff["extra"])
    TALLY["recomputed_done_shards"] += len(recomputed)
    TALLY["leftover_temporaries"] += len(diff["temporaries"])
    where = [(r["kill"]["path"], r["kill"]["event"]) for r in results if r["status"] == "killed"]
    assert not recomputed, f"finished shards recomputed: {recomputed} (kills at {where})"
    assert diff["differ"] == [] and diff["missing"] == [] and diff["extra"] == [], (diff, where)
    assert diff["temporaries"] == [], (diff["temporaries"], where)
    assert diff["compared"] > 0


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", SEEDS)
def test_kill_inside_every_stage_then_resume(kill_reference, tmp_path, seed):
    """One kill inside `scope prepare` and one inside each stage of `scope round` (a moment drawn
    among that stage's file operations; train-step, which commits state, metrics, policy and
    manifest in order, twice), each followed by a rerun."""
    rng = random.Random(seed)
    root = tmp_path / "run"
    target = kill_reference["target"]
    prepare = kill_reference["prepare_events"]
    round_args = ["round", str(target), "--run", str(root), "--quiet"]
    from rel_helpers import prepare_args

    attempts = [{"args": prepare_args(root), "kill_spec": True,
                 "kill": {"after": "", "at": rng.randint(1, len(prepare))}},
                {"args": prepare_args(root)}]
    for name, pattern, n in stage_windows(kill_reference["round_events"], target):
        # a killed train-step restarts from its beginning, so a second draw lands in it too
        for _ in range(2 if name.startswith("train-step") and not LONG else 1):
            attempts.append({"args": round_args, "kill_spec": True,
                             "kill": {"after": pattern, "at": rng.randint(1, n)}})
    attempts.append({"args": round_args})
    results = run_plan(root, attempts, tmp_path / "plan")
    for a, r in zip(attempts, results):
        r["kill_spec"] = a.get("kill_spec", False)
    check_chain(kill_reference, root, results, every_kill_lands=True)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("seed", SEEDS)
def test_kill_at_random_moments_of_a_round(kill_reference, prepared, tmp_path, seed):
    """`scope round` killed at moments drawn uniformly over all its file operations, rerun after each,
    several times in a row (some draws land past the end of what is left: that rerun just finishes)."""
    rng = random.Random(1000 + seed)
    root = copy_run(prepared, tmp_path / "run")
    total = len(kill_reference["round_events"])
    round_args = ["round", str(kill_reference["target"]), "--run", str(root), "--quiet"]
    kills = 4
    draws = sorted((rng.randint(1, total) for _ in range(kills)), reverse=True)
    # later attempts resume with part of the work done: draw from a shrinking window
    attempts = [{"args": round_args, "kill": {"after": "", "at": max(1, d // (k + 1))}}
                for k, d in enumerate(draws)]
    attempts.append({"args": round_args})
    results = run_plan(root, attempts, tmp_path / "plan")
    check_chain(kill_reference, root, results, every_kill_lands=False)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("isolate", [False, True])
def test_scope_round_killed_from_outside(kill_reference, prepared, tmp_path, isolate):
    """A real `scope round` process (and, with --isolate, its stage subprocesses: the whole process
    group, as a batch scheduler's preemption does) killed with SIGKILL from outside at wall-clock
    moments, then rerun to the end."""
    rng = random.Random(7 + isolate)
    root = copy_run(prepared, tmp_path / "run")
    args = ["round", str(kill_reference["target"]), "--run", str(root), "--quiet",
            "--isolate" if isolate else "--no-isolate"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "scope_cli.cli.app", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.time() + 600
        while not (root / "round-000").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)  # the moment drawn counts from when the round starts writing
        time.sleep(rng.uniform(0.0, 20.0 if isolate else 6.0))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        proc.stderr.close()
    scope(*args)
    diff = compare_runs(kill_reference["root"], root)
    TALLY["kills"] += kills
    TALLY["resumes"] += kills
    TALLY["runs_compared"] += 1
    TALLY["files_compared"] += diff["compared"]
    TALLY["differences"] += len(diff["differ"]) + len(diff["missing"]) + len(diff["extra"])
    TALLY["leftover_temporaries"] += len(diff["temporaries"])
    assert diff["differ"] == [] and diff["missing"] == [] and diff["extra"] == [], diff
    assert diff["temporaries"] == [], diff["temporaries"]
