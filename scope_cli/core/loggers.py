"""Live curves: each round's training and eval metrics as TensorBoard event files (and wandb, optionally).

    tensorboard --logdir runs                     # every run side by side
    tensorboard --logdir runs/NAME/tensorboard    # one run

`run.loggers` (operational; default ["tensorboard"]) says where. The points come from the Parquet the
stages already write, read after train-step and after eval (both call `log_rounds` at their end, also
when they find their work done earlier; `scope round` calls it for every round at the end, which
also fills in the curves of a run made before it logged):

- ``train/<column>``: round-R/train/metrics.parquet, one point per optimizer update (loss, lr,
  entropy, clip_fraction, mean_ratio, grad_norm, on/off-policy tokens, ...);
- ``eval/<set>/<metric>``: round-R/eval/summary.parquet (greedy_acc, avg@1, pass@k, maj@k, accuracy by
  difficulty, diversity);
- ``round/<metric>``: round-R/eval/training.parquet (rollout accuracy, salvaged and rectified rows,
  update-averaged entropy, ...).

The step of every point is the global optimizer update count, as `scope report` plots against: an
update's own count, and for round R's eval the count after round R's last update (0 for the base).

A point is never written twice. TensorBoard: one event file per (round, kind) with a fixed name,
``events.out.tfevents.rNNNNN.1-train`` / ``.rNNNNN.2-eval`` (names sort in the order a run writes them,
as TensorBoard's reader expects), built whole in memory and renamed into place. ``_logged.json`` in the
same folder records the sha256 of each file's sources; a rerun or a resumed round finds them
unchanged and writes nothing, and a recomputed round (`--force`) replaces its file instead of adding
to it (a TensorBoard already showing the old points keeps them until it is restarted). wandb: each
(round, kind) is logged once, into one run per run folder (resumed by id), recorded in
``wandb/scope-logged.json`` after it is sent; a recomputed round is not sent again. wandb runs
offline unless WANDB_MODE says otherwise (`wandb sync runs/NAME/wandb/offline-run-*` uploads later);
WANDB_PROJECT names the project (default scope-rl).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scope_cli.errors import ScopeError

TB_DIR = "tensorboard"
LEDGER = "_logged.json"
WANDB_LEDGER = "scope-logged.json"
SKIP_COLUMNS = ("round", "update", "epoch", "minibatch")  # train/metrics.parquet: not curves
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class LoggerError(ScopeError):
    """A logger that cannot run (its package is missing): one line naming run.loggers."""


@dataclass
class Points:
    """One (round, kind)'s points: name (``r00003.1-train``), sources, wall time, [(step, {tag: value})]."""

    name: str
    sources: list[Path]
    wall_time: float
    steps: list[tuple[int, dict[str, float]]]


def check_loggers(loggers: list[str]) -> None:
    """Fail early, in one line, when a listed logger's package is not importable."""
    for name in loggers:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            extra = ("; it is a dependency of scope-rl: pip install tensorboard" if name == "tensorboard"
                     else "; install it (pip install wandb) or leave it out: --set run.loggers=tensorboard")
            raise LoggerError(f"run.loggers: {name!r} is listed but the {PACKAGES[name]} package is not "
                              f"importable{extra}")


