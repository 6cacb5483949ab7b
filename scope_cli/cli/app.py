"""The `scope` command line: one subcommand per stage, plus prepare and status.

Every command takes the run (`--run NAME` under ./runs, or a path) and the config layers
(`--config FILE`, `--set section.key=value`, repeatable). Heavy libraries are imported inside the
commands, so `scope --help` and `scope status` answer at once.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Annotated, Any, Callable, Optional

import typer

from scope_cli.errors import ScopeError


class _FlagsAsFlags:
    """Help that shows a boolean flag as a flag (`--force`), not as taking a value (`--force <bool>`)."""

    def get_params(self, ctx):  # type: ignore[no-untyped-def]
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class _Command(_FlagsAsFlags, typer.core.TyperCommand):
    pass


class _Group(_FlagsAsFlags, typer.core.TyperGroup):
    pass


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    help="SCOPE: RL from verifiable rewards with step-wise off-policy rectification, as offline stages.",
)


def _version(value: bool) -> None:
    if value:
        from scope_cli import __version__

        typer.echo(f"scope-rl {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """SCOPE: RL from verifiable rewards with step-wise off-policy rectification, as offline stages."""


RunOpt = Annotated[str, typer.Option("--run", "-r", help="run name (under $SCOPE_RUNS_DIR or ./runs) or path")]
ConfigOpt = Annotated[Optional[str], typer.Option("--config", "-c", help="TOML config file")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override: section.key=value")]
ForceOpt = Annotated[bool, typer.Option("--force", help="accept a changed config; recompute done shards")]
RoundOpt = Annotated[int, typer.Option("--round", "-R", help="round number (1-based)")]
ShardIndexOpt = Annotated[Optional[int], typer.Option("--shard-index", help="this worker's index")]
NumShardsOpt = Annotated[Optional[int], typer.Option("--num-shards", help="number of workers")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-remote-code", help="allow models whose folder ships Python code to run it (sets "
    "policy.trust_remote_code; off by default: such code can do anything)")]


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a ScopeError as one red line on stderr and exit 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ScopeError, OSError) as exc:  # OSError: a full disk, a permission, a vanished file
            from rich.markup import escape

            from scope_cli.console import make_console

            make_console(stderr=True).print(f"[red]error:[/red] {escape(str(exc))}", markup=True,
                                            soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def run_path(run: str):
    from scope_cli.core.runs import run_root

    return run_root(run, os.environ.get("SCOPE_RUNS_DIR", "runs"))


def open_run(run: str, config: str | None, overrides: list[str] | None, force: bool, create: bool = False,
             trust_remote_code: bool = False, torch_threads: bool = True):
    """Open the run, check that its loggers can run and, for a command that runs a model, set torch's
    CPU threads (train.threads): the same for every command, alone or inside `scope round`."""
    from scope_cli.core.loggers import check_loggers
    from scope_cli.core.runs import Run

    overrides = [*(overrides or []), *(["policy.trust_remote_code=true"] if trust_remote_code else [])]
    the_run = Run.open(run_path(run), config, overrides, force=force, create=create)
    check_loggers(the_run.config.run.loggers)
    if torch_threads:
        from scope_cli.backends.training import set_threads

        set_threads(the_run.config.train.threads)
    return the_run


def peek_run(run: str, config: str | None, overrides: list[str] | None):
    """The run with --config/--set applied, writing nothing (for `scope config`, `--dry-run`)."""
    from scope_cli.core.config import from_dict, load_config, read_toml
    from scope_cli.core.runs import Run, RunError, run_command

    root = run_path(run)
    stored = root / "config.toml"
    if not stored.exists():
        raise RunError(f"{root}: no run here (no config.toml); create it with `{run_command(root, 'prepare')}`")
    base = from_dict(read_toml(stored), str(stored))
    return Run(root, load_config(config, overrides, base=base) if config or overrides else base)


@app.command()
@one_line_errors
def prepare(
    run: RunOpt = "default",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Create a run: training prompts, held-out eval sets and policy-000 (the base policy)."""
    from scope_cli.console import make_console
    from stages.prepare import discard_new_run
    from stages.prepare import prepare as prepare_stage

    root = run_path(run)
    existed = root.exists()
    # only a run this command creates (in a new or an empty folder) is removed again if it fails
    fresh = not existed or (root.is_dir() and not any(root.iterdir()))
    try:
        the_run = open_run(run, config, set_, force, create=True, trust_remote_code=trust_remote_code)
        summary = prepare_stage(the_run, force=force, quiet=quiet)
    except BaseException:
        if fresh:  # a failed first prepare leaves no run behind for a corrected retry to trip over
            discard_new_run(root, keep_folder=existed)
        raise
    console = make_console()
    if summary.pop("skipped", None):
        console.print(f"prepare: {the_run.root}: done earlier, skipped")
    for key, value in summary.items():
        console.print(f"  {key}: {value}")
    console.print(f"prepared {the_run.root}")


