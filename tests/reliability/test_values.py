"""Values and names checked before they enter a run: every numeric key within its declared range,
combinations a later stage would refuse, run names, worker slots; a prepare that fails leaves no run;
files a careless user or a hostile source hands in (unreadable markers, deep JSON, huge numbers, a
10 MB prompt, a full disk while writing weights) end in one line, exit 2.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from rel_helpers import POLICY, TINY, cli, one_line_error, set_args

from scope_cli.core.config import Config, ConfigError, load_config
from scope_cli.sections import Range


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---- every numeric key within its range ------------------------------------------------------------
@pytest.mark.parametrize("setting, fragments", [
    ("generate.temperature=-1", ["generate.temperature: got -1.0", "> 0"]),
    ("generate.temperature=nan", ["generate.temperature: got nan", "a finite number"]),
    ("generate.top_p=2", ["generate.top_p: got 2.0", "<= 1"]),
    ("train.grad_clip=-1", ["train.grad_clip: got -1.0", "0 (no clipping) or"]),
    ("verify.timeout=nan", ["verify.timeout: got nan", "a finite number > 0"]),
    ("train.lr=0", ["train.lr: got 0.0", "> 0"]),
    ("train.lr=nan", ["train.lr: got nan"]),
    ("train.betas=[2, 3]", ["train.betas: got 2.0 in [2.0, 3.0]", "< 1"]),
    ("run.seed=-1", ["run.seed: got -1", ">= 0"]),
    ("generate.n=1000000000", ["generate.n: got 1000000000", "<= 1024"]),
    ("generate.prompts_per_round=1000000000", ["generate.prompts_per_round: got 1000000000"]),
    ("verify.workers=100000", ["verify.workers: got 100000", "<= 256"]),
    ("eval.ks=[1, 0]", ["eval.ks: got 0 in [1, 0]"]),
    ("train.clip_low=1.5", ["train.clip_low: got 1.5", "< 1"]),
    # combinations that train-step or the trainer would refuse only after five stages ran
    ("generate.top_p=0.9", ["generate.top_p=0.9", "top_p=1 and top_k=0"]),
    ("train.lr_min=1", ["train.lr_min: got 1.0", "at most train.lr"]),
    ("train.betas=[0.9]", ["train.betas: expected two numbers"]),
    ("prepare.max_operands=2", ["prepare.max_operands: got 2", "at least prepare.min_operands (3)"]),
])
def test_prepare_refuses_a_bad_value_before_writing(tmp_path, setting, fragments):
    fresh = tmp_path / "fresh"
    one_line_error(cli("prepare", "--run", str(fresh), *set_args([*TINY, setting])), *fragments)
    assert not fresh.exists()


def test_every_numeric_key_declares_its_range():
    """No int or float key is left unchecked (bools and strings are not numbers; lists of numbers
    declare the range of their elements)."""
    cfg, unchecked = Config(), []
    for section in dataclass_fields(cfg):
        for f in dataclass_fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            items = value if isinstance(value, list) else [value]
            numeric = any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items)
            if numeric or f.type in ("int", "float", "list[float]", "list[int]"):
                if not isinstance(f.metadata.get("range"), Range):
                    unchecked.append(f"{section.name}.{f.name}")
    assert unchecked == []
    load_config()  # and every default lies within its own range


def dataclass_fields(obj):
    from dataclasses import fields

    return fields(obj)


@pytest.mark.parametrize("rng, inside, outside", [
    (Range(gt=0, le=10), [1e-9, 10], [0, -1, 10.5, float("nan"), float("inf")]),
    (Range(ge=1, zero="off"), [0, 1, 7], [-1, 0.5]),
    (Range(ge=0, lt=1), [0, 0.999], [1, -1e-9, float("-inf")]),
])
def test_range_table(rng, inside, outside):
    assert all(rng.contains(v) for v in inside) and not any(rng.contains(v) for v in outside)
    assert not rng.contains(True)


def test_zero_grad_clip_means_no_clipping(tmp_path):
    """train.grad_clip = 0 trains without clipping (as other trainers read it): the same weights as a
    bound the gradient never reaches, and not the base policy's weights."""
    from safetensors.torch import load_file
    from train_helpers import build_round, make_run

    from stages.train_step import train_step

    weights = {}
    for clip in ("0", "1000000"):
        run = make_run(tmp_path / clip, ["train.minibatches=1", f"train.grad_clip={clip}"])
        build_round(run, 1, n_prompts=2)
        result = train_step(run, 1, quiet=True)
        weights[clip] = load_file(run.policy_dir(1) / "model.safetensors")
        base = load_file(run.policy_dir(0) / "model.safetensors")
        assert result["updates"] == 1
    assert all(torch.equal(weights["0"][k], weights["1000000"][k]) for k in base)
    assert any(not torch.equal(weights["0"][k], base[k]) for k in base)


