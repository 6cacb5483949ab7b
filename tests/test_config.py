import pytest

from scope_cli.core.config import (
    Config,
    ConfigError,
    config_hash,
    differing_keys,
    from_dict,
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
        ("run.algo=ppo", "run.algo: expected one of grpo, luffy, scope, got 'ppo'"),
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