# ---- points from the Parquet --------------------------------------------------------------------------
def _read(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def train_points(run: Any, round_: int) -> Points | None:
    """round-R/train/metrics.parquet: one step per update, every numeric column as train/<column>."""
    path = run.train_dir(round_) / "metrics.parquet"
    if not path.exists():
        return None
    steps = []
    for row in _read(path):
        values = {f"train/{k}": v for k, raw in row.items() if k not in SKIP_COLUMNS
                  and (v := _number(raw)) is not None}
        steps.append((int(row["update"]), values))
    return Points(f"r{round_:05d}.1-train", [path], path.stat().st_mtime, steps)


def updates_after(run: Any, round_: int) -> tuple[int, Path | None] | None:
    """The global update count after round R and the metrics file it comes from: round R's last
    update (an earlier round's when R made none; 0 for the base policy). None before R has trained."""
    for r in range(round_, 0, -1):
        path = run.train_dir(r) / "metrics.parquet"
        if not path.exists():
            if r == round_:
                return None
            continue
        rows = _read(path)
        if rows:
            return max(int(row["update"]) for row in rows), path
    return 0, None


def eval_points(run: Any, round_: int) -> Points | None:
    """round-R/eval/summary.parquet as eval/<set>/<metric> and training.parquet as round/<metric>,
    at the update count after round R."""
    summary = run.eval_dir(round_) / "summary.parquet"
    after = updates_after(run, round_)
    if not summary.exists() or after is None:
        return None
    step, step_source = after
    sources = [summary, *([step_source] if step_source else [])]  # the step comes from it
    values = {f"eval/{r['eval_set']}/{r['metric']}": v for r in _read(summary)
              if (v := _number(r["value"])) is not None}
    training = run.eval_dir(round_) / "training.parquet"
    if training.exists():
        sources.append(training)
        values.update({f"round/{r['metric']}": v for r in _read(training)
                       if (v := _number(r["value"])) is not None})
    return Points(f"r{round_:05d}.2-eval", sources, summary.stat().st_mtime, [(step, values)])


def round_points(run: Any, rounds: list[int]) -> list[Points]:
    out = []
    for r in rounds:
        out.extend(p for p in (train_points(run, r) if r > 0 else None, eval_points(run, r)) if p)
    return out


def sources_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


# ---- writing --------------------------------------------------------------------------------------------
def log_rounds(run: Any, rounds: list[int] | None = None) -> list[str]:
    """Write the points of `rounds` (default: every round of the run) that are new or changed to
    every logger in run.loggers. Returns the names of the (round, kind)s written."""
    loggers = list(run.config.run.loggers)
    if not loggers:
        return []
    check_loggers(loggers)
    points = round_points(run, run.rounds() if rounds is None else rounds)
    written: list[str] = []
    if "tensorboard" in loggers:
        written = write_tensorboard(run.root / TB_DIR, points)
    if "wandb" in loggers:
        written = sorted(set(written) | set(log_wandb(run, points)))
    return written


def write_tensorboard(folder: Path, points: list[Points]) -> list[str]:
    from scope_cli.tempfiles import remove_stale_temps
    from scope_cli.core.files import write_json_atomic

    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    ledger_path = folder / LEDGER
    ledger = _read_ledger(ledger_path)
    written = []
    for p in points:
        digest = sources_digest(p.sources)
        target = folder / f"events.out.tfevents.{p.name}"
        if ledger.get(p.name) == digest and target.exists():
            continue
        _write_bytes_atomic(event_file_bytes(p), target, p.name)
        ledger[p.name] = digest
        written.append(p.name)
    if written:
        write_json_atomic(ledger, ledger_path)
    return written


def event_file_bytes(p: Points) -> bytes:
    """A TensorBoard event file: the version record, then one event per step with its scalars."""
    import io

    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.record_writer import RecordWriter

    buffer = io.BytesIO()
    writer = RecordWriter(buffer)
    writer.write(Event(wall_time=p.wall_time, file_version="brain.Event:2").SerializeToString())
    for step, values in p.steps:
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=v) for tag, v in sorted(values.items())])
        writer.write(Event(wall_time=p.wall_time, step=step, summary=summary).SerializeToString())
    return buffer.getvalue()


def _write_bytes_atomic(data: bytes, path: Path, temp_name: str) -> None:
    """Write under a temporary name that lacks "tfevents" (TensorBoard would read a half-written
    file), fsync, rename."""
    from scope_cli.errors import WriteError
    from scope_cli.tempfiles import honour_umask, temp_prefix

    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(temp_name), suffix=".tmp", dir=path.parent)
        honour_umask(Path(tmp))  # mkstemp makes 0600; a run's files take the umask
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise WriteError(f"{path}: cannot write ({exc.strerror or exc}); rerun once there is space "
                         "or permission") from exc


def _read_ledger(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # no record: every file is rewritten whole, under its fixed name
    return data if isinstance(data, dict) else {}


def log_wandb(run: Any, points: list[Points]) -> list[str]:
    """Send the (round, kind)s not sent before to the run's wandb run, then record them."""
    from scope_cli.core.files import write_json_atomic

    ledger_path = run.root / "wandb" / WANDB_LEDGER
    ledger = _read_ledger(ledger_path)
    new = [p for p in points if p.name not in ledger]
    if not new:
        return []
    import wandb

    root = run.root.resolve()
    run_id = f"{root.name}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"
    wb = wandb.init(project=os.environ.get("WANDB_PROJECT", "scope-rl"), name=root.name, id=run_id,
                    resume="allow", dir=str(run.root), mode=os.environ.get("WANDB_MODE", "offline"),
                    config=run.config.to_dict())
    try:
        wb.define_metric("update")
        wb.define_metric("*", step_metric="update")  # steps may arrive out of order (a late eval)
        for step, values in sorted(((s, v) for p in new for s, v in p.steps), key=lambda x: x[0]):
            wb.log({**values, "update": step})
    finally:
        wb.finish()
    ledger.update({p.name: sources_digest(p.sources) for p in new})
    write_json_atomic(ledger, ledger_path)
    return [p.name for p in new]
