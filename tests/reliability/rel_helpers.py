"""Shared pieces of the reliability suite: a tiny run config, the fault runner, run comparison.

The suite runs CI-sized by default (inside `make test`). `make reliability` sets
SCOPE_RELIABILITY=long (more seeds, two rounds, every kill moment drawn again) and selects the
tests marked slow as well. Every kill test adds its figures (kills, resumes, files compared,
differences) to a session tally that is printed at the end of the run and, with
SCOPE_RELIABILITY_REPORT=FILE, written there as JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("fault_runner.py")
LONG = os.environ.get("SCOPE_RELIABILITY", "") == "long"
POLICY = REPO / "data" / "policies" / "arith-tiny"

# the tiny run every test builds: 8 prompts x 4 samples per round in 4 shards, tiny eval sets
TINY = [
    "generate.prompts_per_round=8", "generate.n=4", "generate.prompts_per_shard=2",
    "prepare.train_size=64", "prepare.eval_size=16", "prepare.ood_size=8",
    "eval.sampled_limit=2", "eval.n_samples=2", "eval.limit=4", "eval.every=100", "eval.ks=[1,2]",
    "verify.workers=1", f"policy.path={POLICY}",
]

TALLY = {"kills": 0, "resumes": 0, "runs_compared": 0, "files_compared": 0, "differences": 0,
         "recomputed_done_shards": 0, "leftover_temporaries": 0}


def set_args(overrides: list[str]) -> list[str]:
    return [x for item in overrides for x in ("--set", item)]


def prepare_args(root: Path, *extra: str) -> list[str]:
    return ["prepare", "--run", str(root), "--quiet", *set_args([*TINY, *extra])]


def scope(*args: str, check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """The `scope` command line in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kwargs.pop("env", {})}
    done = subprocess.run([sys.executable, "-m", "scope_cli.cli.app", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(f"scope {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def run_plan(root: Path, attempts: list[dict], workdir: Path) -> list[dict]:
    """Run attempts through fault_runner.py (see there); returns one record per attempt."""
    workdir.mkdir(parents=True, exist_ok=True)
    plan, out = workdir / "plan.json", workdir / "result.json"
    plan.write_text(json.dumps({"root": str(root), "attempts": attempts}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(RUNNER), str(plan), str(out)], capture_output=True,
                          text=True, env=env, timeout=1800)
    assert done.returncode == 0 and out.exists(), done.stderr[-3000:]
    return json.loads(out.read_text())


# ---- comparing runs ---------------------------------------------------------------------------------
DATA_SUFFIXES = (".parquet", ".safetensors")
TEMPORARY = re.compile(r"\.tmp@|\.tmp$|\.pruned$")


def data_files(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every Parquet and safetensors file a reader would see."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and p.suffix in DATA_SUFFIXES and not any(part.startswith(".") for part in rel.parts):
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def temporaries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if TEMPORARY.search(p.name))


def compare_runs(reference: Path, other: Path) -> dict:
    """Files compared and every difference between two runs' Parquet and safetensors files."""
    a, b = data_files(reference), data_files(other)
    diffs = sorted({k for k in a.keys() & b.keys() if a[k] != b[k]})
    return {"compared": len(a.keys() & b.keys()), "differ": diffs, "missing": sorted(a.keys() - b.keys()),
            "extra": sorted(b.keys() - a.keys()), "temporaries": temporaries(other)}


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# ---- the command line in this process -----------------------------------------------------------------
def cli(*args: str, env: dict[str, str] | None = None):
    from typer.testing import CliRunner

    from scope_cli.cli.app import app

    return CliRunner().invoke(app, list(args), env=env)


def one_line_error(res, *fragments: str) -> str:
    """The command failed with exit code 2 and one line starting `error:` holding every fragment."""
    assert res.exit_code == 2, res.output
    text = res.output.strip()
    assert text.startswith("error:") and len(text.splitlines()) == 1, text
    for fragment in fragments:
        assert fragment in text, text
    return text

