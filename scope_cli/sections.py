"""The config's sections: one dataclass per stage plus `run`, `task`, `policy` and `round`, and the
allowed values of their keys, declared on the field itself: a `Literal` lists a key's choices, a
`Range` bounds a number.

    algo: Literal["grpo", "luffy", "scope"] = "scope"
    temperature: float = key(1.0, Range(gt=0, le=10))
    grad_clip: float = key(1.0, Range(ge=0, zero="no clipping"))
    batch_size: int = op(256, Range(ge=1))          # operational (never fixes a run)

A key's choices are read from its `Literal` (validation, `scope compare --algos`, the test that
configs/default.toml lists them). A `Range` is finite by construction (NaN and ±inf are refused for
every float key), with optional bounds; `zero` names what 0 means where it is a special value.
Operational keys (`op`) change how work is done (worker counts, batch sizes), not what it computes.
scope_cli/core/config.py builds, validates (every choice; every field that declares a range, each
element of a list field), compares and hashes a `Config` made of these sections.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Range:
    ge: float | None = None  # value >= ge
    gt: float | None = None  # value > gt
    le: float | None = None  # value <= le
    lt: float | None = None  # value < lt
    zero: str = ""  # what 0 means, where 0 is a special value outside the other bounds ("off")

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.zero and value == 0:
            return True
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self, integer: bool) -> str:
        """'an integer >= 1', 'a finite number > 0 and <= 10', '0 (off) or an integer >= 1'."""
        parts = [f"{op} {_num(v)}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le),
                                                    ("<", self.lt)) if v is not None]
        kind = "an integer" if integer else "a finite number"
        text = f"{kind} {' and '.join(parts)}" if parts else kind
        return f"0 ({self.zero}) or {text}" if self.zero else text


def _num(value: float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return f"{value:,}".replace(",", "_") if isinstance(value, int) and abs(value) >= 100_000 else str(value)


def key(default: Any = MISSING, rng: Range | None = None, *, default_factory: Any = MISSING,
        operational: bool = False, added: bool = False) -> Any:
    """A config field with an optional allowed range (`rng`) and the operational flag. `added`: a key
    added after runs were made; at its default it is left out of the stages' config hashes, so those
    runs' finished stages still match and resume as they were."""
    metadata: dict[str, Any] = {}
    if rng is not None:
        metadata["range"] = rng
    if operational:
        metadata["operational"] = True
    if added:
        metadata["added"] = True
    return field(default=default, default_factory=default_factory, metadata=metadata)


def op(default: Any = MISSING, rng: Range | None = None, *, default_factory: Any = MISSING) -> Any:
    """A field that is operational: how work is done (workers, batch sizes), not what it computes;
    left out of a run's fixed config check."""
    return key(default, rng, default_factory=default_factory, operational=True)


SEED = Range(ge=0, le=2**63 - 1)
PROB = Range(ge=0, le=1)
# the choices that several keys share
Dtype = Literal["float32", "bfloat16", "float16"]
AutoOnOff = Literal["auto", "on", "off"]


@dataclass
class RunConfig:
    name: str = "default"
    seed: int = key(0, SEED)
    # what the middle stages do (prm-score, locate-error, rectify; train-step for vppo):
    #   scope          the PRM's first error; the guide continues the kept correct prefix
    #   grpo           the rollouts alone (no PRM, no new rows)
    #   luffy          the prompt's reference solution, whole, in place of failed rows picked by
    #                  sample_idx (no PRM)
    #   luffy_matched  scope's rows (the same PRM selection) and scope's guide, but the guide writes
    #                  the whole solution (offpolicy_start 0): the control that differs only in the prefix
    #   vppo           the PRM's first error and no guide: no new rows; a failed rollout with a negative
    #                  advantage trains only from its first wrong step (its verified prefix is not
    #                  penalised; "Save the Good Prefix"); correct rows as grpo
    algo: Literal["grpo", "luffy", "scope", "luffy_matched", "vppo"] = "scope"
    # checkpoint retention, applied by `scope round` after each finished round (scope_cli/cli/rounds.py);
    # operational: it removes old files, never changes what a stage computes
    keep_policies: int = op(0, Range(ge=1, zero="keep all"))  # keep the last K policy folders
    keep_every: int = op(0, Range(ge=1, zero="none"))  # and every M-th beyond the last K
    keep_state: int = op(1, Range(ge=1, zero="keep all"))  # keep train state of the last K rounds
    # live curves (scope_cli/core/loggers.py): each round's train and eval metrics, written after
    # train-step and eval from their Parquet, stepped by the global optimizer update count.
    # "tensorboard": event files under runs/<run>/tensorboard/; "wandb": a wandb run (offline unless
    # WANDB_MODE says otherwise; needs the wandb package); []: none. Operational: files beside the run
    loggers: list[Literal["tensorboard", "wandb"]] = op(default_factory=lambda: ["tensorboard"])


