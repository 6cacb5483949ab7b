"""A round of the stage pipeline against the same work as one in-memory loop, and how rounds scale.

    .venv/bin/python bench/round_bench.py [--reps 7] [--quick] [--only loop,scaling,shards]

1. round vs loop. Both sides run the embedded default (algo=scope, data/policies/arith-tiny, 32
   prompts × 8 samples, ≤64 tokens, 4 updates per round, one torch thread), round after round:
   - scope: the six training stages of a round (generate → verify → prm-score → locate-error →
     rectify → train-step) called as `scope round` calls them in one process (the generation engine
     and the verify pool live across rounds; every stage reads and writes its Parquet shards and
     manifests; train-step loads policy-(R-1) and its optimizer state and saves policy-R). Eval is
     not timed: `scope round` evaluates every eval.every-th round, apart from this.
   - loop: the same computation with no files: one model and optimizer kept in memory, the
     generation backend sampling from the model being trained, each stage's compute function called
     on in-memory tables (the same sampling code, math-verify pool, rule PRM, oracle guide and loss).
   Both sample the same tokens (checked: equal generated-token counts every round), so the ratio is
   the cost of the stage design itself: Parquet, manifests and hashes, model and state load/save.
   Rounds differ in cost (response lengths), so the ratio is taken per round, scope's time over the
   loop's for the same round, and its median reported.
2. scaling: a scope round at generate.prompts_per_round = 32, 128, 512 (1×, 4×, 16×; `--quick`: 1×
   and 4×), seconds per round and per prompt; 2 rounds each after the warm-up (a 16× round is long).
3. shard workers: `scope generate` of a 512-prompt round (16 shards; `--quick`: 128, 4 shards) by
   one process against two (`--shard-index 0/1 --num-shards 2`), each a fresh CLI process (start-up
   included), twice each (`--quick`: once).
   Beside wall time, CPU seconds: on a shared machine a second process may get no more CPU, so the
   busiest process's CPU time (the wall time given a free core each) is shown too.

Each side is its own process (harness.py), stepped in turn; medians of --reps rounds after one
warm-up round. Prints markdown tables; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import (  # noqa: E402
    PROJECT_PYTHON,
    Lockstep,
    Side,
    Summary,
    fmt_mb,
    fmt_s,
    interleave,
    set_threads,
    table,
    timed_commands,
    write_summaries,
)

DEFAULT_SETS = ["eval.every=1000"]
PARTS = ("generate", "verify", "prm-score", "locate-error", "rectify", "train-step")


class Clock:
    """Seconds spent in each named part, accumulated between marks."""

    def __init__(self) -> None:
        import time

        self._now = time.perf_counter
        self._last = self._now()
        self.parts: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = self._now()
        self.parts[name] = self.parts.get(name, 0.0) + now - self._last
        self._last = now


def open_bench_run(root: Path, sets: list[str]):
    from scope_cli.core.runs import Run
    from stages.prepare import prepare

    shutil.rmtree(root, ignore_errors=True)
    run = Run.open(root, None, [*DEFAULT_SETS, *sets], create=True)
    prepare(run, quiet=True)
    return run


# ---- worker: scope's stages ----------------------------------------------------------------------
def scope_worker(root: Path, sets: list[str]) -> None:
    """Rounds 1, 2, ... through the stage functions, as scope_cli.cli.rounds runs them in one process."""
    step = Lockstep()
    set_threads(1)
    from scope_cli.core.files import read_stage
    from scope_cli.core.resources import StageResources
    from stages.generate import generate
    from stages.locate_error import locate_error
    from stages.prm_score import prm_score
    from stages.rectify import rectify
    from stages.train_step import train_step
    from stages.verify import verify

    run = open_bench_run(root, sets)
    cfg = run.config

    def one_round(r: int) -> tuple[float, dict[str, float]]:
        clock = Clock()
        res.policy_engine(run.input_policy(r))
        generate(run, r, resources=res, quiet=True)
        clock.mark("generate")
        verify(run, r, resources=res, quiet=True)
        clock.mark("verify")
        prm_score(run, r, resources=res, quiet=True)
        clock.mark("prm-score")
        locate_error(run, r, quiet=True)
        clock.mark("locate-error")
        rectify(run, r, quiet=True, resources=res)
        clock.mark("rectify")
        train_step(run, r, quiet=True)
        clock.mark("train-step")
        return step.lap(), clock.parts

    def tokens(r: int) -> int:
        lengths = read_stage(run.stage_dir(r, "rollouts")).column("response_ids").to_pylist()
        return sum(len(x) for x in lengths)

    with StageResources(cfg) as res:  # as `scope round` keeps them: one engine and pool for all rounds
        one_round(1)
        step.ready(tokens=tokens(1))
        r = 1
        while step.go():
            r += 1
            seconds, parts = one_round(r)
            step.done(seconds, tokens=tokens(r), round=r, parts=parts)
    shutil.rmtree(root, ignore_errors=True)


# ---- worker: the same work as one in-memory loop -------------------------------------------------
def loop_worker(root: Path, sets: list[str]) -> None:
    """The round's computation with no files: one model, one optimizer, in-memory tables."""
    step = Lockstep()
    set_threads(1)
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from scope_cli import objectives as obj
    from scope_cli.backends.generation import HFBackend
    from scope_cli.backends.guide import OracleGuide
    from scope_cli.backends.prm import load_prm
    from scope_cli.backends.verifier import Verifier
    from scope_cli.backends.hf import load_policy
    from scope_cli.schema import RECTIFIED, ROLLOUTS
    from scope_cli.core.files import read_stage
    from scope_cli.backends.training import Dist, make_optimizer
    from stages.generate import rollout_rows, sampling_of, shard_groups
    from stages.locate_error import locate_table
    from stages.prm_score import score_table
    from scope_cli.backends.verifier import verify_rows
    from scope_cli.core.train_batch import build_batch
    from scope_cli.core.train_update import fixed_logprobs, micro_batch_tokens, update
    from stages.rectify import rectify_rows
    from stages.verify import verify_table

    run = open_bench_run(root, sets)  # only for the prompt table and each round's slice
    cfg = run.config
    g, t = cfg.generate, cfg.train
    prompts = {row["prompt_id"]: row for row in read_stage(run.prompts_dir).to_pylist()}
    model, tok = load_policy(run.policy_dir(0))
    engine = HFBackend(run.policy_dir(0), batch_size=g.batch_size)
    engine.model = model  # sample from the model being trained: no reload between rounds
    opt = make_optimizer(model, t.lr, t.betas, t.weight_decay)
    scorer, guide = load_prm(cfg.prm), OracleGuide()
    pad = tok.pad_token_id
    updates = 0
    d = Dist()

    def one_round(r: int, verifier: Verifier) -> int:
        nonlocal updates
        name = f"policy-{r - 1:03d}"  # the name scope would give the policy: build_batch checks it
        tables = []
        clock = Clock()
        model.eval()
        for shard in shard_groups(run.round_prompt_ids(r), g.prompts_per_shard, g.n):
            rows = rollout_rows(engine, [prompts[pid] for pid, _ in shard], [s for _, s in shard], g.n,
                                cfg.run.seed, r, name, sampling_of(cfg))
            table = pa.Table.from_pylist(rows, schema=ROLLOUTS)
            clock.mark("generate")
            table, _ = verify_table(table, verifier, cfg)
            clock.mark("verify")
            table, _ = score_table(table, cfg, tok, scorer)
            clock.mark("prm-score")
            table, _ = locate_table(table, cfg)
            clock.mark("locate-error")
            rect, _ = rectify_rows(table.to_pylist(), cfg, r, tok, guide,
                                   lambda new: verify_rows(verifier, new, cfg.verify))
            tables.append(pa.Table.from_pylist(rect, schema=RECTIFIED))
            clock.mark("rectify")
        batch = pa.concat_tables(tables)
        rows, _ = build_batch(batch, cfg, name, model.config.max_position_embeddings, tok.eos_token_id)
        model.train()
        for row, logp in zip(rows, fixed_logprobs(model, rows, d, g.temperature, pad,
                                                    micro_batch_tokens(cfg, d))):
            row.old_logp = logp
        trainable = [row for row in rows if row.tokens > 0]
        for epoch in range(t.ppo_epochs):
            perm = np.random.default_rng([cfg.run.seed, r, epoch]).permutation(len(trainable))
            for part in np.array_split(perm, t.minibatches):
                if len(part):
                    lr = obj.lr_at(updates, t.lr, t.warmup_updates, t.total_updates, t.lr_min)
                    update(model, opt, [trainable[i] for i in part], d, cfg, pad, lr)
                    updates += 1
        clock.mark("train-step")
        parts.update(clock.parts)
        return sum(len(x) for x in batch.filter(pc.equal(batch.column("origin"), "policy"))
                   .column("response_ids").to_pylist())

    parts: dict[str, float] = {}
    with Verifier(workers=cfg.verify.workers, timeout=cfg.verify.timeout) as verifier:
        step.ready(tokens=one_round(1, verifier))
        r = 1
        while step.go():
            r += 1
            n_tokens = one_round(r, verifier)
            seconds = step.lap()  # the token count above is part of the round's tables anyway
            step.done(seconds, tokens=n_tokens, round=r, parts=dict(parts))
    shutil.rmtree(root, ignore_errors=True)


