"""scope's round against TRL's GRPOTrainer, the tool most users would pick instead, on CPU.

    .venv/bin/python bench/trl_bench.py [--reps 5] [--quick]     (`make bench` builds .venv-bench)

The same tiny policy (data/policies/arith-tiny), the same task and the same shape of work per update:
8 prompts × 8 generations ≤ 64 tokens per update, 32 prompts sampled at once and 4 updates on them
(scope: generate.prompts_per_round 32, train.minibatches 4; TRL: per_device_train_batch_size 64,
steps_per_generation 4, num_generations 8), lr 1e-4, clip 0.2 / 0.28, token-mean loss, no KL, one
torch thread, float32. Sides:

- TRL: `trl.GRPOTrainer` with its transformers generation (``use_vllm=False``) and its defaults
  otherwise (gradient checkpointing on), the reward a math-verify check of ``\\boxed{}`` in the main
  process, as TRL's own accuracy reward does. It runs in .venv-bench (its own pins, torch 2.13.0).
  Timed: one generation batch and its 4 optimizer steps, from TRL's step callback.
- scope algo=grpo and algo=scope: the six training stages of a round (bench/round_bench.py's
  worker: files, manifests, policy save/load included; eval not timed).

Reported: seconds per optimizer update (a round or a generation batch ÷ 4), median of --reps after
one warm-up round, and peak RSS. Targets: grpo faster per update than TRL; scope no slower.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import (  # noqa: E402
    BENCH_PYTHON,
    PROJECT_PYTHON,
    Lockstep,
    Side,
    Summary,
    fmt_mb,
    fmt_s,
    interleave,
    set_threads,
    table,
    write_summaries,
)

PROMPTS_PER_UPDATE, GENERATIONS, UPDATES_PER_BATCH, MAX_TOKENS = 8, 8, 4, 64


def trl_worker(policy: Path, prompts_file: Path, out_dir: Path, max_steps: int) -> None:
    """TRL's GRPOTrainer, stepped from its callback every generation batch (4 updates)."""
    step = Lockstep()
    set_threads(1)
    import logging

    from datasets import Dataset
    from math_verify import parse, verify
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    hf_logging.set_verbosity_error()
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    dataset = Dataset.from_list(rows)

    def accuracy(completions: list[str], answer: list[str], **_: object) -> list[float]:
        """1 when the last \\boxed{} equals the gold answer under math-verify (gold first)."""
        out = []
        for text, gold in zip(completions, answer):
            i = text.rfind("\\boxed{")
            j = text.find("}", i)
            pred = text[i + 7:j] if i >= 0 and j >= 0 else ""
            ok = bool(pred) and verify(parse("\\boxed{" + gold + "}"), parse("\\boxed{" + pred + "}"))
            out.append(1.0 if ok else 0.0)
        return out

    config = GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, fp16=False, seed=0, report_to="none",
        per_device_train_batch_size=PROMPTS_PER_UPDATE * GENERATIONS, steps_per_generation=UPDATES_PER_BATCH,
        num_generations=GENERATIONS, max_completion_length=MAX_TOKENS, temperature=1.0, top_p=1.0,
        top_k=0, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, beta=0.0,
        epsilon=0.2, epsilon_high=0.28, loss_type="dapo", num_iterations=1, max_grad_norm=1.0,
        max_steps=max_steps, logging_steps=10_000, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, use_vllm=False,
    )
    model = AutoModelForCausalLM.from_pretrained(policy, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(policy)
    state = {"first": True}

    class Lock(TrainerCallback):
        def on_step_end(self, args, st, control, **kwargs):  # noqa: ANN001 (transformers' signature)
            if st.global_step % UPDATES_PER_BATCH:
                return
            if state["first"]:
                state["first"] = False
                step.ready(parameters=sum(p.numel() for p in model.parameters()),
                           gradient_checkpointing=args.gradient_checkpointing)
            else:
                step.done(updates=UPDATES_PER_BATCH)
            if not step.go():
                sys.exit(0)

    trainer = GRPOTrainer(model=model, reward_funcs=accuracy, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Lock()])
    trainer.train()


