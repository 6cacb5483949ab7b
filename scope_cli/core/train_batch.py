"""train-step's round batch: which rows train, their advantages, token masks and trained tokens.

`build_batch(table, cfg, policy_name, max_positions, eos_id)` turns round-R/rectified/ (the NEEDED
columns) into `Row`s: rows with in_batch; rows whose verify_status is timeout/error get reward 0 (or
are dropped with train.drop_unverified); advantages per prompt group over the whole batch, once,
before any minibatch or process split (train.advantage: grpo | drgrpo | grpo_split); groups with
all-zero advantages are dropped. Per-token masks: tokens at or after offpolicy_start are off-policy
(guide tokens); in rectify.mode = "augment" a failed parent trains only from its first wrong step on
(its correct prefix is shared with its rectified child); under run.algo = "vppo" so does every
policy row with a negative advantage and a located first error (`verified_prefix_start`). The trained tokens are response_ids plus the
end-of-sequence token that ended the row (`trained_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from scope_cli import objectives as obj
from scope_cli.core.config import Config
from scope_cli.schema import RECTIFIED
from scope_cli.backends.training import TrainError

# the columns train-step reads (a subset of RECTIFIED); stop_token_id may be missing (older runs)
NEEDED = pa.schema([RECTIFIED.field(n) for n in (
    "prompt_id", "sample_idx", "prompt_ids", "response", "response_ids", "response_logprobs",
    "finish_reason", "stop_token_id", "policy", "reward", "verify_status", "step_token_ends",
    "first_error_step", "origin", "in_batch", "parent_sample_idx", "offpolicy_start")])


@dataclass
class Row:
    prompt: list[int]
    response: list[int]
    adv: float
    on: np.ndarray  # bool per response token
    off: np.ndarray
    engine_logp: np.ndarray  # float per response token, NaN where unknown
    old_logp: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    ref_logp: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    @property
    def tokens(self) -> int:
        return int(self.on.sum() + self.off.sum())

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.response)


def with_eos(response: list[int], finish_reason: str | None, text: str, eos_id: int | None,
             stop: list[str]) -> list[int]:
    """response_ids plus the tokenizer's eos where the row ended on one: the rule for rows without
    stop_token_id (runs written before the column; see `trained_tokens`).

    Generate and rectify leave eos out of response_ids (finish_reason "stop" records it); training
    needs it, or the policy is never rewarded for stopping. A row stopped by a stop string sampled no
    eos; a row that already ends with eos keeps it once."""
    if (eos_id is None or finish_reason != "stop" or (response and response[-1] == eos_id)
            or any(s and (text or "").endswith(s) for s in stop)):
        return response
    return response + [eos_id]


def trained_tokens(response: list[int], finish_reason: str | None, text: str,
                   stop_token_id: int | None, eos_id: int | None, stop: list[str]) -> list[int]:
    """The trained token sequence: response_ids plus the end-of-sequence token that ended the row.

    stop_token_id is the token generate sampled (a policy may have several eos tokens: Qwen's
    <|im_end|> and <|endoftext|>), or the policy's eos for a guide-written row; it is null where no
    eos ended the row (max_tokens, a stop string) and in runs written before the column existed,
    whose rows keep the earlier rule (`with_eos`: the tokenizer's eos for finish_reason "stop")."""
    if stop_token_id is None:
        return with_eos(response, finish_reason, text, eos_id, stop)
    if response and response[-1] == stop_token_id:
        return response
    return response + [int(stop_token_id)]


def build_batch(table: pa.Table, cfg: Config, policy_name: str, max_positions: int,
                eos_id: int | None = None, prompt_order: list[str] | None = None,
                ) -> tuple[list[Row], dict[str, int]]:
    """Rows to train with advantages and token masks, and the counts of what was left out.
    `prompt_order`: the round's prompts in order (run.round_prompt_ids), which dynamic sampling
    (generate.oversample > 1) needs: it trains the first prompts_per_round groups with signal."""
    t = cfg.train
    n = table.num_rows
    cols = table.select([c for c in NEEDED.names if c in table.column_names]).to_pydict()
    cols.setdefault("stop_token_id", [None] * n)
    order = sorted(range(n), key=lambda i: (cols["prompt_id"][i], cols["origin"][i] or "policy",
                                            cols["sample_idx"][i] or 0,
                                            cols["parent_sample_idx"][i] or -1))
    cols = {k: [v[i] for i in order] for k, v in cols.items()}
    origin = [o or "policy" for o in cols["origin"]]
    in_batch = np.array([b is not False for b in cols["in_batch"]], dtype=bool)
    for i in range(n):
        if origin[i] == "policy" and cols["policy"][i] not in (None, policy_name):
            raise TrainError(f"rectified row (prompt_id {cols['prompt_id'][i]}, sample_idx "
                             f"{cols['sample_idx'][i]}): sampled by {cols['policy'][i]}, but this "
                             f"round trains {policy_name} (old log-probs would be wrong)")
        if cols["prompt_ids"][i] is None or cols["response_ids"][i] is None:
            raise TrainError(f"rectified row (prompt_id {cols['prompt_id'][i]}, sample_idx "
                             f"{cols['sample_idx'][i]}): prompt_ids/response_ids are null")

    rewards, keep, unverified = obj.effective_rewards(cols["reward"], cols["verify_status"],
                                                      t.drop_unverified)
    use = in_batch & keep
    idx = np.flatnonzero(use)
    adv = np.zeros(n)
    dropped = np.zeros(n, dtype=bool)
    adv[idx], dropped[idx] = obj.group_advantages(
        rewards[idx], [cols["prompt_id"][i] for i in idx],
        [origin[i] == "policy" for i in idx], t.advantage, t.adv_eps)

    surplus: set[str] = set()
    if cfg.generate.oversample > 1:  # dynamic sampling: the first groups with signal, in prompt order
        if prompt_order is None:
            raise TrainError("generate.oversample > 1: the batch needs the round's prompt order")
        signal = {cols["prompt_id"][i] for i in idx if not dropped[i]}
        surplus = signal - set(obj.first_groups_with_signal(prompt_order, signal,
                                                             cfg.generate.prompts_per_round))
        dropped |= np.array([p in surplus for p in cols["prompt_id"]], dtype=bool)

    # augment mode: parents with a rectified child train only from their first wrong step on
    children = {(cols["prompt_id"][i], cols["parent_sample_idx"][i])
                for i in range(n) if origin[i] == "rectified" and use[i]}
    rows = []
    for i in idx:
        if dropped[i]:
            continue
        prompt = list(cols["prompt_ids"][i])
        response = trained_tokens(list(cols["response_ids"][i]), cols["finish_reason"][i],
                                  cols["response"][i], cols["stop_token_id"][i], eos_id,
                                  cfg.generate.stop)
        where = f"rectified row (prompt_id {cols['prompt_id'][i]}, sample_idx {cols['sample_idx'][i]})"
        if len(prompt) + len(response) > max_positions:
            raise TrainError(f"{where}: {len(prompt) + len(response)} tokens exceed the policy's "
                             f"max_position_embeddings {max_positions}")
        start = 0
        if (cfg.rectify.mode == "augment" and origin[i] == "policy"
                and (cols["prompt_id"][i], cols["sample_idx"][i]) in children):
            start = obj.loss_start(cols["first_error_step"][i], cols["step_token_ends"][i])
        if cfg.run.algo == "vppo" and origin[i] == "policy":  # the verified prefix is not penalised
            start = obj.verified_prefix_start(adv[i], cols["first_error_step"][i], cols["step_token_ends"][i])
        off_start = cols["offpolicy_start"][i]
        if off_start is not None and not 0 <= off_start <= len(response):
            raise TrainError(f"{where}: offpolicy_start {off_start} outside the response "
                             f"(0..{len(response)})")
        on, off = obj.token_masks(len(response), off_start, start)
        engine = cols["response_logprobs"][i] or []
        engine_logp = np.full(len(response), np.nan, dtype=np.float32)
        engine_logp[: len(engine)] = [np.nan if v is None else v for v in engine[: len(response)]]
        rows.append(Row(prompt, response, float(adv[i]), on, off, engine_logp))
    groups_dropped = len({cols["prompt_id"][i] for i in idx if dropped[i]} - surplus)
    counts = {
        "rows_read": n, "rows_in_batch": int(in_batch.sum()), "unverified_rows": unverified,
        "unverified_dropped": int((in_batch & ~keep).sum()), "groups": len({cols["prompt_id"][i] for i in idx}),
        "dropped_groups": groups_dropped, "rows_trained": len(rows),
    }
    if cfg.generate.oversample > 1:
        counts["surplus_groups"] = len(surplus)  # groups with signal beyond the batch (not trained)
    return rows, counts


