"""`scope status`: a table of a run read from its manifests, and every damaged file named, each with the
command that recomputes it (nothing heavy is imported).

What it checks, cheaply: every file a manifest vouches for (stage shards and what a stage writes beside
them, train-step's metrics and state, eval's summary, the policies' files, the eval sets) exists with
the recorded size and is not newer than its manifest (every writer writes the manifest last; an edit
gives a file a new mtime). A file changed after its manifest is hashed and compared with the recorded
sha256 (up to HASH_BUDGET bytes per call; beyond that it is named as changed, unchecked). `--verify`
hashes every file: damage that left size and mtime alone (a disk's silent corruption, an mtime set
back) shows only then. Stages themselves always hash what they read, so they name such damage too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from scope_cli.errors import ScopeError
from scope_cli.errors import json_object
from scope_cli.core.manifests import (
    damaged,
    manifest_files,
    pruned,
    read_manifest,
    record_lists_problem,
    repair_command,
    sha256_of,
)

STAGE_FOLDERS = ("rollouts", "verified", "scored", "located", "rectified", "train", "eval")
HASH_BUDGET = 1 << 30  # bytes status hashes without --verify (files changed after their manifest)


class Checker:
    """Checks files against their manifests' records; one line per damaged file in `problems`."""

    def __init__(self, root: Path, verify: bool = False):
        self.root, self.verify, self.budget = Path(root), verify, HASH_BUDGET
        self.problems: list[str] = []

    def bad(self, path: Path, why: str) -> bool:
        rel = path.relative_to(self.root) if path.is_relative_to(self.root) else path
        self.problems.append(damaged(path, why, repair_command(rel, self.root)))
        return False

    def intact(self, path: Path, rec: dict[str, Any], since_ns: int) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return self.bad(path, "missing")
        if st.st_size != rec["size"]:
            return self.bad(path, f"{st.st_size} bytes where its manifest records {rec['size']}")
        if not self.verify:
            if st.st_mtime_ns <= since_ns:
                return True
            if st.st_size > self.budget:
                return self.bad(path, "changed after its manifest was written (not hashed; `scope "
                                      "status --verify` compares its content)")
            self.budget -= st.st_size
        if sha256_of(path, rec.get("block")) != rec["sha256"]:
            return self.bad(path, "content differs from its manifest (sha256)")
        return True

    def manifest_intact(self, man: Path, stage_dir: Path, m: dict[str, Any]) -> bool:
        since = man.stat().st_mtime_ns
        files = [(p, r) for p, r in manifest_files(m, stage_dir, self.root) if not pruned(p, self.root)]
        return all([self.intact(p, r, since) for p, r in files])  # (a list: name every damaged file)

    def listed_files(self, marker: Path, folder: Path) -> None:
        """A policy's or the eval sets' marker and the files it records."""
        data, why = json_object(marker)
        why = why or record_lists_problem(data, "files")
        if why is not None:
            self.bad(marker, why)
            return
        since = marker.stat().st_mtime_ns
        for rec in data.get("files", []):
            self.intact(folder / rec["path"], rec, since)


def stage_summary(stage_dir: Path, check: Checker | None = None) -> dict[str, Any]:
    """Sum of the counters of every shard manifest whose output exists (and, with `check`, whose files
    are intact; what is not is added to check.problems)."""
    stage_dir = Path(stage_dir)
    man_dir = stage_dir / "_manifest"
    totals: dict[str, Any] = {"shards": 0, "num_shards": 0, "rows": 0, "seconds": 0.0,
                              "summary": {}, "headline": {}}
    if not man_dir.is_dir():
        return totals
    for path in sorted(man_dir.glob("shard-[0-9][0-9][0-9][0-9][0-9].json")):
        m, why = read_manifest(path)
        if m is None:
            if check is not None:
                check.bad(path, f"not a manifest ({why})")
            continue
        if not (stage_dir / m["output"]["path"]).exists():
            continue
        if check is not None and not check.manifest_intact(path, stage_dir, m):
            continue
        totals["shards"] += 1
        totals["num_shards"] = max(totals["num_shards"], m["num_shards"])
        totals["rows"] += _number(m.get("rows"))
        totals["seconds"] += _number(m.get("seconds"))
        totals["headline"] = m.get("headline") if isinstance(m.get("headline"), dict) else totals["headline"]
        summary = m.get("summary") if isinstance(m.get("summary"), dict) else {}
        for k, v in summary.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                totals["summary"][k] = totals["summary"].get(k, 0) + v
    return totals


