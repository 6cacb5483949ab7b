"""Long responses over a 151,936-token vocabulary on CPU: peak memory and tokens/s of train-step's
log-prob pass and update, whole logits (the path before chunking) against chunked log-probs.

    .venv/bin/python bench/logprob_bench.py [--tokens 1024,2048,4096,8192] [--before 1024,2048,4096]
                                            [--cap-gib 10] [--out FILE.md]

The model: Qwen2's shape with Qwen2.5's full vocabulary (151,936 tokens, tied embeddings) and two
small decoder layers (hidden 256, 4 heads, 2 KV heads, MLP 1024; random init, built from a config:
nothing is downloaded), so that the output projection and its [tokens × vocabulary] tensors are what
the numbers measure. The batch: one row of 128 prompt tokens and N response tokens (half on-policy,
half off-policy), in one micro-batch (train.micro_batch_tokens = 16384, the GPU default).

Sides, each (side, N) in its own child process, one at a time, one torch thread, the child's address
space capped at --cap-gib (RLIMIT_AS; the machine is shared): `before` is train.logprob_chunks = off
(the whole [N, V] logits, then a gathered copy, a float32 log-softmax and their gradients: train-step's
path before chunking, still the CPU default); `after` is train.logprob_chunks = on (chunks of 256
tokens, the CPU value of train.logprob_chunk_tokens = 0) with packing on. In each child, after a
warm-up update on a short row (Adam's moments exist from then on): the old-log-prob pass
(`fixed_logprobs`, no gradient) and then one optimizer update (`update`), each with Linux's peak-RSS
counter reset before it (/proc/self/clear_refs). Reported per pass: peak RSS above the RSS before it
(the pass's own memory: logits, activations, gradients), and response tokens per CPU-second (process
CPU time, which other users of a shared machine move less than wall time; wall time is printed too).
A child that hits the cap is reported as such. Prints a markdown table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = 128
VOCAB = 151936
CHUNK = 256  # train.logprob_chunk_tokens on CPU (0: auto)


def _status(key: str) -> float:
    """A VmRSS/VmHWM-style line of /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def measure(fn) -> dict[str, float]:
    import gc

    gc.collect()
    before = _status("VmRSS")
    _reset_peak()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"rss_before_mib": before, "peak_above_mib": _status("VmHWM") - before, "wall_s": wall,
            "cpu_s": cpu}


def worker(side: str, tokens: int, cap_gib: float) -> dict:
    cap = int(cap_gib * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import numpy as np
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from scope_cli.core.config import Config
    from scope_cli.core.train_batch import Row
    from scope_cli.core.train_update import Mode, fixed_logprobs, update
    from scope_cli.backends.training import Dist, make_optimizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=16384, tie_word_embeddings=True))
    model.config.use_cache = False
    model.train()
    cfg = Config()
    cfg.train.micro_batch_tokens = 16384
    cfg.generate.max_tokens = tokens
    chunked = side == "after"
    cfg.train.logprob_chunks = "on" if chunked else "off"
    cfg.train.packing = "on" if chunked else "off"
    cfg.train.logprob_chunk_tokens = CHUNK
    mode = Mode(packed=chunked, chunk=CHUNK if chunked else 0)
    rng = np.random.default_rng(0)

    def row(n: int) -> Row:
        on, off = np.zeros(n, bool), np.zeros(n, bool)
        on[: n // 2], off[n // 2:] = True, True
        r = Row(rng.integers(3, VOCAB, PROMPT).tolist(), rng.integers(3, VOCAB, n).tolist(), 1.0, on, off,
                np.full(n, np.nan, dtype=np.float32))
        r.old_logp = np.full(n, -12.0, dtype=np.float32)
        return r

    opt = make_optimizer(model, 1e-6, [0.9, 0.999], 0.0)
    d = Dist()
    update(model, opt, [row(64)], d, cfg, 0, 1e-6, mode)  # warm-up: Adam's moments allocated
    rows = [row(tokens)]
    out: dict = {"side": side, "tokens": tokens, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    try:
        out["logprobs"] = measure(lambda: fixed_logprobs(model, rows, d, 1.0, 0, 16384, mode))
        out["update"] = measure(lambda: update(model, opt, rows, d, cfg, 0, 1e-6, mode))
    except (RuntimeError, MemoryError):  # the allocator refused: over the cap
        out["error"] = f"over the {cap_gib:g} GiB cap"
    return out


def run_child(side: str, tokens: int, cap_gib: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--n", str(tokens), "--cap-gib", str(cap_gib)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"side": side, "tokens": tokens, "error": f"child failed: {tail[:120]}"}
    return json.loads(lines[-1])


def fmt(res: dict, part: str) -> list[str]:
    if part not in res:
        return [res.get("error", "-"), "-", "-"]
    m = res[part]
    return [f"{m['peak_above_mib']:,.0f} MiB", f"{res['tokens'] / m['cpu_s']:,.0f}", f"{m['wall_s']:.1f} s"]


def report(results: list[dict], cap_gib: float) -> str:
    head = ["side", "response tokens", "log-prob pass: peak above", "tokens/CPU-s", "wall",
            "update: peak above", "tokens/CPU-s", "wall"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["side"], f"{r['tokens']:,}", *fmt(r, "logprobs"), *fmt(r, "update")]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    ratios = []
    by = {(r["side"], r["tokens"]): r for r in results}
    for (side, n), b in sorted(by.items(), key=lambda kv: kv[0][1]):
        a = by.get(("after", n))
        if side != "before" or a is None:
            continue
        parts = []
        for part, label in (("logprobs", "log-prob pass"), ("update", "update")):
            if part in a and part in b:
                memory = b[part]["peak_above_mib"] / a[part]["peak_above_mib"]
                speed = b[part]["cpu_s"] / a[part]["cpu_s"]
                parts.append(f"{label}: memory {memory:.1f}x lower, tokens/CPU-s after/before {speed:.2f}")
        ratios.append(f"- {n:,} tokens: " + "; ".join(parts))
    params = next((r["params_m"] for r in results if "params_m" in r), float("nan"))
    return (f"Qwen2 shape, vocabulary {VOCAB:,}, 2 layers of hidden 256 ({params:.1f}M parameters), one "
            f"row of {PROMPT} prompt + N response tokens, one torch thread, each child capped at "
            f"{cap_gib:g} GiB.\n\n"
            + text + ("\n\n" + "\n".join(ratios) if ratios else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1024,2048,4096,8192", help="after: response tokens per row")
    ap.add_argument("--before", default="1024,2048,4096", help="before: response tokens per row")
    ap.add_argument("--cap-gib", type=float, default=10.0)
    ap.add_argument("--out", default="")
    ap.add_argument("--worker", choices=["before", "after"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.cap_gib)), flush=True)
        return
    results = []
    plan = [("before", int(n)) for n in args.before.split(",") if n] + [
        ("after", int(n)) for n in args.tokens.split(",") if n]
    for side, n in sorted(plan, key=lambda p: (p[1], p[0] != "before")):
        results.append(run_child(side, n, args.cap_gib))
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    text = report(results, args.cap_gib)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
