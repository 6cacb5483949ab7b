"""The typed config: defaults < TOML file (`--config path`) < `--set section.key=value`.

One `Config` object holds a section per stage plus `run`, `task` and `policy`. Every key has a
documented default; unknown sections or keys fail with the nearest valid name. A stage declares the
keys it reads (e.g. ``["generate", "run.seed", "policy"]``); `config_hash` of those keys goes into the
stage's manifest, so a changed key makes exactly the stages that read it recompute.

Keys marked operational (`op()`) change how work is done (worker counts, batch sizes, backends that give
identical files), not what it computes: they are left out of a run's fixed config check. A choice key
declares its values as a `Literal` on the field and a numeric key its allowed range
(scope_cli/sections.py); `validate` refuses a value outside them, and combinations a later stage
could not run, when the config is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Literal, get_args, get_origin, get_type_hints

from scope_cli.errors import ScopeError
from scope_cli.sections import (
    RunConfig,
    TaskConfig,
    PolicyConfig,
    PrepareConfig,
    GenerateConfig,
    VerifyConfig,
    PrmConfig,
    LocateConfig,
    RectifyConfig,
    TrainConfig,
    SftConfig,
    EvalConfig,
    RoundConfig,
)
from scope_cli.sections import Range


class ConfigError(ScopeError, ValueError):
    """A bad config: the message is one line naming the key and what was expected."""


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


def choices(typ: Any) -> tuple[str, ...]:
    """The values a `Literal[...]` field type allows; () for any other type."""
    return get_args(typ) if get_origin(typ) is Literal else ()


def key_choices(dotted: str) -> tuple[str, ...]:
    """The values a choice key allows, read from its field: `key_choices("run.algo")`."""
    section, _, key = dotted.partition(".")
    sec = _section(Config(), section, dotted)
    _check_key(sec, section, key, dotted)
    return choices(get_type_hints(type(sec))[key])


def _typed_keys(cfg: Config) -> Iterator[tuple[str, Any, Any, dataclasses.Field]]:
    """(section.key, declared type, value, field) of every key, section by section."""
    for sec_field in fields(cfg):
        section = getattr(cfg, sec_field.name)
        hints = get_type_hints(type(section))
        for f in fields(section):
            yield f"{sec_field.name}.{f.name}", hints[f.name], getattr(section, f.name), f


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a TOML value or a `--set` string to the field's declared type (a choice is a string
    here; `validate` checks it against the field's values)."""
    if get_origin(typ) is Literal:
        typ = str
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
    """Every choice among its values, every number within its declared range, then the combinations
    a later stage would otherwise refuse only after the earlier ones ran. One line per problem."""
    keys = list(_typed_keys(cfg))
    for dotted, typ, value, _ in keys:
        allowed = choices(typ)
        if allowed and value not in allowed:
            raise ConfigError(f"{dotted}: expected one of {', '.join(allowed)}, got {value!r}")
    for dotted, typ, value, f in keys:
        rng: Range | None = f.metadata.get("range")
        if rng is None:
            continue
        integer = int in (typ, *get_args(typ))
        for item in value if isinstance(value, list) else [value]:
            if not rng.contains(item):
                shown = f"{value!r}" if not isinstance(value, list) else f"{item!r} in {value!r}"
                raise ConfigError(f"{dotted}: got {shown}, expected {rng.describe(integer)}")
    for dotted, typ, value, _ in keys:
        allowed = choices(get_args(typ)[0]) if get_origin(typ) is list else ()
        bad = [x for x in value if x not in allowed] if allowed else []
        if bad:
            raise ConfigError(f"{dotted}: expected a list of {', '.join(allowed)}, got {bad[0]!r}")
    _check_combinations(cfg)


