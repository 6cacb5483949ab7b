"""Side-by-side timing for the benchmarks: each side in its own process, their steps interleaved.

A comparison has two or more sides (scope and what a user would use instead). Each side runs in its
own worker process, so each has its own peak memory, and the driver steps them in turn — A, B, A, B,
... — so that the load of a shared machine falls on every side alike. The table reports the median
of the steps and the ratio of medians.

Worker side (a bench script run with ``--worker NAME``):

    step = Lockstep()                  # speaks the protocol on stdin/stdout
    ...set up, warm up...
    step.ready(params=123)             # the driver starts timing from the next "go"
    while step.go():                   # blocks for "go"; False on "quit"
        info = do_one_unit()
        step.done(**info)              # seconds since the "go", plus what the unit reports

Code that cannot be driven from a loop (a trainer's callback) calls ``ready`` / ``done`` / ``go``
from inside itself in the same order.

Driver side:

    sides = [Side("scope", [python, script, "--worker", "scope", ...]), Side("trl", [...])]
    results = interleave(sides, reps=5)   # {name: SideResult(seconds=[...], info=[...], ready={...},
                                          #                   max_rss_mb=...)}

Peak memory is the worker's VmHWM (Linux's high-water mark of resident memory) plus that of its
live child processes (a verify pool, an engine), read just before the worker quits.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PYTHON = ROOT / ".venv" / "bin" / "python"
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
_TAG = "@@bench "  # protocol lines on the worker's stdout start with this; anything else is passed on


# ---- worker side ---------------------------------------------------------------------------------
class Lockstep:
    """The worker's half of the protocol. Other output of the worker goes to stderr."""

    def __init__(self) -> None:
        self._out = sys.stdout
        sys.stdout = sys.stderr  # libraries that print must not garble the protocol
        self._t0 = self._cpu0 = 0.0

    def _send(self, obj: dict[str, Any]) -> None:
        self._out.write(_TAG + json.dumps(obj) + "\n")
        self._out.flush()

    def ready(self, **info: Any) -> None:
        self._send({"ready": True, **info})

    def go(self) -> bool:
        line = sys.stdin.readline().strip()
        if line != "go":
            return False
        self._cpu0 = cpu_by_process()
        self._t0 = time.perf_counter()
        return True

    def lap(self) -> float:
        """Seconds since the last "go" (to stop the clock before gathering what to report)."""
        return time.perf_counter() - self._t0

    def done(self, seconds: float | None = None, **info: Any) -> None:
        wall = self.lap() if seconds is None else seconds
        now = cpu_by_process()
        spent = [now[pid] - self._cpu0.get(pid, 0.0) for pid in now]
        # cpu: the step's CPU seconds, every process together; cpu_max: the busiest process's, which
        # is the step's wall time on a machine with a free core per process
        self._send({"seconds": wall, "cpu": sum(spent), "cpu_max": max(spent), **info})


def cpu_by_process() -> dict[int, float]:
    """CPU seconds (user + system) of this process and of each live descendant (a verify pool):
    unlike wall time, nearly blind to other work on a shared machine."""
    try:
        import psutil
    except ImportError:
        return {os.getpid(): time.process_time()}
    me = psutil.Process()
    out = {me.pid: sum(me.cpu_times()[:2])}
    for child in me.children(recursive=True):
        try:
            out[child.pid] = sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return out


def set_threads(threads: int) -> None:
    """One torch thread unless told otherwise (tiny models run fastest on one thread here)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(threads)


# ---- driver side ---------------------------------------------------------------------------------
@dataclass
class SideResult:
    name: str
    seconds: list[float] = field(default_factory=list)
    info: list[dict[str, Any]] = field(default_factory=list)
    ready: dict[str, Any] = field(default_factory=dict)
    max_rss_mb: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def cpu(self) -> float:
        """Median CPU seconds of a step (process and children)."""
        return statistics.median(i["cpu"] for i in self.info) if self.info else float("nan")

    @property
    def cpu_max(self) -> float:
        """Median CPU seconds of a step's busiest process: its wall time given a free core each."""
        return statistics.median(i["cpu_max"] for i in self.info) if self.info else float("nan")

    def median_of(self, key: str) -> float:
        return statistics.median(i[key] for i in self.info)


class BenchError(RuntimeError):
    pass


