"""Opening a generation engine (`open_backend`: hf | vllm | auto) and the transformers engine (``hf``).
The interface, its use and the conventions both engines keep: scope_cli/backends/engine.py.

- ``hf``: transformers, batched with a KV cache and left padding; tokens are drawn row by row from
  counter-based uniforms hashed from (row seed, step), so a row's sample does not depend on which rows
  share its batch, and finished rows leave the batch. The default on CPU, where it is faster than
  vLLM for the tiny policies; at ~50M parameters vLLM is ~2.7× faster (docs/PERFORMANCE.md).
- ``vllm``: scope_cli/backends/vllm.py.
- ``auto``: vllm where CUDA and vllm are both present, else hf.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scope_cli.backends.engine import (
    Completion,
    GenerationBackend,
    GenerationError,
    Progress,
    Sampling,
    decode,
    eos_token_ids,
    resolve_backend,
)
from scope_cli.sections import GenerateConfig, PolicyConfig


def open_backend(name: str, policy_dir: Path, *, dtype: str = "float32", batch_size: int = 256,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5,
                 max_model_len: int = 0, trust_remote_code: bool = False) -> GenerationBackend:
    """A backend with `policy_dir`'s weights loaded (name: hf | vllm | auto)."""
    kind = resolve_backend(name)
    if kind == "vllm":
        from scope_cli.backends.vllm import VLLMBackend

        return VLLMBackend(policy_dir, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                           gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                           trust_remote_code=trust_remote_code)
    return HFBackend(policy_dir, dtype=dtype, batch_size=batch_size, max_model_len=max_model_len,
                     trust_remote_code=trust_remote_code)


def open_policy_engine(g: GenerateConfig, p: PolicyConfig, policy_dir: Path) -> GenerationBackend:
    """The run's generation engine (config sections generate and policy) loaded with `policy_dir`."""
    return open_backend(g.backend, policy_dir, dtype=g.dtype, batch_size=g.batch_size,
                        tensor_parallel_size=g.tensor_parallel_size,
                        gpu_memory_utilization=g.gpu_memory_utilization, max_model_len=g.max_model_len,
                        trust_remote_code=p.trust_remote_code)


# ---- sampling (hf) ---------------------------------------------------------------------------------
_MASK64 = (1 << 64) - 1


