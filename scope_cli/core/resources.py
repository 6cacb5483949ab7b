"""What the stages share while they run: the policy's generation engine, the verifier pool, the PRM
and the guide, each opened on first use from the typed config and closed in one place.

    with own_or_shared(run.config, resources) as res:   # a stage: the round's resources, or its own
        engine = res.policy_engine(policy_dir)           # opened, or given the new policy's weights
        verdicts = verify_rows(res.verifier(), rows, cfg.verify)

A stage run alone opens what it uses and closes it when it ends. `scope round` in one process keeps
one `StageResources` for all its rounds (scope_cli/cli/rounds.py): libraries, the engine and the
verify pool start once, and the engine loads each new policy's weights instead of restarting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from scope_cli.backends.generation import open_policy_engine
from scope_cli.backends.engine import GenerationBackend, resolve_backend
from scope_cli.backends.verifier import Verifier
from scope_cli.core.config import Config


class StageResources:
    """Engines opened lazily from `cfg` and closed by `close()` (or the `with` block)."""

    def __init__(self, cfg: Config, engine: GenerationBackend | None = None,
                 verifier: Verifier | None = None):
        """`engine`, `verifier`: ones already open, to use (and close) instead of opening new ones."""
        self.cfg = cfg
        self._engine: GenerationBackend | None = engine
        self._verifier: Verifier | None = verifier
        self._prm: Any = None
        self._guide: Any = None

    def policy_engine(self, policy_dir: Path) -> GenerationBackend:
        """The generation engine with `policy_dir`'s weights: opened once, then reloaded in place."""
        if self._engine is None:
            self._engine = open_policy_engine(self.cfg.generate, self.cfg.policy, policy_dir)
        elif Path(self._engine.policy).resolve() != Path(policy_dir).resolve():
            self._engine.reload(policy_dir)
        return self._engine

    def engine_name(self) -> str:
        """The generation backend that runs (or would run): hf | vllm."""
        if self._engine is not None:
            return self._engine.name
        backend = self.cfg.generate.backend
        return resolve_backend("auto") if backend == "auto" else backend

    def verifier(self) -> Verifier:
        if self._verifier is None:
            self._verifier = Verifier(workers=self.cfg.verify.workers, timeout=self.cfg.verify.timeout)
        return self._verifier

    def prm(self) -> Any:
        """The PRM scorer of prm.backend (rule, hf, vllm)."""
        if self._prm is None:
            from scope_cli.backends.prm import load_prm

            self._prm = load_prm(self.cfg.prm)
        return self._prm

    def guide(self) -> Any:
        """The guide of rectify.guide: the task's exact solver (oracle) or a model."""
        if self._guide is None:
            from scope_cli.backends.guide import ModelGuide, OracleGuide

            c = self.cfg
            self._guide = (OracleGuide() if c.rectify.guide == "oracle"
                           else ModelGuide(c.rectify, c.generate, c.policy.trust_remote_code))
        return self._guide

    def release(self, *names: str) -> None:
        """Close some of them now ("prm", "guide", ...): a round frees the PRM after prm-score and the
        guide after rectify, so they never sit beside the next stage's models."""
        self._close([f"_{n}" for n in names])

    def close(self) -> None:
        self._close(["_engine", "_verifier", "_prm", "_guide"])

    def _close(self, names: list[str]) -> None:
        for name in names:
            thing, closer = getattr(self, name), None
            setattr(self, name, None)
            closer = getattr(thing, "close", None)
            if closer is not None:
                closer()

    def __enter__(self) -> StageResources:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextmanager
def own_or_shared(cfg: Config, shared: StageResources | None) -> Iterator[StageResources]:
    """The round's resources (left open for the next stage), or the stage's own (closed at its end)."""
    if shared is not None:
        yield shared
        return
    with StageResources(cfg) as own:
        yield own
