"""Process reward models: P(step correct) for every step of a response.

Three backends score a list of `PrmItem`s (problem, prompt, steps) and return one list of floats per
item (None for an item the backend could not align, or, hf, one longer than the PRM's context):

- ``rule``: the task's exact step checker (`task.first_error_step`): 1.0 before the first wrong
  step, 0.0 from it on. Needs a task that has one (arith); real math has none.
- ``hf``: a PRM loaded natively with transformers, no remote code, weights from safetensors only.
    * ``qwen`` convention (Qwen2.5-Math-PRM): the steps joined with ``<extra_0>`` after each one (the
      last one too); the backbone (transformers' Qwen2Model, or any AutoModel backbone) runs once and
      a score head ``score = Sequential(Linear(h, h), ReLU, Linear(h, 2))`` (keys ``score.0.*``,
      ``score.2.*`` beside ``model.*``) gives 2 logits per position; a step's score is the softmax
      probability of class 1 at its ``<extra_0>``. With a chat template the text is Qwen's
      (system instruction, user problem, assistant steps); without one it is the task's raw prompt
      followed by the tagged steps.
    * ``shepherd`` convention (math-shepherd): a causal LM; ``problem + " " + "\\n".join(step + " "
      + tag)``; a step's score is the softmax over the logits of the good and bad tokens ("+", "-")
      at its tag, probability of good.
  Batched (right padding, sorted by length): at most prm.batch_size rows and prm.batch_tokens padded
  tokens per forward pass, so long responses (8k tokens) go a few at a time and short ones many at a
  time; a row longer than the token budget goes alone. bfloat16 on GPU, float32 on CPU
  (`prm.dtype=auto`).
- ``vllm``: the pooling API for process reward models (qwen convention), behind a version check: the
  API changed in almost every minor release (``task="reward"``, then pooling runners, then
  ``encode(..., pooling_task=...)``); this needs a vLLM with ``runner="pooling"`` (checked: 0.32
  CPU). STEP pooling at the folder's own ``<extra_0>`` id; prompts go in as token ids from the
  tokenizer above. vLLM's Qwen2 takes head_dim = hidden_size / heads, so a PRM with other head
  widths (the shipped tiny PRM: the policy's 4 x 32 at hidden 64) is refused with that reason.

Turning scores into a first wrong step, the PRM noise and the ProcessBench metrics are pure maths in
scope_cli/locate.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from scope_cli.errors import ScopeError

QWEN_STEP_TOKEN = "<extra_0>"
QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


class PrmError(ScopeError):
    """A PRM that cannot be loaded or run: one line naming the folder or key."""


@dataclass
class PrmItem:
    problem: str
    prompt: str  # the task's raw prompt (task.format_prompt(problem)), used without a chat template
    steps: list[str]
    text: str = ""  # the whole response (the rule backend checks it)
    task: str = "arith"


class Scorer(Protocol):
    def score(self, items: list[PrmItem]) -> list[list[float] | None]: ...


# ---- rule ------------------------------------------------------------------------------------------
class RulePrm:
    """The task's exact checker as a PRM: 1.0 before the first wrong step, 0.0 from it."""

    def score(self, items: list[PrmItem]) -> list[list[float] | None]:
        from scope_cli.tasks import get_task

        out: list[list[float] | None] = []
        for item in items:
            task = get_task(item.task)
            out.append(rule_scores(task, item.problem, item.text, len(item.steps)))
        return out


def rule_scores(task: ModuleType, problem: str, text: str, n_steps: int) -> list[float]:
    checker = getattr(task, "first_error_step", None)
    if checker is None:
        raise PrmError(f"prm.backend=rule needs a task with an exact step checker; task {task.NAME} "
                       "has none (use prm.backend=hf with a PRM folder)")
    first = checker(problem, text)
    cut = n_steps if first is None else min(first, n_steps)
    return [1.0] * cut + [0.0] * (n_steps - cut)