# ---- driver ----------------------------------------------------------------------------------------
def worker_side(name: str, kind: str, sets: list[str], tmp: Path) -> Side:
    argv = [PROJECT_PYTHON, __file__, "--worker", kind, "--root", tmp / name]
    for s in sets:
        argv += ["--set", s]
    return Side(name, argv)


def round_vs_loop(reps: int, tmp: Path) -> tuple[str, list[Summary]]:
    res = interleave([worker_side("scope", "scope", [], tmp), worker_side("loop", "loop", [], tmp)], reps)
    s, lp = res["scope"], res["loop"]
    same = [a["tokens"] for a in s.info] == [b["tokens"] for b in lp.info]
    # both sides run the same rounds on the same tokens, and rounds differ in cost (response lengths):
    # the ratio is the median over rounds of scope's time / the loop's time for that round
    ratio = statistics.median(a / b for a, b in zip(s.seconds, lp.seconds))
    cpu_ratio = statistics.median(a["cpu"] / b["cpu"] for a, b in zip(s.info, lp.info))

    def part(res, name: str) -> str:
        return f"{statistics.median(i['parts'][name] for i in res.info):.3f}"

    rows = [["scope round (6 stages, files)", fmt_s(s.median), f"{ratio:.2f}", fmt_s(s.cpu), f"{cpu_ratio:.2f}",
             fmt_mb(s.max_rss_mb), *(part(s, p) for p in PARTS)],
            ["in-memory loop (same work)", fmt_s(lp.median), "1.00", fmt_s(lp.cpu), "1.00",
             fmt_mb(lp.max_rss_mb), *(part(lp, p) for p in PARTS)]]
    per_round = ", ".join(f"{a / b:.2f}" for a, b in zip(s.seconds, lp.seconds))
    text = (f"### 1. A round against the same work as an in-memory loop\n\n"
            f"Embedded default (algo=scope), rounds {s.info[0]['round']}-{s.info[-1]['round']} after a "
            f"warm-up round; medians of the rounds' seconds and of each part's; ratio: the median over "
            f"rounds of scope's time / the loop's for the same round ({per_round}); same sampled tokens "
            f"every round: {same}.\n\n"
            + table(["side", "wall/round", "ratio", "CPU/round", "CPU ratio", "max RSS", *PARTS], rows))
    return text, [Summary("1. round vs in-memory loop (embedded default, no eval)",
                          f"{fmt_s(s.median)}/round", f"{fmt_s(lp.median)}/round", ratio,
                          "time scope / loop, per round", "≤ 1.25", ratio <= 1.25, s.max_rss_mb, lp.max_rss_mb)]


