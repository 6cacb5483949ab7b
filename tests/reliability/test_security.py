"""Security: no code runs from model folders unless asked, weights only from safetensors, nothing
unpickled, no shell command built from data, no file name taken from data, no write or delete through
a symbolic link out of the run, and a run's files as readable as the umask says.

The static checks read the project's code (scope_cli/, stages/, bench/, scripts/) with `ast`, so they
fail the moment a forbidden call is added, whatever the comments say.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shlex
import shutil
import stat
from pathlib import Path

import pytest
from rel_helpers import POLICY, REPO, TINY, copy_run, prepare_args, scope
from typer.testing import CliRunner

from scope_cli.cli.app import app
from scope_cli.core.runs import Run
from scope_cli.core.files import list_shard_files

CODE_DIRS = ("scope_cli", "stages", "bench", "scripts")


def project_files() -> list[Path]:
    return sorted(p for d in CODE_DIRS for p in (REPO / d).rglob("*.py") if ".venv" not in p.parts)


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def dotted(func: ast.expr) -> str:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


FORBIDDEN = {  # call (by its last dotted names) -> why
    "pickle.load": "unpickling runs code", "pickle.loads": "unpickling runs code",
    "cPickle.load": "unpickling runs code", "dill.load": "unpickling runs code",
    "dill.loads": "unpickling runs code", "cloudpickle.load": "unpickling runs code",
    "joblib.load": "unpickling runs code", "pd.read_pickle": "unpickling runs code",
    "pandas.read_pickle": "unpickling runs code", "torch.jit.load": "loads code",
    "os.system": "a shell command", "os.popen": "a shell command",
    "subprocess.getoutput": "a shell command", "subprocess.getstatusoutput": "a shell command",
}


def violations() -> list[str]:
    found = []
    for path in project_files():
        rel = path.relative_to(REPO)
        tree = ast.parse(path.read_text(), str(path))
        for call in calls(tree):
            name = dotted(call.func)
            where = f"{rel}:{call.lineno}"
            if name in FORBIDDEN:
                found.append(f"{where}: {name} ({FORBIDDEN[name]})")
            if isinstance(call.func, ast.Name) and name in ("eval", "exec"):
                found.append(f"{where}: {name}() of a string")
            if name.endswith("torch.load") or name == "load" and "torch" in ast.unparse(call.func):
                if not is_true(keyword(call, "weights_only")):
                    found.append(f"{where}: torch.load without weights_only=True")
            if name.endswith(("np.load", "numpy.load")) and is_true(keyword(call, "allow_pickle")):
                found.append(f"{where}: numpy.load with allow_pickle=True")
            if name.endswith("yaml.load") and keyword(call, "Loader") is None:
                found.append(f"{where}: yaml.load without a safe Loader")
            if is_true(keyword(call, "shell")):
                found.append(f"{where}: shell=True")
            if is_true(keyword(call, "trust_remote_code")):
                found.append(f"{where}: trust_remote_code=True hard-coded")
            # models on the paths that read user files load from safetensors (or GGUF, no pickle
            # either); bench/ loads the shipped tiny policy into other libraries as they are used
            if (name.endswith("from_pretrained") and any(m in name for m in ("Model", "LLM", "ForCausalLM"))
                    and rel.parts[0] in ("scope_cli", "stages")):
                if not is_true(keyword(call, "use_safetensors")) and keyword(call, "gguf_file") is None:
                    found.append(f"{where}: {name} without use_safetensors=True")
    return found


def test_no_unsafe_loading_or_shell_calls_in_the_code():
    """No pickle, torch.load only with weights_only=True, models only from safetensors, no shell,
    no eval/exec, trust_remote_code never forced on."""
    assert len(project_files()) > 20
    assert violations() == []


def test_the_static_check_catches_what_it_forbids(tmp_path, monkeypatch):
    """The scanner itself: a file with each forbidden pattern is reported."""
    bad = tmp_path / "scope_cli" / "bad.py"
    bad.parent.mkdir()
    bad.write_text(
        "import pickle, torch, subprocess, os\n"
        "pickle.load(open('x', 'rb'))\n"
        "torch.load('w.pt')\n"
        "torch.load('w.pt', weights_only=False)\n"
        "subprocess.run('ls ' + name, shell=True)\n"
        "os.system('ls')\n"
        "AutoModelForCausalLM.from_pretrained(p, trust_remote_code=True)\n"
        "torch.load('w.pt', weights_only=True)\n"
    )
    monkeypatch.setattr(__import__(__name__), "REPO", tmp_path)
    monkeypatch.setattr(__import__(__name__), "CODE_DIRS", ("scope_cli",))
    found = violations()
    assert len([f for f in found if "torch.load" in f]) == 2
    assert any("pickle.load" in f for f in found) and any("shell=True" in f for f in found)
    assert any("os.system" in f for f in found) and any("use_safetensors" in f for f in found)
    assert any("trust_remote_code=True" in f for f in found)


def test_the_only_shell_script_quotes_every_argument(monkeypatch, tmp_path):
    """`scope compare` runs each arm as a `bash -c` script built from its command-line arguments
    (never from data): every piece goes through shlex.quote, so a hostile name stays one argument."""
    import scope_cli.cli.compare as compare

    scripts = []

    class Done:
        returncode = 0

        def __init__(self, argv, **kwargs):
            scripts.append(argv)

        def poll(self):
            return 0

    monkeypatch.setattr(compare.subprocess, "Popen", Done)
    monkeypatch.setattr(compare.time, "sleep", lambda s: None)
    name = "x; touch PWNED $(id) `id`"
    compare.run_arms(name, compare.parse_arms(["grpo"]), [0], 1, None, ["run.name=a'b"], 1, tmp_path)
    (argv,) = scripts
    assert argv[:2] == ["bash", "-c"]
    words = shlex.split(argv[2])
    assert f"{name}-grpo-s0" in words and "run.name=a'b" in words
    assert not (tmp_path / "PWNED").exists()


# ---- models from folders -----------------------------------------------------------------------------
def evil_policy(folder: Path, marker: Path) -> Path:
    """The tiny policy, plus what a hostile folder may carry: custom code named by config.json (it
    writes `marker` when imported) and a pickled checkpoint that writes `marker` when unpickled."""
    shutil.copytree(POLICY, folder)
    (folder / "scope-policy.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil_lm", architectures=["EvilLM"],
                  auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                            "AutoModelForCausalLM": "modeling_evil.EvilLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('code ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil_lm'\n"
        "class EvilLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('pickle ran')",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    return folder


def test_custom_code_runs_only_with_trust_remote_code(reference, tmp_path):
    marker = tmp_path / "MARKER"
    evil = evil_policy(tmp_path / "evil", marker)
    root = copy_run(reference["root"], tmp_path / "run")
    res = CliRunner().invoke(app, ["eval", "--run", str(root), "--policy", str(evil), "--quiet"])
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "evil: the model needs custom code (config.json auto_map: modeling_evil.EvilConfig" in text
    assert "--trust-remote-code" in text
    assert not marker.exists()
    # as a base policy: the code is not even copied without the flag, and the round says why it stops
    fresh = tmp_path / "fresh"
    settings = [x for item in [*TINY, f"policy.path={evil}"] for x in ("--set", item)]
    assert CliRunner().invoke(app, ["prepare", "--run", str(fresh), "--quiet", *settings]).exit_code == 0
    files = sorted(p.name for p in Run.open(fresh).policy_dir(0).iterdir())
    assert "modeling_evil.py" not in files and "pytorch_model.bin" not in files
    res = CliRunner().invoke(app, ["round", "1", "--run", str(fresh), "--quiet"])
    assert res.exit_code == 2 and "--trust-remote-code" in res.output
    assert not marker.exists()
    # the flag is an explicit, recorded choice: it is the run's policy.trust_remote_code
    trusting = tmp_path / "trusting"
    res = CliRunner().invoke(app, ["prepare", "--run", str(trusting), "--quiet", "--trust-remote-code",
                                   *settings])
    assert res.exit_code == 0, res.output
    assert Run.open(trusting).config.policy.trust_remote_code is True
    assert (Run.open(trusting).policy_dir(0) / "modeling_evil.py").exists()
    res = CliRunner().invoke(app, ["generate", "--round", "1", "--run", str(fresh), "--trust-remote-code"])
    assert res.exit_code == 2 and "these keys differ: policy.trust_remote_code" in res.output
    assert not marker.exists()


def test_pickled_weights_are_never_loaded(tmp_path):
    """A folder with a hostile pytorch_model.bin beside the safetensors weights: the policy loads from
    safetensors, the pickle is never opened; a folder with only the pickle is refused."""
    from scope_cli.backends.hf import load_policy
    from scope_cli.backends.hf import PolicyError

    marker = tmp_path / "MARKER"
    folder = evil_policy(tmp_path / "evil", marker)
    (folder / "config.json").write_text((POLICY / "config.json").read_text())  # no custom code
    (folder / "modeling_evil.py").unlink()
    model, _ = load_policy(folder)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert not marker.exists()
    (folder / "model.safetensors").unlink()
    with pytest.raises(PolicyError, match="no \\*.safetensors weights \\(found pytorch_model.bin"):
        load_policy(folder)
    assert not marker.exists()


def test_file_names_never_come_from_data(reference, tmp_path):
    """Prompts whose prompt_id, data_source and extra_info look like paths (../../x): a round writes
    exactly the files of the usual layout, inside the run, and nothing else anywhere."""
    import pyarrow.parquet as pq

    root = copy_run(reference["root"], tmp_path / "run")
    run = Run.open(root)
    prompts = pq.read_table(list_shard_files(run.prompts_dir)[0]).to_pylist()
    for i, row in enumerate(prompts):
        row.update(prompt_id=f"../../x{i}" if i % 2 else f"/tmp/abs{i}", data_source="../../../evil",
                   extra_info=json.dumps({"path": "../../y"}))
    shutil.rmtree(run.prompts_dir)  # a prompts folder made by hand: taken as it is
    for r in (1,):
        for stage in ("rollouts", "verified", "scored", "located", "rectified", "train", "eval"):
            shutil.rmtree(run.stage_dir(r, stage), ignore_errors=True)
    shutil.rmtree(run.policy_dir(1))
    import pyarrow as pa

    from scope_cli.schema import PROMPTS, conform
    from scope_cli.core.files import shard_path, write_parquet_atomic

    write_parquet_atomic(conform(pa.Table.from_pylist(prompts, schema=PROMPTS), PROMPTS),
                         shard_path(run.prompts_dir, 0))
    before = {p for p in tmp_path.rglob("*")}
    res = CliRunner().invoke(app, ["round", "1", "--run", str(root), "--quiet"])
    assert res.exit_code == 0, res.output
    new = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p not in before)
    assert new and all(p.startswith("run/") for p in new), new
    import re

    layout = re.compile(r"^run/(round-001(/(rollouts|verified|scored|located|rectified|eval|train)"
                        r"(/(_manifest|_locks|state)(/[\w.-]+)?|/[\w.-]+)?)?|policy-001(/[\w.-]+)?)$")
    assert [p for p in new if not layout.match(p)] == []
    assert not (tmp_path.parent / "evil").exists() and not Path("/tmp/abs1").exists()


# ---- folders and modes -----------------------------------------------------------------------------
def test_a_stage_folder_linked_outside_the_run_is_refused(reference, tmp_path):
    """round-001/verified (and train/) made a symbolic link to a folder elsewhere: the stage refuses
    it in one line and the stray shard there (which it would remove as left by another config) stays."""
    root = copy_run(reference["root"], tmp_path / "run")
    for folder, args in (("verified", ["verify", "--round", "1"]), ("train", ["train-step", "--round", "1"])):
        outside = tmp_path / f"outside-{folder}"
        outside.mkdir()
        (outside / "shard-00009.parquet").write_bytes(b"someone else's file")
        shutil.rmtree(root / "round-001" / folder)
        (root / "round-001" / folder).symlink_to(outside)
        res = CliRunner().invoke(app, [*args, "--run", str(root), "--force"])
        assert res.exit_code == 2, res.output
        text = res.output.strip()
        assert len(text.splitlines()) == 1 and f"round-001/{folder}: leads to {outside}" in text, text
        assert "symbolic link" in text
        assert sorted(os.listdir(outside)) == ["shard-00009.parquet"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_runs_files_take_the_umask(tmp_path, umask):
    """prepare and a round (every stage, the policy and train-state folders, eval) under a umask:
    each file gets 0666 and each folder 0777 minus the umask (022: readable by every user)."""
    root = tmp_path / "run"
    set_umask = lambda: os.umask(umask)  # noqa: E731 (runs in the child before exec)
    scope(*prepare_args(root), preexec_fn=set_umask)
    scope("round", "1", "--run", str(root), "--quiet", preexec_fn=set_umask)
    paths = [root, *root.rglob("*")]
    assert len(paths) > 80 and any(p.suffix == ".safetensors" for p in paths)
    wrong = [f"{p.relative_to(root)} {stat.filemode(p.stat().st_mode)}" for p in paths
             if stat.S_IMODE(p.stat().st_mode) != (0o777 if p.is_dir() else 0o666) & ~umask]
    assert wrong == []
