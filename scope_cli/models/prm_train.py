"""The learned PRM of the embedded task: a tiny Qwen2 backbone with a 2-class head at step tags.

    python -m scope_cli.models.prm_train --out data/prms/arith-tiny-prm --threads 4   # rebuild the shipped PRM

(about 4 minutes on one GPU, sampling included; on CPU the same command takes much longer and gives an
equivalent PRM, not a bit-identical one). It is written in the Qwen2.5-Math-PRM format, so the `hf`
PRM backend loads it exactly as it loads the real 7B model: config.json (model_type qwen2,
architectures Qwen2ForProcessRewardModel), model.safetensors with the backbone under ``model.*`` and
the head under ``score.0.*`` / ``score.2.*`` (Linear, ReLU, Linear), and the arith character
tokenizer with one extra special token ``<extra_0>`` placed after every step.

Like real PRMs, it is fine-tuned from a policy: the backbone starts as data/policies/arith-tiny's
Llama body (`prm_from_policy`: Qwen2 is Llama plus q/k/v biases, which start at zero), so it keeps
that policy's shape, 4 heads of 32 at hidden size 64, which vLLM's Qwen2 cannot take (hf only).
``--from-scratch`` trains a random backbone of the given shape instead (hidden 128 with 4 heads of 32
also loads in vLLM).

Training data: rollouts of data/policies/arith-tiny through the hf generation backend (temperature 1,
one seed per problem and sample) on arith problems drawn apart from the run's prompts (`DATA_SEED`),
labelled by the task's exact step checker. Loss: cross-entropy at the <extra_0> of each step up to
the first wrong one (class 1 before it, class 0 at it; later steps carry no loss). Held-out rollouts
(other problems) give the ProcessBench-style metrics against the rule, written to ``scope-prm.json``
beside the weights with the command that built it. The shipped PRM: held-out F1 0.986.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

from scope_cli.backends.prm import QWEN_STEP_TOKEN, PrmItem, qwen_text
from scope_cli.locate import first_error, processbench
from scope_cli.errors import write_errors_named
from scope_cli.tempfiles import folder_written_whole
from scope_cli.tasks import arith

DATA_SEED = 20_26_02  # arith problems for the PRM's data, drawn apart from prepare's seeds
PRM_MARKER = "scope-prm.json"


def build_prm_tokenizer():
    """The arith character tokenizer plus the special step token <extra_0>."""
    from scope_cli.models.tiny import build_arith_tokenizer

    tok = build_arith_tokenizer()
    tok.add_tokens([QWEN_STEP_TOKEN], special_tokens=True)
    tok.padding_side = "right"
    return tok


def tiny_prm_config(tokenizer, *, hidden_size: int = 64, layers: int = 2, heads: int = 2,
                    intermediate_size: int = 256, max_positions: int = 256):
    """A Qwen2 config (heads 32 wide, as vLLM's kernels need) for a PRM over `tokenizer`."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, rms_norm_eps=1e-6, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id, architectures=["Qwen2ForProcessRewardModel"],
        num_labels=2,
    )


def make_prm_module(config):
    """backbone (`model`, a transformers Qwen2Model) + `score` head: the checkpoint's key names."""
    import torch
    from transformers import Qwen2Model

    class TinyQwenPrm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Qwen2Model(config)
            h = config.hidden_size
            self.score = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.ReLU(),
                                             torch.nn.Linear(h, 2))

        def forward(self, input_ids, attention_mask):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.score(hidden)

    return TinyQwenPrm()


def prm_from_policy(policy: str | Path, tokenizer):
    """A PRM module whose Qwen2 backbone starts as the policy's Llama body (the same function: Qwen2
    is Llama plus q/k/v biases, which start at zero), as real PRMs are fine-tuned from a policy
    model. The policy's tokenizer must be `tokenizer` without <extra_0>, whose embedding starts at
    the mean of the others. The head starts random."""
    import torch
    from safetensors.torch import load_file
    from transformers import Qwen2Config

    src = json.loads((Path(policy) / "config.json").read_text())
    if src.get("model_type") != "llama":
        raise ValueError(f"{policy}: expected a Llama policy, got model_type {src.get('model_type')!r}")
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=src["hidden_size"],
        intermediate_size=src["intermediate_size"], num_hidden_layers=src["num_hidden_layers"],
        num_attention_heads=src["num_attention_heads"], num_key_value_heads=src["num_key_value_heads"],
        head_dim=src.get("head_dim") or src["hidden_size"] // src["num_attention_heads"],
        max_position_embeddings=src["max_position_embeddings"], rms_norm_eps=src["rms_norm_eps"],
        rope_parameters=src.get("rope_parameters") or {"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
        architectures=["Qwen2ForProcessRewardModel"], num_labels=2,
    )
    module = make_prm_module(config)
    weights = load_file(str(Path(policy) / "model.safetensors"))
    state = module.state_dict()
    with torch.no_grad():
        for key, value in weights.items():
            if key == "model.embed_tokens.weight":
                emb = state[key]
                emb[: value.shape[0]] = value
                emb[value.shape[0]:] = value.mean(0)
            elif key.startswith("model."):
                state[key].copy_(value)
        for key in state:
            if key.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                state[key].zero_()
    module.load_state_dict(state)
    return module


