"""The run folder: round paths, the run's fixed config, which policy is current, prompt slices, seeds.

    runs/<run>/
      config.toml                 fixed when the run is created
      prompts/ eval-sets/         written by `scope prepare`
      policy-000/                 the base policy
      round-001/<stage>/          shard-NNNNN.parquet + _manifest/
      round-001/train/            metrics.parquet, state/
      policy-001/                 written by round 1's train-step

A policy folder is complete when it holds ``scope-policy.json`` (written last, after the weights).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scope_cli.core.config import (
    Config,
    ConfigError,
    differing_keys,
    from_dict,
    load_config,
    read_toml,
    to_toml,
)
from scope_cli.errors import ScopeError
from scope_cli.core.manifests import run_command
from scope_cli.core.policy import policy_complete

if TYPE_CHECKING:
    import numpy as np


class RunError(ScopeError):
    """A run-level problem (missing input, refused config): one line."""


_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@-]*$")


def run_root(run: str, runs_dir: str | Path = "runs") -> Path:
    """A plain name (letters, digits, `._+=@-`, not starting with a dot) lives under runs_dir; a value
    with a slash is an explicit path (`./mine`, `/scratch/mine`), never one that climbs with `..`."""
    if "/" in run:
        if ".." in Path(run).parts:
            raise RunError(f"--run {run}: a run path must not contain '..' (give the folder as an "
                           "absolute path, or a plain name under the runs folder)")
        return Path(run)
    if not _RUN_NAME.match(run):
        raise RunError(f"--run {run!r}: expected a plain run name (letters, digits and ._+=@-, not "
                       "starting with a dot) or an explicit path such as ./NAME")
    return Path(runs_dir) / run


def read_stored_config(path: Path) -> dict[str, Any]:
    """A run's config.toml as a dict, read as its code meant it. A run created before
    train.mixed_precision had `auto` stored the then default "bf16", which applied only to FSDP on a
    GPU (CPU runs computed in fp32): it reads as auto, which computes the same on CPU and under FSDP
    on a GPU. Such a file is recognised by its [train] section lacking `packing` (added at the same
    time; every config written since lists every key)."""
    data = read_toml(path)
    train = data.get("train")
    if isinstance(train, dict) and "packing" not in train and train.get("mixed_precision") == "bf16":
        train["mixed_precision"] = "auto"
    return data


class Run:
    def __init__(self, root: Path, config: Config):
        self.root = Path(root)
        self.config = config

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        root: Path,
        toml_path: str | None = None,
        overrides: list[str] | None = None,
        force: bool = False,
        create: bool = False,
    ) -> "Run":
        """Open (or create) a run. An existing run's config is the base; a `--config`/`--set` that
        changes a key is refused, naming the keys, unless `force`, which records the new config."""
        from scope_cli.core.files import write_text_atomic

        root = Path(root)
        stored = root / "config.toml"
        if stored.exists():
            base = from_dict(read_stored_config(stored), str(stored))
            if toml_path is None and not overrides:
                return cls(root, base)
            wanted = load_config(toml_path, overrides,
                                 base=from_dict(read_stored_config(stored), str(stored)))
            changed = differing_keys(base, wanted)
            if changed and not force:
                raise config_changed(stored, base, wanted, changed)
            if changed or differing_keys(base, wanted, include_operational=True):
                write_text_atomic(to_toml(wanted), stored)
            return cls(root, wanted)
        if not create:
            raise RunError(f"{root}: no run here (no config.toml); create it with "
                           f"`{run_command(root, 'prepare')}`")
        cfg = load_config(toml_path, overrides)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise RunError(f"{root}: exists and is not a run (no config.toml); a new run needs a new "
                           "or empty folder")
        root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(to_toml(cfg), stored)
        return cls(root, cfg)

    def command(self, args: str) -> str:
        """A `scope` command line for this run, for error hints: pasted, it targets this run."""
        return run_command(self.root, args)

    # ---- paths -----------------------------------------------------------------------------------
    @property
    def prompts_dir(self) -> Path:
        return self.root / "prompts"

    @property
    def eval_sets_dir(self) -> Path:
        return self.root / "eval-sets"

    def round_dir(self, round_: int) -> Path:
        return self.root / f"round-{round_:03d}"

    def stage_dir(self, round_: int, folder: str) -> Path:
        return self.round_dir(round_) / folder

    def train_dir(self, round_: int) -> Path:
        return self.round_dir(round_) / "train"

    def eval_dir(self, round_: int) -> Path:
        return self.round_dir(round_) / "eval"

    def policy_dir(self, round_: int) -> Path:
        return self.root / f"policy-{round_:03d}"

    def rounds(self) -> list[int]:
        return sorted(int(p.name[6:]) for p in self.root.glob("round-[0-9][0-9][0-9]") if p.is_dir())

    def last_policy_round(self) -> int | None:
        done = [int(p.name[7:]) for p in self.root.glob("policy-[0-9][0-9][0-9]") if policy_complete(p)]
        return max(done) if done else None

    def input_policy(self, round_: int) -> Path:
        """The policy round R samples from and trains: policy-(R-1), which must be complete."""
        if round_ < 1:
            raise RunError(f"round must be >= 1, got {round_}")
        path = self.policy_dir(round_ - 1)
        if not policy_complete(path):
            last = self.last_policy_round()
            hint = (f"the last complete policy is policy-{last:03d}; run `{self.command(f'round {last + 1}')}` "
                    "first" if last is not None else f"run `{self.command('prepare')}` first")
            raise RunError(f"{path}: policy missing or incomplete ({hint})")
        return path

    # ---- prompts -----------------------------------------------------------------------------------
    def prompt_ids(self) -> list[str]:
        """All training prompt ids, sorted (the order slices are drawn from)."""
        import pyarrow.parquet as pq

        from scope_cli.core.files import ShardError, list_shard_files

        files = list_shard_files(self.prompts_dir)
        if not files:
            raise ShardError(f"{self.prompts_dir}: no prompt shards; run `{self.command('prepare')}` first")
        ids: list[str] = []
        for f in files:
            ids.extend(pq.read_table(f, columns=["prompt_id"]).column(0).to_pylist())
        return sorted(ids)

    def round_prompt_ids(self, round_: int) -> list[str]:
        """Round R's prompts in order: its own slice, then (generate.oversample > 1) the extra ones."""
        g = self.config.generate
        ids = self.prompt_ids()
        own = round_slice(ids, self.config.run.seed, round_, g.prompts_per_round)
        return own + extra_prompts(ids, own, self.config.run.seed, round_,
                                   (g.oversample - 1) * g.prompts_per_round)