# ---- a prepare that fails leaves no run ----------------------------------------------------------
def test_failed_prepare_leaves_no_run_and_a_corrected_retry_needs_no_force(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+2", "answer": "3"}\n{oops\n')
    root = tmp_path / "run"
    base = [*TINY, "generate.prompts_per_round=1", "generate.prompts_per_shard=1"]
    one_line_error(cli("prepare", "--run", str(root), *set_args([*base, f"prepare.source={bad}"])),
                   "bad.jsonl:2: not valid JSON")
    assert not root.exists()
    bad.write_text('{"problem": "1+2", "answer": "3"}\n{"problem": "4+4", "answer": "8"}\n')
    res = cli("prepare", "--run", str(root), "--quiet", *set_args([*base, f"prepare.source={bad}"]))
    assert res.exit_code == 0, res.output
    assert (root / "config.toml").exists() and (root / "policy-000" / "scope-policy.json").exists()


def test_missing_policy_and_too_big_a_round_are_refused_at_prepare(tmp_path):
    root = tmp_path / "run"
    one_line_error(cli("prepare", "--run", str(root), *set_args([*TINY, f"policy.path={tmp_path / 'no'}"])),
                   "policy.path:", "does not exist")
    one_line_error(cli("prepare", "--run", str(root), *set_args([*TINY, "generate.prompts_per_round=65"])),
                   "generate.prompts_per_round: got 65", "at most the 64 training prompts")
    assert not root.exists()
    empty = tmp_path / "empty"  # a folder that existed before, empty, stays (empty)
    empty.mkdir()
    one_line_error(cli("prepare", "--run", str(empty), *set_args([*TINY, f"policy.path={tmp_path / 'no'}"])),
                   "policy.path:")
    assert empty.is_dir() and not any(empty.iterdir())


# ---- run names ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, fragment", [
    ("..", "expected a plain run name"), (".", "expected a plain run name"),
    (".hidden", "expected a plain run name"), ("../escape", "must not contain '..'"),
    ("a/../../b", "must not contain '..'"),
])
def test_run_names_cannot_escape_the_runs_folder(tmp_path, name, fragment):
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    before = listing(tmp_path)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        one_line_error(cli("prepare", "--run", name, *set_args(TINY)), fragment)
    finally:
        os.chdir(cwd)
    assert listing(tmp_path) == before


def test_a_new_run_needs_a_new_or_empty_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"x")
    one_line_error(cli("prepare", "--run", str(folder), *set_args(TINY)), "exists and is not a run")
    assert listing(folder) == ["holiday.jpg"]


# ---- worker slots ------------------------------------------------------------------------------
def test_worker_slots_from_flags_and_environment(prepared):
    one_line_error(cli("verify", "--round", "1", "--run", str(prepared), "--num-shards", "0"),
                   "worker slot 0 of 0", "--num-shards")
    one_line_error(cli("verify", "--round", "1", "--run", str(prepared), env={"WORLD_SIZE": "abc"}),
                   "WORLD_SIZE='abc'", "expected an integer")
    one_line_error(cli("verify", "--round", "1", "--run", str(prepared),
                       env={"WORLD_SIZE": "2", "RANK": "x1"}), "RANK='x1'")


# ---- hostile files -------------------------------------------------------------------------------
def test_deep_json_and_huge_numbers_in_a_source_are_one_line(tmp_path):
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"problem": "1+2", "answer": "3", "extra_info": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    huge = tmp_path / "huge.jsonl"
    huge.write_text('{"problem": "1+2", "answer": "3", "difficulty": 1e400}\n')
    nan = tmp_path / "nan.jsonl"
    nan.write_text('{"problem": "1+2", "answer": "3", "difficulty": NaN}\n')
    for source, fragments in ((deep, ["deep.jsonl:1", "nested too deeply"]),
                              (huge, ["huge.jsonl:1", "field difficulty", "inf"]),
                              (nan, ["nan.jsonl:1", "field difficulty", "nan"])):
        root = tmp_path / f"run-{source.stem}"
        one_line_error(cli("prepare", "--run", str(root),
                           *set_args([*TINY, "generate.prompts_per_round=1", "generate.prompts_per_shard=1",
                                      f"prepare.source={source}"])),
                       *fragments)
        assert not root.exists()


