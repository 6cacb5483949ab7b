"""train-step throughput: scope's update against a straightforward padded implementation of the same loss.

    .venv/bin/python bench/train_bench.py [--reps 5] [--quick]

The batch is a real one: round 1 of the embedded default (algo=scope: policy rows and rectified rows
with guide tokens) run through generate … rectify once, then read from round-1/rectified/. A step is
what train-step computes on it: old log-probs under the policy, then one epoch of 4 minibatches, one
optimizer update each (AdamW, lr 0 so that every step sees the same weights). Sides, each its own
process (bench/harness.py), stepped in turn, one torch thread:

- scope: `stages.train_step.fixed_logprobs` and `update` (length-bucketed micro-batches of
  train.micro_batch_tokens, logits only from the first response position);
- padded: what one would write first: each minibatch (and the old-log-prob pass over the whole
  batch) as one right-padded batch with an attention mask, logits at every position, log-softmax,
  masks over the response tokens, the same PPO-clip / shaped off-policy terms and token-mean.

Both compute the same loss (the first update's loss is compared). Reported: trained tokens per
second (response tokens that carry loss, per step time), median of --reps steps after a warm-up.
"""

from __future__ import annotations

import argparse
import shutil
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
    fmt_s,
    interleave,
    set_threads,
    table,
    write_summaries,
)


def make_batch(root: Path) -> None:
    """Round 1 of the embedded default up to rectify, in this process."""
    from round_bench import open_bench_run

    from scope_cli.core.resources import StageResources
    from stages.generate import generate
    from stages.locate_error import locate_error
    from stages.prm_score import prm_score
    from stages.rectify import rectify
    from stages.verify import verify

    run = open_bench_run(root, [])
    with StageResources(run.config) as res:
        generate(run, 1, resources=res, quiet=True)
        verify(run, 1, resources=res, quiet=True)
        prm_score(run, 1, resources=res, quiet=True)
        locate_error(run, 1, quiet=True)
        rectify(run, 1, quiet=True, resources=res)


def padded_logprobs(model, rows, temperature: float, pad: int):
    """Per-token log-probs of every row's response, the straightforward way: right-padded
    prompt + response with an attention mask, logits at all positions. Returns (logp [B, L-1] of
    each next token, mask [B, L-1] of the positions that predict a response token)."""
    import torch

    seqs = [r.prompt + r.response for r in rows]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        attn[b, : len(s)] = 1
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    # response token k of row b is predicted at position len(prompt) - 1 + k
    resp = torch.zeros_like(logp, dtype=torch.bool)
    for b, r in enumerate(rows):
        resp[b, len(r.prompt) - 1: len(r.prompt) - 1 + len(r.response)] = True
    return logp, resp


