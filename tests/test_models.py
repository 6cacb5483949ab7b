"""The tiny-model API: the arith tokenizer and policy folders that transformers loads."""

import json

import pytest
import torch
from safetensors.torch import load_file

from scope_cli.models.tiny import arith_vocab, build_arith_tokenizer, init_tiny_policy
from scope_cli.backends.hf import count_parameters, load_policy
from scope_cli.core.policy import policy_info, save_policy
from scope_cli.backends.hf import check_policy_folder
from scope_cli.core.policy import policy_complete
from scope_cli.tasks import arith


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def test_tokenizer_round_trips_arith_text():
    tok = build_arith_tokenizer()
    rows = arith.generate_problems(seed=3, count=20, min_operands=3, max_operands=8)
    for row in rows:
        text = arith.format_prompt(row["problem"]) + row["solution"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids
        # one token per character, except "\boxed{" which is one token
        assert len(ids) == len(text) - (len(arith.BOXED) - 1)


def test_boxed_is_one_token_and_specials():
    tok = build_arith_tokenizer()
    assert tok("\\boxed{7}", add_special_tokens=False)["input_ids"] == [
        tok.convert_tokens_to_ids("\\boxed{"), tok.convert_tokens_to_ids("7"), tok.convert_tokens_to_ids("}")]
    assert tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    assert tok.eos_token_id != tok.pad_token_id
    assert len(tok) == len(arith_vocab())
    assert tok.chat_template is None
    assert tok.decode([tok.convert_tokens_to_ids("3"), tok.eos_token_id], skip_special_tokens=True) == "3"
    # no BOS or EOS added to a prompt
    assert tok("1+2\n")["input_ids"] == [tok.convert_tokens_to_ids(c) for c in "1+2\n"]


def test_init_load_save_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = init_tiny_policy(tmp_path / "p0", seed=1)
    check_policy_folder(path)
    assert policy_complete(path)
    assert sorted(p.suffix for p in path.iterdir() if p.suffix not in (".json",)) == [".safetensors"]
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["max_position_embeddings"] == 256

    # plain transformers loads the folder from safetensors
    hf = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(path)
    assert 200_000 <= count_parameters(hf) <= 1_000_000
    assert tok("\\boxed{")["input_ids"] == [tok.convert_tokens_to_ids("\\boxed{")]

    model, tok2 = load_policy(path)
    ids = torch.tensor([tok2("3+4-1\n")["input_ids"]])
    with torch.no_grad():
        a, b = hf(ids).logits, model(ids).logits
    assert torch.equal(a, b)

    # change a weight, save, reload: the change survives; the marker carries info and a hash
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    save_policy(model, tok2, tmp_path / "p1", {"round": 1})
    again, _ = load_policy(tmp_path / "p1")
    assert torch.equal(again.model.norm.weight, model.model.norm.weight)
    info = policy_info(tmp_path / "p1")
    assert info["round"] == 1 and len(info["hash"]) == 16
    weights = load_file(tmp_path / "p1" / "model.safetensors")
    assert "model.embed_tokens.weight" in weights

    # saving over an existing policy replaces it and leaves no temp folders behind
    save_policy(model, tok2, tmp_path / "p1", {"round": 2})
    assert policy_info(tmp_path / "p1")["round"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p0", "p1"]


def test_same_seed_same_weights(tmp_path):
    a = load_file(init_tiny_policy(tmp_path / "a", seed=5) / "model.safetensors")
    b = load_file(init_tiny_policy(tmp_path / "b", seed=5) / "model.safetensors")
    c = load_file(init_tiny_policy(tmp_path / "c", seed=6) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
