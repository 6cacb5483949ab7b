"""The typed config: defaults < TOML file (`--config path`) < `--set section.key=value`.

One `Config` object holds a section per stage plus `run`, `task` and `policy`. Every key has a
documented default; unknown sections or keys fail with the nearest valid name. A stage declares the
keys it reads (e.g. ``["generate", "run.seed", "policy"]``); `config_hash` of those keys goes into the
stage's manifest, so a changed key makes exactly the stages that read it recompute.

Keys marked operational (`op()`) change how work is done (worker counts, batch sizes, backends that give
identical files), not what it computes: they are left out of a run's fixed config check.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from scope_cli.errors import ScopeError


class ConfigError(ScopeError, ValueError):
    """A bad config: the message is one line naming the key and what was expected."""


def op(default: Any = None, *, default_factory: Any = None) -> Any:
    """A field that is operational: not part of the run's fixed config."""
    if default_factory is not None:
        return field(default_factory=default_factory, metadata={"operational": True})
    return field(default=default, metadata={"operational": True})


@dataclass
class RunConfig:
    name: str = "default"
    seed: int = 0
    algo: str = "scope"  # grpo | luffy | scope
    # checkpoint retention, applied by `scope round` after each finished round (scope_cli/rounds.py);
    # operational: it removes old files, never changes what a stage computes
    keep_policies: int = op(0)  # keep the last K policy folders (0: keep all)
    keep_every: int = op(0)  # and every M-th (0: none beyond the last K)
    keep_state: int = op(1)  # keep train state of the last K rounds (0: all)


@dataclass
class TaskConfig:
    # the task of a file source's rows that name none (in task or data_source): math | choice; arith
    # (the default) is the built-in source's task, so such rows are read as math
    name: str = "arith"


@dataclass
class PolicyConfig:
    path: str = "data/policies/arith-tiny"  # the base policy (HF folder), copied to policy-000
    # the dtype train-step writes policy-R in: float32 keeps every update (an lr-1e-6 step is below
    # bfloat16's resolution and would be rounded away; engines still compute in generate.dtype)
    dtype: str = "float32"  # float32 | bfloat16 | float16
    trust_remote_code: bool = False


@dataclass
class PrepareConfig:
    source: str = "arith"  # "arith" (built-in), a .jsonl/.parquet file, a folder, or hf:<dataset id>
    split: str = "train"  # split to read from a dataset folder / hub dataset
    eval_sources: list[str] = field(default_factory=list)  # ["name=path", ...] for non-arith tasks
    shard_rows: int = 1024
    seed: int = 1234  # data seed (built-in task): fixed apart from run.seed so arms share prompts
    # built-in arithmetic task
    train_size: int = 4096
    eval_size: int = 1000
    ood_size: int = 500
    min_operands: int = 3
    max_operands: int = 6
    ood_min_operands: int = 7
    ood_max_operands: int = 8


@dataclass
class GenerateConfig:
    backend: str = "hf"  # hf | vllm | auto
    prompts_per_round: int = 32
    prompts_per_shard: int = 32
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    batch_size: int = op(256)  # sequences per hf generate call
    dtype: str = "float32"
    tensor_parallel_size: int = op(1)
    gpu_memory_utilization: float = op(0.5)
    max_model_len: int = 0  # 0: the model's own limit


@dataclass
class VerifyConfig:
    workers: int = op(2)
    timeout: float = 5.0  # seconds per item, enforced from outside the worker
    # where the answer comes from (verify, eval and rectify's re-verification): boxed (the last
    # \boxed{}, what the prompts ask for) | auto (math-verify's own LaTeX and plain-expression
    # extraction over the whole response, for free-form answers; a row where it finds none is
    # no_answer). Measured agreement with hand labels: README "Answers in free form"
    extract: str = "boxed"
    format_reward: float = 0.0  # reward given when \boxed{} is missing (off: 0)
    truncation_penalty: float = 0.0  # subtracted when finish_reason == "length"


@dataclass
class PrmConfig:
    backend: str = "rule"  # rule | hf | vllm
    path: str = ""  # PRM folder for hf / vllm
    convention: str = "qwen"  # qwen (<extra_0> + 2-class head) | shepherd (step tag, +/- tokens)
    score: str = "failed"  # failed | all
    noise: float = 0.0  # probability per row of missing or shifting the first error
    batch_size: int = op(32)
    batch_tokens: int = op(65536)  # hf: at most this many (padded) tokens per forward pass
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    device: str = op("auto")  # auto | cpu | cuda | cuda:N
    step_tag: str = "ки"  # shepherd convention: the tag after each step
    good_token: str = "+"  # shepherd convention: the "step is right" token
    bad_token: str = "-"  # shepherd convention: the "step is wrong" token


@dataclass
class LocateConfig:
    method: str = "threshold"  # threshold | argmin
    threshold: float = 0.5
    min_prefix_steps: int = 1
    max_per_group: int = 2
    salvage_disagreement: bool = False  # salvage failed rows where the PRM finds no wrong step