def padded_update(model, opt, rows, cfg, pad: int, lr: float) -> float:
    """One optimizer update on a minibatch with the loss of stages/train_step.py, padded."""
    import torch

    from scope_cli import objectives as obj

    t = cfg.train
    logp, resp = padded_logprobs(model, rows, cfg.generate.temperature, pad)
    on, off, old = (torch.zeros_like(resp), torch.zeros_like(resp), torch.zeros_like(logp))
    for b, r in enumerate(rows):
        start = len(r.prompt) - 1
        span = slice(start, start + len(r.response))
        on[b, span] = torch.from_numpy(r.on)
        off[b, span] = torch.from_numpy(r.off)
        old[b, span] = torch.from_numpy(r.old_logp)
    adv = torch.tensor([r.adv for r in rows], dtype=torch.float32)[:, None]
    on_loss, _, _ = obj.ppo_clip_loss(logp, old, adv, t.clip_low, t.clip_high)
    off_loss, _ = obj.shaped_offpolicy_loss(logp, adv, t.offpolicy_gamma)
    tok_loss = torch.where(on, on_loss, 0.0) + torch.where(off, off_loss, 0.0)
    loss = tok_loss.sum() / (on | off).sum()
    for group in opt.param_groups:
        group["lr"] = lr
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def worker(kind: str, root: Path) -> None:
    step = Lockstep()
    set_threads(1)
    import numpy as np
    import torch

    from scope_cli.backends.hf import load_policy
    from scope_cli.core.runs import Run
    from scope_cli.core.files import read_stage
    from scope_cli.backends.training import Dist, make_optimizer
    from scope_cli.core.train_batch import NEEDED, build_batch
    from scope_cli.core.train_update import fixed_logprobs, micro_batch_tokens, update

    run = Run.open(root)
    cfg = run.config
    t = cfg.train
    model, tok = load_policy(run.policy_dir(0))
    model.train()
    opt = make_optimizer(model, 0.0, t.betas, t.weight_decay)
    rows, _ = build_batch(read_stage(run.stage_dir(1, "rectified"), NEEDED), cfg, run.policy_dir(0).name,
                          model.config.max_position_embeddings, tok.eos_token_id)
    rows = [r for r in rows if r.tokens > 0]
    parts = np.array_split(np.random.default_rng([cfg.run.seed, 1, 0]).permutation(len(rows)),
                           t.minibatches)
    pad, d = tok.pad_token_id, Dist()

    def one_step() -> dict[str, float]:
        if kind == "scope":
            for r, lp in zip(rows, fixed_logprobs(model, rows, d, cfg.generate.temperature, pad,
                                                  micro_batch_tokens(cfg, d))):
                r.old_logp = lp
            losses = [update(model, opt, [rows[i] for i in p], d, cfg, pad, 0.0)["loss"] for p in parts]
        else:
            with torch.no_grad():
                logp, resp = padded_logprobs(model, rows, cfg.generate.temperature, pad)
            for b, r in enumerate(rows):
                r.old_logp = logp[b][resp[b]].numpy().astype(np.float32)
            losses = [padded_update(model, opt, [rows[i] for i in p], cfg, pad, 0.0) for p in parts]
        return {"tokens": sum(r.tokens for r in rows), "loss0": losses[0]}

    one_step()
    step.ready(rows=len(rows), tokens=sum(r.tokens for r in rows),
               padded_tokens=len(rows) * max(len(r.prompt) + len(r.response) for r in rows),
               real_tokens=sum(len(r.prompt) + len(r.response) for r in rows))
    while step.go():
        info = one_step()
        seconds = step.lap()
        step.done(seconds, rate=info["tokens"] / seconds, **info)


def compare(reps: int, tmp: Path) -> tuple[str, list[Summary]]:
    root = tmp / "train-batch"
    make_batch(root)
    base = [PROJECT_PYTHON, __file__, "--root", root]
    res = interleave([Side("scope", [*base, "--worker", "scope"]), Side("padded", [*base, "--worker", "padded"])],
                     reps)
    ours, pad = res["scope"], res["padded"]
    r_ours, r_pad = ours.median_of("rate"), pad.median_of("rate")
    diff = max(abs(a["loss0"] - b["loss0"]) for a, b in zip(ours.info, pad.info))
    info = ours.ready
    rows = [["scope update (bucketed, logits from the response on)", f"{r_ours:.0f}", fmt_s(ours.median),
             f"{r_ours / r_pad:.2f}", fmt_mb(ours.max_rss_mb)],
            ["padded, logits everywhere", f"{r_pad:.0f}", fmt_s(pad.median), "1.00", fmt_mb(pad.max_rss_mb)]]
    text = (f"### 5. train-step against a straightforward padded implementation\n\nRound 1's rectified batch "
            f"of the embedded default: {info['rows']} rows, {info['tokens']} trained tokens; old log-probs "
            f"+ 4 updates per step; median of {reps} steps. Padding to the longest row would hold "
            f"{info['padded_tokens']} positions for {info['real_tokens']} real ones. Same loss: the first "
            f"update's loss is {ours.info[0]['loss0']:.6f} (scope) and {pad.info[0]['loss0']:.6f} (padded), "
            f"{diff:.1e} apart at most over the steps.\n\n"
            + table(["implementation", "trained tokens/s", "s/step", "speed-up", "max RSS"], rows))
    return text, [Summary("5. train-step vs padded implementation (tokens/s)", f"{r_ours:.0f} tok/s",
                          f"{r_pad:.0f} tok/s", r_ours / r_pad, "tokens/s scope / padded", "> 1", r_ours > r_pad,
                          ours.max_rss_mb, pad.max_rss_mb)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None, help="write the summary lines here (bench/run_all.py)")
    ap.add_argument("--worker", choices=["scope", "padded"], help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, Path(args.root))
        return
    set_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="scope-bench-"))
    try:
        text, summaries = compare(3 if args.quick else args.reps, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(text)
    write_summaries(args.json, summaries)


if __name__ == "__main__":
    main()