@dataclass
class TaskConfig:
    # the task of a file source's rows that name none (no task column, no data_source naming one):
    # math or choice; arith (the default) reads such rows as math, as only the built-in source
    # (prepare.source = "arith") writes arith rows. The values are the task modules (scope_cli/tasks)
    name: Literal["arith", "math", "choice"] = "arith"


@dataclass
class PolicyConfig:
    path: str = "data/policies/arith-tiny"  # the base policy (HF folder), copied to policy-000
    # the dtype train-step writes policy-R in: float32 keeps every update (an lr-1e-6 step is below
    # bfloat16's resolution and would be rounded away; engines still compute in generate.dtype)
    dtype: Dtype = "float32"
    trust_remote_code: bool = False


@dataclass
class PrepareConfig:
    source: str = "arith"  # "arith" (built-in), a .jsonl/.parquet file, a folder, or hf:<dataset id>
    split: str = "train"  # split to read from a dataset folder / hub dataset
    eval_sources: list[str] = field(default_factory=list)  # ["name=path", ...] for non-arith tasks
    shard_rows: int = key(1024, Range(ge=1, le=10_000_000))
    seed: int = key(1234, SEED)  # data seed (built-in task): fixed apart from run.seed so arms share prompts
    # built-in arithmetic task (operand counts: 2 .. 32, the longest chain still fits a short context)
    train_size: int = key(4096, Range(ge=1, le=10_000_000))
    eval_size: int = key(1000, Range(ge=1, le=10_000_000))
    ood_size: int = key(500, Range(ge=1, le=10_000_000))
    min_operands: int = key(3, Range(ge=2, le=32))
    max_operands: int = key(6, Range(ge=2, le=32))
    ood_min_operands: int = key(7, Range(ge=2, le=32))
    ood_max_operands: int = key(8, Range(ge=2, le=32))


@dataclass
class GenerateConfig:
    backend: Literal["hf", "vllm", "auto"] = "hf"  # auto: vllm where CUDA and vllm exist, else hf
    # one round's batch: prompts × n rows, at most 1,000,000 (checked with the pair)
    prompts_per_round: int = key(32, Range(ge=1, le=100_000))
    # whole prompt groups per rollouts/ shard (a worker's unit): at most prompts_per_round. It sets
    # the shard layout of the round's stages (verify, prm-score, locate-error and rectify follow
    # generate's shards): ceil(prompts_per_round / prompts_per_shard) shards, so at most that many
    # workers (round.workers / round.devices) help. Changing it changes the rows' order in files
    prompts_per_shard: int = key(32, Range(ge=1, le=100_000))
    n: int = key(8, Range(ge=1, le=1024))
    # dynamic sampling (DAPO's, kept paired): a round samples oversample × prompts_per_round prompts,
    # its own slice first, then extra prompts drawn from (run.seed, round) alone; train-step trains
    # the first prompts_per_round groups, in that order, whose rewards differ (same updates per
    # round). 1: off (every group of the round's own slice, as drawn)
    oversample: int = key(1, Range(ge=1, le=16), added=True)
    # RL sampling: train-step recomputes old log-probs as softmax(logits / temperature), so the
    # distribution sampled from must be exactly that: temperature > 0, top_p = 1, top_k = 0
    temperature: float = key(1.0, Range(gt=0, le=10))
    top_p: float = key(1.0, Range(gt=0, le=1))
    top_k: int = key(0, Range(ge=1, zero="off"))
    max_tokens: int = key(64, Range(ge=1, le=1_048_576))
    stop: list[str] = field(default_factory=list)
    batch_size: int = op(256, Range(ge=1, le=1_000_000))  # sequences per hf generate call
    dtype: Dtype = "float32"
    tensor_parallel_size: int = op(1, Range(ge=1, le=1024))
    gpu_memory_utilization: float = op(0.5, Range(gt=0, le=1))
    max_model_len: int = key(0, Range(ge=1, le=16_777_216, zero="the model's own limit"))


