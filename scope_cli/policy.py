"""Policy folders: Hugging Face folders (config, safetensors weights, tokenizer) that transformers and
vLLM both load. Only model files go in a policy folder; a policy is complete when its marker
``scope-policy.json`` exists (written last). Nothing here reads pickle.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from scope_cli.errors import ScopeError
from scope_cli.runs import POLICY_MARKER, mark_policy_complete, policy_complete
from scope_cli.shards import folder_digest

# Files a policy folder may carry. Pickled weights (.bin/.pt/.pth/.pkl) and remote code (.py) are left
# behind: weights load only from safetensors.
ALLOWED_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja", ".tiktoken", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


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


def copy_policy(src: Path, dst: Path, info: dict | None = None) -> Path:
    """Copy a policy folder's model files to `dst` atomically and mark it complete."""
    src, dst = Path(src), Path(dst)
    check_policy_folder(src)
    if policy_complete(dst):
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        for p in sorted(src.iterdir()):
            if p.is_file() and p.suffix in ALLOWED_SUFFIXES and p.name != POLICY_MARKER:
                shutil.copy2(p, tmp / p.name)
        mark_policy_complete(tmp, {"source": str(src), "hash": folder_digest(tmp), **(info or {})})
        if dst.exists():
            shutil.rmtree(dst)  # an incomplete leftover (no marker)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def policy_hash(path: Path) -> str:
    """The hash recorded when the policy was completed (cheap: no re-hashing of weights)."""
    import json

    marker = Path(path) / POLICY_MARKER
    return json.loads(marker.read_text()).get("hash", "")
