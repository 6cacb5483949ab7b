"""Allowed values of numeric config keys, declared on the config field itself.

    temperature: float = key(1.0, Range(gt=0, le=10))
    grad_clip: float = key(1.0, Range(ge=0, zero="no clipping"))
    batch_size: int = op(256, Range(ge=1))          # operational (never fixes a run)

A `Range` is finite by construction (NaN and ±inf are refused for every float key), with optional
bounds; `zero` names what 0 means where it is a special value. `scope_cli.config.validate` checks
every field that declares one (each element of a list field), so a bad value is refused when the
config is loaded — before `scope prepare` writes anything — with one line naming the key, the value
and the allowed range.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Range:
    ge: float | None = None  # value >= ge
    gt: float | None = None  # value > gt
    le: float | None = None  # value <= le
    lt: float | None = None  # value < lt
    zero: str = ""  # what 0 means, where 0 is a special value outside the other bounds ("off")

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.zero and value == 0:
            return True
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self, integer: bool) -> str:
        """'an integer >= 1', 'a finite number > 0 and <= 10', '0 (off) or an integer >= 1'."""
        parts = [f"{op} {_num(v)}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le),
                                                    ("<", self.lt)) if v is not None]
        kind = "an integer" if integer else "a finite number"
        text = f"{kind} {' and '.join(parts)}" if parts else kind
        return f"0 ({self.zero}) or {text}" if self.zero else text


def _num(value: float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return f"{value:,}".replace(",", "_") if isinstance(value, int) and abs(value) >= 100_000 else str(value)


def key(default: Any = MISSING, rng: Range | None = None, *, default_factory: Any = MISSING,
        operational: bool = False) -> Any:
    """A config field with an optional allowed range (`rng`) and the operational flag."""
    metadata: dict[str, Any] = {}
    if rng is not None:
        metadata["range"] = rng
    if operational:
        metadata["operational"] = True
    return field(default=default, default_factory=default_factory, metadata=metadata)


def op(default: Any = MISSING, rng: Range | None = None, *, default_factory: Any = MISSING) -> Any:
    """A field that is operational: how work is done (workers, batch sizes), not what it computes;
    left out of a run's fixed config check."""
    return key(default, rng, default_factory=default_factory, operational=True)
