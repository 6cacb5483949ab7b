"""The `scope` command line: one subcommand per stage (prepare, generate, verify, train-step,
prm-score, locate-error, rectify, eval), then the commands on whole runs (report, round, compare,
config, status: scope_cli/cli/run_commands.py).

Every command takes the run (`--run NAME` under ./runs, or a path) and the config layers
(`--config FILE`, `--set section.key=value`, repeatable); the options every command shares, and the
shape of a sharded stage command, are declared once in scope_cli/cli/options.py. Heavy libraries are
imported inside the commands, so `scope --help` and `scope status` answer at once.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from scope_cli.cli import run_commands
from scope_cli.cli.options import (
    Command,
    ConfigOpt,
    ForceOpt,
    Group,
    NumShardsOpt,
    QuietOpt,
    RunOpt,
    SetOpt,
    ShardIndexOpt,
    Slot,
    TrustOpt,
    one_line_errors,
    open_run,
    run_path,
    sharded_stage,
)
from scope_cli.errors import ScopeError

if TYPE_CHECKING:
    from scope_cli.core.runs import Run

app = typer.Typer(
    cls=Group,
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
@sharded_stage()
def generate(the_run: Run, round_: int, *, slot: Slot, force: bool, quiet: bool) -> None:
    """Sample generate.n responses per prompt of round R from policy-(R-1): prompts -> rollouts."""
    from scope_cli.cli.status import stage_summary
    from scope_cli.console import make_console
    from stages.generate import generate as generate_stage

    done = generate_stage(the_run, round_, force=force, worker=slot(), quiet=quiet)
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
@sharded_stage(runs_model=False)  # (math-verify: no torch)
def verify(the_run: Run, round_: int, *, slot: Slot, force: bool, quiet: bool) -> None:
    """Check each rollout's answer with math-verify (pred, correct, reward, verify_status): rollouts -> verified."""
    from scope_cli.cli.status import stage_summary
    from scope_cli.console import make_console
    from stages.verify import verify as verify_stage

    done = verify_stage(the_run, round_, force=force, worker=slot(), quiet=quiet)
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


EvalAgainstOpt = Annotated[Optional[str], typer.Option(
    "--eval-against", help="rule: measure the configured PRM against the task's exact checker "
    "(ProcessBench-style F1) instead of writing scored/")]


@app.command("prm-score")
@sharded_stage(extra={"eval_against": (EvalAgainstOpt, None)})
def prm_score(the_run: Run, round_: int, *, slot: Slot, force: bool, quiet: bool,
              eval_against: str | None) -> None:
    """Split rollouts into steps and score them with a PRM: round-R/verified -> round-R/scored."""
    from stages.prm_score import eval_against_rule, print_eval
    from stages.prm_score import prm_score as prm_score_stage

    if eval_against is not None:
        if eval_against != "rule":
            raise ScopeError(f"--eval-against: expected rule, got {eval_against!r}")
        print_eval(eval_against_rule(the_run, round_))
        return
    prm_score_stage(the_run, round_, force=force, worker=slot(), quiet=quiet)


@app.command("locate-error")
@sharded_stage(runs_model=False)  # (no model)
def locate_error(the_run: Run, round_: int, *, slot: Slot, force: bool, quiet: bool) -> None:
    """Find each failed rollout's first wrong step and pick the rows to salvage: scored -> located."""
    from stages.locate_error import locate_error as locate_stage

    locate_stage(the_run, round_, force=force, worker=slot(), quiet=quiet)


@app.command()
@sharded_stage()
def rectify(the_run: Run, round_: int, *, slot: Slot, force: bool, quiet: bool) -> None:
    """Write the training batch (salvaged rows spliced with a guide's continuation): located -> rectified."""
    from stages.rectify import rectify as rectify_stage

    rectify_stage(the_run, round_, force=force, worker=slot(), quiet=quiet)


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
             "distinct-2[correct]", *(f"distinct_correct@{k}" for k in the_run.config.eval.ks if k >= 2),
             "strategy_entropy[all]", "later_error_share")
    table = Table(title=f"eval {result['policy'].name} -> {result['dir']}")
    table.add_column("metric")
    for name in sets:
        table.add_column(name, justify="right")
    for m in shown:
        if any(m in values for values in sets.values()):
            table.add_row(m, *(f"{values[m]:.3f}" if m in values else "-" for values in sets.values()))
    make_console(quiet=quiet).print(table)


# the commands on whole runs (scope_cli/cli/run_commands.py), listed after the stages
app.command()(run_commands.report)
app.command("round")(run_commands.round_)
app.command()(run_commands.compare)
app.command("config")(run_commands.config_)
app.command()(run_commands.status)

for _info in app.registered_commands:
    if _info.cls in (None, typer.core.TyperCommand):
        _info.cls = Command


def main() -> None:
    # `--set` is spelt set_ in Python; typer maps the option name from the declaration above.
    app(prog_name="scope")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