def _number(x: Any) -> float:
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else 0


def headline(totals: dict[str, Any]) -> str:
    spec = totals.get("headline") or {}
    if not spec:
        return ""
    values = {**totals["summary"], "rows": totals["rows"]}
    num, den = values.get(spec.get("num")), values.get(spec.get("den"))
    if num is None:
        return ""
    label = spec.get("label", spec["num"])
    text = f"{label} {num / den:.3f}" if den else f"{label} {num}"
    # counters the stage asks to show beside the headline when non-zero (verify: timeout, error)
    extra = [f"{key} {values[key]}" for key in spec.get("show", []) if values.get(key)]
    return ", ".join([text, *extra])


def run_status(root: Path, check: Checker | None = None) -> list[dict[str, Any]]:
    """One row per (round, stage) that has any manifest, plus prompts. With `check`, also the eval
    sets, each eval's summary and the policies are checked."""
    root = Path(root)
    rows = []
    prompts = stage_summary(root / "prompts", check)
    if prompts["shards"]:
        rows.append({"round": "-", "stage": "prompts", **prompts})
    if check is not None and (root / "eval-sets" / "_manifest.json").exists():
        check.listed_files(root / "eval-sets" / "_manifest.json", root / "eval-sets")
    for round_dir in sorted(root.glob("round-[0-9][0-9][0-9]")):
        for folder in STAGE_FOLDERS:
            totals = stage_summary(round_dir / folder, check)
            if totals["shards"]:
                rows.append({"round": str(int(round_dir.name[6:])), "stage": folder, **totals})
        summary = round_dir / "eval" / "_manifest" / "summary.json"
        if check is not None and summary.exists():
            m, why = read_manifest(summary)
            if m is None:
                check.bad(summary, f"not a manifest ({why})")
            else:
                check.manifest_intact(summary, round_dir / "eval", m)
    if check is not None:
        for policy in sorted(root.glob("policy-[0-9][0-9][0-9]")):
            if (policy / "scope-policy.json").exists():
                check.listed_files(policy / "scope-policy.json", policy)
    return rows


def print_status(root: Path, verify: bool = False) -> list[str]:
    """Print the table and one line per damaged file; returns those lines."""
    from rich.table import Table

    from scope_cli.console import make_console

    console = make_console()
    root = Path(root)
    if not (root / "config.toml").exists():
        raise ScopeError(f"{root}: no run here (no config.toml)")
    check = Checker(root, verify)
    table = Table(title=f"run {root}")
    for col in ("round", "stage", "shards", "rows", "seconds", "headline"):
        table.add_column(col, justify="right" if col in ("shards", "rows", "seconds") else "left")
    for row in run_status(root, check):
        table.add_row(row["round"], row["stage"], f"{row['shards']}/{row['num_shards']}",
                      str(row["rows"]), f"{row['seconds']:.1f}", headline(row))
    policies = sorted(p.name for p in root.glob("policy-[0-9][0-9][0-9]")
                      if (p / "scope-policy.json").exists())
    console.print(table)
    console.print(f"policies: {', '.join(policies) or 'none'}")
    for line in check.problems:
        console.print(f"damaged: {line}")
    if check.problems:
        console.print(f"{len(check.problems)} damaged file(s)" + ("" if verify else
                      " (sizes and modification times checked; `scope status --verify` hashes every file)"))
    elif verify:
        console.print("every recorded file matches its sha256")
    return check.problems
