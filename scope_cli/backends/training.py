"""Training plumbing shared by `scope train-step` (RL) and the SFT bootstrap: processes and devices,
model wrapping (DDP / FSDP2), length-bucketed micro-batches, response log-probs, and the optimizer
state that persists across rounds.

Processes. Under `torchrun --standalone --nproc-per-node N`, RANK / WORLD_SIZE / LOCAL_RANK are set:
the process group uses NCCL on GPUs and gloo on CPU. `train.fsdp = true` shards the model with FSDP2
(`torch.distributed.fsdp.fully_shard`, one group per decoder layer plus the root), else DDP; this
holds for one process under torchrun too (e.g. FSDP2's bf16 mixed precision on one GPU). Without
torchrun the model runs bare in one process.

Length buckets (`plan_microbatches`, `response_logits`): a micro-batch holds rows of similar length,
right-padded, with no attention mask (causal attention never lets a real token see a pad that
follows it), so a row's log-probs do not depend on what it is batched with. Packed micro-batches and
chunked log-probs, for long rows and large vocabularies, are in scope_cli/backends/logprobs.py.

State. Weights go to the policy folder (safetensors, via `scope_cli.core.policy.save_policy`); the
optimizer's full (unsharded) state goes to `state/optimizer.safetensors` with its param groups in the
file's metadata, and the global update count, world size and RNG state to `state/trainer.json` and
`state/rng.safetensors`. Nothing is pickled. Full state dicts make the state independent of the world
size: a round trained on 2 processes can be continued on 1.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from scope_cli.errors import ScopeError


class TrainError(ScopeError):
    """A training input or state that cannot be used: one line naming it and what was expected."""


# ---- processes ------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"


def set_threads(threads: int) -> None:
    """torch's CPU threads for this process: train.threads (0: torch's default), set the same way for
    every command that runs a model (`scope_cli.cli.options.open_run`) and by the SFT bootstrap. One thread is
    fastest for the tiny models on small CPUs (on a loaded 2-core machine torch's default made `scope
    eval --round 0` alone 6× slower: docs/PERFORMANCE.md). Left alone where CUDA is used."""
    if threads > 0 and not torch.cuda.is_available():
        torch.set_num_threads(threads)


def init_dist(device: str = "auto") -> Dist:
    """This process's place, from torchrun's RANK / WORLD_SIZE / LOCAL_RANK (one process without
    them); under torchrun the process group is initialised, NCCL on GPUs and gloo on CPU."""
    from scope_cli.errors import env_int

    world, rank, local = env_int("WORLD_SIZE", "1"), env_int("RANK", "0"), env_int("LOCAL_RANK", "0")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    d = Dist(rank=rank, world=world, local_rank=local, device=dev)
    launched = "MASTER_ADDR" in os.environ and "RANK" in os.environ  # torchrun, even with one process
    if (world > 1 or launched) and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=d.backend,
                                             device_id=dev if dev.type == "cuda" else None)
    return d


def close_dist(d: Dist) -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def all_reduce(t: torch.Tensor, d: Dist, op: str = "sum") -> torch.Tensor:
    """Sum (or max) a tensor over processes; returns it on the CPU as float64."""
    if d.world == 1:
        return t.double().cpu()
    x = t.to(d.device, torch.float64)
    torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX if op == "max" else
                                 torch.distributed.ReduceOp.SUM)
    return x.cpu()


# ---- wrapping -------------------------------------------------------------------------------------
def use_bf16(mixed_precision: str, device: torch.device) -> bool:
    """train.mixed_precision for a device: bf16 | fp32, or auto (bf16 with CUDA, fp32 on CPU)."""
    return mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")


def wrap_model(model, d: Dist, *, fsdp: bool, bf16: bool = False, activation_checkpointing: bool = False):
    """DDP, FSDP2 or the bare model (one process). With `bf16`, FSDP2 on a GPU keeps bf16 copies of
    the parameters for compute (MixedPrecisionPolicy, gradients reduced in fp32); everywhere else
    train-step computes under torch.autocast (scope_cli.core.train_update.Mode)."""
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if not torch.distributed.is_initialized():  # one process started without torchrun
        return model
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if bf16 and d.device.type == "cuda" else MixedPrecisionPolicy())
        for layer in getattr(getattr(model, "model", None), "layers", []):  # decoder layers
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [d.local_rank] if d.device.type == "cuda" else None
    # buffers (rotary tables) are equal everywhere: no collective in forward, so ranks may differ
    # in how many forwards they run before a backward
    params = inspect.signature(DDP).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return DDP(model, device_ids=ids, **no_sync)


def unwrap(model):
    return model.module if hasattr(model, "module") and hasattr(model, "no_sync") else model


def is_fsdp(model) -> bool:
    return hasattr(model, "set_requires_gradient_sync")


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU (gathered from every process under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---- micro-batches and log-probs ------------------------------------------------------------------
def plan_microbatches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Length buckets: indices sorted by length (longest first), cut so that rows × longest row stays
    within `max_tokens` (at least one row per micro-batch)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) + 1) * longest > max_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def response_logits(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits for every response token, [rows, T, V] with T the longest response, the response
    token ids [rows, T] (pad where masked) and the mask [rows, T].

    Rows are prompt + response, right-padded; logits are computed only from the first position that
    predicts a response token (`logits_to_keep`), which skips most prompt positions.
    """
    full = [p + r for p, r in zip(prompts, responses)]
    seq = max(len(f) for f in full)
    ids = torch.full((len(full), seq), pad_id, dtype=torch.long)
    for b, f in enumerate(full):
        ids[b, : len(f)] = torch.tensor(f, dtype=torch.long)
    keep = seq - (min(len(p) for p in prompts) - 1)
    out = model(input_ids=ids.to(device), logits_to_keep=keep, use_cache=False)
    logits = out.logits  # [B, keep, V], position seq-keep+i
    t_max = max(max(len(r) for r in responses), 1)
    index = torch.zeros((len(full), t_max), dtype=torch.long)
    targets = torch.full((len(full), t_max), pad_id, dtype=torch.long)
    mask = torch.zeros((len(full), t_max), dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        n = len(r)
        index[b, :n] = torch.arange(len(p) - 1, len(p) - 1 + n) - (seq - keep)
        targets[b, :n] = torch.tensor(r, dtype=torch.long)
        mask[b, :n] = True
    index = index.to(device)
    picked = torch.gather(logits, 1, index[:, :, None].expand(-1, -1, logits.shape[-1]))
    return picked, targets.to(device), mask.to(device)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T)[target], in float32."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return torch.gather(logp, -1, targets[..., None]).squeeze(-1)


# ---- optimizer state ------------------------------------------------------------------------------
def make_optimizer(model, lr: float, betas, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def save_train_state(state_dir: Path, model, optimizer, info: dict[str, Any], d: Dist) -> None:
    """Write the optimizer's full state (safetensors), RNG state and `info` (global update count,
    world size) to `state_dir` atomically (a temp folder renamed into place). Collective under FSDP:
    every process calls it; the main process writes."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer,
                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.main:
        return
    tensors = {}
    for name, st in osd["state"].items():
        for key, value in st.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{name}.{key}"] = t.detach().cpu().contiguous()
    groups = [{k: v for k, v in g.items()} for g in osd["param_groups"]]
    from scope_cli.errors import write_errors_named
    from scope_cli.tempfiles import folder_written_whole

    with write_errors_named(Path(state_dir)), folder_written_whole(Path(state_dir)) as tmp:
        save_file(tensors, tmp / "optimizer.safetensors",
                  metadata={"param_groups": json.dumps(groups, default=list)})
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, tmp / "rng.safetensors")
        (tmp / "trainer.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


def read_trainer_info(state_dir: Path) -> dict[str, Any]:
    path = Path(state_dir) / "trainer.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainError(f"{path}: train state missing (run the previous round's train-step)") from None
    except json.JSONDecodeError:
        raise TrainError(f"{path}: not valid JSON") from None


def load_train_state(state_dir: Path, model, optimizer) -> dict[str, Any]:
    """Restore the optimizer (moments and step counts), the RNG state, and return trainer.json.
    Every process reads the full state; FSDP keeps its shard of it."""
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state_dir = Path(state_dir)
    info = read_trainer_info(state_dir)
    path = state_dir / "optimizer.safetensors"
    if not path.exists():
        raise TrainError(f"{path}: optimizer state missing")
    state: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            groups = json.loads(fh.metadata()["param_groups"])
            for key in fh.keys():  # noqa: SIM118 (safe_open has no __contains__/__iter__)
                _, rest = key.split(".", 1)
                name, _, field = rest.rpartition(".")
                state.setdefault(name, {})[field] = fh.get_tensor(key)
    except Exception as exc:  # a truncated or foreign file: never train from it
        first = (str(exc).strip().splitlines() or [""])[0]
        raise TrainError(f"{path}: unreadable optimizer state ({type(exc).__name__}: {first}); rerun the "
                         "train-step that wrote it with --force") from exc
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))
    from safetensors.torch import load_file

    rng = load_file(state_dir / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return info