@dataclass
class RectifyConfig:
    mode: str = "replace"  # replace | augment
    guide: str = "oracle"  # oracle | model
    guide_path: str = "data/policies/arith-guide"
    guide_sees_reference: bool = False
    guide_temperature: float = 1.0
    max_tries: int = 4
    max_tokens: int = 64
    guide_tensor_parallel_size: int = op(1)  # vllm: GPUs per model-guide engine


@dataclass
class TrainConfig:
    lr: float = 1e-4  # measured on the embedded task: 1e-3 collapses within 10 rounds, 1e-4 and 3e-4 improve
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_updates: int = 0
    total_updates: int = 0  # 0: constant LR after warm-up; >0: cosine decay to lr_min over this many
    lr_min: float = 0.0
    minibatches: int = 4
    ppo_epochs: int = 1
    clip_low: float = 0.2
    clip_high: float = 0.28
    offpolicy_loss: str = "shaped"  # shaped | nll
    offpolicy_gamma: float = 0.1
    advantage: str = "grpo"  # grpo | drgrpo (no std) | grpo_split (stats over policy rows)
    adv_eps: float = 1e-6
    aggregation: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    kl_coef: float = 0.0
    grad_clip: float = 1.0
    drop_unverified: bool = False
    tis_cap: float = 0.0  # truncated importance correction with the engine's logprobs (0: off)
    micro_batch_tokens: int = op(0)  # rows × longest row per micro-batch; 0: 16384 on GPU, 1024 on CPU (measured)
    threads: int = op(1)  # CPU threads for training (0: torch's default); 1 is fastest for tiny models
    fsdp: bool = False
    activation_checkpointing: bool = False
    mixed_precision: str = "bf16"  # for FSDP on GPU


@dataclass
class SftConfig:
    steps: int = 3000
    batch_size: int = 64
    lr: float = 3e-3
    target_accuracy: float = 0.40
    eval_every: int = 25
    dense_from: float = 0.25  # evaluate every step once accuracy reaches this fraction of the target
    monitor_size: int = 200
    seed: int = 0  # model init, problem draws and solution orders
    train_size: int = 20000  # distinct training problems (the run's held-out eval problems excluded)
    min_operands: int = 3
    max_operands: int = 6
    warmup_steps: int = 50
    max_new_tokens: int = 64  # greedy decoding on the monitor set
    # tiny model shape
    hidden_size: int = 64
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 256


@dataclass
class EvalConfig:
    every: int = 5  # evaluate policy-R when R % every == 0 (round 0, the base, and the last round always)
    sets: list[str] = field(default_factory=list)  # empty: every set in eval-sets/
    greedy: bool = True
    n_samples: int = 16  # samples per prompt at `temperature` (top_p / top_k / stop from [generate])
    temperature: float = 1.0  # keep equal to generate.temperature: sampled metrics at the training T
    max_tokens: int = 64
    limit: int = 0  # 0: whole set; else its first `limit` prompts
    sampled_limit: int = 200  # sampled metrics (n_samples each) on the first K prompts of a set (0: all)
    ks: list[int] = field(default_factory=lambda: [1, 4, 8])  # pass@k and maj@k for k <= n_samples


