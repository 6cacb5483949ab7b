"""verify throughput: scope's math-verify pool against the serial loop a user would write.

    .venv/bin/python bench/verify_bench.py [--items 2000] [--runs 5] [--workers 2]

Both sides check the same (gold, pred) pairs: a mix of the arithmetic task's digits and MATH-style
answers (fractions, decimals, intervals, roots, equations, multiples of pi), half of them right. The
serial side is ``verify(parse(gold), parse(pred))`` with math-verify's own defaults, in this process.
scope's side is `Verifier.check` on a pool started once (as `scope round` keeps it); its start-up is
reported apart. Each run draws fresh pairs (math-verify caches parses), the two sides alternate, and
the table shows the median of the runs. Prints a markdown table; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    """(gold, pred) pairs, about half equivalent."""
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
    return pairs


def serial(pairs: list[tuple[str, str]]) -> int:
    from math_verify import parse, verify

    return sum(bool(verify(parse("\\boxed{" + g + "}"), parse("\\boxed{" + p + "}"))) for g, p in pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    import logging

    from scope_cli.backends.verifier import Verifier

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    serial(make_pairs(50, seed=-1))  # import and warm up the serial side too
    start = time.perf_counter()
    pool = Verifier(workers=args.workers, timeout=5.0)
    pool.check(make_pairs(50, seed=-2))
    startup = time.perf_counter() - start
    rates: dict[str, list[float]] = {"serial": [], "pool": []}
    agree = True
    with pool:
        for run in range(args.runs):
            pairs = make_pairs(args.items, seed=run)
            t = time.perf_counter()
            n_serial = serial(pairs)
            rates["serial"].append(len(pairs) / (time.perf_counter() - t))
            pairs = make_pairs(args.items, seed=run)
            t = time.perf_counter()
            n_pool = sum(v.correct for v in pool.check(pairs))
            rates["pool"].append(len(pairs) / (time.perf_counter() - t))
            agree &= n_pool == n_serial
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"verify: {args.items} pairs per run, {args.runs} runs, median items/s "
          f"(pool start-up, once per round: {startup:.2f} s; same verdicts as serial: {agree})\n")
    print("| checker | items/s | vs serial |")
    print("|---|---:|---:|")
    print(f"| serial math-verify loop (1 process) | {med['serial']:.0f} | 1.00x |")
    ratio = med["pool"] / med["serial"]
    print(f"| scope Verifier ({args.workers} workers) | {med['pool']:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