def save_prm(module, tokenizer, out_dir: str | Path, info: dict[str, Any]) -> Path:
    """Config, safetensors weights (model.*, score.*) and tokenizer, written to a temp folder beside
    `out_dir` and renamed into place; scope-prm.json (info) is written last."""
    from safetensors.torch import save_file

    from scope_cli.backends.hf import quiet_transformers

    quiet_transformers()
    out = Path(out_dir)
    with write_errors_named(out), folder_written_whole(out) as tmp:
        module.model.config.save_pretrained(tmp)
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        cfg_path = tmp / "tokenizer_config.json"
        data = json.loads(cfg_path.read_text())
        if data.get("tokenizer_class") == "TokenizersBackend":  # a name transformers 4.x knows too
            data["tokenizer_class"] = "PreTrainedTokenizerFast"
            cfg_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        (tmp / PRM_MARKER).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return out


def init_tiny_prm(out_dir: str | Path, *, seed: int = 0, **shape: int) -> Path:
    """A randomly initialised tiny PRM folder (tests build these)."""
    import torch

    tok = build_prm_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = make_prm_module(tiny_prm_config(tok, **shape))
    return save_prm(module, tok, out_dir, {"source": "init_tiny_prm", "seed": seed})


# ---- data -----------------------------------------------------------------------------------------
def sample_rollouts(policy: str | Path, problems: list[str], samples: int, *, seed: int,
                    temperature: float = 1.0, max_tokens: int = 64,
                    batch_size: int = 256) -> list[tuple[str, str]]:
    """(problem, response) pairs: `samples` completions per problem from the policy through the hf
    generation backend (what `scope generate` samples with; on the GPU where there is one), at
    `temperature` without top-k/top-p, one seed per (problem, sample)."""
    from scope_cli.backends.generation import open_backend
    from scope_cli.backends.engine import Sampling, encode_prompt
    from scope_cli.core.runs import row_seed

    backend = open_backend("hf", Path(policy), batch_size=batch_size)
    try:
        todo = [(p, k) for p in problems for k in range(samples)]
        prompts = [encode_prompt(backend.tokenizer, arith.format_prompt(p)) for p, _ in todo]
        seeds = [row_seed(seed, 0, p, k) for p, k in todo]
        outs = backend.generate(prompts, seeds, Sampling(temperature=temperature, max_tokens=max_tokens))
    finally:
        backend.close()
    return [(p, out.text) for (p, _), out in zip(todo, outs)]


def labelled_items(pairs: list[tuple[str, str]]) -> tuple[list[PrmItem], list[int | None]]:
    """PRM items of (problem, response) pairs and their rule labels (first wrong step or None);
    responses without any step are left out."""
    items, labels = [], []
    for problem, response in pairs:
        steps = arith.step_texts(response)
        if not steps:
            continue
        items.append(PrmItem(problem, arith.format_prompt(problem), steps, response, "arith"))
        labels.append(arith.first_error_step(problem, response))
    return items, labels


# ---- training -------------------------------------------------------------------------------------
def train_prm(items: list[PrmItem], labels: list[int | None], *, steps: int = 6000,
              batch_size: int = 256, lr: float = 1e-3, seed: int = 0, quiet: bool = False,
              init_from: str | Path | None = None, device: str = "auto", **shape: int):
    """Cross-entropy at the <extra_0> of every step up to the first wrong one: class 1 before it,
    class 0 at it. Steps after the first error carry no loss: whether they are right on their own
    terms does not change where the first error is, and the rule's "0 from it on" would ask the
    model to carry an earlier verdict forward instead of checking each step."""
    import torch

    tok = build_prm_tokenizer()
    tag = tok.convert_tokens_to_ids(QWEN_STEP_TOKEN)
    encoded = []
    for item, first in zip(items, labels):
        ids = tok(qwen_text(tok, item))["input_ids"]
        n = len(item.steps)
        cut = n if first is None else first
        encoded.append((ids, [1] * cut + [0] * (n - cut), n if first is None else first + 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if init_from is not None:
            module = prm_from_policy(init_from, tok)
        else:
            module = make_prm_module(tiny_prm_config(tok, **shape))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        module.to(device)
        opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.01)
        warmup = max(steps // 20, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 1.0) * 0.5 * (
            1 + math.cos(math.pi * min(s / steps, 1.0))))  # warm-up, then cosine to 0
        rng = random.Random(seed)
        module.train()
        start = time.perf_counter()
        for step in range(steps):
            batch = [encoded[rng.randrange(len(encoded))] for _ in range(batch_size)]
            width = max(len(ids) for ids, _, _ in batch)
            ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (row, _, _) in enumerate(batch):
                ids[r, :len(row)] = torch.tensor(row)
                mask[r, :len(row)] = 1
            target = torch.tensor([y for _, ys, _ in batch for y in ys], device=device)
            weight = torch.tensor([float(j < k) for _, ys, k in batch for j in range(len(ys))],
                                  device=device)
            ids, mask = ids.to(device), mask.to(device)
            logits = module(ids, mask)[(ids == tag) & (mask == 1)]
            losses = torch.nn.functional.cross_entropy(logits, target, reduction="none")
            loss = (losses * weight).sum() / weight.sum()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            sched.step()
            if not quiet and (step % 100 == 0 or step == steps - 1):
                print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f}s",
                      flush=True)
    module.eval()
    return module.cpu(), tok