# ---- hf --------------------------------------------------------------------------------------------
def _device_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise PrmError(f"{path}: PRM folder does not exist (prm.path)")
    if not (path / "config.json").exists():
        raise PrmError(f"{path}: not a Hugging Face model folder (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise PrmError(f"{path}: no *.safetensors weights (pickled weights are not loaded)")


def load_score_head(path: Path) -> dict[str, Any]:
    """The Qwen PRM head's tensors (score.0.*, score.2.*) read from the folder's safetensors files."""
    from safetensors import safe_open

    head = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                if key.startswith("score."):
                    head[key[len("score."):]] = fh.get_tensor(key)
    want = {"0.weight", "0.bias", "2.weight", "2.bias"}
    if not want <= set(head):
        missing = ", ".join(sorted(f"score.{k}" for k in want - set(head)))
        raise PrmError(f"{path}: no Qwen PRM score head ({missing} missing); is it a Qwen2.5-Math-PRM-"
                       "style model? (prm.convention=shepherd is for causal-LM PRMs)")
    return head


def load_tokenizer(path: Path):
    """The folder's tokenizer exactly as its tokenizer.json describes it. (transformers 5's AutoTokenizer
    rebuilds some model types' tokenizers, e.g. qwen2's, from vocab and merges, which would drop the
    pipeline of a custom tokenizer such as the tiny PRM's character tokenizer.)"""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (Path(path) / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


class HFPrm:
    """A PRM loaded with transformers (qwen or shepherd convention); see the module docstring."""

    def __init__(self, path: str | Path, convention: str = "qwen", *, device: str = "auto",
                 dtype: str = "auto", batch_size: int = 32, batch_tokens: int = 65536,
                 step_tag: str = "ки", good_token: str = "+", bad_token: str = "-"):
        import torch
        from transformers import AutoModel, AutoModelForCausalLM

        from scope_cli.backends.hf import quiet_transformers

        self.path = Path(path)
        _check_folder(self.path)
        quiet_transformers()
        self.convention = convention
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
        self.device, self.dtype = _device_dtype(device, dtype)
        self.tokenizer = load_tokenizer(self.path)
        if convention == "qwen":
            self.tag = QWEN_STEP_TOKEN
            self.tag_id = self.tokenizer.convert_tokens_to_ids(QWEN_STEP_TOKEN)
            if self.tag_id is None or self.tag_id == self.tokenizer.unk_token_id:
                raise PrmError(f"{self.path}: the tokenizer has no {QWEN_STEP_TOKEN} token")
            # the backbone alone: transformers drops the checkpoint's "model." prefix and leaves
            # the score head, which is read separately
            self.backbone = AutoModel.from_pretrained(
                self.path, dtype=self.dtype, trust_remote_code=False, use_safetensors=True)
            head = load_score_head(self.path)
            hidden = head["0.weight"].shape[1]
            self.head = torch.nn.Sequential(
                torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                torch.nn.Linear(hidden, head["2.weight"].shape[0]))
            self.head.load_state_dict(head)
            self.head.to(self.device, self.dtype).eval()
            self.backbone.to(self.device).eval()
        elif convention == "shepherd":
            self.tag = step_tag
            self.tag_id = self._last_id(step_tag)
            self.candidates = [self._last_id(good_token), self._last_id(bad_token)]
            lm = AutoModelForCausalLM.from_pretrained(
                self.path, dtype=self.dtype, trust_remote_code=False, use_safetensors=True)
            # the body, and the output projection's rows of the two candidate tokens: logits over
            # the whole vocabulary at every position would not fit for a 7B model and long steps
            self.backbone = lm.get_decoder().to(self.device).eval()
            out = lm.get_output_embeddings()
            self.head = torch.nn.Linear(out.weight.shape[1], 2, bias=out.bias is not None)
            with torch.no_grad():
                self.head.weight.copy_(out.weight[self.candidates])
                if out.bias is not None:
                    self.head.bias.copy_(out.bias[self.candidates])
            self.head.to(self.device, self.dtype).eval()
            del lm
        else:
            raise PrmError(f"prm.convention: expected qwen or shepherd, got {convention!r}")
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def close(self) -> None:
        import torch

        self.backbone = self.head = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _last_id(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise PrmError(f"{self.path}: the tokenizer encodes {text!r} to nothing")
        return ids[-1]

    def text(self, item: PrmItem) -> tuple[str, bool]:
        """The PRM's input text for an item, and whether the tokenizer should add special tokens."""
        if self.convention == "shepherd":
            return f"{item.problem} " + "\n".join(f"{s} {self.tag}" for s in item.steps), True
        return qwen_text(self.tokenizer, item), not getattr(self.tokenizer, "chat_template", None)

    def encode(self, item: PrmItem) -> list[int]:
        text, specials = self.text(item)
        return self.tokenizer(text, add_special_tokens=specials)["input_ids"]

    def score(self, items: list[PrmItem]) -> list[list[float] | None]:
        import torch

        out: list[list[float] | None] = [None] * len(items)
        # an item longer than the PRM's context stays unscored (None), like one it cannot align
        limit = getattr(getattr(self.backbone, "config", None), "max_position_embeddings", 0) or 1 << 62
        encoded = {}
        for i, item in enumerate(items):
            if not item.steps:
                out[i] = []
            else:
                ids = self.encode(item)
                if len(ids) <= limit:
                    encoded[i] = ids
        keys = list(encoded)
        for picked in token_batches([len(encoded[i]) for i in keys], self.batch_size, self.batch_tokens):
            batch = [keys[j] for j in picked]
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                ids[r, :len(encoded[i])] = torch.tensor(encoded[i])
                mask[r, :len(encoded[i])] = 1
            at_tags = (ids == self.tag_id) & (mask == 1)
            probs = self._probs(ids.to(self.device), mask.to(self.device), at_tags.to(self.device))
            counts = at_tags.sum(dim=1).tolist()
            start_row = 0
            for r, i in enumerate(batch):
                values = probs[start_row:start_row + counts[r]]
                start_row += counts[r]
                # a step text that itself contains the tag cannot be aligned: leave the row unscored
                out[i] = values if len(values) == len(items[i].steps) else None
        return out

    def _probs(self, ids, mask, at_tags) -> list[float]:
        """P(step correct) at the tag positions, in row-major order."""
        import torch

        with torch.inference_mode():
            hidden = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state[at_tags]
            logits = self.head(hidden.to(self.dtype)).float()
            probs = torch.softmax(logits, dim=-1)
            # qwen: class 1 is "correct"; shepherd: the first candidate is the good token
            return probs[:, 1 if self.convention == "qwen" else 0].cpu().tolist()


def token_batches(lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped for right-padded forward passes: sorted by length (shortest first), each batch
    at most `max_rows` rows and at most `max_tokens` padded tokens (rows x its longest row); a row
    longer than `max_tokens` goes alone."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        cur = batches[-1] if batches else None
        if cur and len(cur) < max_rows and (len(cur) + 1) * lengths[i] <= max_tokens:
            cur.append(i)
        else:
            batches.append([i])
    return batches


# ---- vllm ------------------------------------------------------------------------------------------
VLLM_MIN = (0, 10, 2)  # runner="pooling" and encode(..., pooling_task=...)


def vllm_unavailable_reason() -> str | None:
    """Why the vllm PRM backend cannot run here, or None when it can."""
    try:
        import vllm
    except ImportError:
        return "vllm is not installed (pip install 'scope-rl[gpu]' on a CUDA machine)"
    version = tuple(int(x) for x in vllm.__version__.split("+")[0].split(".")[:3] if x.isdigit())
    if version < VLLM_MIN:
        return (f"vllm {vllm.__version__} is older than {'.'.join(map(str, VLLM_MIN))}, whose pooling "
                "API this backend uses")
    return None


class VllmPrm:
    """A Qwen-convention PRM through vLLM's pooling runner (STEP pooling at the <extra_0> token)."""

    def __init__(self, path: str | Path, convention: str = "qwen", *, dtype: str = "auto",
                 gpu_memory_utilization: float = 0.5):
        reason = vllm_unavailable_reason()
        if reason:
            raise PrmError(f"prm.backend=vllm: {reason}")
        if convention != "qwen":
            raise PrmError("prm.backend=vllm supports prm.convention=qwen; use prm.backend=hf for "
                           "shepherd-style PRMs")
        import dataclasses

        from scope_cli.backends.vllm import vllm_engine_args

        _, engine_args = vllm_engine_args(dtype=dtype, gpu_memory_utilization=gpu_memory_utilization)
        from vllm import LLM
        from vllm.config import PoolerConfig
        from vllm.engine.arg_utils import EngineArgs

        self.path = Path(path)
        _check_folder(self.path)
        config = json.loads((self.path / "config.json").read_text())
        heads, hidden = config.get("num_attention_heads") or 1, config.get("hidden_size") or 0
        if config.get("head_dim") not in (None, hidden // heads):
            raise PrmError(f"{self.path}: head_dim {config['head_dim']} != hidden_size / "
                           f"num_attention_heads ({hidden}/{heads}); vLLM's Qwen2 derives it from "
                           "those, so this PRM runs with prm.backend=hf only")
        self.tokenizer = load_tokenizer(self.path)
        pooler = PoolerConfig(step_tag_id=self.tokenizer.convert_tokens_to_ids(QWEN_STEP_TOKEN))
        names = {f.name for f in dataclasses.fields(EngineArgs)}
        key = "pooler_config" if "pooler_config" in names else "override_pooler_config"
        args: dict[str, Any] = {key: pooler, **engine_args}
        self.llm = LLM(model=str(self.path), runner="pooling", trust_remote_code=False, **args)
        supported = set(getattr(self.llm, "supported_tasks", ()) or ())
        self.pooling_task = "token_classify" if "token_classify" in supported else "encode"

    def encode(self, item: PrmItem) -> list[int]:
        chat = bool(getattr(self.tokenizer, "chat_template", None))
        return self.tokenizer(qwen_text(self.tokenizer, item), add_special_tokens=not chat)["input_ids"]

    def close(self) -> None:
        self.llm = None

    def score(self, items: list[PrmItem]) -> list[list[float] | None]:
        out: list[list[float] | None] = [None] * len(items)
        todo = [i for i, item in enumerate(items) if item.steps]
        for i, item in enumerate(items):
            if not item.steps:
                out[i] = []
        if not todo:
            return out
        # token ids from our own tokenizer: vLLM's AutoTokenizer may rebuild a qwen2 tokenizer from
        # vocab and merges (see load_tokenizer), which would tokenize a custom PRM differently
        prompts = [{"prompt_token_ids": self.encode(items[i])} for i in todo]
        results = self.llm.encode(prompts, pooling_task=self.pooling_task, use_tqdm=False)
        for i, res in zip(todo, results):
            data = res.outputs.data.float()
            if data.min() < 0 or not bool(((data.sum(-1) - 1).abs() < 1e-3).all()):
                data = data.softmax(-1)  # a version that returns logits at the step tags
            values = data[:, 1].tolist()
            out[i] = values if len(values) == len(items[i].steps) else None
        return out


def qwen_text(tokenizer: Any, item: PrmItem) -> str:
    """Qwen-convention PRM input: <extra_0> after every step; Qwen's chat layout where the tokenizer
    has a chat template, else the task's raw prompt followed by the tagged steps."""
    answer = "".join(s + QWEN_STEP_TOKEN for s in item.steps)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": QWEN_SYSTEM},
                    {"role": "user", "content": item.problem},
                    {"role": "assistant", "content": answer}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return item.prompt + answer


# ---- choosing a backend ---------------------------------------------------------------------------
def load_prm(prm_cfg: Any) -> Scorer:
    """The scorer prm.backend names, from the config's prm section."""
    if prm_cfg.backend == "rule":
        return RulePrm()
    if not prm_cfg.path:
        raise PrmError(f"prm.backend={prm_cfg.backend} needs prm.path (a PRM folder)")
    if prm_cfg.backend == "hf":
        return HFPrm(prm_cfg.path, prm_cfg.convention, device=prm_cfg.device, dtype=prm_cfg.dtype,
                     batch_size=prm_cfg.batch_size, batch_tokens=prm_cfg.batch_tokens,
                     step_tag=prm_cfg.step_tag,
                     good_token=prm_cfg.good_token, bad_token=prm_cfg.bad_token)
    if prm_cfg.backend == "vllm":
        return VllmPrm(prm_cfg.path, prm_cfg.convention,
                       dtype="auto" if prm_cfg.dtype == "auto" else prm_cfg.dtype)
    raise PrmError(f"prm.backend: expected rule, hf or vllm, got {prm_cfg.backend!r}")
