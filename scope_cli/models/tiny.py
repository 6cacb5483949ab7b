"""The tiny models of the embedded default: a character tokenizer for arith and small Llama policies.

    tok = build_arith_tokenizer()              # chars of arith.ALPHABET + "\\boxed{" + "}" + "</s>"
    init_tiny_policy("policy-000")             # random LlamaForCausalLM, ~0.33M parameters

A policy is a Hugging Face folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json) plus the marker ``scope-policy.json`` written last;
transformers and vLLM both load it (LlamaForCausalLM, a fast tokenizer, no remote code).

The attention heads are 32 wide (``head_dim``) whatever the hidden size: vLLM's attention kernels take
head sizes from 32 up, so a 64-wide model with 4 heads uses 4 x 32 projections.
"""

from __future__ import annotations

from pathlib import Path

from scope_cli.core.policy import save_policy
from scope_cli.tasks import arith

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


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
