"""The TOML presets in configs/: each loads and validates (every key it sets exists, every value has
its type and allowed choice), and configs/default.toml is the embedded default, key for key."""

from pathlib import Path

import pytest

from scope_cli.core.config import Config, flatten, load_config, read_toml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(CONFIGS.glob("*.toml"))


def keys_set(path: Path) -> set[str]:
    return {f"{section}.{key}" for section, values in read_toml(path).items() for key in values}


def test_the_presets_are_there():
    names = {p.name for p in PRESETS}
    assert {"default.toml", "qwen2.5-math-1.5b.toml", "qwen2.5-math-7b.toml", "smollm2-cpu.toml"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_loads_and_sets_only_known_keys(path):
    cfg = load_config(path)  # unknown sections or keys, bad types or choices raise ConfigError
    values = flatten(cfg)
    data = read_toml(path)
    for section, entries in data.items():  # every value it sets is the one loaded
        for key, value in entries.items():
            loaded = values[f"{section}.{key}"]
            assert loaded == value or (isinstance(value, int) and loaded == float(value)), f"{section}.{key}"


def test_default_toml_is_the_embedded_default_key_for_key():
    path = CONFIGS / "default.toml"
    assert load_config(path) == Config()
    assert keys_set(path) == set(flatten(Config()))  # written out in full, nothing left implicit


@pytest.mark.parametrize("name", ["qwen2.5-math-1.5b.toml", "qwen2.5-math-7b.toml"])
def test_gpu_presets_follow_the_luffy_settings(name):
    cfg = load_config(CONFIGS / name)
    g, t = cfg.generate, cfg.train
    assert (g.backend, g.n, g.temperature, g.max_tokens, g.top_p, g.top_k) == ("vllm", 8, 1.0, 8192, 1.0, 0)
    assert g.max_model_len >= g.max_tokens + 1024  # room for the prompt (needs the context edit)
    assert (t.lr, t.clip_low, t.clip_high, t.kl_coef) == (1e-6, 0.2, 0.28, 0.0)
    assert t.fsdp and t.activation_checkpointing and t.mixed_precision == "bf16"
    assert (t.packing, t.logprob_chunks) == ("on", "on")  # no padding, no [tokens x vocabulary] tensor
    assert g.dtype == "bfloat16" and cfg.prm.dtype == "bfloat16"
    assert cfg.policy.dtype == "float32"  # lr-1e-6 updates survive saving
    assert cfg.round.isolate == "on"
    assert (cfg.prm.backend, cfg.prm.convention, cfg.rectify.guide) == ("hf", "qwen", "model")
    assert cfg.rectify.max_tokens <= g.max_tokens
    sets = dict(item.split("=", 1) for item in cfg.prepare.eval_sources)
    assert set(sets) == {"math500", "aime24", "aime25", "amc", "minerva", "olympiadbench", "arc_c",
                         "gpqa_diamond", "mmlu_pro"}


def test_choice_sets_are_picked_by_data_source_name():
    from scope_cli.tasks import task_for_source

    cfg = load_config(CONFIGS / "qwen2.5-math-7b.toml")
    sets = dict(item.split("=", 1) for item in cfg.prepare.eval_sources)
    tasks = {name: task_for_source(name, "math") for name in sets}
    assert {n for n, t in tasks.items() if t == "choice"} == {"arc_c", "gpqa_diamond", "mmlu_pro"}


def test_smollm2_preset_is_small_and_uses_the_real_model_path():
    cfg = load_config(CONFIGS / "smollm2-cpu.toml")
    assert (cfg.task.name, cfg.run.algo, cfg.generate.backend) == ("math", "scope", "hf")
    assert (cfg.prm.backend, cfg.prm.convention, cfg.rectify.guide) == ("hf", "qwen", "model")
    assert cfg.generate.prompts_per_round * cfg.generate.n <= 16 and cfg.generate.max_tokens <= 128
    for path in (cfg.prepare.source, cfg.prepare.eval_sources[0].split("=", 1)[1]):
        assert (CONFIGS.parent / path).is_file()  # the fixtures ship with the repository