class Side:
    """One worker process of a comparison."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None,
                 cwd: Path | None = None):
        self.name, self.argv = name, [str(a) for a in argv]
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd or ROOT
        self.proc: subprocess.Popen | None = None

    def start(self) -> dict[str, Any]:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=None if os.environ.get("BENCH_VERBOSE") else subprocess.DEVNULL,
                                     text=True, env=self.env, cwd=self.cwd)
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(_TAG):
                return json.loads(line[len(_TAG):])
        code = self.proc.wait()
        raise BenchError(f"bench side {self.name!r} exited with code {code} "
                         f"({' '.join(self.argv[1:4])} ...; rerun with BENCH_VERBOSE=1 to see its output)")

    def step(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._read()

    def peak_rss_mb(self) -> float:
        """VmHWM of the worker and its live descendants, in MiB."""
        assert self.proc is not None
        pids = [self.proc.pid]
        try:
            import psutil

            pids += [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        except Exception:  # noqa: BLE001 (psutil missing or a child gone: count what we can)
            pass
        total = 0
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None and self.proc.stdin is not None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def interleave(sides: list[Side], reps: int) -> dict[str, SideResult]:
    """Start the sides one after another (each warms up alone), then step them in turn `reps`
    times, rotating which goes first; return every side's timings and peak memory."""
    results = {s.name: SideResult(s.name) for s in sides}
    try:
        for s in sides:
            results[s.name].ready = s.start()
        for rep in range(reps):
            k = rep % len(sides)
            for s in sides[k:] + sides[:k]:
                out = s.step()
                results[s.name].seconds.append(out.pop("seconds"))
                results[s.name].info.append(out)
        for s in sides:
            results[s.name].max_rss_mb = s.peak_rss_mb()
    finally:
        for s in sides:
            s.stop()
    return results


def timed_commands(commands: dict[str, list[list[str]]], reps: int, env: dict[str, str] | None = None,
                   cwd: Path | None = None) -> dict[str, SideResult]:
    """Wall-clock seconds and peak RSS of shell commands, interleaved: for each name, a list of
    commands started together (several workers) whose slowest finish ends the step. RSS is the sum
    of the commands' own peaks (each process's ru_maxrss, from wait4)."""
    import tempfile

    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    results = {name: SideResult(name) for name in commands}
    names = list(commands)
    for rep in range(reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            with tempfile.TemporaryFile("w+") as err:
                start = time.perf_counter()
                procs = [subprocess.Popen(c, env=full_env, cwd=cwd or ROOT, stdout=subprocess.DEVNULL,
                                          stderr=err) for c in commands[name]]
                peak_kb, cpu = 0, []
                for p, c in zip(procs, commands[name]):
                    _, status, usage = os.wait4(p.pid, 0)
                    p.returncode = os.waitstatus_to_exitcode(status)
                    peak_kb += usage.ru_maxrss
                    cpu.append(usage.ru_utime + usage.ru_stime)
                    if p.returncode != 0:
                        err.seek(0)
                        raise BenchError(f"`{' '.join(c)}` failed ({p.returncode}): {err.read().strip()[-300:]}")
                results[name].seconds.append(time.perf_counter() - start)
                results[name].info.append({"cpu": sum(cpu), "cpu_max": max(cpu)})
            results[name].max_rss_mb = max(results[name].max_rss_mb, peak_kb / 1024)
    return results


# ---- reporting -----------------------------------------------------------------------------------
def fmt_s(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"


def fmt_mb(mb: float) -> str:
    return f"{mb:.0f} MiB" if mb else "-"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


@dataclass
class Summary:
    """One line of the overall table: scope against the alternative, with the target."""

    comparison: str
    scope: str
    alternative: str
    ratio: float  # scope / alternative, in the sense the target states
    ratio_label: str  # e.g. "time scope / loop"
    target: str
    met: bool | None
    scope_rss_mb: float = 0.0
    alt_rss_mb: float = 0.0
    note: str = ""  # shown beside the verdict

    def row(self) -> list[str]:
        verdict = {True: "yes", False: "**no**", None: "-"}[self.met] + (f" ({self.note})" if self.note else "")
        return [self.comparison, self.scope, self.alternative, f"{self.ratio:.2f} ({self.ratio_label})",
                self.target, verdict, fmt_mb(self.scope_rss_mb), fmt_mb(self.alt_rss_mb)]


SUMMARY_HEADER = ["comparison", "scope", "alternative", "ratio", "target", "met", "scope max RSS",
                  "alternative max RSS"]


def write_summaries(path: str | None, summaries: list[Summary]) -> None:
    """For bench/run_all.py: the script's summary lines as JSON."""
    if path:
        Path(path).write_text(json.dumps([s.__dict__ for s in summaries]))


def machine() -> str:
    import platform

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"load average at start {load}")
