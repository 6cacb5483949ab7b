"""train-step: one round of RL updates on the rectified batch; writes policy-R.

    scope train-step --run NAME --round R [--set train.minibatches=4] [--force]
    torchrun --standalone --nproc-per-node 2 -m scope_cli.cli.app -- train-step --run NAME --round R
    torchrun ... -- train-step --run NAME --round R --set train.fsdp=true   # FSDP2 instead of DDP
(the `--` stops torchrun from reading `--run` as an abbreviation of its own `--run-path`)

Reads round-R/rectified/ (every shard), policy-(R-1) and round-(R-1)/train/state/ (optimizer moments,
global update count); writes round-R/train/state/, round-R/train/metrics.parquet (one row per
update, schema TRAIN_METRICS), policy-R/ and, last, round-R/train/_manifest/shard-00000.json (timings,
config hash, the inputs' and outputs' sizes and sha256). A finished train-step (policy complete,
manifest matching, every output intact) is skipped; the input policy and train state are checked
against their manifests before they are used.

What it does, in order:
1. The round batch (scope_cli/core/train_batch.py): rows with in_batch; rows whose verify_status is
   timeout/error get reward 0 (or are dropped with train.drop_unverified). Advantages per prompt group
   over the whole batch, once, before any minibatch or process split (train.advantage: grpo | drgrpo |
   grpo_split); groups with all-zero advantages are dropped. Per-token masks: tokens at or after
   offpolicy_start are off-policy (guide tokens); in rectify.mode = "augment" a failed parent trains
   only from its first wrong step on, and so does, under run.algo = "vppo", every policy row with a
   negative advantage and a located first error (its verified prefix is not penalised). A row that ended on an end-of-sequence token trains on it too
   (stop_token_id: the one sampled; runs without the column: the tokenizer's eos).
2. Old log-probs: recomputed with policy-(R-1) under logits / T (T = generate.temperature), the same
   distribution the new log-probs and the off-policy π use. Sampling must have used top_p = 1 and no
   top_k, otherwise the sampled distribution is not logits / T and the step refuses to run.
3. Updates (scope_cli/core/train_update.py): train.ppo_epochs passes, each shuffled (seeded by run.seed,
   round, epoch) and cut into train.minibatches minibatches, one optimizer update each: on-policy
   tokens take the PPO clipped ratio (train.clip_low / clip_high), off-policy tokens LUFFY's shaped
   -A·π/(π+γ); the loss is aggregated by train.aggregation over the whole minibatch (token counts
   summed over processes; seq-mean-token-sum-norm divides by generate.max_tokens); gradient clipping;
   LR warm-up/decay over the persisted global update count. Optional: KL to policy-000
   (train.kl_coef), truncated importance weights on the engine's log-probs (train.tis_cap).
   How (train.mixed_precision, packing, logprob_chunks; all `auto`): with CUDA, bf16 compute with
   float32 weights and Adam moments, rows packed without padding and log-probs in chunks of response
   tokens (scope_cli/backends/logprobs.py); on CPU, float32 whole logits over length buckets.
4. Commit: state and metrics first, then the policy folder (atomic rename, float32 by default:
   policy.dtype), then the manifest.

The loss terms are in scope_cli/objectives.py; processes, bucketing and state files in
scope_cli/backends/training.py.
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from scope_cli import objectives as obj
from scope_cli.backends.hf import load_policy
from scope_cli.backends.training import (
    TrainError,
    close_dist,
    full_state_dict,
    init_dist,
    is_fsdp,
    load_train_state,
    make_optimizer,
    save_train_state,
    unwrap,
    use_bf16,
    wrap_model,
)
from scope_cli.console import make_console, progress_bars
from scope_cli.core.config import Config, config_hash
from scope_cli.core.files import check_inside_run, manifest_path, read_stage, write_parquet_atomic
from scope_cli.core.loggers import log_rounds
from scope_cli.core.manifests import record as file_digest
from scope_cli.core.manifests import records
from scope_cli.core.policy import POLICY_MARKER, save_weights
from scope_cli.core.runs import Run
from scope_cli.core.shards import complete_shards, cpu_seconds, engine_versions, shard_lock, write_manifest
from scope_cli.core.train_batch import NEEDED, build_batch
from scope_cli.core.train_files import check_inputs, is_done, stage_inputs
from scope_cli.core.train_update import fixed_logprobs, micro_batch_tokens, resolve_mode, update
from scope_cli.schema import TRAIN_METRICS, conform
from scope_cli.tempfiles import remove_stale_temps

CONFIG_KEYS = ["train", "generate.temperature", "generate.top_p", "generate.top_k",
               "generate.max_tokens", "generate.stop", "rectify.mode", "run.seed", "policy.dtype"]
METRICS_FILE = "metrics.parquet"


def config_keys(cfg: Config) -> list[str]:
    """CONFIG_KEYS, and run.algo where it changes what the batch trains (vppo's masks; the other
    algorithms differ only in their rectified/ input, whose digest the manifest holds)."""
    keys = CONFIG_KEYS + ["run.algo"] if cfg.run.algo == "vppo" else CONFIG_KEYS
    if cfg.generate.oversample > 1:  # dynamic sampling: which groups train
        keys = keys + ["generate.oversample", "generate.prompts_per_round"]
    return keys


def train_step(run: Run, round_: int, *, force: bool = False, worker: tuple[int, int] = (0, 1),
               quiet: bool = False) -> dict[str, Any]:
    """Train round `round_` (`worker` is unused: processes come from torchrun's RANK/WORLD_SIZE).

    The main process holds a lock on the round's train folder (``train/_locks/``, an flock the kernel
    releases when the process dies): a second train-step of the same round is refused while one runs,
    and whatever a killed one left half-written (temporary policy and state folders) is removed."""
    check_inside_run(run.train_dir(round_), run.root)
    main = os.environ.get("RANK", "0") == "0"
    lock = shard_lock(run.train_dir(round_), 0) if main else contextlib.nullcontext(True)
    with lock as held:
        if not held:
            raise TrainError(f"{run.train_dir(round_)}: round {round_}'s train-step is running in "
                             "another process (its lock is held); wait for it to finish")
        if main:
            remove_stale_temps(run.root, [run.policy_dir(round_).name])
            remove_stale_temps(run.train_dir(round_), ["state", METRICS_FILE])
            remove_stale_temps(run.train_dir(round_) / "_manifest", ["shard-00000.json"])
        result = _train_step(run, round_, force=force, quiet=quiet)
        if main:  # live curves from train/metrics.parquet (run.loggers; never a point twice)
            log_rounds(run, [round_])
        return result


def _train_step(run: Run, round_: int, *, force: bool, quiet: bool) -> dict[str, Any]:
    cfg = run.config
    t = cfg.train
    out_policy, train_dir = run.policy_dir(round_), run.train_dir(round_)
    cfg_hash = config_hash(cfg, config_keys(cfg))
    if not force and is_done(run, round_, cfg_hash):
        if os.environ.get("RANK", "0") == "0":
            make_console(stderr=True, quiet=quiet).print(
                f"train-step: round {round_}: done earlier, skipped ({out_policy.name})")
        return {"skipped": True, "policy": str(out_policy)}
    complete_shards(run.stage_dir(round_, "rectified"), run.command(f"rectify --round {round_}"))
    in_policy = run.input_policy(round_)
    inputs = stage_inputs(run, round_)
    if round_ > 1 and not (run.train_dir(round_ - 1) / "state" / "trainer.json").exists():
        raise TrainError(f"{run.train_dir(round_ - 1) / 'state'}: train state of round {round_ - 1} "
                         f"missing (run `{run.command(f'train-step --round {round_ - 1}')}` first)")
    # the inputs' digests (the main process: 91 GB at 7B), in a thread while the model loads; checked
    # before the train state is read or anything is trained
    checked = None
    if os.environ.get("RANK", "0") == "0":
        checking = ThreadPoolExecutor(1)
        checked = checking.submit(check_inputs, run, round_, in_policy)
        checking.shutdown(wait=False)
    d = init_dist()
    console = make_console(stderr=True, quiet=quiet or not d.main)
    start, start_cpu = time.perf_counter(), cpu_seconds()

    # 1. the round batch and its advantages (every process reads all of it)
    try:
        model, tok = load_policy(in_policy, dtype="float32", device=str(d.device),
                                 trust_remote_code=cfg.policy.trust_remote_code)
    except Exception:
        if checked is not None:
            checked.result()  # a damaged input says more than the load error it causes
        raise
    table = read_stage(run.stage_dir(round_, "rectified"), NEEDED)
    rows, counts = build_batch(table, cfg, in_policy.name, model.config.max_position_embeddings,
                               tok.eos_token_id,
                               run.round_prompt_ids(round_) if cfg.generate.oversample > 1 else None)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # 2. model, optimizer and state; old (and reference) log-probs under policy-(R-1)
    bf16 = use_bf16(t.mixed_precision, d.device)
    model = wrap_model(model, d, fsdp=t.fsdp, bf16=bf16,
                       activation_checkpointing=t.activation_checkpointing)
    model.train()
    opt = make_optimizer(model, t.lr, t.betas, t.weight_decay)
    if checked is not None:
        checked.result()
    if round_ > 1:  # optimizer moments, update count and the RNG state carry over rounds
        state = load_train_state(run.train_dir(round_ - 1) / "state", model, opt)
    else:  # the first round starts the RNG from the run's seed, never from the process's history
        state = {"updates": 0}
        torch.manual_seed(cfg.run.seed)
    for group in opt.param_groups:  # the config's hyperparameters win over the stored ones
        group.update(betas=tuple(t.betas), weight_decay=t.weight_decay)
    mode = resolve_mode(cfg, d, model)
    scorer = model if is_fsdp(model) else unwrap(model)
    for r, logp in zip(rows, fixed_logprobs(scorer, rows, d, cfg.generate.temperature, pad,
                                            micro_batch_tokens(cfg, d), mode)):
        r.old_logp = logp
    if t.kl_coef > 0:
        ref, _ = load_policy(run.policy_dir(0), dtype="float32", device=str(d.device),
                             trust_remote_code=cfg.policy.trust_remote_code)
        ref = wrap_model(ref, d, fsdp=t.fsdp, bf16=bf16) if t.fsdp else ref
        for r, logp in zip(rows, fixed_logprobs(ref, rows, d, cfg.generate.temperature, pad,
                                                micro_batch_tokens(cfg, d), mode)):
            r.ref_logp = logp
        del ref
    prep_seconds = time.perf_counter() - start

    # 3. updates: ppo_epochs × minibatches
    metrics, updates, tokens = [], int(state["updates"]), 0
    rank_tokens = [0] * d.world
    trainable = [r for r in rows if r.tokens > 0]
    t_updates = time.perf_counter()
    parts = [(epoch, mb, part) for epoch in range(t.ppo_epochs) for mb, part in enumerate(np.array_split(
        np.random.default_rng([cfg.run.seed, round_, epoch]).permutation(len(trainable)), t.minibatches))
        if len(part)]
    with progress_bars(quiet or not d.main) as bars:
        task = bars.add_task(f"train-step round {round_}: updates", total=len(parts), rate="")
        for epoch, mb, part in parts:
            lr = obj.lr_at(updates, t.lr, t.warmup_updates, t.total_updates, t.lr_min)
            s = update(model, opt, [trainable[i] for i in part], d, cfg, pad, lr, mode)
            updates += 1
            tokens += int(s["tokens"])
            rank_tokens = [a + b for a, b in zip(rank_tokens, s["rank_tokens"])]
            metrics.append({
                "round": round_, "update": updates, "epoch": epoch, "minibatch": mb,
                "loss": s["loss"], "lr": lr, "onpolicy_tokens": int(s["on"]),
                "offpolicy_tokens": int(s["off"]),
                "mean_ratio": s["ratio"] / s["on"] if s["on"] else None,
                "clip_fraction": s["clipped"] / s["on"] if s["on"] else None,
                "mean_offpolicy_prob": s["prob"] / s["off"] if s["off"] else None,
                "entropy": s["entropy"] / s["tokens"] if s["tokens"] else None,
                "grad_norm": s["grad_norm"],
                "kl": s["kl"] / s["tokens"] if t.kl_coef > 0 and s["tokens"] else None,
                "dropped_groups": counts["dropped_groups"],
            })
            console.print(f"train-step: round {round_} update {updates} loss {s['loss']:.4f} "
                          f"tokens {int(s['tokens'])} grad_norm {s['grad_norm']:.3f}")
            bars.advance(task)
        bars.remove_task(task)
    update_seconds = time.perf_counter() - t_updates

    # 4. commit: state and metrics, then the policy (atomic rename), then the manifest
    info = {"updates": updates, "round": round_, "world_size": d.world, "fsdp": t.fsdp}
    save_train_state(train_dir / "state", model, opt, info, d)
    if d.main:  # the state's digests, in a thread while the policy is gathered and saved
        hashing = ThreadPoolExecutor(1)
        state_records = hashing.submit(records, sorted(p for p in (train_dir / "state").iterdir()
                                                      if p.is_file()), train_dir, True)
        hashing.shutdown(wait=False)  # the thread ends with its one task
    weights = full_state_dict(model)
    if d.main:
        write_parquet_atomic(conform(pa.Table.from_pylist(metrics, schema=TRAIN_METRICS),
                                     TRAIN_METRICS), train_dir / METRICS_FILE)
        save_weights(weights, in_policy, out_policy, tok, cfg.policy.dtype, {
            "source": "train-step", "round": round_, "parent": in_policy.name, "updates": updates,
            "world_size": d.world, "fsdp": t.fsdp})
        seconds = time.perf_counter() - start
        n_up = max(len(metrics), 1)
        write_manifest(
            manifest_path(train_dir, 0), "train-step", [file_digest(p, run.root) for p in inputs],
            file_digest(train_dir / METRICS_FILE, train_dir), cfg_hash, config_keys(cfg),
            outputs=state_records.result(), engines=engine_versions("torch", "transformers"),
            rows=counts["rows_trained"], seconds=seconds, cpu=cpu_seconds() - start_cpu,
            summary={**counts, "updates": len(metrics), "tokens": tokens,
                     "offpolicy_tokens": sum(m["offpolicy_tokens"] for m in metrics)},
            headline={"label": "offpolicy_frac", "num": "offpolicy_tokens", "den": "tokens"},
            policy_marker=file_digest(out_policy / POLICY_MARKER, run.root), policy=out_policy.name,
            timings={"prepare_seconds": round(prep_seconds, 4), "update_seconds": round(update_seconds, 4),
                     "seconds_per_update": round(update_seconds / n_up, 4),
                     "tokens_per_second": round(tokens / max(update_seconds, 1e-9), 1)},
            world_size=d.world, fsdp=t.fsdp, rank_tokens=rank_tokens)
        console.print(f"train-step: round {round_}: {len(metrics)} updates, {tokens} tokens, "
                      f"{counts['dropped_groups']} groups dropped, {time.perf_counter() - start:.1f}s "
                      f"-> {out_policy}")
    close_dist(d)
    return {"skipped": False, "policy": str(out_policy), "updates": len(metrics), **counts}
