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

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="SCOPE: RL from verifiable rewards with step-wise off-policy rectification, as offline stages.",
)

RunOpt = Annotated[str, typer.Option("--run", "-r", help="run name (under $SCOPE_RUNS_DIR or ./runs) or path")]
ConfigOpt = Annotated[Optional[str], typer.Option("--config", "-c", help="TOML config file")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override: section.key=value")]
ForceOpt = Annotated[bool, typer.Option("--force", help="accept a changed config; recompute done shards")]
RoundOpt = Annotated[int, typer.Option("--round", "-R", help="round number (1-based)")]
ShardIndexOpt = Annotated[Optional[int], typer.Option("--shard-index", help="this worker's index")]
NumShardsOpt = Annotated[Optional[int], typer.Option("--num-shards", help="number of workers")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")]


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print a ScopeError as one red line on stderr and exit 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ScopeError as exc:
            from rich.console import Console

            Console(stderr=True, highlight=False).print(f"[red]error:[/red] {exc}", soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def run_path(run: str):
    from scope_cli.runs import run_root

    return run_root(run, os.environ.get("SCOPE_RUNS_DIR", "runs"))


def open_run(run: str, config: str | None, overrides: list[str] | None, force: bool, create: bool = False):
    from scope_cli.runs import Run

    return Run.open(run_path(run), config, overrides or [], force=force, create=create)


@app.command()
@one_line_errors
def prepare(
    run: RunOpt = "default",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Create a run: training prompts, held-out eval sets and policy-000 (the base policy)."""
    from rich.console import Console

    from stages.prepare import prepare as prepare_stage

    the_run = open_run(run, config, set_, force, create=True)
    summary = prepare_stage(the_run, force=force, quiet=quiet)
    console = Console()
    for key, value in summary.items():
        console.print(f"  {key}: {value}")
    console.print(f"prepared {the_run.root}")


@app.command()
@one_line_errors
def status(run: RunOpt = "default") -> None:
    """Shards done, rows, seconds and the headline metric of every stage of a run (reads manifests)."""
    from scope_cli.status import print_status

    print_status(run_path(run))


def main() -> None:
    # `--set` is spelt set_ in Python; typer maps the option name from the declaration above.
    app(prog_name="scope")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
