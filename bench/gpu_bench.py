"""GPU benchmark: MFU, tokens/s and peak memory of a train-step update on Qwen2.5-0.5B's and 1.5B's
shapes, and hf generate tokens/s.

    python bench/gpu_bench.py [--shapes 0.5b,1.5b] [--rows 16] [--row-tokens 4096] [--out FILE.md]
    python bench/gpu_bench.py --small          # a tiny config on whatever device is there (CPU-safe)

Models: Qwen2 configs with Qwen2.5-0.5B's and -1.5B's shapes (151,936-token vocabulary, tied
embeddings), random init from the config alone (nothing is downloaded), float32 weights and AdamW
moments. Batch: --rows rows of --row-tokens tokens each (--prompt of them prompt, the rest response,
half on-policy, half off-policy), one optimizer update through the stage's own `update()`
(PPO-clip + shaped off-policy loss, token-mean, micro-batches of train.micro_batch_tokens = 16384).

Variants, each on a fresh model (bf16 compute under autocast on a GPU; fp32 on a CPU):
- `whole-padded`: the whole [tokens × vocabulary] logits over length buckets: train-step's path
  before chunked log-probs and packing (equal-length rows: no padding here);
- `chunked-padded`: chunked log-probs (2048 response tokens per chunk, train.logprob_chunk_tokens'
  CUDA default), length buckets; sdpa runs its
  plain causal kernel;
- `chunked-packed-sdpa`: the CUDA default (train.packing = auto): rows packed into one sequence,
  sdpa with the block-causal mask transformers builds from the position ids (a dense mask: the
  kernel computes the whole square of a micro-batch);
- `chunked-packed-flex`: the same with flex_attention (block-sparse: computes only the blocks the
  mask keeps; torch.compile'd by transformers on first use).
A variant that fails (out of memory, a kernel missing) is reported with its error; the others run.

Reported: seconds per update (mean of --steps after one warm-up update), tokens/s (prompt + response
tokens), peak memory (torch.cuda.max_memory_allocated over the timed updates: weights, Adam moments,
gradients, activations), and MFU = model FLOPs / s / peak dense bf16 FLOP/s of the GPU (989 TFLOP/s
for H100/H200 SXM; --peak-tflops for another). Model FLOPs per update: 6·N·tokens (N: every parameter,
the tied embedding once, so the lm_head product counts and the embedding lookup does not) plus
attention 6·L·(heads·head_dim)·Σ_rows T_row² (QKᵀ and AV over the causal lower triangle, forward +
backward = 3 × forward; half of the 12·L·H·Q·T per token that counts the full square). Activation
recomputation and the masked-out work of a dense mask count for nothing. Prints a markdown table;
asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

SHAPES = {  # Qwen2.5 model cards' config.json values
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
    "small": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1),
}
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
VARIANTS = ("whole-padded", "chunked-padded", "chunked-packed-sdpa", "chunked-packed-flex")


def qwen_config(shape: str):
    from transformers import Qwen2Config

    vocab = 1024 if shape == "small" else 151936
    return Qwen2Config(**SHAPES[shape], vocab_size=vocab, max_position_embeddings=32768,
                       rope_theta=1e6, tie_word_embeddings=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_flops(device, given: float) -> float:
    if given:
        return given * 1e12
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))


def model_flops(config, n_params: int, lengths: list[int]) -> float:
    """6·N per token plus causal attention (see the module docstring)."""
    d_attn = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    return 6 * n_params * sum(lengths) + 6 * config.num_hidden_layers * d_attn * sum(t * t for t in lengths)


def make_rows(n_rows: int, row_tokens: int, prompt: int, vocab: int):
    from scope_cli.core.train_batch import Row

    rng = np.random.default_rng(0)
    resp = row_tokens - prompt
    rows = []
    for _ in range(n_rows):
        on, off = np.zeros(resp, dtype=bool), np.zeros(resp, dtype=bool)
        on[: resp // 2], off[resp // 2:] = True, True
        row = Row(rng.integers(3, vocab, prompt).tolist(), rng.integers(3, vocab, resp).tolist(),
                  float(rng.normal()), on, off, np.full(resp, np.nan, dtype=np.float32))
        row.old_logp = np.full(resp, -12.0, dtype=np.float32)
        rows.append(row)
    return rows


def bench_variant(shape: str, variant: str, device, rows, steps: int) -> dict:
    from transformers import Qwen2ForCausalLM

    from scope_cli.core.config import Config
    from scope_cli.core.train_update import Mode, update
    from scope_cli.backends.training import Dist, make_optimizer

    cfg = Config()
    cfg.train.micro_batch_tokens = 16384
    cfg.generate.max_tokens = max(len(r.response) for r in rows)
    autocast = device.type == "cuda"  # bf16 (train.mixed_precision = auto); fp32 on a CPU
    chunk = (2048 if device.type == "cuda" else 256) if variant.startswith("chunked") else 0
    mode = Mode(autocast=autocast, packed="-packed" in variant, chunk=chunk)
    config = qwen_config(shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    if variant.endswith("flex"):
        model.set_attn_implementation("flex_attention")
    model.config.use_cache = False
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(model, 1e-6, [0.9, 0.999], 0.0)
    d = Dist(device=device)
    try:
        update(model, opt, rows, d, cfg, 0, 1e-6, mode)  # warm-up (Adam's moments, compilation)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            update(model, opt, rows, d, cfg, 0, 1e-6, mode)
        sync(device)
        seconds = (time.perf_counter() - start) / steps
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        lengths = [r.length for r in rows]
        return {"seconds": seconds, "tokens_s": sum(lengths) / seconds, "peak_gib": peak,
                "flops": model_flops(config, n_params, lengths), "params": n_params}
    except Exception as exc:  # noqa: BLE001 (one variant's failure is a result, not the end)
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}", "params": n_params}
    finally:
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_generate(device, prompts_n: int, new_tokens: int, shape: str) -> float:
    from transformers import Qwen2ForCausalLM

    from scope_cli.backends.generation import HFBackend
    from scope_cli.backends.engine import Sampling
    from scope_cli.models.tiny import build_arith_tokenizer
    from scope_cli.core.policy import mark_policy_complete

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        Qwen2ForCausalLM(qwen_config(shape)).to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        build_arith_tokenizer().save_pretrained(tmp)
        mark_policy_complete(Path(tmp), {"hash": "bench"})
        backend = HFBackend(Path(tmp), device=device.type,
                            dtype="bfloat16" if device.type == "cuda" else "float32", batch_size=prompts_n)
        rng = np.random.default_rng(1)
        prompts = [rng.integers(3, 50, 32).tolist() for _ in range(prompts_n)]
        backend.generate(prompts[:4], list(range(4)), Sampling(temperature=1.0, max_tokens=4))
        sync(device)
        start = time.perf_counter()
        sampling = Sampling(temperature=1.0, max_tokens=new_tokens)
        outs = backend.generate(prompts, list(range(prompts_n)), sampling)
        sync(device)
        return sum(len(o.response_ids) for o in outs) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a tiny config and batch (CPU-safe)")
    ap.add_argument("--shapes", default="0.5b,1.5b")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--row-tokens", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    ap.add_argument("--no-generate", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.small:
        args.shapes, args.rows, args.row_tokens, args.prompt, args.steps = "small", 4, 96, 16, 1
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if device.type != "cuda":  # flex_attention needs a compiler toolchain for the CPU; not this check
        variants = [v for v in variants if not v.endswith("flex")]
    peak = peak_flops(device, args.peak_tflops)
    lines = ["| shape | variant | s/update | tokens/s | peak memory | MFU |", "|---|---|---|---|---|---|"]
    for shape in args.shapes.split(","):
        rows = make_rows(args.rows, args.row_tokens, args.prompt, qwen_config(shape).vocab_size)
        for variant in variants:
            r = bench_variant(shape, variant, device, rows, args.steps)
            name = f"{shape} ({r['params'] / 1e6:.1f}M)"
            if "error" in r:
                lines.append(f"| {name} | {variant} | failed: {r['error']} | | | |")
            else:
                lines.append(f"| {name} | {variant} | {r['seconds']:.3f} | {r['tokens_s']:,.0f} | "
                             f"{r['peak_gib']:.1f} GiB | {r['flops'] / r['seconds'] / peak:.1%} |")
            print(lines[-1], flush=True)
    if not args.no_generate:
        gen = (64, 128) if not args.small else (4, 16)
        tps = bench_generate(device, *gen, "0.5b" if not args.small else "small")
        dtype = "bf16" if device.type == "cuda" else "fp32"
        lines.append(f"| {'0.5b' if not args.small else 'small'} | hf generate, {gen[0]} prompts × {gen[1]} "
                     f"tokens, T=1, {dtype} | | {tps:,.0f} | | |")
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    table = "\n".join([*lines, "", f"device: {dev}; torch {torch.__version__}; {args.rows} rows × "
                       f"{args.row_tokens} tokens ({args.prompt} prompt) per update; peak bf16 "
                       f"{peak / 1e12:.0f} TFLOP/s"])
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
