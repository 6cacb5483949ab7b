"""prm-score: the rule PRM, the hf backend (qwen and shepherd conventions on tiny PRM folders built
here with the real key names), the vllm gate, the stage (noise and errors_found at locate.threshold)
and --eval-against rule. The maths of first errors and noise: tests/test_locate.py."""

import json

import pytest
import torch

from scope_cli.backends.prm import HFPrm, PrmError, PrmItem, RulePrm, load_prm, vllm_unavailable_reason
from scope_cli.core.config import Config
from scope_cli.models.tiny import build_arith_tokenizer, init_tiny_policy
from scope_cli.models.prm_train import build_prm_tokenizer, init_tiny_prm, make_prm_module, tiny_prm_config
from scope_cli.core.files import read_stage_df
from scope_cli.locate import first_error
from scope_cli.tasks import arith, math
from scope_rows import (
    NO_ANSWER, PROBLEM, RIGHT, RIGHT_2, TRUNCATED, WRONG_ANSWER, WRONG_AT_0, WRONG_AT_1, group,
    make_run, write_verified,
)


def rule(response, problem=PROBLEM):
    item = PrmItem(problem, arith.format_prompt(problem), arith.step_texts(response), response)
    return RulePrm().score([item])[0]


# ---- rule -----------------------------------------------------------------------------------------
def test_rule_prm_scores_one_before_the_first_wrong_step():
    assert rule(RIGHT) == [1.0, 1.0, 1.0]
    assert rule(WRONG_AT_1) == [1.0, 0.0, 0.0]
    assert rule(WRONG_AT_0) == [0.0, 0.0, 0.0]


def test_rule_prm_edge_cases():
    assert rule(WRONG_ANSWER) == [1.0, 1.0, 0.0]  # right steps, wrong boxed value
    assert rule(TRUNCATED) == [1.0, 0.0]  # cut off inside step 1
    assert rule(NO_ANSWER) == [1.0, 0.0]  # every step right but no answer: the last one is wrong
    assert rule("") == []
    assert rule("7+5=2;2-7=5;\\boxed{5};") == [1.0, 1.0, 1.0]
    assert rule("7+5=2;7+5=2;\\boxed{2}") == [1.0, 0.0, 0.0]  # a term used twice


def test_rule_prm_needs_an_exact_checker():
    item = PrmItem("1+1", "1+1", ["x"], "x", task="math")
    with pytest.raises(PrmError, match="exact step checker"):
        RulePrm().score([item])
    assert math.first_error_step is None


# ---- hf: qwen convention --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_prm(tmp_path_factory):
    return init_tiny_prm(tmp_path_factory.mktemp("prm") / "tiny-prm", seed=3)