def config_changed(stored: Path, base: Config, wanted: Config, changed: list[str]) -> ConfigError:
    """The refusal of a changed config: each key with its old and new value."""
    shown = ", ".join(f"{k} {json.dumps(base.get(k))} -> {json.dumps(wanted.get(k))}" for k in changed)
    return ConfigError(f"{stored}: the run's config is fixed; these keys differ: {shown} (rerun with --force "
                       "to accept the new config and recompute what depends on them)")


def round_slice(all_ids: list[str], seed: int, round_: int, per_round: int) -> list[str]:
    """Round R's prompts: positions [(R-1)·P, R·P) of the concatenated per-epoch permutations.

    Each epoch is a fresh permutation seeded by (seed, epoch), so prompts are drawn without replacement
    within an epoch, and a round's slice depends only on (seed, round) — never on what ran before.
    """
    n = len(all_ids)
    if n == 0:
        raise RunError("no training prompts")
    check_round_size(per_round, n, "the run's prompts/")
    start = (round_ - 1) * per_round
    out = []
    for pos in range(start, start + per_round):
        epoch, offset = divmod(pos, n)
        perm = _epoch_permutation(n, seed, epoch)
        out.append(all_ids[perm[offset]])
    return out


def extra_prompts(all_ids: list[str], own: list[str], seed: int, round_: int, count: int) -> list[str]:
    """`count` prompts for round R beyond its own slice (dynamic sampling): the first of a permutation
    seeded by (seed, round) that are not in the slice, so they depend on (seed, round) alone and the
    round's own slice stays what it is without them."""
    if count <= 0:
        return []
    check_round_size(len(own) + count, len(all_ids), "the run's prompts/",
                     "generate.prompts_per_round × generate.oversample")
    import numpy as np

    taken = set(own)
    perm = np.random.default_rng([seed, round_, 0xD7A]).permutation(len(all_ids))
    return [all_ids[i] for i in perm if all_ids[i] not in taken][:count]


