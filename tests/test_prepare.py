import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from scope_cli.cli.app import app
from scope_cli.core.runs import Run
from scope_cli.core.files import read_stage
from stages.prepare import PrepareError, prepare, prompt_id


POLICY = str(Path(__file__).resolve().parents[1] / "data" / "policies" / "arith-tiny")


def make_run(tmp_path, *overrides):
    return Run.open(tmp_path / "run", None, ["policy.path=" + POLICY, *overrides], create=True)


def verl_table():
    """A Parquet file in verl's schema, as verl's preprocessing scripts (and LUFFY) write it."""
    chat = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
    return pa.table({
        "data_source": ["openr1", "openr1", "aime"],
        "prompt": pa.array([[{"content": "Find 1+1.", "role": "user"}],
                            [{"content": "You are helpful.", "role": "system"},
                             {"content": "Solve x+2=5.", "role": "user"}],
                            [{"content": "Find 1+1.", "role": "user"}]], type=chat),
        "ability": ["math", "math", "math"],
        "reward_model": pa.array([{"style": "rule", "ground_truth": "2"},
                                  {"style": "rule", "ground_truth": "3"},
                                  {"style": "rule", "ground_truth": "2"}],
                                 type=pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        "extra_info": pa.array([{"split": "train", "index": 0}, {"split": "train", "index": 1},
                                {"split": "train", "index": 2}],
                               type=pa.struct([("split", pa.string()), ("index", pa.int64())])),
        "target": pa.array([[{"content": "1+1=2. \\boxed{2}", "role": "assistant"}],
                            [{"content": "x=3 \\boxed{3}", "role": "assistant"}],
                            [{"content": "2", "role": "assistant"}]], type=chat),
    })


def test_verl_parquet_written_elsewhere(tmp_path):
    src = tmp_path / "train.parquet"
    pq.write_table(verl_table(), src)
    run = make_run(tmp_path, f"prepare.source={src}", "task.name=math", "generate.prompts_per_round=2",
                   "generate.prompts_per_shard=2")
    summary = prepare(run, quiet=True)
    rows = read_stage(run.prompts_dir).to_pylist()
    assert summary["prompts"] == 2 and summary["duplicates"] == 1  # the same problem twice (same answer)
    first, second = rows
    assert first["problem"] == "Find 1+1." and first["answer"] == "2" and first["task"] == "math"
    assert first["messages"] == [{"role": "user", "content": "Find 1+1."}]
    assert second["messages"][0] == {"role": "system", "content": "You are helpful."}
    assert second["problem"] == "Solve x+2=5." and second["solution"] == "x=3 \\boxed{3}"
    assert json.loads(first["extra_info"]) == {"index": 0, "split": "train"}
    assert first["data_source"] == "openr1"
    assert first["prompt_id"] == prompt_id("math", "Find 1+1.")


def test_conflicting_duplicates_name_both_sources(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text('{"problem": "2+2", "answer": "4"}\n{"problem": "3+3", "answer": "6"}\n'
                   '{"problem": "2+2", "answer": "5"}\n')
    run = make_run(tmp_path, f"prepare.source={src}", "task.name=math", "generate.prompts_per_round=2",
                   "generate.prompts_per_shard=2")
    with pytest.raises(PrepareError) as err:
        prepare(run, quiet=True)
    assert f"{src}:3: same problem as {src}:1 with a different answer ('5' vs '4')" in str(err.value)


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"problem": "2+2"}\n', "d.jsonl:1: missing field answer"),
        (b'{"answer": "4"}\n', "d.jsonl:1: missing field problem"),
        (b'{"problem": "2+2", "answer": "4"}\n{oops\n', "d.jsonl:2: not valid JSON"),
        (b'{"problem": "2+2\xff", "answer": "4"}\n', "d.jsonl:1: not valid UTF-8 text"),
        (b"", "d.jsonl: no rows"),
        (b'{"problem": "  ", "answer": "4"}\n', "d.jsonl:1: empty problem"),
    ],
)
def test_bad_jsonl_is_one_line(tmp_path, content, message):
    src = tmp_path / "d.jsonl"
    src.write_bytes(content)
    run = make_run(tmp_path, f"prepare.source={src}", "task.name=math", "generate.prompts_per_round=2",
                   "generate.prompts_per_shard=2")
    with pytest.raises(PrepareError) as err:
        prepare(run, quiet=True)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_local_hf_dataset_folder_and_eval_sources(tmp_path):
    # a `save_to_disk` folder: one Arrow IPC stream per split
    folder = tmp_path / "ds"
    (folder / "train").mkdir(parents=True)
    table = pa.table({"problem": ["a+b", "c+d", "e+f"], "answer": ["1", "2", "3"],
                      "solution": ["s1", None, "s3"], "level": [1, 2, 3]})
    with pa.OSFile(str(folder / "train" / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (folder / "dataset_dict.json").write_text('{"splits": ["train"]}')
    held = tmp_path / "held.jsonl"
    held.write_text('{"problem": "c+d", "answer": "2"}\n{"problem": "x+y", "answer": "9"}\n')
    run = make_run(tmp_path, f"prepare.source={folder}", "task.name=math", "generate.prompts_per_round=1",
                   "generate.prompts_per_shard=1",
                   f'prepare.eval_sources=["held={held}"]')
    summary = prepare(run, quiet=True)
    assert summary["removed_eval_overlap"] == 1  # eval sets are disjoint from the prompts
    rows = read_stage(run.prompts_dir).to_pylist()
    assert [r["problem"] for r in rows] == ["a+b", "e+f"]
    assert [r["difficulty"] for r in rows] == [1, 3]
    evals = pq.read_table(run.eval_sets_dir / "held.parquet").to_pylist()
    assert [r["problem"] for r in evals] == ["c+d", "x+y"]


def test_arith_prepare_is_disjoint_deterministic_and_resumable(tmp_path):
    run = make_run(tmp_path, "prepare.train_size=300", "prepare.eval_size=100", "prepare.ood_size=50",
                   "prepare.shard_rows=128")
    summary = prepare(run, quiet=True)
    assert summary["prompts"] == 300 and summary["eval:heldout"] == 100 and summary["eval:ood"] == 50
    assert summary["policy-000"] == POLICY
    train = read_stage(run.prompts_dir).to_pylist()
    held = pq.read_table(run.eval_sets_dir / "heldout.parquet").to_pylist()
    ood = pq.read_table(run.eval_sets_dir / "ood.parquet").to_pylist()
    problems = [r["problem"] for r in train]
    assert not set(problems) & {r["problem"] for r in held}
    assert {r["difficulty"] for r in ood} == {7, 8}
    assert len(list(run.prompts_dir.glob("shard-*.parquet"))) == 3
    before = {p.name: p.read_bytes() for p in run.prompts_dir.glob("shard-*.parquet")}
    assert prepare(run, quiet=True)["skipped"] == "already prepared"
    other = Run.open(tmp_path / "run2", None, ["policy.path=" + POLICY,
                                               "prepare.train_size=300", "prepare.eval_size=100",
                                               "prepare.ood_size=50", "prepare.shard_rows=128"], create=True)
    prepare(other, quiet=True)
    assert before == {p.name: p.read_bytes() for p in other.prompts_dir.glob("shard-*.parquet")}


def test_policy_is_copied_without_pickles(tmp_path):
    src = tmp_path / "pol"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"weights")
    (src / "tokenizer.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"pickle")
    (src / "modeling_evil.py").write_text("import os")
    run = Run.open(tmp_path / "run", None, [f"policy.path={src}", "prepare.train_size=50",
                                            "prepare.eval_size=10", "prepare.ood_size=10"], create=True)
    prepare(run, quiet=True)
    files = sorted(p.name for p in run.policy_dir(0).iterdir())
    assert files == ["config.json", "model.safetensors", "scope-policy.json", "tokenizer.json"]
    assert run.input_policy(1) == run.policy_dir(0)


def test_cli_prepare_status_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("SCOPE_RUNS_DIR", str(tmp_path / "runs"))
    cli = CliRunner()
    args = ["--run", "demo", "--set", "prepare.train_size=64", "--set", "prepare.eval_size=16",
            "--set", "prepare.ood_size=8", "--set", f"policy.path={tmp_path / 'none'}"]
    res = cli.invoke(app, ["prepare", *args, "--quiet"])  # a missing base policy: refused, nothing kept
    assert res.exit_code == 2 and "policy.path:" in res.output and "does not exist" in res.output
    assert not (tmp_path / "runs" / "demo").exists()
    args[-1] = f"policy.path={POLICY}"
    res = cli.invoke(app, ["prepare", *args, "--quiet"])
    assert res.exit_code == 0, res.output
    assert "prompts: 64" in res.output
    res = cli.invoke(app, ["status", "--run", "demo"])
    assert res.exit_code == 0 and "prompts" in res.output and "64" in res.output
    res = cli.invoke(app, ["prepare", "--run", "demo", "--set", "verfy.timeout=3"])
    assert res.exit_code == 2
    assert "unknown section 'verfy' in '--set verfy.timeout=3'; did you mean 'verify'?" in res.output
    res = cli.invoke(app, ["prepare", "--run", "demo", "--set", "generate.n=3"])
    assert res.exit_code == 2 and "these keys differ: generate.n" in res.output
    res = cli.invoke(app, ["status", "--run", "nothing"])
    assert res.exit_code == 2 and "no run here" in res.output


# ---- datasets: save_to_disk folders, the hub cache, the default task of a file ------------------------
MATH_ROWS = {"problem": ["Tom has 3 apples and buys 4 more. How many now?", "What is 6 times 5?",
                         "Solve x+2=5."],
             "answer": ["7", "30", "3"], "solution": ["3 + 4 = 7. \\boxed{7}", None, "x = 3"]}


def test_save_to_disk_folder_loads_as_a_folder_and_as_hf(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(MATH_ROWS),
                          "test": datasets.Dataset.from_dict({"problem": ["What is 2+2?"],
                                                              "answer": ["4"]})}).save_to_disk(folder)
    for i, source in enumerate([str(folder), f"hf:{folder}"]):
        run = Run.open(tmp_path / f"run{i}", None, ["policy.path=" + POLICY, "generate.prompts_per_round=3",
                                                    "generate.prompts_per_shard=3",
                                                    f"prepare.source={source}",
                                                    f'prepare.eval_sources=["held=hf:{folder}"]'],
                       create=True)
        summary = prepare(run, quiet=True)
        rows = read_stage(run.prompts_dir).to_pylist()
        assert summary["prompts"] == 3 and summary["eval:held"] == 1
        assert [r["problem"] for r in rows] == MATH_ROWS["problem"]
        assert [r["task"] for r in rows] == ["math"] * 3  # a file source defaults to math
        assert rows[0]["solution"] == "3 + 4 = 7. \\boxed{7}" and rows[1]["solution"] is None
        held = pq.read_table(run.eval_sets_dir / "held.parquet").to_pylist()
        assert [r["problem"] for r in held] == ["What is 2+2?"]
    run = make_run(tmp_path / "bad", f"prepare.source=hf:{folder}", "prepare.split=validation")
    with pytest.raises(PrepareError, match="no split 'validation' \\(have: train, test\\); set prepare.split"):
        prepare(run, quiet=True)


def hub_cache(root, repo_id):
    """What an online `load_dataset(repo_id)` leaves in the datasets cache
    (<cache>/<owner>___<name>/<config>/<version>/<commit>/<name>-<split>.arrow + dataset_info.json),
    built here from a local Parquet file, so that an offline load finds it."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    owner, name = repo_id.split("/")
    src = root / "train.parquet"
    pq.write_table(pa.table(MATH_ROWS), src)
    builder = Parquet(cache_dir=str(root / "build"), dataset_name=name,
                      data_files=DataFilesDict.from_patterns({"train": [str(src)]}))
    builder.download_and_prepare()
    cache = root / "datasets-cache"
    commit = cache / f"{owner}___{name}" / "default" / "0.0.0" / ("0123456789abcdef" * 3)[:40]
    commit.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(builder.cache_dir, commit)
    return cache


def test_hf_id_loads_offline_from_the_local_cache(tmp_path):
    """`hf:owner/name` with HF_HUB_OFFLINE=1: `datasets` reads the copy in HF_DATASETS_CACHE."""
    import os
    import subprocess
    import sys

    cache = hub_cache(tmp_path, "someone/tiny-math")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-home"), "HF_DATASETS_CACHE": str(cache),
           "PYTHONPATH": str(root), "SCOPE_RUNS_DIR": str(tmp_path / "runs")}
    base = [sys.executable, "-m", "scope_cli.cli.app", "prepare", "--quiet",
            "--set", f"policy.path={POLICY}", "--set", "generate.prompts_per_round=3",
            "--set", "generate.prompts_per_shard=3"]
    res = subprocess.run([*base, "--run", "hub", "--set", "prepare.source=hf:someone/tiny-math"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = read_stage(tmp_path / "runs" / "hub" / "prompts").to_pylist()
    assert [r["problem"] for r in rows] == MATH_ROWS["problem"] and rows[2]["answer"] == "3"
    # not in the cache and offline: one line naming the source
    res = subprocess.run([*base, "--run", "missing", "--set", "prepare.source=hf:someone/absent"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "hf:someone/absent: cannot load with `datasets` (ConnectionError" in res.stdout + res.stderr


def test_file_rows_default_to_math_and_an_arith_row_must_be_arith(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text(json.dumps({"problem": "What is 6 times 5?", "answer": "30"}) + "\n"
                   + json.dumps({"problem": "7+5-7", "answer": "5", "data_source": "arith"}) + "\n")
    run = make_run(tmp_path, f"prepare.source={src}", "generate.prompts_per_round=2",
                   "generate.prompts_per_shard=2")  # task.name: arith
    prepare(run, quiet=True)
    rows = read_stage(run.prompts_dir).to_pylist()
    assert [(r["task"], r["data_source"]) for r in rows] == [("math", "math"), ("arith", "arith")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "What is 6 times 5?", "answer": "30", "task": "arith"}) + "\n")
    with pytest.raises(PrepareError, match="bad.jsonl:1: field problem: 'What is 6 times 5\\?' is not an "
                                           "arith problem .*the row's task or data_source says arith"):
        prepare(make_run(tmp_path / "b", f"prepare.source={bad}"), quiet=True)