@dataclass
class VerifyConfig:
    workers: int = op(2, Range(ge=1, le=256))
    timeout: float = key(5.0, Range(gt=0, le=3600))  # seconds per item, enforced from outside the worker
    # where the answer comes from (verify, eval and rectify's re-verification): boxed (the last
    # \boxed{}, what the prompts ask for) or auto (math-verify's own LaTeX and plain-expression
    # extraction over the whole response, for free-form answers; a row where it finds none is
    # no_answer). Measured agreement with hand labels: README "Answers in free form"
    extract: Literal["boxed", "auto"] = "boxed"
    format_reward: float = key(0.0, Range(ge=-1, le=1))  # reward given when \boxed{} is missing (off: 0)
    truncation_penalty: float = key(0.0, Range(ge=0, le=1))  # subtracted when finish_reason == "length"


@dataclass
class PrmConfig:
    backend: Literal["rule", "hf", "vllm"] = "rule"  # rule: the task's exact step checker
    path: str = ""  # PRM folder for hf / vllm
    # qwen: <extra_0> + 2-class head; shepherd: step tag, +/- tokens
    convention: Literal["qwen", "shepherd"] = "qwen"
    score: Literal["failed", "all"] = "failed"  # score the failed rows only, or all
    noise: float = key(0.0, PROB)  # probability per row of missing or shifting the first error
    batch_size: int = op(32, Range(ge=1, le=1_000_000))
    batch_tokens: int = op(65536, Range(ge=1, le=1 << 40))  # hf: at most this many (padded) tokens per pass
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    device: str = op("auto")  # auto | cpu | cuda | cuda:N
    step_tag: str = "ки"  # shepherd convention: the tag after each step
    good_token: str = "+"  # shepherd convention: the "step is right" token
    bad_token: str = "-"  # shepherd convention: the "step is wrong" token


@dataclass
class LocateConfig:
    # threshold: the first step scored below locate.threshold; argmin: the lowest-scored step
    method: Literal["threshold", "argmin"] = "threshold"
    threshold: float = key(0.5, PROB)
    min_prefix_steps: int = key(1, Range(ge=0, le=1_000_000))
    max_per_group: int = key(2, Range(ge=0, le=1_000_000))
    salvage_disagreement: bool = False  # salvage failed rows where the PRM finds no wrong step
    # the order a group's qualifying failed rows are salvaged in (scope, luffy_matched), up to
    # max_per_group: longest (the longest correct prefix first; ties: lower sample_idx) or random (a
    # shuffle seeded from run.seed, the round and the prompt_id, the same for every arm of a seed)
    order: Literal["longest", "random"] = key("longest", added=True)


@dataclass
class RectifyConfig:
    # replace: a salvaged row takes its parent's place in the batch; augment: both train
    mode: Literal["replace", "augment"] = "replace"
    guide: Literal["oracle", "model"] = "oracle"  # oracle: the task's exact solver; model: an LM
    guide_path: str = "data/policies/arith-guide"
    guide_sees_reference: bool = False
    guide_temperature: float = key(1.0, Range(gt=0, le=10))
    max_tries: int = key(4, Range(ge=1, le=1000))
    max_tokens: int = key(64, Range(ge=1, le=1_048_576))
    guide_tensor_parallel_size: int = op(1, Range(ge=1, le=1024))  # vllm: GPUs per model-guide engine


