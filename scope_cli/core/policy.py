"""Policy folders: Hugging Face folders (config, safetensors weights, tokenizer) that transformers and
vLLM both load. Only model files go in a policy folder; a policy is complete when its marker
``scope-policy.json`` exists (written last). The marker records every file's size and sha256
(``files``); `verify_policy` checks them before a stage uses the policy. Writes go to a temporary folder
renamed into place (`save_policy`, `copy_policy`). Nothing here reads pickle; loading is
scope_cli/backends/hf.py's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from scope_cli.backends.hf import ALLOWED_SUFFIXES, PolicyError, check_policy_folder, quiet_transformers
from scope_cli.core.manifests import damaged, policy_digests, problems, record_lists_problem
from scope_cli.errors import json_object, read_json_object, write_errors_named
from scope_cli.tempfiles import folder_written_whole

POLICY_MARKER = "scope-policy.json"


def policy_complete(path: Path) -> bool:
    return (Path(path) / POLICY_MARKER).exists()


def mark_policy_complete(path: Path, info: dict) -> None:
    from scope_cli.core.files import write_text_atomic

    write_text_atomic(json.dumps(info, indent=1, sort_keys=True) + "\n", Path(path) / POLICY_MARKER)


def copy_policy(src: Path, dst: Path, info: dict | None = None, *, code: bool = False) -> Path:
    """Copy a policy folder's model files to `dst` atomically and mark it complete. Its Python files
    (custom model code) are copied only with `code` (policy.trust_remote_code)."""
    src, dst = Path(src), Path(dst)
    check_policy_folder(src)
    if policy_complete(dst) and policy_problem(dst) is None:
        return dst
    with write_errors_named(dst), folder_written_whole(dst) as tmp:  # replaces an incomplete or damaged one
        for p in sorted(src.iterdir()):
            if p.is_file() and (p.suffix in ALLOWED_SUFFIXES or (code and p.suffix == ".py")) \
                    and p.name != POLICY_MARKER:
                shutil.copy2(p, tmp / p.name)  # its mode becomes the run's umask's at the end
        mark_policy_complete(tmp, {"source": str(src), **policy_digests(tmp), **(info or {})})
    return dst


def policy_problem(path: Path) -> str | None:
    """What is wrong with a complete policy's files against its marker (one line), or None. A folder
    without a marker, or whose marker records no files (a policy made elsewhere), vouches for nothing
    and is taken as it is."""
    marker = Path(path) / POLICY_MARKER
    if not marker.exists():
        return None
    data, why = json_object(marker)
    if data is None:
        return f"{marker}: {why}"
    if "files" not in data:
        return None
    if (why := record_lists_problem(data, "files")) is not None:
        return f"{marker}: {why}"
    bad = problems(data["files"], Path(path))
    return f"{bad[0][0]}: {bad[0][1]}" if bad else None


def verify_policy(path: Path, repair: str) -> None:
    """Refuse a policy whose files are not what its marker records, naming the file and `repair`, the
    command that writes the policy again (to the same bytes on CPU)."""
    why = policy_problem(path)
    if why is not None:
        where, _, what = why.partition(": ")
        raise PolicyError(damaged(Path(where), what, repair))


def policy_hash(path: Path) -> str:
    """The hash recorded when the policy was completed (cheap: no re-hashing of weights)."""
    marker = Path(path) / POLICY_MARKER
    return str(read_json_object(marker, fix="the policy folder is damaged: rerun the command that "
                                "wrote it").get("hash", ""))


def save_policy(model, tokenizer, out_dir: str | Path, info: dict) -> Path:
    """Save weights (safetensors), config and tokenizer to a temp folder beside `out_dir`, write the
    marker (with the folder's hash and `info`), then rename into place. An existing `out_dir` is
    replaced only after the new folder is complete."""
    quiet_transformers()
    out = Path(out_dir)
    with write_errors_named(out), folder_written_whole(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_config(tmp / "tokenizer_config.json")
        stray = [p.name for p in tmp.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".py")]
        if stray:
            raise PolicyError(f"{out}: refusing to save non-safetensors files {', '.join(stray)}")
        mark_policy_complete(tmp, {**policy_digests(tmp), **json.loads(json.dumps(info))})
    return out


def _portable_tokenizer_config(path: Path) -> None:
    """Name the tokenizer class as transformers 4.x (vLLM's pin) knows it: a plain fast tokenizer."""
    if not path.exists():
        return
    data = json.loads(path.read_text())
    if data.get("tokenizer_class") == "TokenizersBackend":
        data["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def policy_info(path: str | Path) -> dict:
    """The marker's contents (what wrote the policy, its hash, training notes)."""
    return read_json_object(Path(path) / POLICY_MARKER, fix="the policy folder is damaged: rerun the "
                            "command that wrote it")


def save_weights(weights: dict[str, Any], in_policy: Path, out: Path, tok, dtype_name: str,
                 info: dict) -> None:
    """Save gathered weights as a policy folder with the input policy's config, in `dtype_name`
    (policy.dtype). The next round trains from these weights, so float32 (the default) keeps every
    update: an lr-1e-6 step is far below bfloat16's resolution (~0.4% of a weight) and would be
    rounded away on saving."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(in_policy)
    dtype = getattr(torch, dtype_name)
    config.dtype = dtype_name
    with torch.device("meta"):
        template = AutoModelForCausalLM.from_config(config)
    template = template.to_empty(device="cpu").to(dtype)
    missing, unexpected = template.load_state_dict(
        {k: v.to(dtype) for k, v in weights.items()}, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise PolicyError(f"{out}: gathered weights do not match {in_policy}'s config "
                         f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
    template.tie_weights()
    save_policy(template, tok, out, info)
