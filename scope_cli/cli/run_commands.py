"""The commands on whole runs: `scope report`, `round`, `compare`, `config` and `status`. Each is a
plain function with its typer options; scope_cli/cli/app.py registers them after the stage commands.
Heavy libraries are imported inside each command.
"""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from scope_cli.cli.options import (
    ConfigOpt,
    ForceOpt,
    QuietOpt,
    RunOpt,
    SetOpt,
    TrustOpt,
    one_line_errors,
    open_run,
    peek_run,
    run_path,
)
from scope_cli.errors import ScopeError

# the arms `scope compare` runs by default, the headline of docs/RESULTS.md: GRPO, GRPO with dynamic
# sampling, luffy_matched (SCOPE's rows, the guide writes the whole solution), vppo (the PRM's first
# error, no guide), SCOPE with the oracle guide and with the LM guide. `--algos grpo,luffy,scope` runs
# the three arms of the first recorded tables.
DEFAULT_ARMS = ("grpo,grpo-ds=grpo,generate.oversample=2,luffy_matched,vppo,scope,"
                "scope-model=scope,rectify.guide=model,rectify.guide_path=data/policies/arith-guide")


@one_line_errors
def report(
    runs: Annotated[list[str], typer.Argument(help="run names (under $SCOPE_RUNS_DIR or ./runs) or paths")],
    out: Annotated[Optional[str], typer.Option(
        "--out", "-o", help="folder for report.png, report.pdf and report.md "
                            "(default: reports/<run>-vs-<run> in the current folder)")] = None,
    title: Annotated[Optional[str], typer.Option("--title", help="the figure's title")] = None,
) -> None:
    """One figure (accuracy, pass@k, diversity, entropy against optimizer updates; PNG and PDF) and
    one markdown table comparing runs. A run without an eval is skipped and named."""
    from scope_cli.cli.report import report as write_report

    result = write_report([run_path(r) for r in runs], out, title)
    typer.echo(result["table"])
    for skipped in result["skipped"]:
        typer.echo(f"skipped {skipped}")
    typer.echo(f"wrote {result['png']}, {result['pdf']} and {result['markdown']}")


