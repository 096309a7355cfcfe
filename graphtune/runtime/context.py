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

The protocol is :class:`Feature` + :func:`register_feature` / :func:`unregister_feature`: a
feature is a name, a selector, an optional planner, a priority and whether its implementations
re-enter the op (then the chain skips the feature while its own implementation runs: the
re-entry guard is generic, no feature keeps its own). No module touches another's lists.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

from graphtune.ir.ops import set_impl_selector

__all__ = [
    "BatchContext",
    "RequestStates",
    "batch_context",
    "cache_length",
    "find_cache",
    "current",
    "Feature",
    "register_feature",
    "unregister_feature",
    "feature_registered",
    "registered_features",
    "exact_only",
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
        Tokens already in the KV cache before this forward (0 at a prefill, and when the caller
        could not find the cache: selectors check it against the call's own shapes).
    position_ids : Tensor or None
        ``[B, L]`` (or ``[1, L]``) positions of the new tokens, if the caller passed them.
    other_inputs : tuple of str
        Names of the forward's other tensor inputs (e.g. ``token_type_ids``, ``inputs_embeds``):
        they may make rows with identical ids differ, so planners that compare rows decline.
    plans : dict
        Plans by feature name, filled by planners; persist across decode steps through ``state``.
    state : dict
        State that lives across the forwards of one request: the optimized model keeps one per
        KV cache object, so concurrent requests (threads, interleaved caches) never share it.
    options : graphtune.flags.Options or None
        The optimized model's options; features honour their switch (``options.shared_prefix``...).
    """

    input_ids: Any = None
    attention_mask: Any = None
    past_length: int = 0
    plans: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    options: Any = None
    position_ids: Any = None
    other_inputs: tuple[str, ...] = ()

    def enabled(self, feature: str) -> bool:
        """Whether ``feature`` (an Options field such as "shared_prefix") is on for this model."""
        return self.options is None or bool(getattr(self.options, feature, True))


Planner = Callable[[BatchContext], None]
# selector(op_name, args, ctx) -> implementation callable or None
Selector = Callable[[str, tuple, Optional[BatchContext]], Optional[Callable[..., Any]]]

_current: contextvars.ContextVar[BatchContext | None] = contextvars.ContextVar("graphtune_batch", default=None)


@dataclass(frozen=True)
class Feature:
    """A runtime feature: a per-call implementation selector and, optionally, a per-forward planner.

    Parameters
    ----------
    name : str
        Unique name (also the key of its plans in :attr:`BatchContext.plans`, by convention).
    select : Selector
        ``select(op, args, ctx) -> callable or None``: the implementation for this call, or None
        to let lower-priority features (and finally the op's default path) decide.
    priority : int
        Higher is asked first. Op families declare it (:class:`graphtune.codegen.family.OpFamily`).
    plan : Planner or None
        ``plan(ctx)``, run once at the start of every optimized forward.
    reenters : bool
        The implementations this feature returns call graphtune ops themselves (e.g. the
        shared-prefix decomposition's partial attentions). While one runs, this feature is not
        asked again, so the inner calls go to the features below it.
    exact : bool
        False for approximate features (sparse prefill): :func:`exact_only` turns them off, e.g.
        while translation validation compares a rewritten graph with the original.
    """

    name: str
    select: Selector
    priority: int = 0
    plan: Planner | None = None
    reenters: bool = False
    exact: bool = True


_features: dict[str, Feature] = {}
_chain: tuple[Feature, ...] = ()  # by priority, highest first
_running: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("graphtune_running_features",
                                                                          default=frozenset())
_exact: contextvars.ContextVar[bool] = contextvars.ContextVar("graphtune_exact_only", default=False)


def current() -> BatchContext | None:
    """The context of the forward being run, or None outside optimized models."""
    return _current.get()


def register_feature(feature: Feature) -> None:
    """Add (or replace, by name) a runtime feature; the op's selector chain is rebuilt."""
    global _chain
    _features[feature.name] = feature
    _chain = tuple(sorted(_features.values(), key=lambda f: -f.priority))
    set_impl_selector(_select)


def unregister_feature(name: str) -> None:
    """Remove a feature (its selector and its planner); unknown names are ignored."""
    global _chain
    _features.pop(name, None)
    _chain = tuple(sorted(_features.values(), key=lambda f: -f.priority))
    set_impl_selector(_select if _chain else None)


def feature_registered(name: str) -> bool:
    return name in _features


def registered_features() -> list[str]:
    """Names of the registered features, highest priority first."""
    return [f.name for f in _chain]


@contextlib.contextmanager
def running(name: str) -> Iterator[None]:
    """Mark feature ``name`` as running: the selector chain skips it until the block ends.

    Features with ``reenters=True`` get this automatically around the implementations they
    return; code that calls a feature's implementation directly (not through the op) uses it.
    """
    tok = _running.set(_running.get() | {name})
    try:
        yield
    finally:
        _running.reset(tok)


@contextlib.contextmanager
def exact_only() -> Iterator[None]:
    """Within the block, approximate features (``Feature.exact=False``) are not asked: every op is exact."""
    tok = _exact.set(True)
    try:
        yield
    finally:
        _exact.reset(tok)


def _guarded(name: str, impl: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(impl)
    def call(*args: Any, **kwargs: Any) -> Any:
        with running(name):
            return impl(*args, **kwargs)
    return call


def _select(op: str, args: tuple) -> Callable[..., Any] | None:
    ctx = _current.get()
    busy = _running.get()
    exact = _exact.get()
    for f in _chain:
        if busy and f.name in busy or exact and not f.exact:
            continue
        impl = f.select(op, args, ctx)
        if impl is not None:
            return _guarded(f.name, impl) if f.reenters else impl
    return None


@contextlib.contextmanager
def batch_context(
    input_ids: Any = None,
    attention_mask: Any = None,
    past_length: int = 0,
    state: dict[str, Any] | None = None,
    options: Any = None,
    position_ids: Any = None,
    other_inputs: tuple[str, ...] = (),
) -> Iterator[BatchContext]:
    """Plan once for this batch, then run the forward inside the context."""
    ctx = BatchContext(input_ids, attention_mask, past_length, state=state if state is not None else {},
                       options=options, position_ids=position_ids, other_inputs=tuple(other_inputs))
    for f in _chain:
        if f.plan is not None:
            f.plan(ctx)
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


# --------------------------------------------------------------------------------------
# Per-request state of a model driven by Hugging Face (one state per KV cache object)
# --------------------------------------------------------------------------------------

CACHE_NAMES = ("cache", "past_key_values")  # the forward's KV-cache keyword: transformers >= 5, < 5


def find_cache(positional: Sequence[str] | None, args: tuple, kwargs: dict) -> Any:
    """The KV cache of a forward call, whatever the keyword or position it was passed under.

    ``positional``: the forward's positional parameter names (from ``inspect.signature``, bound
    once), so ``model(ids, mask, pos, cache)`` is found too.

    >>> find_cache(["input_ids", "cache"], (1, "c"), {}), find_cache(None, (), {"past_key_values": "p"})
    ('c', 'p')
    """
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    for name, value in zip(positional or (), args):
        if name in CACHE_NAMES and value is not None:
            return value
    return None


def cache_length(cache: Any) -> int | None:
    """Tokens held by a KV cache: 0 for None, None when the cache's kind is unknown.

    HF ``Cache`` objects (any version) answer ``get_seq_length()``; legacy caches are per-layer
    ``(k [B, H, S, D], v)`` tuples.
    """
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    if callable(get):
        try:
            return int(get())
        except Exception:  # noqa: BLE001 - unknown length: no plan will rely on it
            return None
    if isinstance(cache, (tuple, list)):
        if len(cache) == 0:
            return 0
        first = cache[0]
        k = first[0] if isinstance(first, (tuple, list)) and first else None
        if hasattr(k, "shape") and len(k.shape) >= 2:
            return int(k.shape[-2])
    return None


@dataclass
class _Request:
    state: dict[str, Any]
    length: int  # tokens in the cache after the last forward that used `state`


class RequestStates:
    """``BatchContext.state`` per KV cache object, so plans never outlive the cache they describe.

    A state is handed out again only for the cache object it was stored with (identity, held by
    weak reference) and only while that cache holds exactly the tokens it held after the last
    forward that used the state: a cache prefilled elsewhere, rolled back, or grown by someone
    else gets a fresh, empty state. Thread safe: concurrent requests have distinct caches.
    A change that keeps the length (HF's ``reorder_cache`` / ``batch_select_indices``, which move
    rows in place, as beam search does) is not seen here: a feature whose state describes the
    cache's rows checks them itself (shared-prefix: every forward, before first use).

    >>> import torch
    >>> class Cache:
    ...     def __init__(self): self.n = 0
    ...     def get_seq_length(self): return self.n
    >>> states, c = RequestStates(), Cache()
    >>> st = states.get(c)                  # prefill: a fresh state
    >>> st["plan"] = "p"; c.n = 5
    >>> states.put(c, st, expected=5)       # the forward appended the 5 prompt tokens
    >>> states.get(c)["plan"]
    'p'
    >>> c.n = 3                             # rolled back: the plan may describe tokens now gone
    >>> states.get(c)
    {}
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[int, tuple[weakref.ref, _Request]] = {}

    def get(self, cache: Any) -> dict[str, Any]:
        """The state of the request continuing from ``cache`` (a new one if none is valid)."""
        n = cache_length(cache)
        if cache is None or not n:
            return {}  # a prefill (or an untrackable cache): a new request
        with self._lock:
            entry = self._by_id.get(id(cache))
        if entry is None or entry[0]() is not cache or entry[1].length != n:
            return {}
        return entry[1].state

    def put(self, cache: Any, state: dict[str, Any], expected: int | None) -> None:
        """Keep ``state`` for ``cache`` if it now holds ``expected`` tokens (else forget the cache).

        ``expected`` is the past length plus this forward's new tokens: any other length means the
        cache is not a plain append (sliding window, static or offloaded layouts, ...).
        """
        if cache is None:
            return
        key = id(cache)
        n = cache_length(cache)
        if n is None or expected is None or n != expected or not state:
            with self._lock:
                self._by_id.pop(key, None)
            return
        try:
            ref = weakref.ref(cache, functools.partial(self._forget, key))
        except TypeError:  # legacy tuple caches cannot be tracked: no state survives the call
            return
        with self._lock:
            self._by_id[key] = (ref, _Request(state, n))

    def _forget(self, key: int, ref: weakref.ref) -> None:
        with self._lock:
            entry = self._by_id.get(key)
            if entry is not None and entry[0] is ref:
                del self._by_id[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)
