"""The consoles every command prints through, and the progress bars of the long stages.

- On a terminal, rich as usual (its width, colours, live bars).
- Piped (a file, a SLURM log, `| grep`), a line is never broken: rich would wrap at 80 columns, so
  one message could land on two lines. Tables are as wide as their content, or `COLUMNS` when set.
- Markup is off: a printed value such as the metric `avg@1[difficulty=5]` or a run folder with
  brackets in its name is shown as it is, never read as a rich style tag. A styled message asks for
  markup on its own print call (and escapes what it prints).

`progress_bars(quiet)` is the one live display of a stage: bars for shards, rows or updates, with
tokens per second where given. Nested calls share the outer display (rich allows one at a time);
`--quiet` and a non-terminal stderr show none.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

PIPED_WIDTH = 1000  # the width of a table printed to a pipe when COLUMNS is not set


def make_console(stderr: bool = False, quiet: bool = False):
    """A rich Console on stdout (or stderr) with markup off; full lines when not a terminal."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if _is_terminal(stream):
        return Console(stderr=stderr, quiet=quiet, markup=False, highlight=False)
    columns = os.environ.get("COLUMNS", "")
    width = int(columns) if columns.isdigit() and int(columns) > 0 else PIPED_WIDTH
    return Console(stderr=stderr, quiet=quiet, markup=False, highlight=False, soft_wrap=True, width=width)


def _is_terminal(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


_ACTIVE: list[Any] = []  # the live Progress, while one is shown


@contextmanager
def progress_bars(quiet: bool = False) -> Iterator[Any]:
    """The stage's rich Progress on stderr (transient: gone when the stage ends). Inside another
    `progress_bars`, the outer one."""
    if _ACTIVE:
        yield _ACTIVE[-1]
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = make_console(stderr=True, quiet=quiet)
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                    console=console, transient=True, disable=quiet or not console.is_terminal)
    _ACTIVE.append(bars)
    try:
        with bars:
            yield bars
    finally:
        _ACTIVE.pop()


def rows_task(bars: Any, description: str, total: int) -> tuple[Any, Callable[[int, int], None]]:
    """A bar over `total` rows with tokens per second; returns (task id, update(rows, new_tokens)),
    the progress callback the generation backends call."""
    task = bars.add_task(description, total=total, rate="")
    start, tokens = time.perf_counter(), [0]

    def update(done: int, new_tokens: int) -> None:
        tokens[0] += new_tokens
        rate = tokens[0] / max(time.perf_counter() - start, 1e-9)
        bars.update(task, advance=done, rate=f"{rate:>8.0f} tok/s")

    return task, update