@dataclass
class TrainConfig:
    # measured on the embedded task: 1e-3 collapses within 10 rounds, 1e-4 and 3e-4 improve
    lr: float = key(1e-4, Range(gt=0, le=1))
    weight_decay: float = key(0.0, Range(ge=0, le=1))
    betas: list[float] = key(default_factory=lambda: [0.9, 0.999], rng=Range(ge=0, lt=1))  # Adam's two
    warmup_updates: int = key(0, Range(ge=0, le=1 << 40))
    # 0: constant LR after warm-up; >0: cosine decay to lr_min over this many
    total_updates: int = key(0, Range(ge=0, le=1 << 40))
    lr_min: float = key(0.0, Range(ge=0, le=1))  # at most lr
    minibatches: int = key(4, Range(ge=1, le=100_000))
    ppo_epochs: int = key(1, Range(ge=1, le=1000))
    clip_low: float = key(0.2, Range(ge=0, lt=1))
    clip_high: float = key(0.28, Range(ge=0, le=100))
    offpolicy_loss: Literal["shaped", "nll"] = "shaped"  # shaped: LUFFY's pi/(pi+gamma)
    offpolicy_gamma: float = key(0.1, Range(gt=0, le=1000))
    # drgrpo: no std; grpo_split: group statistics over the policy's own rows
    advantage: Literal["grpo", "drgrpo", "grpo_split"] = "grpo"
    adv_eps: float = key(1e-6, Range(gt=0, le=1))
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    kl_coef: float = key(0.0, Range(ge=0, le=1000))
    # the gradient's global norm is clipped to this; 0 means no clipping (as in TRL, verl, torch)
    grad_clip: float = key(1.0, Range(gt=0, le=1e6, zero="no clipping"))
    drop_unverified: bool = False
    tis_cap: float = key(0.0, Range(ge=1, le=1e6, zero="off"))  # truncated importance correction cap
    # rows × longest row (packed: total tokens) per micro-batch; 0: 16384 on GPU, 1024 on CPU (measured)
    micro_batch_tokens: int = op(0, Range(ge=1, le=1 << 40, zero="auto"))
    # torch's CPU threads in every command that runs a model (0: torch's default; left alone where
    # CUDA is used); 1 is fastest for the tiny models
    threads: int = op(1, Range(ge=1, le=4096, zero="torch's default"))
    fsdp: bool = False
    activation_checkpointing: bool = False
    # the compute dtype of train-step (FSDP on GPU: its MixedPrecisionPolicy, else torch.autocast);
    # weights, gradients and Adam moments stay float32. auto: bf16 with CUDA, fp32 on CPU (as every
    # CPU result so far)
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    # pack a micro-batch's rows into one sequence (position ids restart per row, so attention stays
    # within a row; no padding) instead of right-padded length buckets. auto: on with CUDA, off on
    # CPU (the same bytes as before on CPU; packing changes float rounding only)
    packing: AutoOnOff = op("auto")
    # log-probs from the last hidden states in chunks of response tokens (lm_head, log-softmax and
    # the loss's gradient one chunk at a time), never a [tokens × vocabulary] tensor.
    # auto: on with CUDA, off on CPU (same values within float rounding, not the same bytes)
    logprob_chunks: AutoOnOff = op("auto")
    # response tokens per chunk (~3 × this × vocabulary floats at once); 0: 2048 with CUDA (fewer
    # chunks: each adds the lm_head gradient, vocabulary × hidden, into its float32 sum), 256 on CPU
    logprob_chunk_tokens: int = op(0, Range(ge=1, le=1 << 30, zero="auto"))


