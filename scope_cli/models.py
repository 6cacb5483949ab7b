"""The tiny models of the embedded default: a character tokenizer for arith and small Llama policies.

A policy is a Hugging Face folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json) plus the marker ``scope-policy.json`` written last;
transformers and vLLM both load it (LlamaForCausalLM, a fast tokenizer, no remote code).

    tok = build_arith_tokenizer()              # chars of arith.ALPHABET + "\\boxed{" + "}" + "</s>"
    init_tiny_policy("policy-000")             # random LlamaForCausalLM, ~0.33M parameters
    model, tok = load_policy("policy-000")     # safetensors only
    save_policy(model, tok, "policy-001", {"round": 1})   # temp folder, marker, rename

The attention heads are 32 wide (``head_dim``) whatever the hidden size: vLLM's attention kernels take
head sizes from 32 up, so a 64-wide model with 4 heads uses 4 x 32 projections.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from scope_cli.manifests import policy_digests
from scope_cli.policy import PolicyError, check_policy_folder, load_error
from scope_cli.runs import POLICY_MARKER, mark_policy_complete
from scope_cli.tempfiles import honour_umask_files, make_temp_dir, remove_stale_temps, swap_folder
from scope_cli.shards import write_failure
from scope_cli.tasks import arith

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
DTYPES = ("float32", "bfloat16", "float16")


def quiet_transformers() -> None:
    """No progress bars or load reports from transformers in stage output."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def arith_vocab() -> list[str]:
    """Token strings in id order: specials, the alphabet's characters, then the answer tokens."""
    return [PAD, EOS, UNK, *arith.ALPHABET, arith.BOXED, "}"]


def build_arith_tokenizer():
    """A character-level fast tokenizer over arith.ALPHABET with `\\boxed{` as one token.

    The pre-tokenizer isolates ``\\boxed{`` or any single character; a word-level model maps each piece
    to its id (anything else is <unk>); the Fuse decoder joins tokens without spaces. No BOS is added
    and there is no chat template: prompts are the task's raw text.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(arith_vocab())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=256, padding_side="left", clean_up_tokenization_spaces=False,
    )
    return tok


def tiny_config(tokenizer, *, hidden_size: int = 64, layers: int = 4, heads: int = 4,
                intermediate_size: int = 256, head_dim: int = 32, max_positions: int = 256):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )


def init_tiny_policy(out_dir: str | Path, *, hidden_size: int = 64, layers: int = 4, heads: int = 4,
                     intermediate_size: int = 256, seed: int = 0, head_dim: int = 32) -> Path:
    """A randomly initialised LlamaForCausalLM with the arith tokenizer, saved as a complete policy."""
    import torch
    from transformers import LlamaForCausalLM

    tok = build_arith_tokenizer()
    config = tiny_config(tok, hidden_size=hidden_size, layers=layers, heads=heads,
                         intermediate_size=intermediate_size, head_dim=head_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return save_policy(model, tok, out_dir, {"source": "init_tiny_policy", "seed": seed})


def load_policy(path: str | Path, *, dtype: str = "float32", device: str = "cpu",
                trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) from a policy folder; weights only from safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    check_policy_folder(path)
    quiet_transformers()
    if dtype not in DTYPES:
        raise PolicyError(f"{path}: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=trust_remote_code,
        ).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # truncated weights, custom code not allowed, a broken config: one line
        raise load_error(path, exc, trust_remote_code) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def save_policy(model, tokenizer, out_dir: str | Path, info: dict) -> Path:
    """Save weights (safetensors), config and tokenizer to a temp folder beside `out_dir`, write the
    marker (with the folder's hash and `info`), then rename into place. An existing `out_dir` is
    replaced only after the new folder is complete."""
    quiet_transformers()
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent)  # what a killed save left behind
    tmp = make_temp_dir(out.parent, out.name)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_config(tmp / "tokenizer_config.json")
        stray = [p.name for p in tmp.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".py")]
        if stray:
            raise PolicyError(f"{out}: refusing to save non-safetensors files {', '.join(stray)}")
        honour_umask_files(tmp)
        mark_policy_complete(tmp, {**policy_digests(tmp), **json.loads(json.dumps(info))})
        swap_folder(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = write_failure(exc, out)
        if failure is exc:
            raise
        raise failure from exc
    return out


def _portable_tokenizer_config(path: Path) -> None:
    """Name the tokenizer class as transformers 4.x (vLLM's pin) knows it: a plain fast tokenizer."""
    if not path.exists():
        return
    data = json.loads(path.read_text())
    if data.get("tokenizer_class") == "TokenizersBackend":
        data["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def policy_info(path: str | Path) -> dict:
    """The marker's contents (what wrote the policy, its hash, training notes)."""
    from scope_cli.jsonfile import read_json_object

    return read_json_object(Path(path) / POLICY_MARKER, fix="the policy folder is damaged: rerun the "
                            "command that wrote it")


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