@app.command()
@one_line_errors
def generate(
    round_: RoundOpt,
    run: RunOpt = "default",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    shard_index: ShardIndexOpt = None,
    num_shards: NumShardsOpt = None,
    quiet: QuietOpt = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Sample generate.n responses per prompt of round R from policy-(R-1): prompts -> rollouts."""
    from scope_cli.console import make_console
    from scope_cli.core.shards import worker_slot
    from scope_cli.cli.status import stage_summary
    from stages.generate import generate as generate_stage

    the_run = open_run(run, config, set_, force, trust_remote_code=trust_remote_code)
    done = generate_stage(the_run, round_, force=force, worker=worker_slot(shard_index, num_shards),
                          quiet=quiet)
    if not done.computed:  # it said what it skipped; the totals below would be an earlier run's
        return
    totals = stage_summary(the_run.stage_dir(round_, "rollouts"))
    tokens, rows, seconds = totals["summary"].get("tokens", 0), totals["rows"], totals["seconds"]
    make_console(stderr=True, quiet=quiet).print(
        f"generate: round {round_}: {totals['shards']}/{totals['num_shards']} shards, {rows} rows, "
        f"{tokens / max(rows, 1):.1f} tokens/row, {totals['summary'].get('length', 0)} cut at max_tokens, "
        f"{totals['summary'].get('prompt_too_long', 0)} prompts skipped as longer than the model's context, "
        f"{tokens / max(seconds, 1e-9):.0f} tokens/s")


@app.command()
@one_line_errors
def verify(
    round_: RoundOpt,
    run: RunOpt = "default",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    shard_index: ShardIndexOpt = None,
    num_shards: NumShardsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Check each rollout's answer with math-verify (pred, correct, reward, verify_status): rollouts -> verified."""
    from scope_cli.console import make_console
    from scope_cli.core.shards import worker_slot
    from scope_cli.cli.status import stage_summary
    from stages.verify import verify as verify_stage

    the_run = open_run(run, config, set_, force, torch_threads=False)  # (math-verify: no torch)
    done = verify_stage(the_run, round_, force=force, worker=worker_slot(shard_index, num_shards),
                        quiet=quiet)
    if not done.computed:  # it said what it skipped; the totals below would be an earlier run's
        return
    totals = stage_summary(the_run.stage_dir(round_, "verified"))
    s, rows = totals["summary"], totals["rows"]
    counts = ", ".join(f"{k} {s.get(k, 0)}" for k in ("ok", "no_answer", "timeout", "error"))
    make_console(stderr=True, quiet=quiet).print(
        f"verify: round {round_}: {totals['shards']}/{totals['num_shards']} shards, {rows} rows, "
        f"acc {s.get('correct', 0) / max(rows, 1):.3f} ({counts}), "
        f"{rows / max(totals['seconds'], 1e-9):.0f} items/s")


@app.command("train-step")
@one_line_errors
def train_step(
    run: RunOpt = "default",
    round_: Annotated[Optional[int], typer.Option("--round", "-R", help="round number (1-based; rl)")] = None,
    objective: Annotated[str, typer.Option("--objective", help="rl (a round's update) | sft (bootstrap "
                                           "a tiny policy from scratch)")] = "rl",
    out: Annotated[Optional[str], typer.Option("--out", help="sft: the policy folder to write")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Train: round R's RL update (policy-(R-1) + rectified batch -> policy-R; torchrun for DDP/FSDP2),
    or `--objective sft --out DIR` to build a tiny arith policy from scratch."""
    from scope_cli.console import make_console
    from scope_cli.errors import ScopeError

    if objective == "sft":
        if not out:
            raise ScopeError("train-step --objective sft: --out DIR (the policy folder to write) is required")
        from scope_cli.core.config import load_config
        from scope_cli.models.sft import sft

        result = sft(load_config(config, set_ or []), out, quiet=quiet)
        make_console().print(f"wrote {out}: greedy accuracy {result['monitor_accuracy']:.3f} at step "
                             f"{result['step']} ({result['seconds_per_step']:.3f} s/step, "
                             f"{result['seconds']:.0f}s in all)")
        return
    if objective != "rl":
        raise ScopeError(f"--objective: expected rl or sft, got {objective!r}")
    if round_ is None:
        raise ScopeError("train-step --objective rl: --round R is required")
    from stages.train_step import train_step as train_stage

    the_run = open_run(run, config, set_, force, trust_remote_code=trust_remote_code)
    train_stage(the_run, round_, force=force, quiet=quiet)  # says "done earlier, skipped" itself


@app.command("prm-score")
@one_line_errors
def prm_score(
    round_: RoundOpt,
    run: RunOpt = "default",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    shard_index: ShardIndexOpt = None,
    num_shards: NumShardsOpt = None,
    eval_against: Annotated[Optional[str], typer.Option(
        "--eval-against", help="rule: measure the configured PRM against the task's exact checker "
        "(ProcessBench-style F1) instead of writing scored/")] = None,
    quiet: QuietOpt = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Split rollouts into steps and score them with a PRM: round-R/verified -> round-R/scored."""
    from scope_cli.errors import ScopeError
    from scope_cli.core.shards import worker_slot
    from stages.prm_score import eval_against_rule, print_eval
    from stages.prm_score import prm_score as prm_score_stage

    the_run = open_run(run, config, set_, force, trust_remote_code=trust_remote_code)
    if eval_against is not None:
        if eval_against != "rule":
            raise ScopeError(f"--eval-against: expected rule, got {eval_against!r}")
        print_eval(eval_against_rule(the_run, round_))
        return
    prm_score_stage(the_run, round_, force=force, worker=worker_slot(shard_index, num_shards),
                    quiet=quiet)


@app.command("locate-error")
@one_line_errors
def locate_error(
    round_: RoundOpt,
    run: RunOpt = "default",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    shard_index: ShardIndexOpt = None,
    num_shards: NumShardsOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Find each failed rollout's first wrong step and pick the rows to salvage: scored -> located."""
    from scope_cli.core.shards import worker_slot
    from stages.locate_error import locate_error as locate_stage

    the_run = open_run(run, config, set_, force, torch_threads=False)  # (no model)
    locate_stage(the_run, round_, force=force, worker=worker_slot(shard_index, num_shards), quiet=quiet)


@app.command()
@one_line_errors
def rectify(
    round_: RoundOpt,
    run: RunOpt = "default",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    shard_index: ShardIndexOpt = None,
    num_shards: NumShardsOpt = None,
    quiet: QuietOpt = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Write the training batch (salvaged rows spliced with a guide's continuation): located -> rectified."""
    from scope_cli.core.shards import worker_slot
    from stages.rectify import rectify as rectify_stage

    the_run = open_run(run, config, set_, force, trust_remote_code=trust_remote_code)
    rectify_stage(the_run, round_, force=force, worker=worker_slot(shard_index, num_shards), quiet=quiet)


@app.command("eval")
@one_line_errors
def eval_(
    run: RunOpt = "default",
    round_: Annotated[Optional[int], typer.Option(
        "--round", "-R", help="evaluate policy-R (0: the base policy) into round-R/eval/")] = None,
    policy: Annotated[Optional[str], typer.Option("--policy", help="evaluate this policy folder instead")] = None,
    out: Annotated[Optional[str], typer.Option(
        "--out", help="with --policy: the folder to write (default <run>/eval-<folder name>)")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    shard_index: ShardIndexOpt = None,
    num_shards: NumShardsOpt = None,
    quiet: QuietOpt = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Greedy accuracy, pass@k, maj@k and diversity of a policy on the run's held-out sets."""
    from pathlib import Path

    from rich.table import Table

    from scope_cli.console import make_console
    from scope_cli.core.shards import worker_slot
    from stages.eval import evaluate

    the_run = open_run(run, config, set_, force, trust_remote_code=trust_remote_code)
    result = evaluate(the_run, round_, policy=Path(policy) if policy else None,
                      out_dir=Path(out) if out else None, force=force,
                      worker=worker_slot(shard_index, num_shards), quiet=quiet)
    console = make_console(stderr=True, quiet=quiet)
    if result["summary"] is None:
        console.print(f"eval: {result['dir']}: computed {', '.join(result['computed']) or 'nothing'}; "
                      "other sets are still running in other workers")
        return
    sets = {name: values for name, values in result["metrics"].items() if name != "train"}
    shown = ("greedy_acc", "avg@1", *(f"pass@{k}" for k in the_run.config.eval.ks),
             *(f"maj@{k}" for k in the_run.config.eval.ks), "distinct_correct_norm", "distinct-2",
             "later_error_share")
    table = Table(title=f"eval {result['policy'].name} -> {result['dir']}")
    table.add_column("metric")
    for name in sets:
        table.add_column(name, justify="right")
    for m in shown:
        if any(m in values for values in sets.values()):
            table.add_row(m, *(f"{values[m]:.3f}" if m in values else "-" for values in sets.values()))
    make_console(quiet=quiet).print(table)


@app.command()
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


@app.command("round")
@one_line_errors
def round_(
    target: Annotated[int, typer.Argument(help="bring the run to this round (runs every unfinished round)")],
    run: RunOpt = "default",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    isolate: Annotated[Optional[bool], typer.Option(
        "--isolate/--no-isolate", help="one subprocess per stage (default: round.isolate)")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="list per round and stage what would run and what is done; run nothing")] = False,
    quiet: QuietOpt = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Run the seven stages of every unfinished round up to TARGET (and the round-0 baseline eval)."""
    from scope_cli.console import make_console
    from scope_cli.cli.rounds import bring_to_round, round_table

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


@app.command()
@one_line_errors
def compare(
    rounds: Annotated[int, typer.Option("--rounds", help="rounds per arm")] = 8,
    seeds: Annotated[int, typer.Option("--seeds", help="seeds per arm (0..seeds-1)")] = 3,
    name: Annotated[str, typer.Option("--name", help="prefix of the arms' run names")] = "mini",
    algos: Annotated[str, typer.Option("--algos", help="comma-separated arms")] = "grpo,luffy,scope",
    jobs: Annotated[int, typer.Option("--jobs", help="arms run at once (default: CPU count)")] = 0,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """The miniature experiment: GRPO vs LUFFY vs SCOPE, same start and prompts, several seeds."""
    from pathlib import Path

    import polars as pl

    from scope_cli.cli import compare as cmp
    from scope_cli.console import make_console
    from scope_cli.core.files import write_parquet_atomic, write_text_atomic

    arms = [a.strip() for a in algos.split(",") if a.strip()]
    bad = [a for a in arms if a not in ("grpo", "luffy", "scope")]
    if bad:
        raise ScopeError(f"--algos: unknown arm {', '.join(bad)} (expected grpo, luffy, scope)")
    runs_dir = Path(os.environ.get("SCOPE_RUNS_DIR", "runs"))
    seed_list = list(range(seeds))
    codes = cmp.run_arms(name, arms, seed_list, rounds, config, set_ or [], jobs or os.cpu_count() or 1,
                         runs_dir)
    failed = [r for r, c in codes.items() if c != 0]
    if failed:
        raise ScopeError(f"compare: arms failed: {', '.join(failed)} (logs in {runs_dir / (name + '-compare') / 'logs'})")
    out = runs_dir / f"{name}-compare"
    table = cmp.summarise(name, arms, seed_list, rounds, runs_dir)
    columns = arms + [f"scope-{a}" for a in arms if a != "scope" and "scope" in arms]
    markdown = cmp.to_markdown(table, columns)
    write_parquet_atomic(pl.DataFrame(table).to_arrow(), out / "table.parquet")
    write_text_atomic(f"# {name}: {', '.join(arms)}; {seeds} seeds; round {rounds}\n\n{markdown}", out / "table.md")
    cmp.plot_curves(name, arms, seed_list, runs_dir, out / "curves.png",
                    ("greedy_acc", "avg@1", "pass@8", "distinct_correct_norm", "later_error_share"))
    console = make_console()  # markup off: `avg@1[difficulty=5]` is printed as it is
    console.print(markdown)
    console.print(f"wrote {out / 'table.md'}, {out / 'table.parquet'}, {out / 'curves.png'}")


@app.command("config")
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


@app.command()
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


for _info in app.registered_commands:
    if _info.cls in (None, typer.core.TyperCommand):
        _info.cls = _Command


def main() -> None:
    # `--set` is spelt set_ in Python; typer maps the option name from the declaration above.
    app(prog_name="scope")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