def row_uniforms(seeds: np.ndarray, step: int) -> np.ndarray:
    """One uniform in [0, 1) per row for decoding step `step`: SplitMix64 of (seed, step). Depends on
    nothing but the row's seed and the step."""
    with np.errstate(over="ignore"):
        z = seeds + np.uint64((0x9E3779B97F4A7C15 * (step + 1)) & _MASK64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def top_k_top_p(logits, top_k: int, top_p: float):
    """Mask (to -inf) tokens outside the top-k logits, then outside the smallest set whose
    probability reaches top_p (always keeping the most likely token); vLLM's rule."""
    import torch

    vocab = logits.shape[-1]
    if top_k and 0 < top_k < vocab:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def pick_tokens(logits, seeds: np.ndarray, step: int, sampling: Sampling):
    """(token ids, their log-probs) for one step of a batch; logits is (rows, vocab) float32."""
    import torch

    if sampling.temperature == 0:
        logprobs = logits.log_softmax(dim=-1)
        tokens = logits.argmax(dim=-1)
        return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)
    processed = top_k_top_p(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    logprobs = processed.log_softmax(dim=-1)
    probs = logprobs.double().exp()
    cdf = probs.cumsum(dim=-1)
    u = torch.from_numpy(row_uniforms(seeds, step)).to(cdf.device) * cdf[:, -1]
    tokens = torch.searchsorted(cdf, u[:, None], right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)
    # rounding can carry u past the last token with mass: step back to it
    last = cdf.shape[1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    tokens = torch.where(probs.gather(1, tokens[:, None]).squeeze(1) > 0, tokens, last)
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)


# ---- transformers ----------------------------------------------------------------------------------
class HFBackend:
    name = "hf"

    def __init__(self, policy_dir: Path, *, dtype: str = "float32", batch_size: int = 256,
                 max_model_len: int = 0, trust_remote_code: bool = False, device: str | None = None):
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype, self.batch_size, self.trust_remote_code = dtype, batch_size, trust_remote_code
        self._max_model_len = max_model_len
        self.reload(policy_dir)

    def reload(self, policy_dir: Path) -> None:
        """Load a policy folder (weights and tokenizer) in place of the current one. The next round's
        policy (same config and tokenizer files, one safetensors file) only has its weights copied
        into the live model."""
        from scope_cli.backends.hf import load_policy

        if not self._load_weights_only(Path(policy_dir)):
            self.model, self.tokenizer = load_policy(policy_dir, dtype=self.dtype, device=self.device,
                                                     trust_remote_code=self.trust_remote_code)
        self.model.eval()
        self.policy = Path(policy_dir)
        self.eos = eos_token_ids(policy_dir, self.tokenizer)
        limits = [x for x in (self._max_model_len,
                              getattr(self.model.config, "max_position_embeddings", 0)) if x]
        self.max_model_len = int(min(limits)) if limits else 1 << 30

    def _load_weights_only(self, policy_dir: Path) -> bool:
        """Copy policy_dir's weights into the loaded model when nothing else differs (config,
        generation config and tokenizer files byte-identical to the loaded policy's, weights in one
        model.safetensors holding exactly the model's tensors, tied ones aside); else False."""
        from safetensors.torch import load_file

        from scope_cli.backends.hf import check_policy_folder

        old = getattr(self, "policy", None)
        weights = policy_dir / "model.safetensors"
        if getattr(self, "model", None) is None or old is None or not weights.exists():
            return False
        for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json"):
            a, b = old / name, policy_dir / name
            if a.exists() != b.exists() or (a.exists() and a.read_bytes() != b.read_bytes()):
                return False
        check_policy_folder(policy_dir)
        state = load_file(weights)
        own = self.model.state_dict()
        tied = {k for k in own if k not in state and own[k].data_ptr() in
                {v.data_ptr() for n, v in own.items() if n in state}}
        if set(state) - set(own) or set(own) - set(state) - tied:
            return False
        import torch

        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)
        return True

    def close(self) -> None:
        self.model = None

    def generate(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], sampling: Sampling,
                 progress: Progress | None = None) -> list[Completion]:
        if len(prompts) != len(seeds):
            raise GenerationError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        out: list[Completion] = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            out.extend(self._batch(prompts[start:stop], seeds[start:stop], sampling, progress))
        return out

    def _batch(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], sampling: Sampling,
               progress: Progress | None) -> list[Completion]:
        import torch
        from transformers import DynamicCache

        rows, width = len(prompts), max(len(p) for p in prompts)
        if width >= self.max_model_len:
            raise GenerationError(f"a prompt of {width} tokens leaves no room under the model's length "
                                  f"limit of {self.max_model_len} (generate.max_model_len)")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((rows, width), pad, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, position = ids.to(self.device), mask.to(self.device), position.to(self.device)
        seed_arr = np.array([int(s) & _MASK64 for s in seeds], dtype=np.uint64)
        budget = [min(sampling.max_tokens, self.max_model_len - len(p)) for p in prompts]
        tokens: list[list[int]] = [[] for _ in range(rows)]
        logprobs: list[list[float]] = [[] for _ in range(rows)]
        finish: list[str | None] = [None] * rows
        stop_ids: list[int | None] = [None] * rows
        stop_window = 4 * max((len(s) for s in sampling.stop), default=0) + 8

        live = list(range(rows))  # the row at each batch position: finished rows leave the batch
        with torch.inference_mode():
            cache = DynamicCache(config=self.model.config)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=position,
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
            next_pos = position[:, -1:] + 1
            for step in range(max(budget)):
                picked, lps = pick_tokens(out.logits[:, -1, :].float(), seed_arr, step, sampling)
                picked_l, lps_l = picked.tolist(), lps.tolist()
                done_now = new_tokens = 0
                for k, i in enumerate(live):
                    if finish[i] is not None:
                        continue
                    if picked_l[k] in self.eos:
                        finish[i], stop_ids[i] = "stop", picked_l[k]
                    else:
                        tokens[i].append(picked_l[k])
                        logprobs[i].append(lps_l[k])
                        new_tokens += 1
                        # a stop string completed by this token lies within the last few tokens
                        # (each decodes to at least one byte): decode only those, not the whole row
                        text = decode(self.tokenizer, tokens[i][-stop_window:]) if sampling.stop else ""
                        if any(s in text for s in sampling.stop):
                            finish[i] = "stop"
                        elif len(tokens[i]) >= budget[i]:
                            finish[i] = "length"
                    done_now += finish[i] is not None
                if progress is not None:
                    progress(done_now, new_tokens)
                if all(f is not None for f in finish):
                    break
                active = [k for k, i in enumerate(live) if finish[i] is None]
                if len(active) <= 0.75 * len(live) and _can_drop_rows(cache):
                    # a quarter of the batch has finished: drop those rows (cache, mask, positions)
                    # rather than keep computing them; a row's tokens never depend on its batch mates
                    keep = torch.tensor(active, device=self.device)
                    cache.batch_select_indices(keep)
                    mask, next_pos, picked = mask[keep], next_pos[keep], picked[keep]
                    seed_arr, live = seed_arr[active], [live[k] for k in active]
                mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
                out = self.model(input_ids=picked[:, None].to(self.device), attention_mask=mask,
                                 position_ids=next_pos, past_key_values=cache, use_cache=True)
                next_pos = next_pos + 1
        return [Completion(t, lp, f or "length", decode(self.tokenizer, t), stop_id)
                for t, lp, f, stop_id in zip(tokens, logprobs, finish, stop_ids)]


def _can_drop_rows(cache: Any) -> bool:
    """Whether every layer of a DynamicCache keeps only keys and values (attention layers), so that
    `batch_select_indices` drops a row's whole state; linear-attention layers keep more."""
    from transformers import cache_utils

    other = getattr(cache_utils, "LinearAttentionCacheLayerMixin", ())
    return all(isinstance(layer, cache_utils.DynamicLayer) and not isinstance(layer, other)
               for layer in cache.layers)