def write_prompts(path: Path, count: int) -> None:
    """The embedded task's training prompts (as `scope prepare` draws them), text and gold answer."""
    from scope_cli.core.config import Config
    from scope_cli.tasks import arith

    p = Config().prepare
    problems = arith.generate_problems(seed=p.seed, count=count, min_operands=p.min_operands,
                                       max_operands=p.max_operands)
    path.write_text("".join(json.dumps({"prompt": arith.format_prompt(x["problem"]),
                                        "answer": str(x["answer"])}) + "\n" for x in problems))


def compare(reps: int, tmp: Path) -> tuple[str, list[Summary]]:
    if not BENCH_PYTHON.exists():
        return ("### 2. scope vs TRL GRPOTrainer\n\nskipped: no .venv-bench (`make bench` creates it)", [])
    prompts = tmp / "prompts.jsonl"
    write_prompts(prompts, 4096)
    policy = ROOT / "data" / "policies" / "arith-tiny"
    round_bench = ROOT / "bench" / "round_bench.py"
    sides = [
        Side("TRL GRPOTrainer", [BENCH_PYTHON, __file__, "--worker", "trl", "--policy", policy,
                                 "--prompts", prompts, "--out", tmp / "trl",
                                 "--max-steps", UPDATES_PER_BATCH * (reps + 2)]),
        Side("scope algo=grpo", [PROJECT_PYTHON, round_bench, "--worker", "scope", "--root", tmp / "grpo",
                                 "--set", "run.algo=grpo"]),
        Side("scope algo=scope", [PROJECT_PYTHON, round_bench, "--worker", "scope", "--root",
                                  tmp / "scope", "--set", "run.algo=scope"]),
    ]
    res = interleave(sides, reps)
    trl = res["TRL GRPOTrainer"]
    per_update = {name: r.median / UPDATES_PER_BATCH for name, r in res.items()}
    rows = [[name, fmt_s(per_update[name]), f"{per_update[name] / per_update[trl.name]:.2f}",
             fmt_mb(r.max_rss_mb)] for name, r in res.items()]
    text = (f"### 2. scope against TRL's GRPOTrainer\n\n{PROMPTS_PER_UPDATE} prompts × {GENERATIONS} "
            f"generations ≤ {MAX_TOKENS} tokens per update, {UPDATES_PER_BATCH} updates per generation batch, "
            f"arith-tiny ({trl.ready.get('parameters')} parameters), CPU, one thread; TRL gradient "
            f"checkpointing: {trl.ready.get('gradient_checkpointing')}. Median of {reps} batches after a "
            "warm-up batch.\n\n" + table(["side", "s/update", "vs TRL", "max RSS"], rows))
    grpo, scope = res["scope algo=grpo"], res["scope algo=scope"]
    r_grpo = per_update[grpo.name] / per_update[trl.name]
    r_scope = per_update[scope.name] / per_update[trl.name]
    return text, [
        Summary("2. algo=grpo vs TRL GRPOTrainer (per update)", f"{fmt_s(per_update[grpo.name])}/update",
                f"{fmt_s(per_update[trl.name])}/update", r_grpo, "time scope / TRL", "< 1.00", r_grpo < 1.0,
                grpo.max_rss_mb, trl.max_rss_mb),
        Summary("2. algo=scope vs TRL GRPOTrainer (per update)", f"{fmt_s(per_update[scope.name])}/update",
                f"{fmt_s(per_update[trl.name])}/update", r_scope, "time scope / TRL", "≤ 1.00",
                r_scope <= 1.0, scope.max_rss_mb, trl.max_rss_mb),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None, help="write the summary lines here (bench/run_all.py)")
    ap.add_argument("--worker", choices=["trl"], help=argparse.SUPPRESS)
    ap.add_argument("--policy", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--max-steps", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        trl_worker(Path(args.policy), Path(args.prompts), Path(args.out), args.max_steps)
        return
    tmp = Path(tempfile.mkdtemp(prefix="scope-bench-"))
    try:
        text, summaries = compare(3 if args.quick else args.reps, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(text)
    write_summaries(args.json, summaries)


if __name__ == "__main__":
    main()
