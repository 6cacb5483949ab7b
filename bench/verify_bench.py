"""verify throughput: scope's math-verify pool against the serial loop a user would write.

    .venv/bin/python bench/verify_bench.py [--items 600] [--reps 4] [--workers 2] [--quick]

Both sides check the same (gold, pred) pairs: a mix of the arithmetic task's digits and MATH-style
answers (fractions, decimals, intervals, roots, equations, multiples of pi), half of them right, and a
few adversarial answers placed at random (a sum of 1000 ones, 30 nested roots, a 12×12 matrix,
(x+1)^60, 2000 characters of garbage: each 0.2-2 s of math-verify). Sides, each its own process
(bench/harness.py), stepped in turn:

- serial: ``verify(parse(gold), parse(pred))`` with math-verify's own defaults (its SIGALRM timeouts),
  one item after another in one process;
- scope: `Verifier.check` on a pool of --workers processes started once (as `scope round` keeps it);
  its start-up is reported apart.

Each step draws fresh pairs (math-verify caches parses); items/s is the median over --reps steps.
Beside wall time, CPU seconds: on a shared machine the pool's second process may get no more CPU
than one, so the busiest process's CPU time per step (the step's wall time given a free core per
process) gives the speed-up on free cores too.
Verdicts are compared on the ordinary items (an adversarial one may be a timeout in the pool and
False in the serial loop). Prints a markdown table; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import PROJECT_PYTHON, Lockstep, Side, Summary, fmt_mb, interleave, table, write_summaries  # noqa: E402

ADVERSARIAL = [
    "+".join(["1"] * 1000),
    "\\sqrt{" * 30 + "2" + "}" * 30,
    "\\begin{pmatrix}" + "\\\\".join("&".join(str(i * j) for j in range(12)) for i in range(12))
    + "\\end{pmatrix}",
    "(x+1)^{60}",
    "x" * 2000,
]


def make_pairs(count: int, seed: int, adversarial: bool = True) -> tuple[list[tuple[str, str]], set[int]]:
    """(gold, pred) pairs, about half equivalent, and the positions of the adversarial ones."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        a, b = rng.randint(1, 999), rng.randint(2, 999)
        right = rng.random() < 0.5
        off = 0 if right else rng.randint(1, 9)
        kind = rng.randrange(8)
        if kind < 3:  # the arithmetic task: a digit
            d = rng.randrange(10)
            pairs.append((str(d), str((d + off) % 10)))
        elif kind == 3:
            pairs.append((f"\\frac{{{a}}}{{{b}}}", f"{a + off}/{b}"))
        elif kind == 4:
            pairs.append((f"{a}.{b}", f"{a + off}.{b}0"))
        elif kind == 5:
            pairs.append((f"[{a}, {a + b})", f"\\left[{a}, {a + b + off}\\right)"))
        elif kind == 6:
            pairs.append((f"{a}\\sqrt{{{b}}}", f"{a + off}\\sqrt{{{b}}}"))
        else:
            pairs.append((f"x = {a}", f"{a + off}" if rng.random() < 0.5 else f"{a + off}\\pi"))
    bad: set[int] = set()
    if adversarial:
        for text in ADVERSARIAL:
            i = rng.randrange(count)
            pairs[i] = (pairs[i][0], text)
            bad.add(i)
    return pairs, bad


def serial(pairs: list[tuple[str, str]]) -> list[bool]:
    from math_verify import parse, verify

    return [bool(verify(parse("\\boxed{" + g + "}"), parse("\\boxed{" + p + "}"))) for g, p in pairs]


def worker(kind: str, items: int, workers: int) -> None:
    step = Lockstep()
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    if kind == "serial":
        serial(make_pairs(50, seed=-1, adversarial=False)[0])  # imports and first parses
        check = serial
        step.ready()
    else:
        from scope_cli.backends.verifier import Verifier

        start = time.perf_counter()
        pool = Verifier(workers=workers, timeout=5.0)
        pool.check(make_pairs(50, seed=-2, adversarial=False)[0])
        startup = time.perf_counter() - start

        def check(pairs: list[tuple[str, str]]) -> list[bool]:
            return [v.correct for v in pool.check(pairs)]

        step.ready(startup=startup)
    rep = 0
    while step.go():
        pairs, bad = make_pairs(items, seed=rep)
        verdicts = check(pairs)
        seconds = step.lap()
        step.done(seconds, items=len(pairs),
                  correct=[v for i, v in enumerate(verdicts) if i not in bad])
        rep += 1


def compare(items: int, reps: int, workers: int) -> tuple[str, list[Summary]]:
    base = [PROJECT_PYTHON, __file__, "--items", str(items), "--workers", str(workers)]
    res = interleave([Side("serial", [*base, "--worker", "serial"]),
                      Side("scope", [*base, "--worker", "scope"])], reps)
    ser, pool = res["serial"], res["scope"]
    agree = all(a["correct"] == b["correct"] for a, b in zip(ser.info, pool.info))
    rate_s, rate_p = items / ser.median, items / pool.median
    speedup = rate_p / rate_s
    # on a machine with a free core per worker a step lasts as long as its busiest process's CPU time
    projected = ser.cpu_max / pool.cpu_max
    rows = [["serial math-verify loop (1 process)", f"{rate_s:.0f}", "1.00", f"{ser.cpu:.1f} s",
             f"{ser.cpu_max:.1f} s", "1.00", fmt_mb(ser.max_rss_mb)],
            [f"scope Verifier ({workers} workers)", f"{rate_p:.0f}", f"{speedup:.2f}", f"{pool.cpu:.1f} s",
             f"{pool.cpu_max:.1f} s", f"{projected:.2f}", fmt_mb(pool.max_rss_mb)]]
    text = (f"### 4. verify against a serial math-verify loop\n\n{items} pairs per step, "
            f"{len(ADVERSARIAL)} of them adversarial, median of {reps} steps; pool start-up (once per "
            f"`scope round`): {pool.ready['startup']:.2f} s; same verdicts on the ordinary items: "
            f"{agree}. CPU/step: CPU seconds of a step, the pool's workers included; busiest: the CPU "
            "seconds of the step's busiest process, the step's wall time where each process has a free "
            "core, hence the speed-up on free cores (serial busiest / pool busiest). Max RSS counts the "
            "pool's workers.\n\n"
            + table(["checker", "items/s", "vs serial (wall)", "CPU/step", "busiest", "on free cores",
                     "max RSS"], rows))
    return text, [Summary(f"4. verify ({workers} workers) vs serial math-verify loop", f"{rate_p:.0f} items/s",
                          f"{rate_s:.0f} items/s", speedup, "wall speed-up", "≥ 1.6", speedup >= 1.6,
                          pool.max_rss_mb, ser.max_rss_mb, note=f"{projected:.2f} on free cores")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=600)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None, help="write the summary lines here (bench/run_all.py)")
    ap.add_argument("--worker", choices=["serial", "scope"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.items, args.workers)
        return
    text, summaries = compare(300 if args.quick else args.items, 3 if args.quick else args.reps,
                              args.workers)
    print(text)
    write_summaries(args.json, summaries)


if __name__ == "__main__":
    main()
