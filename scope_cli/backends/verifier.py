"""math-verify in a pool of killable worker processes, with a hard wall-clock limit per item.

    with Verifier(workers=2, timeout=5.0) as v:          # created once, reused by a whole round
        verdicts = v.check([(gold, pred), ...])          # in input order: Verdict(status, correct)
        verdicts = v.check([(gold, response), ...], extract="auto")   # Verdict(status, correct, pred)

Where the answer comes from (`verify.extract`):

- ``boxed`` (the default; what the prompts ask for and training needs): the task extracts the answer
  (`task.extract_answer`, math: the last ``\\boxed{}``) and math-verify compares it with the gold one.
- ``auto``: math-verify's own extraction over the whole response, in the worker: its LaTeX and
  plain-expression extractors (`LatexExtractionConfig()`, `ExprExtractionConfig()` with their default
  priorities: "final answer is X. I hope", then "final answer ... is X" and ``\\boxed{}``, then
  "answer: X", "answer ... X", and last any LaTeX or number; within a priority the last match in the
  text wins). For free-form answers ("Therefore, there are 29 valid strings"), e.g. evaluating a base
  model. `Verdict.pred` is the text it extracted.

math-verify's pitfalls, and what this module does about each:

- `verify(gold, pred)` is not symmetric: the gold answer goes first.
- A bare gold answer (``3``, ``\\frac{1}{2}``) may not parse: it is wrapped in ``\\boxed{}`` first.
  A gold answer that still does not parse into a math expression is an ``error`` row, never a correct
  one (math-verify would otherwise fall back to comparing raw strings).
- Its own timeouts use SIGALRM, which works only in a main thread, and a timeout is reported as
  ``False``, indistinguishable from a wrong answer. Here its timeouts are off; each worker runs items
  in its main thread under its own soft alarm, and a worker stuck where a signal cannot reach it (a C
  loop: an exponent tower, a catastrophic regex) is killed from outside by pebble when the item's hard
  limit passes, and replaced. Both give the status ``timeout``, which is counted, never scored.

Rows of a task with its own answer check (the multiple-choice task compares option letters) do not
go through math-verify: `check_answers(verifier, tasks, pairs)` checks them in this process and sends
the rest to the pool; `check_responses(verifier, tasks, golds, responses, extract)` does the same from
whole responses in either mode; the stages (verify, eval, rectify's re-verification) call it.

Workers start with ``forkserver`` (never ``fork``: the parent may hold torch or vLLM threads); the fork
server preloads math-verify, so a replaced worker starts in milliseconds. Items travel in chunks to
keep inter-process overhead low; a chunk that passes its limit is retried item by item, each with the
per-item limit, so one bad item costs only its own timeout.
"""

from __future__ import annotations

import math
import multiprocessing
import signal
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from typing import Any

from scope_cli.sections import VerifyConfig

STATUSES = ("ok", "no_answer", "timeout", "error")
EXTRACT_MODES = ("boxed", "auto")
_SOFT_FRACTION = 0.8  # the worker's own alarm fires at this fraction of the hard limit
_MEMORY_LIMIT = 2 << 30  # bytes of address space per worker: a runaway sympy integer hits MemoryError


@dataclass(frozen=True)
class Verdict:
    status: str  # ok | no_answer | timeout | error
    correct: bool
    pred: str | None = None  # the extracted answer (filled by extract="auto" and by check_responses)


def reward(verdict: Verdict, finish_reason: str | None, format_reward: float = 0.0,
           truncation_penalty: float = 0.0) -> float:
    """1 for a correct answer, else 0; `format_reward` for a row with no answer; minus
    `truncation_penalty` for a row cut at the length limit."""
    value = 1.0 if verdict.correct else (format_reward if verdict.status == "no_answer" else 0.0)
    if finish_reason == "length":
        value -= truncation_penalty
    return value


