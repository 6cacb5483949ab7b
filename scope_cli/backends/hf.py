"""Loading a model folder with transformers: checks that it is a usable Hugging Face folder (config,
safetensors weights, tokenizer; nothing pickled), remote code only when asked, one-line errors, and
transformers kept quiet in stage output. Writing policy folders (and their completion marker) is
scope_cli/core/policy.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scope_cli.errors import ScopeError

# Files a policy folder may carry. Pickled weights (.bin/.pt/.pth/.pkl) and remote code (.py) are left
# behind: weights load only from safetensors.
ALLOWED_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja", ".tiktoken", ".gguf")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
DTYPES = ("float32", "bfloat16", "float16")


class PolicyError(ScopeError):
    """A policy folder that cannot be used: one line naming the folder and what is missing."""


def check_policy_folder(path: Path) -> None:
    path = Path(path)
    if not path.is_dir():
        raise PolicyError(f"{path}: policy folder does not exist")
    if not (path / "config.json").exists():
        raise PolicyError(f"{path}: not a Hugging Face model folder (no config.json)")
    if not any(path.glob("*.safetensors")):
        pickled = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        extra = f" (found {', '.join(pickled)}: convert them to safetensors)" if pickled else ""
        raise PolicyError(f"{path}: no *.safetensors weights{extra}")
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise PolicyError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")


def remote_code_of(path: Path) -> str | None:
    """What custom code a model folder asks for (config.json / tokenizer_config.json `auto_map`), or
    None. Such code runs only with --trust-remote-code (policy.trust_remote_code = true)."""
    import json

    for name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((Path(path) / name).read_text()).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue
        if auto_map:
            refs = auto_map.values() if isinstance(auto_map, dict) else auto_map
            return f"{name} auto_map: {', '.join(sorted({str(r) for r in refs}))}"
    return None


def load_error(path: Path, exc: BaseException, trust_remote_code: bool) -> PolicyError:
    """A one-line error for a model folder that transformers could not load."""
    remote = remote_code_of(path)
    if remote and not trust_remote_code:
        return PolicyError(f"{path}: the model needs custom code ({remote}); it is not run unless you "
                           "pass --trust-remote-code (policy.trust_remote_code = true), which executes it")
    first = (str(exc).strip().splitlines() or [""])[0]
    return PolicyError(f"{path}: cannot load the model ({type(exc).__name__}: {first}); is the folder "
                       "complete?")


def quiet_transformers() -> None:
    """No progress bars or load reports from transformers in stage output."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def load_policy(path: str | Path, *, dtype: str = "float32", device: str = "cpu",
                trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) from a policy folder; weights only from safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    check_policy_folder(path)
    quiet_transformers()
    if dtype not in DTYPES:
        raise PolicyError(f"{path}: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=trust_remote_code,
        ).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # truncated weights, custom code not allowed, a broken config: one line
        raise load_error(path, exc, trust_remote_code) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
