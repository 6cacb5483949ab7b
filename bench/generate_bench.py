"""generate throughput: scope's generation backends against the raw engine calls a user would make.

    .venv/bin/python bench/generate_bench.py [--policy DIR] [--prompts 32] [--n 8] [--max-tokens 64]
                                             [--runs 5] [--backends hf,vllm] [--threads 1]

On the same prompt token ids (arith prompts, n samples each, one batch), in one process:

- hf: `HFBackend.generate` (per-row seeds, processed log-probs) against ``model.generate(do_sample=True,
  output_scores=True)`` followed by ``compute_transition_scores`` for the log-probs;
- vllm: `VLLMBackend.generate` (a SamplingParams per row with its seed) against ``llm.generate`` with one
  shared SamplingParams(logprobs=0) on the same engine.

Tokens/s counts generated tokens (EOS and padding excluded). The two sides of a backend alternate;
the table shows the median of the runs and scope's overhead (target: at most 5%). The policy is
data/policies/arith-tiny when it exists, else a randomly initialised tiny policy. Asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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


def timed(fn) -> float:
    start = time.perf_counter()
    tokens = fn()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=str(ROOT / "data/policies/arith-tiny"))
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--backends", default="hf,vllm")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import os

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from scope_cli.backends.generation import HFBackend, Sampling, VLLMBackend, vllm_available
    from scope_cli.models import count_parameters, init_tiny_policy
    from scope_cli.runs import policy_complete

    torch.set_num_threads(args.threads)
    policy = Path(args.policy)
    if not policy_complete(policy):
        policy = init_tiny_policy(Path(tempfile.mkdtemp()) / "tiny", seed=0)
    sampling = Sampling(temperature=1.0, max_tokens=args.max_tokens)
    rows: list[tuple[str, str, float, float]] = []
    params = None
    for name in args.backends.split(","):
        if name == "vllm" and not vllm_available():
            print("(vllm not installed: `make setup-vllm`; skipping it)")
            continue
        backend = HFBackend(policy, batch_size=args.prompts * args.n) if name == "hf" else VLLMBackend(policy)
        params = params or count_parameters(HFBackend(policy).model)
        prompts = [p for p in arith_prompts(backend.tokenizer, args.prompts) for _ in range(args.n)]
        seeds = list(range(len(prompts)))

        def ours():
            return sum(len(o.response_ids) for o in backend.generate(prompts, seeds, sampling))

        if name == "hf":
            raws = {"model.generate + compute_transition_scores":
                    lambda: raw_hf(backend.model, backend.tokenizer, prompts, args.max_tokens)}
        else:
            raws = {"vllm.LLM.generate, one SamplingParams": lambda: raw_vllm(backend.llm, prompts,
                                                                              args.max_tokens),
                    "vllm.LLM.generate, a seeded SamplingParams per row":
                    lambda: raw_vllm(backend.llm, prompts, args.max_tokens, seeds)}
        rates: dict[str, list[float]] = {"scope": [], **{label: [] for label in raws}}
        ours(), [raw() for raw in raws.values()]  # warm-up
        for _ in range(args.runs):
            rates["scope"].append(timed(ours))
            for label, raw in raws.items():
                rates[label].append(timed(raw))
        for label in raws:
            rows.append((name, label, statistics.median(rates["scope"]), statistics.median(rates[label])))
        backend.close()
    print(f"\ngenerate: {args.prompts} prompts x {args.n} samples, <= {args.max_tokens} tokens, "
          f"policy {policy.name} ({params} parameters), {args.threads} thread(s), median of {args.runs} "
          "runs, tokens/s\n")
    print("| backend | scope tokens/s | raw call | raw tokens/s | scope / raw |")
    print("|---|---:|---|---:|---:|")
    for name, label, ours_rate, raw_rate in rows:
        print(f"| {name} | {ours_rate:.0f} | {label} | {raw_rate:.0f} | {ours_rate / raw_rate:.2f} |")


if __name__ == "__main__":
    main()