# ---- inside a worker -------------------------------------------------------------------------------
class _ItemTimeout(BaseException):
    """Raised by the worker's alarm; a BaseException so math-verify's `except Exception` lets it pass."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _ItemTimeout()


def _init_worker() -> None:
    import logging
    import resource

    # math-verify warns once per process that its own timeouts are off: they are, on purpose.
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > _MEMORY_LIMIT:
        resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_LIMIT, hard))
    signal.signal(signal.SIGALRM, _on_alarm)
    try:  # warm up: the first parse builds the LaTeX parser (seconds on a loaded machine), which must
        check_pair("1", "1")  # not count against the first real item's time limit
    except Exception:
        pass


def wrap_gold(gold: str) -> str:
    """A gold answer in the form math-verify parses reliably: ``\\boxed{gold}`` unless already boxed or
    in ``$...$``."""
    text = gold.strip()
    if "\\boxed" in text or (text.startswith("$") and text.endswith("$") and len(text) > 1):
        return text
    return "\\boxed{" + text + "}"


def check_pair(gold: str, pred: str, extract: str = "boxed") -> Verdict:
    """One comparison, in this process, with no time limit: gold first, then the prediction. With
    extract="auto", `pred` is the whole response and math-verify finds the answer in it."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from sympy import Basic, MatrixBase

    gold_parsed = parse(wrap_gold(gold), parsing_timeout=None, raise_on_error=True)
    if not any(isinstance(g, (Basic, MatrixBase)) for g in gold_parsed):
        return Verdict("error", False)  # unparseable gold: never scored correct
    if extract == "auto":
        pred_parsed = parse(pred, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                            parsing_timeout=None, raise_on_error=True)
        # the matched text (math-verify's fallback string) is the answer the row shows
        found = next((p for p in pred_parsed if isinstance(p, str)), None)
        if found is None and pred_parsed:
            found = str(pred_parsed[0])
    elif extract == "boxed":
        pred_parsed = parse("\\boxed{" + pred + "}", parsing_timeout=None, raise_on_error=True)
        found = None
    else:
        raise ValueError(f"extract must be one of {', '.join(EXTRACT_MODES)}, got {extract!r}")
    if not pred_parsed:
        return Verdict("no_answer", False)
    return Verdict("ok", bool(verify(gold_parsed, pred_parsed, timeout_seconds=None)), found)


def _check_one(gold: str, pred: str, soft_seconds: float, extract: str) -> tuple[str, bool, str | None]:
    signal.setitimer(signal.ITIMER_REAL, soft_seconds)
    try:
        verdict = check_pair(gold, pred, extract)
        return verdict.status, verdict.correct, verdict.pred
    except Exception:  # a parser bug or MemoryError on adversarial text: counted, never scored
        return "error", False, None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _check_chunk(pairs: list[tuple[str, str]], soft_seconds: float,
                 extract: str = "boxed") -> list[tuple[str, bool, str | None]]:
    """Runs in a worker's main thread: each item under a one-shot soft alarm."""
    out = []
    for gold, pred in pairs:
        try:
            out.append(_check_one(gold, pred, soft_seconds, extract))
        except _ItemTimeout:  # raised anywhere in _check_one, its `finally` included
            out.append(("timeout", False, None))
    return out


# ---- the pool --------------------------------------------------------------------------------------
class Verifier:
    """A reusable pool of math-verify workers. Use as a context manager; `check` keeps input order."""

    # a worker's job: (pairs, soft seconds, extract) -> [(status, correct, pred)]
    _work = staticmethod(_check_chunk)

    def __init__(self, workers: int = 2, timeout: float = 5.0, chunk_size: int = 64):
        if workers < 1 or timeout <= 0 or chunk_size < 1:
            raise ValueError("Verifier needs workers >= 1, timeout > 0 and chunk_size >= 1")
        self.workers = workers
        self.timeout = float(timeout)
        self.chunk_size = chunk_size
        self._pool = None
        self.stats = {"items": 0, "killed": 0}

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _ensure_pool(self):
        if self._pool is None:
            from pebble import ProcessPool

            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["math_verify", "sympy"])
            self._pool = ProcessPool(max_workers=self.workers, initializer=_init_worker, context=ctx)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self._pool.join()
            self._pool = None

    def check(self, pairs: Sequence[tuple[str, str | None]], extract: str = "boxed") -> list[Verdict]:
        """Verdicts for (gold, pred) pairs, in order; with extract="auto" the pairs are (gold, whole
        response) and each verdict carries the answer found. A missing or empty pred (response) is
        ``no_answer`` without a trip to the pool. Every item, in either mode, runs in the pool under
        the worker's alarm and the outside kill."""
        if extract not in EXTRACT_MODES:
            raise ValueError(f"extract must be one of {', '.join(EXTRACT_MODES)}, got {extract!r}")
        results: list[Verdict | None] = [None] * len(pairs)
        todo = []
        for i, (gold, pred) in enumerate(pairs):
            if pred is None or not pred.strip():
                results[i] = Verdict("no_answer", False)
            else:
                todo.append(i)
        if todo:
            pool = self._ensure_pool()
            soft = self.timeout * _SOFT_FRACTION
            # enough chunks to keep every worker busy, none larger than chunk_size
            size = max(1, min(self.chunk_size, math.ceil(len(todo) / (4 * self.workers))))
            chunks = [todo[i:i + size] for i in range(0, len(todo), size)]
            # a chunk may hold one item that runs to its soft alarm; two such items get retried alone
            futures = [pool.schedule(self._work, args=([pairs[i] for i in c], soft, extract),
                                     timeout=self.timeout + soft + 0.05 * len(c)) for c in chunks]
            retry = []
            for chunk, future in zip(chunks, futures):
                try:
                    for i, item in zip(chunk, future.result()):
                        results[i] = Verdict(*item)
                except Exception:  # the chunk passed its limit, or its worker died
                    retry.extend(chunk)
            singles = [(i, pool.schedule(self._work, args=([pairs[i]], soft, extract),
                                         timeout=self.timeout)) for i in retry]
            for i, future in singles:
                try:
                    item, = future.result()
                    results[i] = Verdict(*item)
                except FutureTimeout:
                    self.stats["killed"] += 1
                    results[i] = Verdict("timeout", False)
                except Exception:  # the worker died (memory, a crash in a C extension)
                    results[i] = Verdict("error", False)
        self.stats["items"] += len(pairs)
        return results  # type: ignore[return-value]  (every slot is filled above)


