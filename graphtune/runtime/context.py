"""Per-batch runtime context: plan once per forward on the host, run per layer.

An optimized model's forward runs inside :func:`batch_context`. Registered *planners* look at
the batch once (input ids, attention mask, cache lengths) and store plans in the context —
e.g. the shared-prefix planner records which rows share a prompt prefix, the lean-decode
planner partitions ragged KV work over workers. Every attention call of every layer then
goes through graphtune's op, whose implementation is picked by the registered *selectors*
(highest priority first), which read those plans; the first selector returning a callable
wins, otherwise the op's default path runs.

Why a chain rather than one selector: features (tuned dispatch, shared prefix, lean decode)
are independent and each owns its own selector; priorities make their order explicit.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from graphtune.ir.ops import set_impl_selector

__all__ = [
    "BatchContext",
    "batch_context",
    "current",
    "register_planner",
    "register_selector",
    "unregister_selector",
]


@dataclass
class BatchContext:
    """What the host knows about the batch of the current forward call.

    Attributes
    ----------
    input_ids : Tensor or None
        ``[B, L]`` token ids of this forward (prefill: the prompt; decode: the new token).
    attention_mask : Tensor or None
        HF-style ``[B, S_total]`` 0/1 padding mask over cache + new tokens, if given.
    past_length : int
        Tokens already in the KV cache before this forward.
    plans : dict
        Plans by feature name, filled by planners; persist across decode steps through ``state``.
    state : dict
        Per-model state that lives across forwards (e.g. a prefix plan found at prefill).
    options : graphtune.flags.Options or None
        The optimized model's options; features honour their switch (``options.shared_prefix``...).
    """

    input_ids: Any = None
    attention_mask: Any = None
    past_length: int = 0
    plans: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    options: Any = None

    def enabled(self, feature: str) -> bool:
        """Whether ``feature`` (an Options field such as "shared_prefix") is on for this model."""
        return self.options is None or bool(getattr(self.options, feature, True))


Planner = Callable[[BatchContext], None]
# selector(op_name, args, ctx) -> implementation callable or None
Selector = Callable[[str, tuple, Optional[BatchContext]], Optional[Callable[..., Any]]]

_current: contextvars.ContextVar[BatchContext | None] = contextvars.ContextVar("graphtune_batch", default=None)
_planners: dict[str, Planner] = {}
_selectors: list[tuple[int, str, Selector]] = []  # sorted by priority, descending


def current() -> BatchContext | None:
    """The context of the forward being run, or None outside optimized models."""
    return _current.get()


def register_planner(name: str, planner: Planner) -> None:
    """Run ``planner(ctx)`` once at the start of every optimized forward (replaces same name)."""
    _planners[name] = planner


def register_selector(name: str, selector: Selector, priority: int = 0) -> None:
    """Add (or replace) an implementation selector; higher priority is asked first."""
    unregister_selector(name)
    _selectors.append((priority, name, selector))
    _selectors.sort(key=lambda t: -t[0])
    set_impl_selector(_select if _selectors else None)


def unregister_selector(name: str) -> None:
    _selectors[:] = [t for t in _selectors if t[1] != name]
    set_impl_selector(_select if _selectors else None)


def _select(op: str, args: tuple) -> Callable[..., Any] | None:
    ctx = _current.get()
    for _, _, sel in _selectors:
        impl = sel(op, args, ctx)
        if impl is not None:
            return impl
    return None


@contextlib.contextmanager
def batch_context(
    input_ids: Any = None,
    attention_mask: Any = None,
    past_length: int = 0,
    state: dict[str, Any] | None = None,
    options: Any = None,
) -> Iterator[BatchContext]:
    """Plan once for this batch, then run the forward inside the context."""
    ctx = BatchContext(input_ids, attention_mask, past_length, state=state if state is not None else {},
                       options=options)
    for planner in list(_planners.values()):
        planner(ctx)
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)