def reference_scores(folder, item):
    """An independent forward pass: the whole checkpoint loaded into backbone + head modules."""
    from safetensors.torch import load_file

    tok = build_prm_tokenizer()
    module = make_prm_module(tiny_prm_config(tok))
    module.load_state_dict(load_file(str(folder / "model.safetensors")))
    module.eval()
    ids = tok(item.prompt + "".join(s + "<extra_0>" for s in item.steps))["input_ids"]
    tag = tok.convert_tokens_to_ids("<extra_0>")
    with torch.no_grad():
        logits = module(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
    return torch.softmax(logits[[i for i, t in enumerate(ids) if t == tag]], -1)[:, 1].tolist()


def test_tiny_prm_folder_has_the_qwen_prm_layout(tiny_prm):
    from safetensors import safe_open

    with safe_open(str(tiny_prm / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
    assert {"score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias",
            "model.embed_tokens.weight", "model.norm.weight"} <= keys
    assert all(k.startswith(("model.", "score.")) for k in keys)
    config = json.loads((tiny_prm / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForProcessRewardModel"]
    assert not list(tiny_prm.glob("*.bin")) and not list(tiny_prm.glob("*.py"))


def test_hf_qwen_scores_match_an_independent_forward(tiny_prm):
    prm = HFPrm(tiny_prm, "qwen", batch_size=2)
    items = [PrmItem(PROBLEM, arith.format_prompt(PROBLEM), arith.step_texts(r), r)
             for r in (RIGHT, WRONG_AT_1, TRUNCATED, "")]
    scores = prm.score(items)
    assert scores[3] == []
    for item, got in zip(items[:3], scores[:3]):
        assert len(got) == len(item.steps)
        assert got == pytest.approx(reference_scores(tiny_prm, item), abs=1e-5)
        assert all(0.0 <= s <= 1.0 for s in got)
    # batching and padding do not change a row's scores
    alone = [prm.score([item])[0] for item in items[:3]]
    for a, b in zip(alone, scores[:3]):
        assert a == pytest.approx(b, abs=1e-5)


def test_hf_qwen_loads_natively_even_where_the_config_names_remote_code(tiny_prm, tmp_path):
    """Qwen2.5-Math-PRM's config.json carries an auto_map to its own modeling file: it is ignored
    (no remote code runs; there is no .py file here at all)."""
    import shutil

    folder = tmp_path / "with-auto-map"
    shutil.copytree(tiny_prm, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
                          "AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel"}
    (folder / "config.json").write_text(json.dumps(config))
    item = PrmItem(PROBLEM, arith.format_prompt(PROBLEM), arith.step_texts(RIGHT), RIGHT)
    assert HFPrm(folder, "qwen").score([item]) == HFPrm(tiny_prm, "qwen").score([item])


def test_hf_qwen_refuses_folders_it_cannot_load(tiny_prm, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    no_head = tmp_path / "no-head"
    shutil.copytree(tiny_prm, no_head)
    state = load_file(str(no_head / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("score.")},
              str(no_head / "model.safetensors"))
    with pytest.raises(PrmError, match="score.0.weight"):
        HFPrm(no_head, "qwen")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(PrmError, match="safetensors"):
        HFPrm(pickled, "qwen")
    with pytest.raises(PrmError, match="does not exist"):
        HFPrm(tmp_path / "missing", "qwen")


def test_hf_qwen_with_a_chat_template_uses_qwens_layout(tiny_prm, tmp_path):
    import shutil

    folder = tmp_path / "chat-prm"
    shutil.copytree(tiny_prm, folder)
    template = ("{% for m in messages %}{{ m['role'][0] }}\n{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}a\n{% endif %}")
    (folder / "chat_template.jinja").write_text(template)
    prm = HFPrm(folder, "qwen")
    item = PrmItem(PROBLEM, arith.format_prompt(PROBLEM), arith.step_texts(RIGHT), RIGHT)
    text, _ = prm.text(item)
    assert text.endswith("7+5=2<extra_0>2-7=5<extra_0>\\boxed{5}<extra_0>\n")
    assert PROBLEM in text
    assert len(prm.score([item])[0]) == 3


# ---- hf: math-shepherd convention -----------------------------------------------------------------
@pytest.fixture(scope="module")
def shepherd_prm(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from scope_cli.models.tiny import tiny_config

    folder = tmp_path_factory.mktemp("shepherd") / "prm"
    tok = build_arith_tokenizer()
    tok.add_tokens(["ки", " "])
    torch.manual_seed(5)
    model = LlamaForCausalLM(tiny_config(tok, layers=2))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_hf_shepherd_scores_are_good_vs_bad_at_the_step_tag(shepherd_prm):
    from transformers import LlamaForCausalLM

    prm = HFPrm(shepherd_prm, "shepherd")
    item = PrmItem(PROBLEM, arith.format_prompt(PROBLEM), arith.step_texts(WRONG_AT_1), WRONG_AT_1)
    text, _ = prm.text(item)
    assert text == "7+5-7 7+5=2 ки\n2-7=4 ки\n\\boxed{4} ки"
    got = prm.score([item])[0]
    tok = prm.tokenizer
    ids = tok(text)["input_ids"]
    tag, good, bad = (tok.convert_tokens_to_ids(t) for t in ("ки", "+", "-"))
    model = LlamaForCausalLM.from_pretrained(shepherd_prm).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    at = [i for i, t in enumerate(ids) if t == tag]
    want = torch.softmax(logits[at][:, [good, bad]], -1)[:, 0].tolist()
    assert len(got) == 3 and got == pytest.approx(want, abs=1e-5)


# ---- vllm ---------------------------------------------------------------------------------------
def test_vllm_backend_is_gated_with_a_clear_reason(tiny_prm, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vllm", None)  # as where vllm is not installed
    cfg = Config()
    cfg.prm.backend, cfg.prm.path = "vllm", str(tiny_prm)
    assert "not installed" in vllm_unavailable_reason()
    with pytest.raises(PrmError, match="prm.backend=vllm: vllm is not installed"):
        load_prm(cfg.prm)


@pytest.mark.vllm
@pytest.mark.slow  # an engine start per PRM
@pytest.mark.parametrize("which", ["tiny", "shipped"])
def test_vllm_backend_matches_hf(tiny_prm, which):
    reason = vllm_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    from scope_cli.backends.prm import VllmPrm

    items = [PrmItem(PROBLEM, arith.format_prompt(PROBLEM), arith.step_texts(r), r)
             for r in (RIGHT, WRONG_AT_1, TRUNCATED, "")]
    if which == "shipped":  # the policy's shape: 4 heads x 32 at hidden 64, which vLLM's Qwen2 lacks
        with pytest.raises(PrmError, match="head_dim"):
            VllmPrm(SHIPPED / "prms/arith-tiny-prm", "qwen")
        return
    folder = tiny_prm
    want = HFPrm(folder, "qwen").score(items)
    prm = VllmPrm(folder, "qwen", dtype="float32")
    got = prm.score(items)
    prm.close()
    assert got[3] == [] and [len(g) for g in got] == [3, 3, 2, 0]
    for a, b in zip(got, want):
        assert a == pytest.approx(b, abs=1e-3)


# ---- the stage ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return init_tiny_policy(tmp_path_factory.mktemp("policy") / "tiny", layers=1)


def responses_group():
    tok = build_arith_tokenizer()
    return group(tok, PROBLEM, [RIGHT, WRONG_AT_1, WRONG_ANSWER, TRUNCATED, RIGHT_2, ""])


def test_prm_score_stage_scores_failed_rows(tmp_path, policy):
    from stages.prm_score import prm_score

    run = make_run(tmp_path / "run", policy)
    write_verified(run, 1, [responses_group()])
    result = prm_score(run, 1, quiet=True)
    assert result.computed == [0]
    df = read_stage_df(run.stage_dir(1, "scored")).sort("sample_idx")
    assert df["steps"].to_list()[:4] == [arith.step_texts(r) for r in (RIGHT, WRONG_AT_1,
                                                                       WRONG_ANSWER, TRUNCATED)]
    assert df["step_token_ends"].to_list()[1] == [6, 12, 15]  # \boxed{, 4, }
    assert df["step_scores"].to_list() == [None, [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0],
                                           None, []]
    manifest = json.loads((run.stage_dir(1, "scored") / "_manifest" / "shard-00000.json").read_text())
    assert manifest["summary"]["scored"] == 4 and manifest["summary"]["errors_found"] == 3
    assert prm_score(run, 1, quiet=True).skipped_done == [0]


def test_prm_score_all_rows_and_noise(tmp_path, policy):
    from stages.prm_score import prm_score

    run = make_run(tmp_path / "run", policy, ["prm.score=all", "prm.noise=1.0"])
    write_verified(run, 1, [responses_group()])
    prm_score(run, 1, quiet=True)
    df = read_stage_df(run.stage_dir(1, "scored")).sort("sample_idx")
    scores = df["step_scores"].to_list()
    assert scores[0] == [1.0, 1.0, 1.0] and scores[4] == [1.0, 1.0, 1.0]  # nothing to perturb
    assert first_error(scores[1]) != 1 and first_error(scores[2]) != 2  # every error moved/missed
    manifest = json.loads((run.stage_dir(1, "scored") / "_manifest" / "shard-00000.json").read_text())
    assert manifest["summary"]["noise_miss"] + manifest["summary"]["noise_shift"] == 3


class FixedScorer:
    """Every step 0.9 but the second, 0.6: wrong at locate.threshold 0.7, right at 0.5."""

    def score(self, items):
        return [[0.6 if k == 1 else 0.9 for k in range(len(item.steps))] for item in items]


@pytest.mark.parametrize("threshold, noise, found, perturbed", [
    (0.5, 0.0, 0, 0), (0.7, 0.0, 3, 0), (0.5, 1.0, 0, 0), (0.7, 1.0, None, 3),
])
def test_noise_and_errors_found_follow_locate_threshold(threshold, noise, found, perturbed):
    """Three failed rows with steps (3, 3 and 2 of them) and one without: at threshold 0.5 the PRM
    finds no wrong step, so there is nothing to count or perturb; at 0.7 it finds step 1 in all three,
    and noise 1.0 perturbs each of them."""
    from scope_rows import verified_table
    from stages.prm_score import score_table

    cfg = Config()
    cfg.locate.threshold, cfg.prm.noise = threshold, noise
    table, summary = score_table(verified_table(responses_group()), cfg, build_arith_tokenizer(),
                                 FixedScorer())
    assert summary["scored"] == 4 and summary["noise_miss"] + summary["noise_shift"] == perturbed
    if found is None:  # a missed error is no longer found; a shifted one is, one step off
        found = 3 - summary["noise_miss"]
        for scores in table.column("step_scores").to_pylist()[1:4]:
            assert first_error(scores, "threshold", threshold) in (None, 0, 2)
    assert summary["errors_found"] == found


@pytest.mark.parametrize("algo", ["grpo", "luffy"])
def test_prm_score_passes_through_without_a_prm(tmp_path, policy, algo):
    from stages.prm_score import prm_score

    run = make_run(tmp_path / "run", policy, [f"run.algo={algo}", "prm.backend=hf",
                                              "prm.path=/nonexistent"])
    write_verified(run, 1, [responses_group()])
    prm_score(run, 1, quiet=True)  # no PRM is loaded: the bad path is never touched
    df = read_stage_df(run.stage_dir(1, "scored"))
    assert df.height == 6
    for col in ("steps", "step_token_ends", "step_scores"):
        assert df[col].null_count() == 6


def test_prm_score_with_the_hf_backend_and_eval_against_rule(tmp_path, policy, tiny_prm):
    from stages.prm_score import eval_against_rule, prm_score

    run = make_run(tmp_path / "run", policy, ["prm.backend=hf", f"prm.path={tiny_prm}"])
    write_verified(run, 1, [responses_group()])
    prm_score(run, 1, quiet=True)
    df = read_stage_df(run.stage_dir(1, "scored")).sort("sample_idx")
    for steps, scores, correct in zip(df["steps"], df["step_scores"], df["correct"]):
        assert (scores is None) == correct
        if scores is not None:
            assert len(scores) == len(steps)
    report = eval_against_rule(run, 1)
    assert report["samples"] == 5 and report["erroneous"] == 3 and report["correct"] == 2
    assert json.loads((run.round_dir(1) / "prm-eval-rule.json").read_text())["f1"] == report["f1"]


def test_eval_against_rule_of_the_rule_is_perfect(tmp_path, policy):
    from stages.prm_score import eval_against_rule

    run = make_run(tmp_path / "run", policy)
    write_verified(run, 1, [responses_group()])
    report = eval_against_rule(run, 1)
    assert report["f1"] == 1.0 and report["exact_match"] == 1.0 and report["skipped_no_steps"] == 1


@pytest.mark.gpu
@pytest.mark.parametrize("convention", ["qwen", "shepherd"])
def test_hf_bfloat16_on_gpu_agrees_with_float32_on_cpu(tiny_prm, shepherd_prm, convention):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    folder = tiny_prm if convention == "qwen" else shepherd_prm
    rng = __import__("random").Random(0)
    items = []
    for _ in range(64):
        problem = arith.make_problem(rng, rng.randint(3, 6))
        response = arith.reference_solution(problem, rng)
        if rng.random() < 0.5:
            response = response.replace("=", "=1", 1)[:-1]
        items.append(PrmItem(problem, arith.format_prompt(problem), arith.step_texts(response), response))
    gpu = HFPrm(folder, convention, device="auto", dtype="auto", batch_size=16)
    assert gpu.device == "cuda" and gpu.dtype == torch.bfloat16
    cpu = HFPrm(folder, convention, device="cpu", dtype="float32")
    for a, b in zip(gpu.score(items), cpu.score(items)):
        assert len(a) == len(b) and a == pytest.approx(b, abs=0.03)


# ---- the shipped learned PRM ----------------------------------------------------------------------
SHIPPED = __import__("pathlib").Path(__file__).resolve().parents[1] / "data"


def test_shipped_learned_prm_agrees_with_the_rule_on_policy_rollouts():
    """data/prms/arith-tiny-prm, loaded by the hf backend as a Qwen PRM, finds the rule's first
    errors in fresh rollouts of data/policies/arith-tiny (problems apart from its training data)."""
    from scope_cli.models.prm_train import DATA_SEED, PRM_MARKER, evaluate, labelled_items, sample_rollouts

    folder = SHIPPED / "prms/arith-tiny-prm"
    info = json.loads((folder / PRM_MARKER).read_text())
    assert info["heldout_vs_rule"]["f1"] > 0.95 and info["rebuild"].startswith("python -m")
    problems = [r["problem"] for r in arith.generate_problems(DATA_SEED + 7, 40, 3, 6)]
    items, labels = labelled_items(sample_rollouts(SHIPPED / "policies/arith-tiny", problems, 3, seed=5))
    metrics = evaluate(HFPrm(folder, "qwen"), items, labels)
    assert metrics["erroneous"] > 20 and metrics["correct"] > 5
    assert metrics["f1"] > 0.85 and metrics["exact_match"] > 0.85


def test_shipped_learned_prm_of_the_long_policy_finds_its_first_errors():
    """data/prms/arith-tiny-long-prm (1,000 steps on CPU, held-out F1 0.77 recorded in its marker) is
    the learned PRM of data/policies/arith-tiny-long: on fresh rollouts of that policy (5-9 operands,
    problems apart from its training data) it finds the rule's first errors far above chance. The
    bounds sit about 4 binomial standard errors under the recorded held-out figures (0.64 and 0.69 with
    ~100 erroneous of 120 rollouts: standard errors ~0.05 and ~0.04)."""
    from scope_cli.models.prm_train import DATA_SEED, PRM_MARKER, evaluate, labelled_items, sample_rollouts

    folder = SHIPPED / "prms/arith-tiny-long-prm"
    info = json.loads((folder / PRM_MARKER).read_text())
    assert info["policy"] == "data/policies/arith-tiny-long" and info["operands"] == [5, 9]
    assert info["rebuild"].startswith("python -m scope_cli.models.prm_train --policy data/policies/arith-tiny-long")
    problems = [r["problem"] for r in arith.generate_problems(DATA_SEED + 7, 40, 5, 9)]
    items, labels = labelled_items(sample_rollouts(SHIPPED / "policies/arith-tiny-long", problems, 3, seed=5))
    metrics = evaluate(HFPrm(folder, "qwen"), items, labels)
    assert metrics["erroneous"] > 50
    assert metrics["acc_erroneous"] > 0.45 and metrics["exact_match"] > 0.5


def test_prm_training_learns_on_a_small_budget(tmp_path):
    """The training code path end to end on a tiny budget: sample, label, train from the policy,
    save in the Qwen PRM format, reload with the hf backend and measure."""
    from scope_cli.models.prm_train import build

    info = build(tmp_path / "prm", policy=SHIPPED / "policies/arith-tiny", train_problems=24,
                 eval_problems=8, samples=2, steps=3, batch_size=8, quiet=True)
    folder = tmp_path / "prm"
    assert (folder / "model.safetensors").exists() and (folder / "scope-prm.json").exists()
    assert info["train_rollouts"] > 0 and info["heldout_vs_rule"]["samples"] == info["eval_rollouts"]
    assert len(HFPrm(folder, "qwen").score([PrmItem(PROBLEM, arith.format_prompt(PROBLEM),
                                                    arith.step_texts(RIGHT), RIGHT)])[0]) == 3