def _check_combinations(cfg: Config) -> None:
    g, t = cfg.generate, cfg.train
    if g.top_p != 1.0 or g.top_k != 0:
        raise ConfigError(f"generate.top_p={g.top_p}, generate.top_k={g.top_k}: RL sampling must use "
                          "top_p=1 and top_k=0 (train-step recomputes old log-probs as "
                          "softmax(logits / temperature))")
    if g.prompts_per_round * g.oversample * g.n > 1_000_000:
        raise ConfigError(f"generate.prompts_per_round × generate.oversample × generate.n = "
                          f"{g.prompts_per_round} × {g.oversample} × {g.n}: expected at most 1_000_000 "
                          "rows per round")
    if g.prompts_per_shard > g.prompts_per_round:
        raise ConfigError(f"generate.prompts_per_shard: got {g.prompts_per_shard}, expected at most "
                          f"generate.prompts_per_round ({g.prompts_per_round})")
    if len(t.betas) != 2:
        raise ConfigError(f"train.betas: expected two numbers [beta1, beta2], got {t.betas!r}")
    if t.lr_min > t.lr:
        raise ConfigError(f"train.lr_min: got {t.lr_min!r}, expected at most train.lr ({t.lr!r})")
    for low, high in (("prepare.min_operands", "prepare.max_operands"),
                      ("prepare.ood_min_operands", "prepare.ood_max_operands"),
                      ("sft.min_operands", "sft.max_operands")):
        if cfg.get(low) > cfg.get(high):
            raise ConfigError(f"{high}: got {cfg.get(high)!r}, expected at least {low} ({cfg.get(low)!r})")
    if cfg.sft.hidden_size % cfg.sft.heads:
        raise ConfigError(f"sft.hidden_size: got {cfg.sft.hidden_size}, expected a multiple of sft.heads "
                          f"({cfg.sft.heads})")


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


def to_toml_marked(cfg: Config, changed_only: bool = False) -> str:
    """`to_toml(cfg)` with every key whose value differs from the built-in default marked
    `# default: VALUE` (and `(op)` when operational); `changed_only`: those keys alone."""
    operational, section, out = operational_keys(), "", []
    for ours, default in zip(to_toml(cfg).splitlines(), to_toml(Config()).splitlines()):
        if " = " not in ours:  # a [section] header or the blank line after a section
            section = ours[1:-1] if ours.startswith("[") else section
            out.append(ours)
        elif ours != default:
            op_note = " (op)" if f"{section}.{ours.partition(' = ')[0]}" in operational else ""
            out.append(f"{ours}  # default: {default.partition(' = ')[2]}{op_note}")
        elif not changed_only:
            out.append(ours)
    if changed_only:  # sections with no changed key go
        out = [x for i, x in enumerate(out) if not x.startswith("[") or " = " in (out[i + 1:] or [""])[0]]
        out = [x for i, x in enumerate(out) if x or (i and out[i - 1])]
    return "\n".join(out).strip("\n") + "\n"


def operational_keys() -> set[str]:
    out = set()
    for sec_field in fields(Config):
        for f in fields(sec_field.default_factory()):  # type: ignore[misc]
            if f.metadata.get("operational"):
                out.add(f"{sec_field.name}.{f.name}")
    return out


def added_defaults() -> dict[str, Any]:
    """The keys marked `added` (sections.key) and their defaults."""
    out = {}
    for sec_field in fields(Config):
        for f in fields(sec_field.default_factory()):  # type: ignore[misc]
            if f.metadata.get("added"):
                out[f"{sec_field.name}.{f.name}"] = f.default
    return out


def flatten(cfg: Config) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, values in cfg.to_dict().items() for k, v in values.items()}


def differing_keys(old: Config, new: Config, include_operational: bool = False) -> list[str]:
    skip = set() if include_operational else operational_keys()
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a if a[k] != b[k] and k not in skip)


def config_hash(cfg: Config, keys: list[str]) -> str:
    """Hash of the values of `keys` (sections or section.key), operational keys left out, and keys
    added after runs were made (`added`) left out while at their default: the hash those runs wrote."""
    skip = operational_keys()
    flat = flatten(cfg)
    unset = {k for k, default in added_defaults().items() if flat[k] == default}
    picked = {}
    for key in sorted(keys):
        if "." in key:
            cfg.get(key)  # raises on a typo in a stage's declaration
            if key not in unset:
                picked[key] = flat[key]
        else:
            picked.update({k: v for k, v in flat.items()
                           if k.startswith(key + ".") and k not in skip and k not in unset})
    blob = json.dumps(picked, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