def check_round_size(per_round: int, prompts: int, source: str, what: str = "generate.prompts_per_round") -> None:
    """A round draws each prompt at most once: it cannot ask for more prompts than there are."""
    if per_round > prompts:
        raise RunError(f"{what}: got {per_round}, expected at most the {prompts} "
                       f"training prompts of {source}")


_PERM_CACHE: dict[tuple[int, int, int], np.ndarray] = {}


def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    key = (n, seed, epoch)
    if key not in _PERM_CACHE:
        import numpy as np  # here, not at the top: `scope status` opens runs without numpy

        _PERM_CACHE[key] = np.random.default_rng([seed, epoch, 0x5C0BE]).permutation(n)
    return _PERM_CACHE[key]


def row_seed(seed: int, round_: int, prompt_id: str, sample_idx: int) -> int:
    """Per-row randomness: hash(run seed, round, prompt_id, sample_idx) as a 63-bit int."""
    blob = f"{seed}\x00{round_}\x00{prompt_id}\x00{sample_idx}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") >> 1


# ---- a round's training-side tables ------------------------------------------------------------------
def training_metrics(run: Any, round_: int) -> dict[str, float]:
    """What round R's stages wrote, where present: rollout accuracy, shares of all-wrong and all-right
    groups, salvaged and rectified rows, and (from train/metrics.parquet) the last update, dropped
    groups, and the mean entropy, ratio and clip fraction over the round's updates."""
    import polars as pl

    from scope_cli.core.files import list_shard_files

    def scan(folder: str, columns: list[str]) -> pl.DataFrame | None:
        files = list_shard_files(run.stage_dir(round_, folder))
        if not files:
            return None
        frame = pl.scan_parquet([str(p) for p in files])
        have = frame.collect_schema().names()
        return frame.select([c for c in columns if c in have]).collect()

    out: dict[str, float] = {}
    verified = scan("verified", ["prompt_id", "correct"])
    if verified is not None and verified.height and "correct" in verified.columns:
        groups = verified.group_by("prompt_id").agg(pl.col("correct").cast(pl.Float64).mean().alias("acc"))
        out["rollouts"] = float(verified.height)
        out["rollout_acc"] = float(verified["correct"].cast(pl.Float64).mean())
        out["all_wrong_share"] = float((groups["acc"] == 0.0).mean())
        out["all_right_share"] = float((groups["acc"] == 1.0).mean())
    located = scan("located", ["salvage"])
    if located is not None and "salvage" in located.columns:
        out["salvaged"] = float(located["salvage"].fill_null(False).sum())
    rectified = scan("rectified", ["origin", "in_batch"])
    if rectified is not None and "origin" in rectified.columns:
        out["rectified"] = float((rectified["origin"] == "rectified").sum())
        out["reference"] = float((rectified["origin"] == "reference").sum())
        if (rectified["origin"] == "guided").any():  # luffy_matched's rows
            out["guided"] = float((rectified["origin"] == "guided").sum())
        if "in_batch" in rectified.columns:
            out["batch_rows"] = float(rectified["in_batch"].fill_null(False).sum())
    train_file = run.train_dir(round_) / "metrics.parquet"
    if train_file.exists():
        train = pl.read_parquet(train_file)
        if train.height:
            out["update"] = float(train["update"].max())
            out["updates"] = float(train.height)
            if "dropped_groups" in train.columns:
                out["dropped_groups"] = float(train["dropped_groups"].max())
            for col in ("entropy", "mean_ratio", "clip_fraction", "loss", "kl", "grad_norm"):
                if col in train.columns and train[col].drop_nulls().len():
                    out[col] = float(train[col].drop_nulls().mean())
    return out
