import pytest

from scope_cli.core.config import ConfigError
from scope_cli.core.runs import Run, RunError, round_slice, row_seed


def test_round_slices_are_deterministic_and_without_replacement_within_an_epoch():
    ids = [f"p{i:03d}" for i in range(100)]
    epoch = [pid for r in range(1, 6) for pid in round_slice(ids, 7, r, 20)]
    assert sorted(epoch) == ids  # rounds 1-5 cover the epoch exactly once
    assert round_slice(ids, 7, 3, 20) == round_slice(ids, 7, 3, 20)
    assert round_slice(ids, 7, 3, 20) != round_slice(ids, 8, 3, 20)
    # a round straddling two epochs: the tail of epoch 0 and the head of epoch 1
    straddle = round_slice(ids, 7, 4, 30)  # positions 90..119
    assert straddle[:10] == [pid for pid in epoch[90:100]]
    assert len(set(straddle[10:])) == 20
    # the slice of round R never depends on what ran before
    assert round_slice(ids, 7, 9, 20) == round_slice(list(ids), 7, 9, 20)


def test_row_seed_is_stable_and_distinct():
    a = row_seed(0, 1, "abc", 0)
    assert a == row_seed(0, 1, "abc", 0)
    assert len({a, row_seed(0, 1, "abc", 1), row_seed(0, 2, "abc", 0), row_seed(1, 1, "abc", 0),
                row_seed(0, 1, "abd", 0)}) == 5
    assert 0 <= a < 2**63


def test_run_config_is_fixed_at_creation(tmp_path):
    root = tmp_path / "r"
    with pytest.raises(RunError, match="no run here"):
        Run.open(root)
    run = Run.open(root, None, ["generate.n=4"], create=True)
    assert run.config.generate.n == 4
    assert Run.open(root).config.generate.n == 4  # no flags: the stored config
    assert Run.open(root, None, ["generate.n=4"]).config.generate.n == 4  # same value: fine
    with pytest.raises(ConfigError) as err:
        Run.open(root, None, ["generate.n=5", "train.lr=0.5"])
    assert "these keys differ: generate.n 4 -> 5, train.lr 0.0001 -> 0.5" in str(err.value)  # old -> new
    forced = Run.open(root, None, ["generate.n=5"], force=True)
    assert forced.config.generate.n == 5 and Run.open(root).config.generate.n == 5
    # operational keys never fix a run
    assert Run.open(root, None, ["verify.workers=1"]).config.verify.workers == 1


def test_input_policy_needs_a_complete_policy(tmp_path):
    run = Run.open(tmp_path / "r", create=True)
    with pytest.raises(RunError, match="policy-000: policy missing or incomplete .*scope prepare"):
        run.input_policy(1)
    (tmp_path / "r" / "policy-000").mkdir()
    (tmp_path / "r" / "policy-000" / "scope-policy.json").write_text("{}")
    assert run.input_policy(1).name == "policy-000"
    (tmp_path / "r" / "policy-001").mkdir()  # half-written: no marker
    with pytest.raises(RunError, match="policy-001.*last complete policy is policy-000; run `scope round 1 "
                                       f"--run {tmp_path / 'r'}` first"):
        run.input_policy(2)


def test_a_run_from_before_mixed_precision_auto_keeps_computing_in_fp32_on_cpu(tmp_path):
    """A config.toml written before train.packing and the `auto` precision existed stored the then
    default mixed_precision = "bf16" (used only by FSDP on a GPU): it reads as auto, so the run goes on
    in fp32 on CPU, unchanged. A config written since (it lists train.packing) keeps bf16 as written."""
    old = Run.open(tmp_path / "old", None, ["train.mixed_precision=bf16"], create=True)
    path = old.root / "config.toml"
    path.write_text("\n".join(line for line in path.read_text().splitlines()
                              if not line.startswith("packing =")) + "\n")
    assert Run.open(old.root).config.train.mixed_precision == "auto"
    assert Run.open(old.root, None, ["run.keep_state=1"]).config.train.mixed_precision == "auto"
    new = Run.open(tmp_path / "new", None, ["train.mixed_precision=bf16"], create=True)
    assert Run.open(new.root).config.train.mixed_precision == "bf16"
