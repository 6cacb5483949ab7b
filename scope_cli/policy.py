"""Policy folders: Hugging Face folders (config, safetensors weights, tokenizer) that transformers and
vLLM both load. Only model files go in a policy folder; a policy is complete when its marker
``scope-policy.json`` exists (written last). The marker records every file's size and sha256
(``files``); `verify_policy` checks them before a stage uses the policy. Nothing here reads pickle.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from scope_cli.errors import ScopeError
from scope_cli.jsonfile import json_object
from scope_cli.manifests import damaged, policy_digests, problems, record_lists_problem
from scope_cli.runs import POLICY_MARKER, mark_policy_complete, policy_complete
from scope_cli.tempfiles import honour_umask, make_temp_dir, remove_stale_temps, swap_folder

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


def copy_policy(src: Path, dst: Path, info: dict | None = None, *, code: bool = False) -> Path:
    """Copy a policy folder's model files to `dst` atomically and mark it complete. Its Python files
    (custom model code) are copied only with `code` (policy.trust_remote_code)."""
    src, dst = Path(src), Path(dst)
    check_policy_folder(src)
    if policy_complete(dst) and policy_problem(dst) is None:
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dst.parent)  # what a killed copy left behind
    tmp = make_temp_dir(dst.parent, dst.name)
    try:
        for p in sorted(src.iterdir()):
            if p.is_file() and (p.suffix in ALLOWED_SUFFIXES or (code and p.suffix == ".py")) \
                    and p.name != POLICY_MARKER:
                shutil.copy2(p, tmp / p.name)
                honour_umask(tmp / p.name)  # the run's umask, not the source's mode
        mark_policy_complete(tmp, {"source": str(src), **policy_digests(tmp), **(info or {})})
        swap_folder(tmp, dst)  # replaces an incomplete or damaged one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
    from scope_cli.jsonfile import read_json_object

    marker = Path(path) / POLICY_MARKER
    return str(read_json_object(marker, fix="the policy folder is damaged: rerun the command that "
                                "wrote it").get("hash", ""))
