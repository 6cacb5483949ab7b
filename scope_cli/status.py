"""`scope status`: a table of a run read only from manifests (nothing heavy is imported)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scope_cli.errors import ScopeError

STAGE_FOLDERS = ("rollouts", "verified", "scored", "located", "rectified", "train", "eval")


def stage_summary(stage_dir: Path) -> dict[str, Any]:
    """Sum of every shard manifest's counters (only shards whose output exists count)."""
    man_dir = Path(stage_dir) / "_manifest"
    totals: dict[str, Any] = {"shards": 0, "num_shards": 0, "rows": 0, "seconds": 0.0,
                              "summary": {}, "headline": {}}
    if not man_dir.is_dir():
        return totals
    for path in sorted(man_dir.glob("*.json")):
        try:
            m = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        output = m.get("output", {}).get("path")
        if output and not (Path(stage_dir) / output).exists():
            continue
        totals["shards"] += 1
        totals["num_shards"] = max(totals["num_shards"], m.get("num_shards", 1))
        totals["rows"] += m.get("rows", 0)
        totals["seconds"] += m.get("seconds", 0.0)
        totals["headline"] = m.get("headline") or totals["headline"]
        for k, v in (m.get("summary") or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                totals["summary"][k] = totals["summary"].get(k, 0) + v
    return totals


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


def run_status(root: Path) -> list[dict[str, Any]]:
    """One row per (round, stage) that has any manifest, plus prompts."""
    root = Path(root)
    rows = []
    prompts = stage_summary(root / "prompts")
    if prompts["shards"]:
        rows.append({"round": "-", "stage": "prompts", **prompts})
    for round_dir in sorted(root.glob("round-[0-9][0-9][0-9]")):
        for folder in STAGE_FOLDERS:
            totals = stage_summary(round_dir / folder)
            if totals["shards"]:
                rows.append({"round": str(int(round_dir.name[6:])), "stage": folder, **totals})
    return rows


def print_status(root: Path) -> None:
    from rich.table import Table

    from scope_cli.console import make_console

    console = make_console()
    root = Path(root)
    if not (root / "config.toml").exists():
        raise ScopeError(f"{root}: no run here (no config.toml)")
    table = Table(title=f"run {root}")
    for col in ("round", "stage", "shards", "rows", "seconds", "headline"):
        table.add_column(col, justify="right" if col in ("shards", "rows", "seconds") else "left")
    for row in run_status(root):
        table.add_row(row["round"], row["stage"], f"{row['shards']}/{row['num_shards']}",
                      str(row["rows"]), f"{row['seconds']:.1f}", headline(row))
    policies = sorted(p.name for p in root.glob("policy-[0-9][0-9][0-9]")
                      if (p / "scope-policy.json").exists())
    console.print(table)
    console.print(f"policies: {', '.join(policies) or 'none'}")
