"""train-step: one round of RL updates on the rectified batch; writes policy-R.

    scope train-step --run NAME --round R [--set train.minibatches=4] [--force]
    torchrun --standalone --nproc-per-node 2 -m scope_cli.app -- train-step --run NAME --round R
    torchrun ... -- train-step --run NAME --round R --set train.fsdp=true   # FSDP2 instead of DDP
(the `--` stops torchrun from reading `--run` as an abbreviation of its own `--run-path`)

Reads round-R/rectified/ (every shard), policy-(R-1) and round-(R-1)/train/state/ (optimizer moments,
global update count); writes round-R/train/state/, round-R/train/metrics.parquet (one row per
update, schema TRAIN_METRICS), policy-R/ and, last, round-R/train/_manifest/shard-00000.json (timings,
input digests, config hash). A finished train-step (policy complete, manifest matching) is skipped.

What it does, in order:
1. The round batch: rows with in_batch; rows whose verify_status is timeout/error get reward 0 (or
   are dropped with train.drop_unverified). Advantages per prompt group over the whole batch, once,
   before any minibatch or process split (train.advantage: grpo | drgrpo | grpo_split); groups with
   all-zero advantages are dropped. Per-token masks: tokens at or after offpolicy_start are
   off-policy (guide tokens); in rectify.mode = "augment" a failed parent trains only from its first
   wrong step on (its correct prefix is shared with its rectified child).
2. Old log-probs: recomputed with policy-(R-1) under logits / T (T = generate.temperature), the same
   distribution the new log-probs and the off-policy π use. Sampling must have used top_p = 1 and no
   top_k, otherwise the sampled distribution is not logits / T and the step refuses to run.
3. Updates: train.ppo_epochs passes, each shuffled (seeded by run.seed, round, epoch) and cut into
   train.minibatches minibatches, one optimizer update each: on-policy tokens take the PPO clipped
   ratio (train.clip_low / clip_high), off-policy tokens LUFFY's shaped -A·π/(π+γ); the loss is
   aggregated by train.aggregation over the whole minibatch (token counts summed over processes;
   seq-mean-token-sum-norm divides by generate.max_tokens); gradient clipping; LR warm-up/decay over
   the persisted global update count. Optional: KL to policy-000 (train.kl_coef), truncated
   importance weights on the engine's log-probs (train.tis_cap).
4. Commit: state and metrics first, then the policy folder (atomic rename), then the manifest.

The loss terms are in scope_cli/objectives.py; processes, bucketing and state files in
scope_cli/training.py.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from scope_cli import objectives as obj
from scope_cli.config import Config, config_hash
from scope_cli.console import make_console, progress_bars
from scope_cli.loggers import log_rounds
from scope_cli.models import load_policy, save_policy
from scope_cli.runs import Run, policy_complete
from scope_cli.schema import RECTIFIED, TRAIN_METRICS, conform
from scope_cli.shards import (
    complete_shards,
    engine_versions,
    file_digest,
    list_shard_files,
    manifest_path,
    read_stage,
    remove_stale_temps,
    shard_lock,
    write_json_atomic,
    write_parquet_atomic,
)
from scope_cli.training import (
    Dist,
    TrainError,
    all_reduce,
    close_dist,
    full_state_dict,
    init_dist,
    is_fsdp,
    load_train_state,
    make_optimizer,
    plan_microbatches,
    response_logits,
    save_train_state,
    token_logprobs,
    unwrap,
    wrap_model,
)

CONFIG_KEYS = ["train", "generate.temperature", "generate.top_p", "generate.top_k",
               "generate.max_tokens", "generate.stop", "rectify.mode", "run.seed", "policy.dtype"]
# the columns train-step reads (a subset of RECTIFIED)
NEEDED = pa.schema([RECTIFIED.field(n) for n in (
    "prompt_id", "sample_idx", "prompt_ids", "response", "response_ids", "response_logprobs",
    "finish_reason", "policy", "reward", "verify_status", "step_token_ends", "first_error_step", "origin", "in_batch",
    "parent_sample_idx", "offpolicy_start")])
METRICS_FILE = "metrics.parquet"


def check_sampling(cfg: Config) -> None:
    g = cfg.generate
    if g.top_p != 1.0 or g.top_k != 0:
        raise TrainError(
            f"generate.top_p={g.top_p}, generate.top_k={g.top_k}: RL sampling must use top_p=1 and "
            "top_k=0 (train-step recomputes old log-probs as softmax(logits / temperature))"
        )
    if g.temperature <= 0:
        raise TrainError(f"generate.temperature={g.temperature}: RL sampling needs a temperature > 0")


# ---- 1. the round batch -------------------------------------------------------------------------
@dataclass
class Row:
    prompt: list[int]
    response: list[int]
    adv: float
    on: np.ndarray  # bool per response token
    off: np.ndarray
    engine_logp: np.ndarray  # float per response token, NaN where unknown
    old_logp: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    ref_logp: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    @property
    def tokens(self) -> int:
        return int(self.on.sum() + self.off.sum())

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.response)


def with_eos(response: list[int], finish_reason: str | None, text: str, eos_id: int | None,
             stop: list[str]) -> list[int]:
    """The trained token sequence: response_ids plus the end-of-sequence token the policy sampled.

    Generate and rectify leave eos out of response_ids (finish_reason "stop" records it); training
    needs it, or the policy is never rewarded for stopping. A row stopped by a stop string sampled no
    eos; a row that already ends with eos keeps it once."""
    if (eos_id is None or finish_reason != "stop" or (response and response[-1] == eos_id)
            or any(s and (text or "").endswith(s) for s in stop)):
        return response
    return response + [eos_id]


def build_batch(table: pa.Table, cfg: Config, policy_name: str,
                max_positions: int, eos_id: int | None = None) -> tuple[list[Row], dict[str, int]]:
    """Rows to train with advantages and token masks, and the counts of what was left out."""
    t = cfg.train
    cols = table.select(NEEDED.names).to_pydict()
    n = table.num_rows
    order = sorted(range(n), key=lambda i: (cols["prompt_id"][i], cols["origin"][i] or "policy",
                                            cols["sample_idx"][i] or 0,
                                            cols["parent_sample_idx"][i] or -1))
    cols = {k: [v[i] for i in order] for k, v in cols.items()}
    origin = [o or "policy" for o in cols["origin"]]
    in_batch = np.array([b is not False for b in cols["in_batch"]], dtype=bool)
    for i in range(n):
        if origin[i] == "policy" and cols["policy"][i] not in (None, policy_name):
            raise TrainError(f"rectified row (prompt_id {cols['prompt_id'][i]}, sample_idx "
                             f"{cols['sample_idx'][i]}): sampled by {cols['policy'][i]}, but this "
                             f"round trains {policy_name} (old log-probs would be wrong)")
        if cols["prompt_ids"][i] is None or cols["response_ids"][i] is None:
            raise TrainError(f"rectified row (prompt_id {cols['prompt_id'][i]}, sample_idx "
                             f"{cols['sample_idx'][i]}): prompt_ids/response_ids are null")

    rewards, keep, unverified = obj.effective_rewards(cols["reward"], cols["verify_status"],
                                                      t.drop_unverified)
    use = in_batch & keep
    idx = np.flatnonzero(use)
    adv = np.zeros(n)
    dropped = np.zeros(n, dtype=bool)
    adv[idx], dropped[idx] = obj.group_advantages(
        rewards[idx], [cols["prompt_id"][i] for i in idx],
        [origin[i] == "policy" for i in idx], t.advantage, t.adv_eps)

    # augment mode: parents with a rectified child train only from their first wrong step on
    children = {(cols["prompt_id"][i], cols["parent_sample_idx"][i])
                for i in range(n) if origin[i] == "rectified" and use[i]}
    rows = []
    for i in idx:
        if dropped[i]:
            continue
        prompt = list(cols["prompt_ids"][i])
        response = with_eos(list(cols["response_ids"][i]), cols["finish_reason"][i], cols["response"][i],
                            eos_id, cfg.generate.stop)
        where = f"rectified row (prompt_id {cols['prompt_id'][i]}, sample_idx {cols['sample_idx'][i]})"
        if len(prompt) + len(response) > max_positions:
            raise TrainError(f"{where}: {len(prompt) + len(response)} tokens exceed the policy's "
                             f"max_position_embeddings {max_positions}")
        start = 0
        if (cfg.rectify.mode == "augment" and origin[i] == "policy"
                and (cols["prompt_id"][i], cols["sample_idx"][i]) in children):
            start = obj.loss_start(cols["first_error_step"][i], cols["step_token_ends"][i])
        off_start = cols["offpolicy_start"][i]
        if off_start is not None and not 0 <= off_start <= len(response):
            raise TrainError(f"{where}: offpolicy_start {off_start} outside the response "
                             f"(0..{len(response)})")
        on, off = obj.token_masks(len(response), off_start, start)
        engine = cols["response_logprobs"][i] or []
        engine_logp = np.full(len(response), np.nan, dtype=np.float32)
        engine_logp[: len(engine)] = [np.nan if v is None else v for v in engine[: len(response)]]
        rows.append(Row(prompt, response, float(adv[i]), on, off, engine_logp))
    groups_dropped = len({cols["prompt_id"][i] for i in idx if dropped[i]})
    counts = {
        "rows_read": n, "rows_in_batch": int(in_batch.sum()), "unverified_rows": unverified,
        "unverified_dropped": int((in_batch & ~keep).sum()), "groups": len({cols["prompt_id"][i] for i in idx}),
        "dropped_groups": groups_dropped, "rows_trained": len(rows),
    }
    return rows, counts


# ---- 2. log-probs of fixed policies (old, reference) ---------------------------------------------
def fixed_logprobs(model, rows: list[Row], d: Dist, temperature: float, pad_id: int,
                   max_tokens: int) -> list[np.ndarray]:
    """Per-row response log-probs under logits / T with no gradient, each process computing a share
    and the results summed over processes (so every process holds all of them)."""
    offsets = np.cumsum([0] + [len(r.response) for r in rows])
    flat = torch.zeros(int(offsets[-1]), dtype=torch.float64)
    mine = [i for k, i in enumerate(sorted(range(len(rows)), key=lambda i: -rows[i].length))
            if k % d.world == d.rank]
    batches = [[mine[j] for j in b] for b in plan_microbatches([rows[i].length for i in mine], max_tokens)]
    steps = int(all_reduce(torch.tensor(float(len(batches))), d, "max").item())
    with torch.no_grad():
        for k in range(steps):
            b = batches[k] if k < len(batches) else []
            prompts = [rows[i].prompt for i in b] or [[pad_id]]
            responses = [rows[i].response for i in b] or [[pad_id]]
            logits, targets, _ = response_logits(model, prompts, responses, pad_id, d.device)
            logp = token_logprobs(logits, targets, temperature).double().cpu()
            for j, i in enumerate(b):
                flat[offsets[i]: offsets[i + 1]] = logp[j, : len(rows[i].response)]
    flat = all_reduce(flat, d)
    return [flat[offsets[i]: offsets[i + 1]].numpy().astype(np.float32) for i in range(len(rows))]


def micro_batch_tokens(cfg: Config, d: Dist) -> int:
    """train.micro_batch_tokens, or where it is 0: 16384 on a GPU, 1024 on a CPU, where micro-batches
    that short (less padding, activations that stay in cache) made the tiny policies' updates 20-25%
    and their old log-probs 45-50% faster than one micro-batch per update (docs/PERFORMANCE.md)."""
    return cfg.train.micro_batch_tokens or (16384 if d.device.type == "cuda" else 1024)


# ---- 3. one optimizer update ----------------------------------------------------------------------
STATS = ("loss", "on", "off", "ratio", "clipped", "prob", "entropy", "kl", "tokens")


def microbatch_loss(model, rows: list[Row], weights: list[float], cfg: Config, pad_id: int,
                    device) -> tuple[torch.Tensor, dict[str, float]]:
    """Σ weight·loss over the trained tokens of `rows`, and sums for the metrics."""
    t = cfg.train
    if not rows:  # keeps processes in step: a forward/backward that changes nothing
        logits, _, _ = response_logits(model, [[pad_id]], [[pad_id]], pad_id, device)
        return logits.sum() * 0.0, dict.fromkeys(STATS, 0.0)
    logits, targets, mask = response_logits(model, [r.prompt for r in rows],
                                            [r.response for r in rows], pad_id, device)
    logp = token_logprobs(logits, targets, cfg.generate.temperature)

    def grid(values, fill=0.0, dtype=torch.float32):
        g = torch.full(mask.shape, fill, dtype=dtype)
        for b, v in enumerate(values):
            g[b, : len(v)] = torch.as_tensor(v, dtype=dtype)
        return g.to(device)

    on, off = grid([r.on for r in rows], False, torch.bool), grid([r.off for r in rows], False, torch.bool)
    old = grid([r.old_logp for r in rows])
    adv = torch.tensor([r.adv for r in rows], dtype=torch.float32, device=device)[:, None]
    w = torch.tensor(weights, dtype=torch.float32, device=device)[:, None]

    on_loss, ratio, clipped = obj.ppo_clip_loss(logp, old, adv, t.clip_low, t.clip_high)
    if t.tis_cap > 0:
        on_loss = on_loss * obj.tis_weights(old, grid([r.engine_logp for r in rows], float("nan")),
                                            t.tis_cap)
    if t.offpolicy_loss == "shaped":
        off_loss, prob = obj.shaped_offpolicy_loss(logp, adv, t.offpolicy_gamma)
    else:
        off_loss, prob = obj.nll_offpolicy_loss(logp, adv), logp.exp()
    tok_loss = torch.where(on, on_loss, 0.0) + torch.where(off, off_loss, 0.0)
    trained = on | off
    kl = torch.zeros_like(logp)
    if t.kl_coef > 0:
        kl = obj.kl_k3(logp, grid([r.ref_logp for r in rows]))
        tok_loss = tok_loss + t.kl_coef * torch.where(trained, kl, 0.0)
    loss = (tok_loss * w).sum()
    with torch.no_grad():
        ent = obj.entropy(logits / cfg.generate.temperature)
        f = trained.float()
        stats = {
            "loss": loss.item(), "on": on.sum().item(), "off": off.sum().item(),
            "ratio": (ratio * on).sum().item(), "clipped": (clipped & on).sum().item(),
            "prob": (prob * off).sum().item(), "entropy": (ent * f).sum().item(),
            "kl": (kl * f).sum().item(), "tokens": f.sum().item(),
        }
    return loss, stats


def update(model, opt, rows: list[Row], d: Dist, cfg: Config, pad_id: int, lr: float) -> dict[str, float]:
    """One optimizer update on a minibatch (every process passes the whole minibatch's rows and
    trains its share: rows sorted by length, dealt round-robin)."""
    t = cfg.train
    order = sorted(range(len(rows)), key=lambda i: (-rows[i].length, i))
    mine = [rows[i] for k, i in enumerate(order) if k % d.world == d.rank]
    # the minibatch's token and sequence counts, summed over processes
    counts = all_reduce(torch.tensor([sum(r.tokens for r in mine), sum(r.tokens > 0 for r in mine)],
                                     dtype=torch.float64), d)
    weights = obj.token_weights(t.aggregation, [r.tokens for r in mine], int(counts[0]),
                                int(counts[1]), cfg.generate.max_tokens)
    batches = plan_microbatches([r.length for r in mine], micro_batch_tokens(cfg, d))
    steps = int(all_reduce(torch.tensor(float(len(batches))), d, "max").item())
    sums = dict.fromkeys(STATS, 0.0)
    for k in range(steps):
        b = batches[k] if k < len(batches) else []
        last = k == steps - 1
        if is_fsdp(model):
            model.set_requires_gradient_sync(last)
        sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
        with sync:
            loss, stats = microbatch_loss(model, [mine[i] for i in b], [weights[i] for i in b],
                                          cfg, pad_id, d.device)
            # DDP and FSDP average gradients over processes; the loss is already a global sum
            (loss * d.world).backward()
        for key in STATS:
            sums[key] += stats[key]
    for group in opt.param_groups:
        group["lr"] = lr
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    opt.step()
    opt.zero_grad(set_to_none=True)
    total = dict(zip(STATS, all_reduce(torch.tensor([sums[k] for k in STATS]), d).tolist()))
    total["grad_norm"] = float(grad_norm)
    per_rank = torch.zeros(d.world, dtype=torch.float64)
    per_rank[d.rank] = sums["tokens"]
    total["rank_tokens"] = [int(x) for x in all_reduce(per_rank, d).tolist()]
    return total


# ---- the stage ------------------------------------------------------------------------------------
def stage_inputs(run: Run, round_: int) -> list[Path]:
    files = list_shard_files(run.stage_dir(round_, "rectified"))
    files.append(run.policy_dir(round_ - 1) / "scope-policy.json")
    if round_ > 1:
        state = run.train_dir(round_ - 1) / "state"
        files += [state / "trainer.json", state / "optimizer.safetensors"]
    return files


def is_done(run: Run, round_: int, cfg_hash: str) -> bool:
    import json

    man = manifest_path(run.train_dir(round_), 0)
    metrics = run.train_dir(round_) / METRICS_FILE
    if not (policy_complete(run.policy_dir(round_)) and man.exists() and metrics.exists()):
        return False
    try:
        m = json.loads(man.read_text())
    except (json.JSONDecodeError, OSError):
        return False
    if m.get("config_hash") != cfg_hash or m.get("output", {}).get("size") != metrics.stat().st_size:
        return False
    # the previous policy and train state may since have been pruned (run.keep_policies /
    # keep_state): a missing one still counts as matching; every input that exists must match
    prunable = {str(p.relative_to(run.root)) for p in stage_inputs(run, round_)[-3:]
                if not p.is_relative_to(run.stage_dir(round_, "rectified"))}
    recorded = {x["path"]: (x["size"], x["sha256"]) for x in m.get("inputs", [])}
    current = {}
    for p in stage_inputs(run, round_):
        name = str(p.relative_to(run.root))
        if p.exists():
            x = file_digest(p, run.root)
            current[name] = (x["size"], x["sha256"])
        elif name in prunable:
            current[name] = recorded.get(name)
    return current == recorded


def train_step(run: Run, round_: int, *, force: bool = False, worker: tuple[int, int] = (0, 1),
               quiet: bool = False) -> dict[str, Any]:
    """Train round `round_` (`worker` is unused: processes come from torchrun's RANK/WORLD_SIZE).

    The main process holds a lock on the round's train folder (``train/_locks/``, an flock the kernel
    releases when the process dies): a second train-step of the same round is refused while one runs,
    and whatever a killed one left half-written (temporary policy and state folders) is removed."""
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
    check_sampling(cfg)
    out_policy, train_dir = run.policy_dir(round_), run.train_dir(round_)
    cfg_hash = config_hash(cfg, CONFIG_KEYS)
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
    d = init_dist()
    console = make_console(stderr=True, quiet=quiet or not d.main)
    start = time.perf_counter()

    # 1. the round batch and its advantages (every process reads all of it)
    model, tok = load_policy(in_policy, dtype="float32", device=str(d.device),
                             trust_remote_code=cfg.policy.trust_remote_code)
    table = read_stage(run.stage_dir(round_, "rectified"), NEEDED)
    rows, counts = build_batch(table, cfg, in_policy.name, model.config.max_position_embeddings,
                               tok.eos_token_id)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # 2. model, optimizer and state; old (and reference) log-probs under policy-(R-1)
    model = wrap_model(model, d, fsdp=t.fsdp, mixed_precision=t.mixed_precision,
                       activation_checkpointing=t.activation_checkpointing)
    model.train()
    opt = make_optimizer(model, t.lr, t.betas, t.weight_decay)
    if round_ > 1:  # optimizer moments, update count and the RNG state carry over rounds
        state = load_train_state(run.train_dir(round_ - 1) / "state", model, opt)
    else:  # the first round starts the RNG from the run's seed, never from the process's history
        state = {"updates": 0}
        torch.manual_seed(cfg.run.seed)
    for group in opt.param_groups:  # the config's hyperparameters win over the stored ones
        group.update(betas=tuple(t.betas), weight_decay=t.weight_decay)
    scorer = model if is_fsdp(model) else unwrap(model)
    for r, logp in zip(rows, fixed_logprobs(scorer, rows, d, cfg.generate.temperature, pad,
                                            micro_batch_tokens(cfg, d))):
        r.old_logp = logp
    if t.kl_coef > 0:
        ref, _ = load_policy(run.policy_dir(0), dtype="float32", device=str(d.device),
                             trust_remote_code=cfg.policy.trust_remote_code)
        ref = wrap_model(ref, d, fsdp=t.fsdp, mixed_precision=t.mixed_precision) if t.fsdp else ref
        for r, logp in zip(rows, fixed_logprobs(ref, rows, d, cfg.generate.temperature, pad,
                                                micro_batch_tokens(cfg, d))):
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
            s = update(model, opt, [trainable[i] for i in part], d, cfg, pad, lr)
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
    weights = full_state_dict(model)
    if d.main:
        write_parquet_atomic(conform(pa.Table.from_pylist(metrics, schema=TRAIN_METRICS),
                                     TRAIN_METRICS), train_dir / METRICS_FILE)
        save_weights(weights, in_policy, out_policy, tok, cfg.policy.dtype, {
            "source": "train-step", "round": round_, "parent": in_policy.name, "updates": updates,
            "world_size": d.world, "fsdp": t.fsdp})
        seconds = time.perf_counter() - start
        n_up = max(len(metrics), 1)
        write_json_atomic({
            "stage": "train-step", "shard": 0, "num_shards": 1,
            "inputs": [file_digest(p, run.root) for p in inputs],
            "output": {"path": METRICS_FILE, "size": (train_dir / METRICS_FILE).stat().st_size},
            "config_hash": cfg_hash, "config_keys": sorted(CONFIG_KEYS),
            "engines": engine_versions("torch", "transformers"),
            "rows": counts["rows_trained"], "seconds": round(seconds, 4),
            "timings": {"prepare_seconds": round(prep_seconds, 4),
                        "update_seconds": round(update_seconds, 4),
                        "seconds_per_update": round(update_seconds / n_up, 4),
                        "tokens_per_second": round(tokens / max(update_seconds, 1e-9), 1)},
            "world_size": d.world, "fsdp": t.fsdp, "rank_tokens": rank_tokens, "policy": out_policy.name,
            "summary": {**counts, "updates": len(metrics), "tokens": tokens,
                        "offpolicy_tokens": sum(m["offpolicy_tokens"] for m in metrics)},
            "headline": {"label": "offpolicy_frac", "num": "offpolicy_tokens", "den": "tokens"},
        }, manifest_path(train_dir, 0))
        console.print(f"train-step: round {round_}: {len(metrics)} updates, {tokens} tokens, "
                      f"{counts['dropped_groups']} groups dropped, {time.perf_counter() - start:.1f}s "
                      f"-> {out_policy}")
    close_dist(d)
    return {"skipped": False, "policy": str(out_policy), "updates": len(metrics), **counts}


def save_weights(weights: dict[str, torch.Tensor], in_policy: Path, out: Path, tok, dtype_name: str,
                 info: dict) -> None:
    """Save gathered weights as a policy folder with the input policy's config, in `dtype_name`
    (policy.dtype). The next round trains from these weights, so float32 (the default) keeps every
    update: an lr-1e-6 step is far below bfloat16's resolution (~0.4% of a weight) and would be
    rounded away on saving."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(in_policy)
    dtype = getattr(torch, dtype_name)
    config.dtype = dtype_name
    with torch.device("meta"):
        template = AutoModelForCausalLM.from_config(config)
    template = template.to_empty(device="cpu").to(dtype)
    missing, unexpected = template.load_state_dict(
        {k: v.to(dtype) for k, v in weights.items()}, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise TrainError(f"{out}: gathered weights do not match {in_policy}'s config "
                         f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
    template.tie_weights()
    save_policy(template, tok, out, info)