@dataclass
class SftConfig:
    steps: int = key(3000, Range(ge=1, le=100_000_000))
    batch_size: int = key(64, Range(ge=1, le=1_000_000))
    lr: float = key(3e-3, Range(gt=0, le=1))
    target_accuracy: float = key(0.40, PROB)
    eval_every: int = key(25, Range(ge=1, le=100_000_000))
    dense_from: float = key(0.25, PROB)  # evaluate every step once accuracy reaches this fraction of the target
    monitor_size: int = key(200, Range(ge=1, le=1_000_000))
    seed: int = key(0, SEED)  # model init, problem draws and solution orders
    # distinct training problems (the run's held-out eval problems excluded)
    train_size: int = key(20000, Range(ge=1, le=10_000_000))
    min_operands: int = key(3, Range(ge=2, le=32))
    max_operands: int = key(6, Range(ge=2, le=32))
    warmup_steps: int = key(50, Range(ge=0, le=100_000_000))
    max_new_tokens: int = key(64, Range(ge=1, le=1_048_576))  # greedy decoding on the monitor set
    # tiny model shape
    hidden_size: int = key(64, Range(ge=1, le=65536))
    layers: int = key(4, Range(ge=1, le=1024))
    heads: int = key(4, Range(ge=1, le=1024))
    intermediate_size: int = key(256, Range(ge=1, le=1 << 20))


@dataclass
class EvalConfig:
    # evaluate policy-R when R % every == 0 (round 0, the base, and the last round always)
    every: int = key(5, Range(ge=1, le=1_000_000))
    sets: list[str] = field(default_factory=list)  # empty: every set in eval-sets/
    greedy: bool = True
    # samples per prompt at `temperature` (top_p / top_k / stop from [generate])
    n_samples: int = key(16, Range(ge=1, le=4096))
    temperature: float = key(1.0, Range(gt=0, le=10))  # keep equal to generate.temperature: sampled metrics at the training T
    max_tokens: int = key(64, Range(ge=1, le=1_048_576))
    limit: int = key(0, Range(ge=1, le=100_000_000, zero="whole set"))  # else its first `limit` prompts
    # sampled metrics (n_samples each) on the first K prompts of a set
    sampled_limit: int = key(200, Range(ge=1, le=100_000_000, zero="all"))
    # pass@k and maj@k for k <= n_samples
    ks: list[int] = key(default_factory=lambda: [1, 4, 8], rng=Range(ge=1, le=4096))


@dataclass
class RoundConfig:
    isolate: AutoOnOff = op("auto")  # run each stage as a subprocess (auto: on with vllm or CUDA)
    # isolated rounds: train-step runs under `torchrun --standalone --nproc-per-node N` when N > 1
    # (DDP, or FSDP2 with train.fsdp, over one node's GPUs); 1: one plain process
    train_procs: int = op(1, Range(ge=1, le=1024))
    # one node's workers for the sharded stages (generate, prm-score, rectify, eval; verify keeps its
    # verify.workers pool): on CPU, round.workers processes, each claiming the next shard not done
    # (scope_cli/cli/workers.py); 1: the stages run as before. At most as many as the stage has
    # shards (generate.prompts_per_shard sets that; eval has one shard per eval set). Logs under
    # round-RRR/logs/. The same files for any count at a given shard layout
    workers: int = op(1, Range(ge=1, le=1024))
    # with CUDA: the GPUs the workers use ([]: every visible GPU; else ids as CUDA_VISIBLE_DEVICES
    # takes them), one worker per group of the stage's tensor-parallel size (generate and eval:
    # generate.tensor_parallel_size; rectify's model guide: rectify.guide_tensor_parallel_size),
    # each with its own CUDA_VISIBLE_DEVICES; round.workers is then not used. Ignored on CPU
    devices: list[int] = op(default_factory=list, rng=Range(ge=0, le=1_000_000))
    # who starts those workers: local (processes on this node) or ray (tasks on the Ray cluster this
    # node has joined, `ray start`; RAY_ADDRESS or "auto"; the run folder shared by every node; the
    # `ray` extra; scope_cli/cli/ray_workers.py): round.workers tasks where the cluster has no GPUs,
    # else one task per tensor-parallel group of its GPUs
    launcher: Literal["local", "ray"] = op("local")
    # with round.launcher = ray: train-step over this many nodes, one `torchrun --nnodes N
    # --nproc-per-node round.train_procs` per node started as a Ray task (one task per node, a
    # STRICT_SPREAD placement group), the rendezvous static at node 0's address and round.train_port;
    # 1: train-step runs where `scope round` runs
    train_nodes: int = op(1, Range(ge=1, le=4096))
    train_port: int = op(29500, Range(ge=1024, le=65535))  # node 0's rendezvous port (train_nodes > 1)