def scaling(reps: int, tmp: Path, factors: list[int]) -> tuple[str, list[Summary]]:
    sides = [worker_side(f"x{f}", "scope", [f"generate.prompts_per_round={32 * f}"], tmp) for f in factors]
    res = interleave(sides, reps)
    base = res[f"x{factors[0]}"].median
    rows = []
    for f in factors:
        r = res[f"x{f}"]
        rows.append([f"{f}× ({32 * f} prompts, {32 * f * 8} rollouts)", fmt_s(r.median),
                     f"{r.median / (32 * f) * 1000:.0f} ms", f"{r.median / base:.2f}", fmt_mb(r.max_rss_mb)])
    top = factors[-1]
    growth = res[f"x{top}"].median / base
    text = (f"### 6a. Time per round as prompts per round grow\n\nscope round (6 stages), median of "
            f"{reps} rounds after a warm-up round. Linear would be a time ratio equal to the factor.\n\n"
            + table(["prompts per round", "s/round", "per prompt", "time ratio", "max RSS"], rows))
    return text, [Summary(f"6. scaling: round time at {top}× prompts", fmt_s(res[f"x{top}"].median),
                          f"{fmt_s(base)} at 1×", growth / top, f"(t{top}×/t1×)/{top}",
                          "≤ 1.00 (linear or better)", growth / top <= 1.0,
                          res[f"x{top}"].max_rss_mb, res[f"x{factors[0]}"].max_rss_mb)]


