"""The options the `scope` commands share, declared once (scope_cli/cli/options.py): every sharded
stage takes the same options in the same order, --trust-remote-code exactly where it runs a model, and
a sharded stage command opens the run and hands its body the worker slot."""

import typer
from typer.testing import CliRunner

from scope_cli.cli.app import app
from scope_cli.cli.compare import check_arms, parse_arms
from scope_cli.cli.options import sharded_stage
from scope_cli.core.config import key_choices

SHARED = ["--round", "--run", "--config", "--set", "--force", "--shard-index", "--num-shards"]


def options_of(name: str) -> list[str]:
    return [p.opts[0] for p in typer.main.get_command(app).commands[name].params]


def test_sharded_stages_share_their_options():
    assert options_of("generate") == [*SHARED, "--quiet", "--trust-remote-code"]
    assert options_of("rectify") == [*SHARED, "--quiet", "--trust-remote-code"]
    assert options_of("prm-score") == [*SHARED, "--eval-against", "--quiet", "--trust-remote-code"]
    assert options_of("verify") == [*SHARED, "--quiet"]  # no model: no remote code to trust
    assert options_of("locate-error") == [*SHARED, "--quiet"]


def test_compare_arms_are_run_algo_values():
    algos = next(p for p in typer.main.get_command(app).commands["compare"].params if p.name == "algos")
    arms = parse_arms(algos.default)  # the headline of docs/RESULTS.md
    assert [a.name for a in arms] == ["grpo", "grpo-ds", "luffy_matched", "vppo", "scope", "scope-model"]
    assert {a.algo for a in arms} <= set(key_choices("run.algo"))
    check_arms(arms, None, [])  # every arm's settings are valid config keys and values


def test_a_sharded_stage_opens_the_run_and_passes_the_slot(tmp_path, monkeypatch):
    from scope_cli.core.runs import Run

    monkeypatch.setenv("SCOPE_RUNS_DIR", str(tmp_path))
    Run.open(tmp_path / "r", None, [], create=True)  # a run folder with its config.toml
    seen = {}

    @sharded_stage(runs_model=False, extra={"note": (str, "x")})
    def probe(the_run, round_, *, slot, force, quiet, note):
        """A probe."""
        seen.update(root=the_run.root, round=round_, slot=slot(), force=force, quiet=quiet, note=note)

    probe_app = typer.Typer()
    probe_app.command()(probe)
    probe_app.command("other")(lambda: None)  # two commands: the probe is a subcommand
    result = CliRunner().invoke(probe_app, ["probe", "--round", "3", "--run", "r", "--shard-index", "1",
                                            "--num-shards", "2", "-q"])
    assert result.exit_code == 0, result.output
    assert seen == {"root": tmp_path / "r", "round": 3, "slot": (1, 2), "force": False, "quiet": True,
                    "note": "x"}
    bad = CliRunner().invoke(probe_app, ["probe", "--round", "1", "--run", "r", "--shard-index", "2",
                                         "--num-shards", "2"])
    assert bad.exit_code == 2 and "worker slot 2 of 2" in bad.output