@pytest.mark.parametrize("content", ["{", "[]", "null", '"s"'])
def test_unreadable_policy_marker_is_one_line(prepared, tmp_path, content):
    import shutil

    root = tmp_path / "run"
    shutil.copytree(prepared, root)
    (root / "policy-000" / "scope-policy.json").write_text(content)
    one_line_error(cli("generate", "--round", "1", "--run", str(root), "--quiet"),
                   "policy-000/scope-policy.json")


def test_unreadable_generation_config_is_one_line(prepared, tmp_path):
    """A policy folder (here evaluated with --policy) whose generation_config.json is broken."""
    import shutil

    bad = tmp_path / "bad-policy"
    shutil.copytree(POLICY, bad)
    out = tmp_path / "eval"
    (bad / "generation_config.json").write_text("{not json")
    one_line_error(cli("eval", "--run", str(prepared), "--policy", str(bad), "--out", str(out), "--quiet"),
                   "generation_config.json: not valid JSON")
    (bad / "generation_config.json").write_text('{"eos_token_id": ["x"]}')
    one_line_error(cli("eval", "--run", str(prepared), "--policy", str(bad), "--out", str(out), "--quiet"),
                   "generation_config.json: eos_token_id")


def test_a_huge_prompt_is_skipped_without_tokenizing_it():
    """A 10 MB prompt has at least 10 MB / (longest vocabulary entry) tokens: far over the context, so
    it is skipped before the tokenizer sees it (which would take GBs and tens of seconds)."""
    from scope_cli.backends.engine import encode_prompt, max_token_chars
    from scope_cli.backends.hf import load_policy

    _, tokenizer = load_policy(POLICY)
    calls = []

    class Spy:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, *args, **kwargs):
            calls.append(len(args[0]))
            return tokenizer(*args, **kwargs)

    spy = Spy()
    assert max_token_chars(spy) == max(len(t) for t in tokenizer.get_vocab())
    assert encode_prompt(spy, "1+2=" * 2_500_000, limit=256) is None and calls == []
    short = encode_prompt(spy, "1+2\n", limit=256)
    assert short == tokenizer("1+2\n")["input_ids"] and calls == [4]
    # near the bound it is the tokenizer that decides: never a prompt that would fit
    edge = "1" * (256 * max_token_chars(tokenizer))
    assert encode_prompt(spy, edge, limit=256) is not None


def test_a_full_disk_while_writing_weights_is_one_line(tmp_path, monkeypatch):
    """safetensors raises SafetensorError (not an OSError) on a full disk: train-step says so in one
    line and leaves no policy, state or temporary behind."""
    import safetensors.torch
    import transformers.modeling_utils
    from safetensors import SafetensorError
    from train_helpers import build_round, make_run

    run = make_run(tmp_path / "run", ["train.minibatches=1"])
    build_round(run, 1, n_prompts=2)

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    text = one_line_error(cli("train-step", "--round", "1", "--run", str(run.root), "--quiet"),
                          "cannot write", "Error while serializing")
    assert "nothing was left under this name" in text
    assert not run.policy_dir(1).exists() and not (run.train_dir(1) / "state").exists()
    assert not [p for p in run.root.rglob("*") if ".tmp@" in p.name]


def test_config_error_for_a_stored_run_names_the_file(prepared, tmp_path):
    """A run whose stored config.toml was edited by hand to a bad value is refused when opened."""
    import shutil

    root = tmp_path / "run"
    shutil.copytree(prepared, root)
    text = (root / "config.toml").read_text().replace("timeout = 5.0", "timeout = nan")
    (root / "config.toml").write_text(text)
    one_line_error(cli("verify", "--round", "1", "--run", str(root)), "verify.timeout: got nan")
    with pytest.raises(ConfigError):
        load_config(root / "config.toml")