@dataclass
class RoundConfig:
    isolate: str = op("auto")  # auto | on | off: run each stage as a subprocess
    # isolated rounds: train-step runs under `torchrun --standalone --nproc-per-node N` when N > 1
    # (DDP, or FSDP2 with train.fsdp, over one node's GPUs); 1: one plain process
    train_procs: int = op(1)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    prm: PrmConfig = field(default_factory=PrmConfig)
    locate: LocateConfig = field(default_factory=LocateConfig)
    rectify: RectifyConfig = field(default_factory=RectifyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    round: RoundConfig = field(default_factory=RoundConfig)

    # ---- views -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def get(self, dotted: str) -> Any:
        """`cfg.get("generate.n")` or a whole section `cfg.get("generate")` (as a dict)."""
        section, _, key = dotted.partition(".")
        sec = _section(self, section, dotted)
        if not key:
            return dataclasses.asdict(sec)
        _check_key(sec, section, key, dotted)
        return getattr(sec, key)


CHOICES: dict[str, tuple[str, ...]] = {
    "run.algo": ("grpo", "luffy", "scope"),
    "task.name": ("arith", "math", "choice"),
    "verify.extract": ("boxed", "auto"),
    "policy.dtype": ("float32", "bfloat16", "float16"),
    "generate.backend": ("hf", "vllm", "auto"),
    "generate.dtype": ("float32", "bfloat16", "float16"),
    "prm.backend": ("rule", "hf", "vllm"),
    "prm.convention": ("qwen", "shepherd"),
    "prm.score": ("failed", "all"),
    "prm.dtype": ("auto", "float32", "bfloat16", "float16"),
    "locate.method": ("threshold", "argmin"),
    "rectify.mode": ("replace", "augment"),
    "rectify.guide": ("oracle", "model"),
    "train.offpolicy_loss": ("shaped", "nll"),
    "train.advantage": ("grpo", "drgrpo", "grpo_split"),
    "train.aggregation": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
    "train.mixed_precision": ("bf16", "fp32"),
    "round.isolate": ("auto", "on", "off"),
}

POSITIVE: tuple[str, ...] = (
    "generate.n", "generate.prompts_per_round", "generate.prompts_per_shard", "generate.max_tokens",
    "generate.batch_size", "verify.workers", "verify.timeout", "prepare.shard_rows",
    "train.minibatches", "train.ppo_epochs", "eval.every", "eval.n_samples", "eval.max_tokens",
    "rectify.max_tries", "rectify.max_tokens", "rectify.guide_tensor_parallel_size", "prm.batch_tokens",
    "sft.steps", "sft.batch_size", "sft.eval_every", "round.train_procs",
)


# ---- building a config ---------------------------------------------------------------------------
def _section(cfg: Config, section: str, where: str) -> Any:
    names = [f.name for f in fields(cfg)]
    if section not in names:
        raise ConfigError(f"unknown section '{section}' in '{where}'{_nearest(section, names)}")
    return getattr(cfg, section)


def _check_key(sec: Any, section: str, key: str, where: str) -> None:
    names = [f.name for f in fields(sec)]
    if key not in names:
        raise ConfigError(
            f"unknown key '{key}' in section '{section}' ('{where}')"
            f"{_nearest(key, names, prefix=section + '.')}"
        )


def _nearest(word: str, names: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid: {', '.join(names)}"


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a TOML value or a `--set` string to the field's declared type."""
    origin = get_origin(typ)
    if origin is list:
        (inner,) = get_args(typ)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{where}: expected a list like [1, 2], got {value!r}") from exc
            else:
                value = [v for v in text.split(",") if v != ""]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, inner, where) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {typ}")  # pragma: no cover


def _assign(cfg: Config, dotted: str, value: Any, where: str) -> None:
    section, dot, key = dotted.partition(".")
    if not dot or not key:
        raise ConfigError(f"{where}: expected section.key, got '{dotted}'")
    sec = _section(cfg, section, where)
    _check_key(sec, section, key, where)
    hints = get_type_hints(type(sec))
    setattr(sec, key, _coerce(value, hints[key], f"{where} ({dotted})"))


def apply_mapping(cfg: Config, data: dict[str, Any], source: str) -> Config:
    """Apply a nested mapping {section: {key: value}} (a parsed TOML file) onto cfg."""
    for section, values in data.items():
        if not isinstance(values, dict):
            _section(cfg, section, source)
            raise ConfigError(f"{source}: [{section}] must be a table of keys")
        for key, value in values.items():
            _assign(cfg, f"{section}.{key}", value, source)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` strings."""
    for item in overrides:
        dotted, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        _assign(cfg, dotted.strip(), value.strip(), f"--set {item}")
    return cfg


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def load_config(
    toml_path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: Config | None = None,
) -> Config:
    """defaults (or `base`) < TOML file < overrides, then validated."""
    cfg = base if base is not None else Config()
    if toml_path is not None:
        apply_mapping(cfg, read_toml(toml_path), str(toml_path))
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


def from_dict(data: dict[str, Any], source: str = "config") -> Config:
    cfg = apply_mapping(Config(), data, source)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    for dotted, allowed in CHOICES.items():
        value = cfg.get(dotted)
        if value not in allowed:
            raise ConfigError(f"{dotted}: expected one of {', '.join(allowed)}, got {value!r}")
    for dotted in POSITIVE:
        value = cfg.get(dotted)
        if value <= 0:
            raise ConfigError(f"{dotted}: expected a positive number, got {value!r}")
    for dotted in ("run.keep_policies", "run.keep_every", "run.keep_state"):
        if cfg.get(dotted) < 0:
            raise ConfigError(f"{dotted}: expected 0 (off) or a positive number, got {cfg.get(dotted)!r}")
    if not 0.0 <= cfg.prm.noise <= 1.0:
        raise ConfigError(f"prm.noise: expected a probability in [0, 1], got {cfg.prm.noise!r}")
    if cfg.generate.prompts_per_shard > cfg.generate.prompts_per_round:
        cfg.generate.prompts_per_shard = cfg.generate.prompts_per_round


# ---- serialisation, comparison, hashing ----------------------------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: Config) -> str:
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def operational_keys() -> set[str]:
    out = set()
    for sec_field in fields(Config):
        for f in fields(sec_field.default_factory()):  # type: ignore[misc]
            if f.metadata.get("operational"):
                out.add(f"{sec_field.name}.{f.name}")
    return out


def flatten(cfg: Config) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, values in cfg.to_dict().items() for k, v in values.items()}


def differing_keys(old: Config, new: Config, include_operational: bool = False) -> list[str]:
    skip = set() if include_operational else operational_keys()
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a if a[k] != b[k] and k not in skip)


def config_hash(cfg: Config, keys: list[str]) -> str:
    """Hash of the values of `keys` (sections or section.key), operational keys left out."""
    skip = operational_keys()
    flat = flatten(cfg)
    picked = {}
    for key in sorted(keys):
        if "." in key:
            cfg.get(key)  # raises on a typo in a stage's declaration
            picked[key] = flat[key]
        else:
            picked.update({k: v for k, v in flat.items() if k.startswith(key + ".") and k not in skip})
    blob = json.dumps(picked, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
