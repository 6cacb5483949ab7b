"""GPU benchmark: train-step tokens/s and MFU on a ~0.5B random-initialised Qwen2, hf generate tokens/s.

    python bench/gpu_bench.py [--small] [--out FILE.md]

Uses the stage's own update() (PPO-clip + shaped off-policy loss, token-mean, AdamW) on rows of random
token ids (half the response on-policy, half off-policy), fp32 weights (the default path) and bf16
weights; and the hf generation backend (sampling at T=1). MFU = 6·N·tokens/s over the GPU's dense bf16
peak (989 TFLOP/s on an H100 SXM). `--small` runs a tiny config on whatever device is there (the CPU-safe
path of scripts/gpu-check.sh). Prints a markdown table; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PEAK_BF16 = 989e12


def qwen_config(small: bool):
    from transformers import Qwen2Config

    if small:
        return Qwen2Config(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=1024, max_position_embeddings=1024,
                           tie_word_embeddings=True)
    return Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096,
                       tie_word_embeddings=True)  # Qwen2.5-0.5B's shape


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_train(model, device, rows_n, prompt_len, resp_len, steps, vocab):
    from scope_cli.config import Config
    from scope_cli.training import Dist, make_optimizer
    from stages.train_step import Row, update

    cfg = Config()
    cfg.train.micro_batch_tokens = 8 * (prompt_len + resp_len)
    cfg.generate.max_tokens = resp_len
    rng = np.random.default_rng(0)
    rows = []
    for i in range(rows_n):
        on = np.zeros(resp_len, dtype=bool)
        off = np.zeros(resp_len, dtype=bool)
        on[: resp_len // 2] = True
        off[resp_len // 2:] = True
        row = Row(rng.integers(3, vocab, prompt_len).tolist(), rng.integers(3, vocab, resp_len).tolist(),
                  float(rng.normal()), on, off, np.full(resp_len, np.nan, dtype=np.float32))
        row.old_logp = np.full(resp_len, -5.0, dtype=np.float32)
        rows.append(row)
    opt = make_optimizer(model, 1e-6, [0.9, 0.999], 0.0)
    d = Dist(device=device)
    update(model, opt, rows, d, cfg, 0, 1e-6)  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        update(model, opt, rows, d, cfg, 0, 1e-6)
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    tokens = rows_n * (prompt_len + resp_len)
    return seconds, tokens / seconds


def bench_generate(policy_dir, device, prompts_n, new_tokens):
    from scope_cli.backends.generation import HFBackend, Sampling

    backend = HFBackend(policy_dir, device=device.type, dtype="bfloat16" if device.type == "cuda" else "float32",
                        batch_size=prompts_n)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 50, 32).tolist() for _ in range(prompts_n)]
    sampling = Sampling(temperature=1.0, max_tokens=new_tokens)
    backend.generate(prompts[:4], list(range(4)), Sampling(temperature=1.0, max_tokens=4))
    sync(device)
    start = time.perf_counter()
    outs = backend.generate(prompts, list(range(prompts_n)), sampling)
    sync(device)
    seconds = time.perf_counter() - start
    return sum(len(o.response_ids) for o in outs) / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    from transformers import Qwen2ForCausalLM

    from scope_cli.models import build_arith_tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = qwen_config(args.small)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    shape = dict(rows_n=16, prompt_len=128, resp_len=512, steps=3) if not args.small else dict(
        rows_n=4, prompt_len=16, resp_len=32, steps=2)
    lines = [f"| device | {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} |",
             f"| model | Qwen2 config, {n_params / 1e6:.0f}M parameters, random init |"]
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        seconds, tps = bench_train(model, device, vocab=cfg.vocab_size, **shape)
        mfu = 6 * n_params * tps / PEAK_BF16 if device.type == "cuda" else float("nan")
        results.append(f"| train-step update, {str(dtype)[6:]} weights | {seconds:.3f} s/update | "
                       f"{tps:,.0f} tokens/s | MFU {mfu:.1%} |")
    with tempfile.TemporaryDirectory() as tmp:
        from scope_cli.runs import mark_policy_complete

        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        build_arith_tokenizer().save_pretrained(tmp)
        mark_policy_complete(Path(tmp), {"hash": "bench"})
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        gen_shape = (64, 128) if not args.small else (4, 16)
        tps = bench_generate(Path(tmp), device, *gen_shape)
        results.append(f"| hf generate, {gen_shape[0]} prompts x {gen_shape[1]} tokens, T=1 | | "
                       f"{tps:,.0f} tokens/s | |")
    table = "\n".join(["| what | time | throughput | MFU |", "|---|---|---|---|", *results, "", *lines])
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