def check_answers(verifier: Verifier, tasks: Sequence[str],
                  pairs: Sequence[tuple[str, str | None]]) -> list[Verdict]:
    """Verdicts for the (gold, pred) pairs of rows whose tasks are `tasks`, in order. A task with its
    own answer check (`task.check(answer, pred)`: choice compares option letters) is checked here, in
    this process; every other row goes to math-verify in the verifier's pool. For a task's own check a
    missing pred is ``no_answer`` and a gold answer it cannot read (ValueError) is ``error``."""
    from scope_cli.tasks import get_task

    if len(tasks) != len(pairs):
        raise ValueError(f"{len(tasks)} tasks but {len(pairs)} answer pairs")
    results: list[Verdict | None] = [None] * len(pairs)
    pooled = []
    for i, (task, (gold, pred)) in enumerate(zip(tasks, pairs)):
        own = getattr(get_task(task), "check", None)
        if own is None:
            pooled.append(i)
        elif pred is None or not pred.strip():
            results[i] = Verdict("no_answer", False)
        else:
            try:
                results[i] = Verdict("ok", bool(own(gold, pred)))
            except ValueError:
                results[i] = Verdict("error", False)
    if pooled:
        for i, verdict in zip(pooled, verifier.check([pairs[i] for i in pooled])):
            results[i] = verdict
    return results  # type: ignore[return-value]  (every slot is filled above)


def check_responses(verifier: Verifier, tasks: Sequence[str], golds: Sequence[str],
                    responses: Sequence[str | None], extract: str = "boxed") -> list[Verdict]:
    """Verdicts, with the extracted answer in `pred`, for whole responses against gold answers.
    boxed: each task extracts its answer (`task.extract_answer`) and `check_answers` compares it;
    auto: math-verify extracts it from the response in the pool. Tasks with their own check (choice)
    always extract their own way (option letters)."""
    from scope_cli.tasks import get_task

    if extract not in EXTRACT_MODES:
        raise ValueError(f"verify.extract must be one of {', '.join(EXTRACT_MODES)}, got {extract!r}")
    texts = [r or "" for r in responses]
    own = [extract == "boxed" or getattr(get_task(t), "check", None) is not None for t in tasks]
    preds = [get_task(t).extract_answer(r) if o else None for t, r, o in zip(tasks, texts, own)]
    mine = [i for i, o in enumerate(own) if o]
    results: list[Verdict | None] = [None] * len(texts)
    verdicts = check_answers(verifier, [tasks[i] for i in mine], [(golds[i], preds[i]) for i in mine])
    for i, verdict in zip(mine, verdicts):
        results[i] = replace(verdict, pred=preds[i])
    auto = [i for i, o in enumerate(own) if not o]
    if auto:
        for i, verdict in zip(auto, verifier.check([(golds[i], texts[i]) for i in auto], extract="auto")):
            results[i] = verdict
    return results  # type: ignore[return-value]  (every slot is filled above)


def verify_rows(verifier: Verifier, rows: Sequence[dict[str, Any]], cfg: VerifyConfig) -> list[dict[str, Any]]:
    """The verify stage's columns for rows with task, answer, response and finish_reason: `pred`,
    `correct`, `verify_status` (math-verify with verify.extract, or the task's own check: choice
    letters) and `reward` (1 for a right answer, verify.format_reward without one, minus
    verify.truncation_penalty when cut at the length limit). The one answer check of verify, rectify's
    re-verification of new rows and eval."""
    verdicts = check_responses(verifier, [r["task"] for r in rows], [r["answer"] for r in rows],
                               [r["response"] for r in rows], cfg.extract)
    return [{"pred": v.pred, "correct": v.correct, "verify_status": v.status,
             "reward": reward(v, r.get("finish_reason"), cfg.format_reward, cfg.truncation_penalty)}
            for r, v in zip(rows, verdicts)]