@one_line_errors
def round_(
    target: Annotated[int, typer.Argument(help="bring the run to this round (runs every unfinished round)")],
    run: RunOpt = "default",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    isolate: Annotated[Optional[bool], typer.Option(
        "--isolate/--no-isolate", help="one subprocess per stage (default: round.isolate)")] = None,
    workers: Annotated[Optional[int], typer.Option(
        "--workers", help="one node: run generate, prm-score, rectify and eval as N worker processes "
        "claiming shards (sets round.workers; with CUDA, one worker per GPU of round.devices instead)")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="list per round and stage what would run and what is done; run nothing")] = False,
    quiet: QuietOpt = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Run the seven stages of every unfinished round up to TARGET (and the round-0 baseline eval).

    One node: scope round 2 --run demo --workers 2   (CUDA: one worker per GPU, round.devices)

    Many nodes: scope round 2 --run /shared/q7 --set round.launcher=ray   (+ --set round.train_nodes=K)

    Workers claim shards; never more workers than shards (generate.prompts_per_shard)."""
    from scope_cli.cli.rounds import bring_to_round, round_table
    from scope_cli.console import make_console

    set_ = [*(set_ or []), *([f"round.workers={workers}"] if workers is not None else [])]

    if dry_run:
        from scope_cli.cli.rounds import dry_run as plan
        from scope_cli.core.config import differing_keys
        from scope_cli.core.runs import config_changed

        stored = peek_run(run, None, None)
        the_run = peek_run(run, config, [*(set_ or []), *(["policy.trust_remote_code=true"]
                                                         if trust_remote_code else [])])
        changed = differing_keys(stored.config, the_run.config)
        if changed and not force:  # as the real command would refuse
            raise config_changed(the_run.root / "config.toml", stored.config, the_run.config, changed)
        console = make_console()
        console.print(f"{the_run.root}: round {target}, dry run (nothing is run)")
        for r, stage, what in plan(the_run, target):
            console.print(f"  round {r:<3} {stage:<13} {what}")
        return
    the_run = open_run(run, config, set_, force, trust_remote_code=trust_remote_code)
    ran = bring_to_round(the_run, target, quiet=quiet, isolate=isolate)
    console = make_console()
    console.print(f"{the_run.root}: round {target} " + ("done" if ran else "already done"))
    for row in round_table(the_run, target):
        shown = {k: v for k, v in row.items() if k == "round" or k.endswith(("greedy_acc", "pass@8"))}
        console.print("  " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in shown.items()))


@one_line_errors
def compare(
    rounds: Annotated[int, typer.Option("--rounds", help="rounds per arm")] = 8,
    seeds: Annotated[int, typer.Option("--seeds", help="seeds per arm (0..seeds-1)")] = 3,
    name: Annotated[str, typer.Option("--name", help="prefix of the arms' run names")] = "mini",
    algos: Annotated[list[str], typer.Option(
        "--algos", help="comma-separated arms: a run.algo value, or name=algo followed by its own "
        "section.key=value settings (grpo,scope,scope-split=scope,train.advantage=grpo_split); "
        "repeatable")] = [DEFAULT_ARMS],  # noqa: B006 (typer reads it, nothing mutates it)
    jobs: Annotated[int, typer.Option("--jobs", help="arms run at once (default: CPU count)")] = 0,
    out_dir: Annotated[Optional[str], typer.Option(
        "--out", help="folder for table.md, table.parquet, curves.png and the arms' logs (default: "
        "<runs>/<name>-compare); several compares can share arms' runs (same --name) and keep their own "
        "tables")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """The miniature experiment: GRPO vs LUFFY vs SCOPE (or any arms), same start and prompts, several
    seeds; every arm paired against grpo and scope."""
    from pathlib import Path

    import polars as pl

    from scope_cli.cli import compare as cmp
    from scope_cli.console import make_console
    from scope_cli.core.files import write_parquet_atomic, write_text_atomic

    arms = cmp.parse_arms(algos)
    cmp.check_arms(arms, config, set_ or [])
    names = [a.name for a in arms]
    runs_dir = Path(os.environ.get("SCOPE_RUNS_DIR", "runs"))
    seed_list = list(range(seeds))
    out = Path(out_dir) if out_dir else runs_dir / f"{name}-compare"
    codes = cmp.run_arms(name, arms, seed_list, rounds, config, set_ or [], jobs or os.cpu_count() or 1,
                         runs_dir, out / "logs")
    failed = [r for r, c in codes.items() if c != 0]
    if failed:
        raise ScopeError(f"compare: arms failed: {', '.join(failed)} (logs in {out / 'logs'})")
    table = cmp.summarise(name, names, seed_list, rounds, runs_dir)
    columns = names + [f"{a}-{b}" for a, b in cmp.paired_columns(names)]
    markdown = cmp.to_markdown(table, columns)
    write_parquet_atomic(pl.DataFrame(table).to_arrow(), out / "table.parquet")
    write_text_atomic(f"# {name}: {'; '.join(a.spec for a in arms)}; {seeds} seeds; round {rounds}\n\n"
                      f"{markdown}", out / "table.md")
    cmp.plot_curves(name, names, seed_list, runs_dir, out / "curves.png",
                    ("greedy_acc", "avg@1", "pass@8", "distinct_correct@8", "strategy_entropy[all]",
                     "later_error_share"))
    console = make_console()  # markup off: `avg@1[difficulty=5]` is printed as it is
    console.print(markdown)
    console.print(f"wrote {out / 'table.md'}, {out / 'table.parquet'}, {out / 'curves.png'}")


@one_line_errors
def config_(
    run: Annotated[Optional[str], typer.Option(
        "--run", "-r", help="run name or path (default: no run, the built-in defaults)")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    changed: Annotated[bool, typer.Option("--changed", help="only the keys that differ from the defaults")] = False,
) -> None:
    """Print a run's resolved config as TOML (with --config/--set applied, nothing written); a key that
    differs from the built-in default ends with `# default: VALUE`, an operational one says (op)."""
    from scope_cli.core.config import load_config, to_toml_marked

    if run is not None:
        cfg, origin = peek_run(run, config, set_).config, f"the config of {run_path(run)}"
    else:
        cfg, origin = load_config(config, set_ or []), "the built-in defaults"
    layers = "".join(f" < {x}" for x in (config and "--config", set_ and "--set") if x)
    typer.echo(f"# {origin}{layers}")
    typer.echo(to_toml_marked(cfg, changed_only=changed), nl=False)


@one_line_errors
def status(
    run: RunOpt = "default",
    verify: Annotated[bool, typer.Option(
        "--verify", help="hash every recorded file (default: sizes and modification times; files "
        "changed since written are hashed)")] = False,
) -> None:
    """Shards done, rows, seconds and the headline metric of every stage of a run (reads manifests), and
    every damaged file with the command that recomputes it (exit code 1 when there is one)."""
    from scope_cli.cli.status import print_status

    if print_status(run_path(run), verify=verify):
        raise typer.Exit(1)
