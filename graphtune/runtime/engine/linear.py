"""The engine's linear layers: each ``nn.Linear`` call of a decode or verify step runs the CPU
formulation the tuning database chose for its shape (the ``linear`` op family).

Why: a decode step is a stack of few-row products, and ATen's path for them is often not the
fastest on a CPU (``graphtune/codegen/linear``: SmolLM2's LM head takes 15 ms for 2 rows through
``F.linear``, 2.4 ms weight-major on 2 cores). Speculative verification multiplies 2..20 rows per
step, exactly where the gap is widest.

How: :class:`LinearRouter` gives each plain ``nn.Linear`` of the model (exact type: subclasses such
as quantized or LoRA layers keep their own forward) an instance ``forward`` that asks the router
only while an engine forward runs on this thread (a context variable); any other call, a
``torch.compile`` trace included, is the module's own forward. Per forward the router keeps a
table ``(rows, out, in, dtype) -> tuned callable`` filled from
:func:`graphtune.runtime.dispatch.tuned_call`; a shape with no record runs ``F.linear``, so an
untuned database changes nothing. A runtime selector, not a rewrite: the choice depends on the
step's row count. Exact up to floating-point summation order.
"""
from __future__ import annotations

import contextlib
import contextvars
import types
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphtune import flags
from graphtune.runtime import dispatch

__all__ = ["LinearRouter", "model_linear_shapes", "model_linear_problems", "tune_linears"]

_router: contextvars.ContextVar["LinearRouter | None"] = contextvars.ContextVar("graphtune_linear", default=None)


def _routed_forward(self: nn.Linear, x: Tensor) -> Tensor:
    # is_compiling() first: Dynamo folds it to True and never sees the context variable (a
    # ContextVar.get would break the graph at every linear of a captured model)
    if torch.compiler.is_compiling():
        return nn.Linear.forward(self, x)
    r = _router.get()
    if r is None:
        return nn.Linear.forward(self, x)
    return r(self, x)


class LinearRouter:
    """Routes a model's linear layers through tuned implementations inside :meth:`active` blocks.

    Parameters
    ----------
    model : torch.nn.Module
        Its plain ``nn.Linear`` modules get the routing forward (once; idempotent). Nothing changes
        outside :meth:`active`.

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(8, 4)
    >>> r = LinearRouter(torch.nn.Sequential(lin))
    >>> x = torch.randn(2, 8)
    >>> with r.active():
    ...     y = lin(x)
    >>> torch.allclose(y, torch.nn.functional.linear(x, lin.weight, lin.bias))
    True
    """

    def __init__(self, model: nn.Module) -> None:
        self.enabled = bool(flags.get("ENGINE_TUNED_LINEAR"))
        self.max_rows = int(flags.get("ENGINE_LINEAR_MAX_ROWS"))
        self.modules = [m for m in model.modules() if type(m) is nn.Linear]
        for m in self.modules:
            if not isinstance(m.__dict__.get("forward"), types.MethodType):
                # a bound method, not a closure: deepcopy / pickling rebinds it to the copy
                m.forward = types.MethodType(_routed_forward, m)
        self._table: dict[tuple, Any] = {}
        self._token: tuple | None = None
        self.served: dict[tuple[int, int, int], str] = {}  # (rows, out, in) -> implementation (explain)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within the block, this thread's calls of the model's linears are routed."""
        if not self.enabled:
            yield
            return
        token = dispatch.cache_token()
        if token != self._token:  # another database, a write, another thread count
            self._table.clear()
            self._token = token
        t = _router.set(self)
        try:
            yield
        finally:
            _router.reset(t)

    def __call__(self, mod: nn.Linear, x: Tensor) -> Tensor:
        w = mod.weight
        x2 = x.reshape(-1, x.shape[-1])  # [M, in]
        m = x2.shape[0]
        if m > self.max_rows or x.device.type != "cpu" or x.requires_grad:
            return F.linear(x, w, mod.bias)
        key = (m, w.shape[0], w.shape[1], x.dtype)
        try:
            fn = self._table[key]
        except KeyError:
            fn = self._table[key] = dispatch.tuned_call("linear", (x2, w, mod.bias))
            self.served[key[:3]] = "cpu.aten" if fn is None else f"{fn.impl_name}[{fn.config}]"
        if fn is None:
            return F.linear(x, w, mod.bias)
        y = fn(x2, w, mod.bias)[0]
        if getattr(fn, "dropped", False):  # it failed (dispatch warned, fell back): F.linear from now on
            self._table[key] = None
            self.served[key[:3]] = "cpu.aten (tuned implementation failed)"
        return y.view(*x.shape[:-1], w.shape[0])

    def describe(self) -> str:
        """One line: how the linear calls seen so far were served."""
        if not self.enabled:
            return "linear layers: F.linear (ENGINE_TUNED_LINEAR=0)"
        if not self.served:
            return "linear layers: no call routed yet"
        tuned = {k: v for k, v in self.served.items() if v != "cpu.aten"}
        rows = sorted({k[0] for k in self.served})
        return (f"linear layers: {len(tuned)} of {len(self.served)} (rows, out, in) shapes tuned "
                f"(rows seen {rows[0]}..{rows[-1]})" + (f", e.g. {next(iter(tuned.values()))}" if tuned else ""))


def model_linear_shapes(model: nn.Module) -> list[tuple[int, int, str]]:
    """Distinct ``(out_features, in_features, dtype)`` of a model's plain ``nn.Linear`` layers."""
    seen: dict[tuple[int, int, str], None] = {}
    for m in model.modules():
        if type(m) is nn.Linear:
            seen[(m.out_features, m.in_features, str(m.weight.dtype).removeprefix("torch."))] = None
    return list(seen)


DEFAULT_ROWS = tuple(range(1, 17)) + (32, 64, 128, 256, 512)
HEAD_MAX_ROWS = 128  # the LM head only multiplies the rows whose logits are needed: one per sequence in prefill


def model_linear_problems(model: nn.Module, rows: tuple[int, ...] = DEFAULT_ROWS) -> list[Any]:
    """The :class:`~graphtune.codegen.linear.key.LinearShape` problems of ``model``'s linear layers
    at these row counts (the LM head's only up to ``HEAD_MAX_ROWS``), at this thread count."""
    from graphtune.codegen.linear.key import LinearShape

    head = getattr(model, "get_output_embeddings", lambda: None)()
    head_key = (head.out_features, head.in_features) if type(head) is nn.Linear else None
    body = {(n, k) for m in model.modules() if type(m) is nn.Linear and m is not head
            for n, k in [(m.out_features, m.in_features)]}
    out = []
    for n, k, dt in model_linear_shapes(model):
        only_head = (n, k) == head_key and (n, k) not in body
        out += [LinearShape(m, n, k, dt) for m in rows if not (only_head and m > HEAD_MAX_ROWS)]
    return out


def tune_linears(model: nn.Module, rows: tuple[int, ...] = DEFAULT_ROWS, *, budget_s: float | None = None,
                 db: Any = True, progress: Any = None) -> list[Any]:
    """Tune the ``linear`` family for every linear shape of ``model`` at these row counts
    (:func:`model_linear_problems`), at this process's torch thread count, and store the winners
    (what the engine then runs).

    Returns the :class:`~graphtune.autotune.tuner.TuneResult` list. ``budget_s`` defaults to 1.5 s
    per shape.
    """
    from graphtune.autotune.tuner import tune_shapes

    shapes = model_linear_problems(model, rows)
    budget = 1.5 * len(shapes) if budget_s is None else budget_s
    return tune_shapes(shapes, budget, "exhaustive", db=db, progress=progress)
