import re
from dataclasses import fields
from pathlib import Path
from typing import get_args, get_origin, get_type_hints

import pytest

from scope_cli.core.config import (
    Config,
    ConfigError,
    choices,
    config_hash,
    differing_keys,
    from_dict,
    key_choices,
    load_config,
    read_toml,
    to_toml,
)


def test_defaults_then_toml_then_set(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[generate]\nn = 4\ntemperature = 0.7\n[run]\nalgo = "grpo"\n')
    cfg = load_config(toml, ["generate.n=6", "train.lr=2e-4", "generate.stop=[\"x\", \"y\"]"])
    assert cfg.generate.n == 6  # --set wins over TOML
    assert cfg.generate.temperature == 0.7  # TOML wins over the default
    assert cfg.run.algo == "grpo"
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.generate.stop == ["x", "y"]
    assert cfg.verify.timeout == Config().verify.timeout


@pytest.mark.parametrize(
    "override, message",
    [
        ("verfy.timeout=3", "unknown section 'verfy' in '--set verfy.timeout=3'; did you mean 'verify'?"),
        ("verify.timeot=3", "did you mean 'verify.timeout'?"),
        ("generate.n=abc", "expected an integer, got 'abc'"),
        ("generate.n=0", "generate.n: got 0, expected an integer >= 1 and <= 1024"),
        ("generate.n=-2", "generate.n: got -2, expected an integer >= 1 and <= 1024"),
        ("run.algo=ppo", "run.algo: expected one of grpo, luffy, scope, luffy_matched, vppo, got 'ppo'"),
        ("train.fsdp=maybe", "expected true or false"),
        ("generate", "expected section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_toml_typo_and_bad_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[genrate]\nn = 3\n")
    with pytest.raises(ConfigError, match="did you mean 'generate'"):
        load_config(bad)
    broken = tmp_path / "broken.toml"
    broken.write_text("[generate\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_toml_round_trip(tmp_path):
    cfg = load_config(None, ["generate.stop=[\";;\"]", "prm.noise=0.3", "run.name=x\"y"])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(cfg))
    again = from_dict(read_toml(path))
    assert again == cfg


def test_hash_covers_declared_keys_only():
    a = Config()
    b = load_config(None, ["verify.timeout=9"])
    assert config_hash(a, ["generate", "run.seed"]) == config_hash(b, ["generate", "run.seed"])
    assert config_hash(a, ["verify"]) != config_hash(b, ["verify"])
    c = load_config(None, ["verify.workers=7"])  # operational: never part of a hash
    assert config_hash(a, ["verify"]) == config_hash(c, ["verify"])
    assert differing_keys(a, b) == ["verify.timeout"]
    assert differing_keys(a, c) == []
    with pytest.raises(ConfigError):
        config_hash(a, ["generate.nn"])


# ---- choices: declared once, as a Literal on the field ---------------------------------------------
def choice_keys() -> dict[str, tuple[tuple[str, ...], bool]]:
    """{section.key: (its values, whether the key is a list of them)} for every choice key."""
    out = {}
    for section in fields(Config):
        for name, typ in get_type_hints(section.default_factory).items():
            is_list = get_origin(typ) is list
            values = choices(get_args(typ)[0] if is_list else typ)
            if values:
                out[f"{section.name}.{name}"] = (values, is_list)
    return out


def test_choice_keys_are_found():
    keys = choice_keys()
    assert keys["run.algo"] == (("grpo", "luffy", "scope", "luffy_matched", "vppo"), False)
    assert keys["run.loggers"] == (("tensorboard", "wandb"), True)
    assert keys["train.packing"] == (("auto", "on", "off"), False)
    assert keys["round.launcher"] == (("local", "ray"), False)
    assert keys["locate.order"] == (("longest", "random"), False)
    assert len(keys) == 23  # every `a | b` key of the sections, none left as a plain str
    assert "prm.device" not in keys  # cuda:N is open-ended: a plain string


def test_every_choice_default_is_one_of_its_values():
    cfg = Config()
    for dotted, (values, is_list) in choice_keys().items():
        default = cfg.get(dotted)
        assert all(v in values for v in default) if is_list else default in values, dotted


def test_validation_accepts_every_choice_and_refuses_others():
    for dotted, (values, is_list) in choice_keys().items():
        for value in values:
            assert load_config(None, [f"{dotted}={value}"]).get(dotted) == ([value] if is_list else value)
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{dotted}=nope"])
        expected = "a list of" if is_list else "one of"
        assert str(err.value) == f"{dotted}: expected {expected} {', '.join(values)}, got 'nope'"
    assert key_choices("run.algo") == ("grpo", "luffy", "scope", "luffy_matched", "vppo")
    assert key_choices("run.seed") == ()


def test_task_name_accepts_exactly_the_task_modules():
    from scope_cli.tasks import TASKS

    assert key_choices("task.name") == tuple(TASKS)


def test_default_toml_lists_every_choice():
    """configs/default.toml's comment on each choice key names all of its values."""
    lines = {}
    section = ""
    for line in (Path(__file__).resolve().parents[1] / "configs" / "default.toml").read_text().splitlines():
        if line.startswith("["):
            section = line[1:line.index("]")]
        elif " = " in line:
            lines[f"{section}.{line.partition(' = ')[0].strip()}"] = line
    for dotted, (values, _) in choice_keys().items():
        comment = lines[dotted].partition("#")[2]
        missing = [v for v in values if not re.search(rf"(?<![\w-]){re.escape(v)}(?![\w-])", comment)]
        assert missing == [], dotted


@pytest.mark.parametrize("per_round, per_shard", [(4, 4), (4, 2), (32, 1)])
def test_prompts_per_shard_at_most_per_round(per_round, per_shard):
    cfg = load_config(None, [f"generate.prompts_per_round={per_round}", f"generate.prompts_per_shard={per_shard}"])
    assert (cfg.generate.prompts_per_round, cfg.generate.prompts_per_shard) == (per_round, per_shard)


def test_prompts_per_shard_above_per_round_is_refused_not_clamped():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["generate.prompts_per_round=4"])  # prompts_per_shard: 32 by default
    assert str(err.value) == ("generate.prompts_per_shard: got 32, expected at most "
                              "generate.prompts_per_round (4)")


def test_a_key_added_later_keeps_the_hash_of_earlier_runs_at_its_default():
    """locate.order was added after runs were made: at its default (longest) the stages that read
    the locate section hash as they did before it existed (the values below), so finished stages of
    those runs stay done; set to random, the hash changes and locate-error recomputes."""
    from stages import locate_error, rectify

    keys = locate_error.CONFIG_KEYS
    assert config_hash(Config(), keys) == "8642ee590b5e9f7c"
    assert config_hash(load_config(None, ["run.algo=luffy"]), keys) == "7e95c37c20b71d71"
    assert config_hash(Config(), rectify.CONFIG_KEYS) == "270830f7de378e2f"
    assert config_hash(load_config(None, ["locate.order=random"]), keys) != "8642ee590b5e9f7c"
    assert config_hash(load_config(None, ["locate.order=longest"]), keys) == "8642ee590b5e9f7c"


def test_prm_score_hashes_the_threshold_only_where_noise_reads_it():
    """locate.threshold changes prm-score's output only through prm.noise: without noise the stage
    hashes as runs made before it read the threshold (the value below), so their scored/ stays done."""
    from stages import prm_score

    assert config_hash(Config(), prm_score.config_keys(Config())) == "c4349b9e2c855ab5"
    noisy = load_config(None, ["prm.noise=0.3"])
    assert "locate.threshold" in prm_score.config_keys(noisy)
    moved = load_config(None, ["prm.noise=0.3", "locate.threshold=0.4"])
    assert config_hash(moved, prm_score.config_keys(moved)) != config_hash(noisy, prm_score.config_keys(noisy))
