"""Search strategies over (implementation, config) candidates, and the cost-model interface.

A strategy gets the candidate list, a ``measure(candidate, reps) -> Measurement`` function and a
:class:`Budget`, and returns every measurement it made (the tuner picks the fastest). Strategies:

``exhaustive``
    every candidate, ``reps`` repetitions each, in order, until the budget runs out;
``random``
    a seeded sample (``Budget.max_candidates`` of them, else half the space);
``successive_halving``
    all candidates with few repetitions, keep the faster half, double the repetitions, repeat:
    most of the time goes to the contenders.

A :class:`CostModel` pre-ranks candidates before any is run (:func:`prerank`); the static
mode's cross-compiled resource model is one (:class:`ResourceModel`).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

from graphtune.autotune.measure import Candidate, Measurement
from graphtune.autotune.shapes import AttentionShape
from graphtune.errors import OptionError

__all__ = ["Budget", "CostModel", "ResourceModel", "prerank", "STRATEGIES", "parse_budget"]

Measure = Callable[[Candidate, int], Measurement]


@dataclass
class Budget:
    """How much one shape's search may spend: wall-clock seconds and/or distinct candidates."""

    seconds: float | None = None
    max_candidates: int | None = None
    reps: int = 10  # repetitions of a full measurement (successive halving starts lower)
    _deadline: float | None = None
    _tried: int = 0

    def start(self) -> "Budget":
        self._deadline = None if self.seconds is None else time.monotonic() + self.seconds
        self._tried = 0
        return self

    def out_of_time(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def may_try_new(self) -> bool:
        return not self.out_of_time() and (self.max_candidates is None or self._tried < self.max_candidates)

    def note_new(self) -> None:
        self._tried += 1


def parse_budget(text: str | float | int | None) -> tuple[float | None, int | None]:
    """``"30"``/``"30s"`` -> 30 seconds; ``"12c"`` -> 12 candidates per shape; ``"30s,12c"`` both.

    >>> parse_budget("45s,8c")
    (45.0, 8)
    """
    if text is None:
        return None, None
    if isinstance(text, (int, float)):
        return float(text), None
    secs, cands = None, None
    for part in str(text).replace(" ", "").split(","):
        try:
            if part.endswith("c"):
                cands = int(part[:-1])
            else:
                secs = float(part[:-1] if part.endswith("s") else part)
        except ValueError:
            raise OptionError(f"budget {text!r}: {part!r} is not N (seconds), Ns or Nc (candidates)") from None
    if (secs is not None and secs <= 0) or (cands is not None and cands < 1):
        raise OptionError(f"budget {text!r} must be positive")
    return secs, cands


@runtime_checkable
class CostModel(Protocol):
    """Predicts a candidate's cost on a shape (lower is better; ``inf`` = do not run)."""

    def predict(self, candidate: Candidate, shape: AttentionShape) -> float: ...


class ResourceModel:
    """Cost model from cross-compiled resources (static mode): ``1 / score`` of ``crosscompile.static_rank``.

    Parameters
    ----------
    arch : int
        Target compute capability, e.g. 90 for ``sm_90``.
    """

    def __init__(self, arch: int) -> None:
        from graphtune.codegen import crosscompile  # the Triton toolchain, only when asked for

        self.arch, self._rank = arch, crosscompile.static_rank

    def predict(self, candidate: Candidate, shape: AttentionShape) -> float:
        ranked = self._rank(candidate.impl.name, shape.meta_args(), [candidate.config], self.arch)
        score = ranked[0][1] if ranked else float("-inf")
        return 1.0 / score if score > 0 else math.inf


def prerank(cands: list[Candidate], model: CostModel, shape: AttentionShape, keep: float = 0.5) -> list[Candidate]:
    """Candidates sorted by predicted cost, the ``keep`` fraction kept (never fewer than one)."""
    scored = sorted(((model.predict(c, shape), i, c) for i, c in enumerate(cands)), key=lambda t: (t[0], t[1]))
    finite = [c for p, _, c in scored if math.isfinite(p)] or [scored[0][2]]
    return finite[: max(1, math.ceil(len(finite) * keep))]


def exhaustive(cands: list[Candidate], measure: Measure, budget: Budget, seed: int = 0) -> list[Measurement]:
    out = []
    for c in cands:
        if not budget.may_try_new():
            break
        budget.note_new()
        out.append(measure(c, budget.reps))
    return out


def random_sample(cands: list[Candidate], measure: Measure, budget: Budget, seed: int = 0) -> list[Measurement]:
    k = budget.max_candidates if budget.max_candidates is not None else max(1, len(cands) // 2)
    picked = random.Random(seed).sample(cands, min(k, len(cands)))
    return exhaustive(picked, measure, budget, seed)


def successive_halving(cands: list[Candidate], measure: Measure, budget: Budget, seed: int = 0) -> list[Measurement]:
    latest: dict[int, Measurement] = {}
    alive: list[int] = []
    reps = max(2, budget.reps // 4)
    for i, c in enumerate(cands):  # round 0: every candidate the budget allows, cheaply
        if not budget.may_try_new():
            break
        budget.note_new()
        latest[i] = measure(c, reps)
        if latest[i].ok:
            alive.append(i)
    rnd = 0
    while len(alive) > 1 and not budget.out_of_time():
        alive.sort(key=lambda i: latest[i].median_us)
        alive = alive[: math.ceil(len(alive) / 2)]
        reps, rnd = reps * 2, rnd + 1
        if len(alive) == 1:  # decided: no need to time the last one again
            latest[alive[0]].round = rnd
            break
        for i in alive:
            if budget.out_of_time():
                break
            m = measure(cands[i], reps)
            m.round = rnd
            latest[i] = m
        alive = [i for i in alive if latest[i].ok]
        if reps >= 4 * budget.reps:
            break
    return list(latest.values())


STRATEGIES: dict[str, Callable[[list[Candidate], Measure, Budget, int], list[Measurement]]] = {
    "exhaustive": exhaustive,
    "random": random_sample,
    "successive_halving": successive_halving,
}