def shard_workers(reps: int, tmp: Path, prompts: int) -> tuple[str, list[Summary]]:
    import os

    runs = tmp / "shard-runs"
    env = {"SCOPE_RUNS_DIR": str(runs)}
    scope = str(ROOT / ".venv" / "bin" / "scope")
    sets = ["--set", f"generate.prompts_per_round={prompts}"]
    timed_commands({"prepare": [[scope, "prepare", "--run", "s", "--quiet", *sets]]}, 1, env=env)
    base = [scope, "generate", "--run", "s", "--round", "1", "--force", "--quiet"]
    commands = {"1 worker": [base],
                "2 workers": [[*base, "--shard-index", str(i), "--num-shards", "2"] for i in range(2)]}
    res = timed_commands(commands, reps, env={**env, "OMP_NUM_THREADS": "1"})
    one, two = res["1 worker"], res["2 workers"]
    speedup = one.median / two.median
    projected = one.cpu_max / two.cpu_max  # wall time where each process has a free core
    rows = [["1 process", fmt_s(one.median), "1.00", fmt_s(one.cpu), fmt_s(one.cpu_max), "1.00"],
            ["2 processes", fmt_s(two.median), f"{speedup:.2f}", fmt_s(two.cpu), fmt_s(two.cpu_max),
             f"{projected:.2f}"]]
    text = (f"### 6b. Shard workers: `scope generate`, {prompts} prompts ({prompts // 32} shards), 1 process "
            "vs 2\n\n"
            f"Wall seconds of the command(s), CLI start-up included, median of {reps}; {os.cpu_count()} "
            "cores, shared. CPU: all processes' CPU seconds; busiest: the busiest process's, the wall "
            "time where each process has a free core.\n\n"
            + table(["workers", "wall", "speed-up (wall)", "CPU", "busiest", "speed-up on free cores"], rows))
    return text, [Summary("6. shard workers: generate, 2 processes vs 1", fmt_s(two.median), fmt_s(one.median),
                          speedup, "wall speed-up", "> 1", speedup > 1.0, two.max_rss_mb, one.max_rss_mb,
                          note=f"{projected:.2f} on free cores")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="loop,scaling,shards")
    ap.add_argument("--json", default=None, help="write the summary lines here (bench/run_all.py)")
    ap.add_argument("--worker", choices=["scope", "loop"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        (scope_worker if args.worker == "scope" else loop_worker)(Path(args.root), args.set)
        return
    tmp = Path(tempfile.mkdtemp(prefix="scope-bench-"))
    parts, summaries = [], []
    try:
        only = args.only.split(",")
        if "loop" in only:
            text, s = round_vs_loop(4 if args.quick else args.reps, tmp)
            parts.append(text)
            summaries += s
        if "scaling" in only:
            factors = [1, 4] if args.quick else [1, 4, 16]
            text, s = scaling(2, tmp, factors)
            parts.append(text)
            summaries += s
        if "shards" in only:
            text, s = shard_workers(1 if args.quick else 2, tmp, 128 if args.quick else 512)
            parts.append(text)
            summaries += s
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n\n".join(parts))
    write_summaries(args.json, summaries)


if __name__ == "__main__":
    main()
