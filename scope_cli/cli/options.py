"""What the `scope` commands share: their typer options (declared once here), the one-line error
wrapper, opening the run that --run/--config/--set/--force name, and the shape of a sharded stage
command (`sharded_stage`: --round, the run options, --shard-index/--num-shards, --quiet and, where the
stage runs a model, --trust-remote-code). The commands themselves are in scope_cli/cli/app.py.
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional

import typer

from scope_cli.errors import ScopeError

if TYPE_CHECKING:
    from scope_cli.core.runs import Run


class _FlagsAsFlags:
    """Help that shows a boolean flag as a flag (`--force`), not as taking a value (`--force <bool>`)."""

    def get_params(self, ctx):  # type: ignore[no-untyped-def]
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class Command(_FlagsAsFlags, typer.core.TyperCommand):
    pass


class Group(_FlagsAsFlags, typer.core.TyperGroup):
    pass


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
Slot = Callable[[], tuple[int, int]]  # this worker's (index, count), read when called (sharded_stage)


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


def run_path(run: str) -> Path:
    from scope_cli.core.runs import run_root

    return run_root(run, os.environ.get("SCOPE_RUNS_DIR", "runs"))


def open_run(run: str, config: str | None, overrides: list[str] | None, force: bool, create: bool = False,
             trust_remote_code: bool = False, torch_threads: bool = True) -> Run:
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


def peek_run(run: str, config: str | None, overrides: list[str] | None) -> Run:
    """The run with --config/--set applied, writing nothing (for `scope config`, `--dry-run`)."""
    from scope_cli.core.config import from_dict, load_config, read_toml
    from scope_cli.core.runs import Run, RunError, run_command

    root = run_path(run)
    stored = root / "config.toml"
    if not stored.exists():
        raise RunError(f"{root}: no run here (no config.toml); create it with `{run_command(root, 'prepare')}`")
    base = from_dict(read_toml(stored), str(stored))
    return Run(root, load_config(config, overrides, base=base) if config or overrides else base)


def sharded_stage(runs_model: bool = True, extra: dict[str, tuple[Any, Any]] | None = None
                  ) -> Callable[[Callable[..., None]], Callable[..., Any]]:
    """Make `body(the_run, round_, *, slot, force, quiet, **extra)` a command taking the options of
    every sharded stage, in this order: --round, --run, --config, --set, --force, --shard-index,
    --num-shards, the `extra` options ({name: (annotation, default)}), --quiet, and --trust-remote-code
    where the stage runs a model (`runs_model`, which also sets torch's CPU threads). The command opens
    the run and calls the body; `slot()` is this worker's (index, count) from --shard-index/--num-shards
    or the environment, read when called. The body's name and docstring are the command's."""

    def decorate(body: Callable[..., None]) -> Callable[..., None]:
        def command(**opts: Any) -> None:
            the_run = open_run(opts["run"], opts["config"], opts["set_"], opts["force"],
                               trust_remote_code=opts.get("trust_remote_code", False),
                               torch_threads=runs_model)
            from scope_cli.core.shards import worker_slot

            body(the_run, opts["round_"], slot=lambda: worker_slot(opts["shard_index"], opts["num_shards"]),
                 force=opts["force"], quiet=opts["quiet"], **{name: opts[name] for name in extra or {}})

        # typer reads a command's options from its signature: build it from the declarations above
        options = [("round_", RoundOpt, inspect.Parameter.empty), ("run", RunOpt, "default"),
                   ("config", ConfigOpt, None), ("set_", SetOpt, None), ("force", ForceOpt, False),
                   ("shard_index", ShardIndexOpt, None), ("num_shards", NumShardsOpt, None),
                   *((name, annotation, default) for name, (annotation, default) in (extra or {}).items()),
                   ("quiet", QuietOpt, False), *([("trust_remote_code", TrustOpt, False)] if runs_model else [])]
        command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
             for name, annotation, default in options])
        command.__name__, command.__qualname__, command.__doc__ = body.__name__, body.__qualname__, body.__doc__
        return one_line_errors(command)

    return decorate