def evaluate(scorer: Any, items: list[PrmItem], labels: list[int | None]) -> dict[str, float]:
    """ProcessBench-style metrics of a scorer's first errors (threshold 0.5) against rule labels."""
    preds = [first_error(s) if s is not None else None for s in scorer.score(items)]
    return processbench(preds, labels)


def build(out: str | Path, *, policy: str | Path = "data/policies/arith-tiny", train_problems: int = 8000,
          eval_problems: int = 500, samples: int = 4, steps: int = 6000, batch_size: int = 256,
          lr: float = 1e-3, seed: int = 0, from_policy: bool = True, quiet: bool = False,
          command: str = "", min_operands: int = 3, max_operands: int = 6,
          **shape: int) -> dict[str, Any]:
    """Sample, label, train, save in the Qwen PRM format, reload with the hf backend and measure."""
    from scope_cli.backends.prm import HFPrm

    t0 = time.perf_counter()
    train_set = arith.generate_problems(DATA_SEED, train_problems, min_operands, max_operands)
    seen = {r["problem"] for r in train_set}
    eval_set = arith.generate_problems(DATA_SEED + 1, eval_problems, min_operands, max_operands,
                                       exclude=seen)
    train_pairs = sample_rollouts(policy, [r["problem"] for r in train_set], samples, seed=seed)
    eval_pairs = sample_rollouts(policy, [r["problem"] for r in eval_set], 2, seed=seed + 1)
    items, labels = labelled_items(train_pairs)
    eval_items, eval_labels = labelled_items(eval_pairs)
    if not quiet:
        wrong = sum(lab is not None for lab in labels)
        print(f"{len(items)} training rollouts ({wrong} with an error), {len(eval_items)} held out; "
              f"sampling took {time.perf_counter() - t0:.0f}s", flush=True)
    module, tok = train_prm(items, labels, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                            quiet=quiet, init_from=policy if from_policy else None, **shape)
    info = {
        "source": "scope_cli.models.prm_train", "policy": str(policy), "data_seed": DATA_SEED, "seed": seed,
        "train_problems": train_problems, "eval_problems": eval_problems, "samples": samples,
        "operands": [min_operands, max_operands],
        "steps": steps, "batch_size": batch_size, "lr": lr,
        "init": "policy" if from_policy else {"random": shape},
        "train_rollouts": len(items), "eval_rollouts": len(eval_items),
        "device": "cuda" if __import__("torch").cuda.is_available() else "cpu",
        "rebuild": command or f"python -m scope_cli.models.prm_train --out {out}",
    }
    folder = save_prm(module, tok, out, info)
    info["heldout_vs_rule"] = evaluate(HFPrm(folder, "qwen", device="cpu"), eval_items, eval_labels)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    (folder / PRM_MARKER).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scope_cli.models.prm_train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/prms/arith-tiny-prm")
    parser.add_argument("--policy", default="data/policies/arith-tiny")
    parser.add_argument("--train-problems", type=int, default=8000)
    parser.add_argument("--eval-problems", type=int, default=500)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--min-operands", type=int, default=3, help="operands of the sampled problems")
    parser.add_argument("--max-operands", type=int, default=6)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--from-scratch", action="store_true",
                        help="a randomly initialised backbone of the shape below, not the policy's")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2, help="heads of 32 dims: hidden-size / 32")
    parser.add_argument("--intermediate-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import sys

    from scope_cli.backends.training import set_threads

    set_threads(args.threads)
    command = " ".join(["python -m scope_cli.models.prm_train", *(sys.argv[1:] if argv is None else argv)])
    info = build(args.out, policy=args.policy, train_problems=args.train_problems,
                 eval_problems=args.eval_problems, samples=args.samples, steps=args.steps,
                 batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                 from_policy=not args.from_scratch, command=command,
                 min_operands=args.min_operands, max_operands=args.max_operands,
                 hidden_size=args.hidden_size,
                 layers=args.layers, heads=args.heads, intermediate_size=args.intermediate_size)
    print(json.dumps(info["heldout_vs_rule"], indent=1))


if __name__ == "__main__":
    main()
