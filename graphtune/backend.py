"""The ``torch.compile(model, backend="graphtune")`` backend and the shared graph-rewrite step.

graphtune rewrites the Dynamo graph (torch-level, before AOT autograd), then hands it to
Inductor (default) or runs it as is. Inductor caching stays intact: the FX graph cache keys on
the *rewritten* graph, and the only pass graphtune installs inside Inductor is a
:class:`~torch._inductor.custom_graph_pass.CustomGraphPass` with a stable ``uuid()`` (a bare
callable would make Inductor bypass its cache).

Runtime features on this path: ``torch.compile(model, backend="graphtune")`` gets the rewrite and
tuned dispatch, but *not* the per-batch features (shared-prefix decode, prefill dedup, lean
decode). Those need what only :func:`graphtune.optimize` sees: the caller's input ids, padding
mask, positions and the KV cache *object* of each forward, to plan once per request and to tie
each plan to that cache (:class:`graphtune.runtime.context.RequestStates`). A backend sees one
graph at a time (several per forward after graph breaks) with flattened tensor inputs, so a
batch context opened here could neither cover the whole forward nor know which request a
cache belongs to; guessing would risk wrong answers. Without a context their selectors decline,
so this path is always exact. Use ``graphtune.optimize(model)`` for generation.
"""
from __future__ import annotations

import hashlib
import logging
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from graphtune import flags
from graphtune.errors import GraphtuneError, TranslationValidationError, VerificationError
from graphtune.flags import Options
from graphtune.ir.graph import format_graph, verify
from graphtune.rewrites import PipelineResult, run_pipeline, validate_rewrite

__all__ = ["graphtune_backend", "GraphtuneBackend", "rewrite_graph", "copy_graph_module"]

log = logging.getLogger("graphtune")


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own copy of the graph (node metadata copied), sharing submodules."""
    g = fx.Graph()
    g._codegen = gm.graph._codegen
    out = g.graph_copy(gm.graph, {})
    g.output(out)
    return fx.GraphModule(gm, g)


def _concrete_inputs(example_inputs: Sequence[Any]) -> list[Any] | None:
    """Example inputs as real values for translation validation, or None if some are fake.

    Dynamo hands dynamic-shape graphs SymInt size inputs; their hints are the real sizes.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    out = []
    for x in example_inputs:
        if isinstance(x, FakeTensor):
            return None
        if isinstance(x, torch.SymInt):
            hint = x.node.hint
            if hint is None:
                return None
            x = int(hint)
        out.append(x)
    return out


def rewrite_graph(gm: fx.GraphModule, example_inputs: Sequence[Any] | None, options: Options) -> PipelineResult:
    """Run graphtune's pipeline on ``gm`` in place: verify (GRAPHTUNE_SPEC), rewrite, validate.

    A failure inside a pass is not fatal: the original graph is kept and a warning says why.
    Verification and translation-validation failures are bugs and are raised.
    """
    spec = flags.get("SPEC")
    original = copy_graph_module(gm)
    if spec:
        verify(gm)
    try:
        result = run_pipeline(gm, options, verify=verify if spec else None)
    except (VerificationError, TranslationValidationError):
        raise
    except Exception as e:  # a broken pass must never take the user's model down
        warnings.warn(f"graphtune: rewrite failed ({type(e).__name__}: {e}); running the graph unchanged", stacklevel=2)
        return PipelineResult(original, [], [])
    real = _concrete_inputs(example_inputs) if (options.validating and example_inputs is not None) else None
    if real is not None and result.sites:
        from graphtune.runtime.context import exact_only

        with exact_only():  # validate the rewrite, not the opt-in approximate selectors (sparse prefill)
            validate_rewrite(original, result.gm, real, options.rtol, options.atol)
    if flags.get("DEBUG") >= 1:
        log.warning("graphtune: %s", ", ".join(f"{p.name}={p.matches}" for p in result.passes))
    if flags.get("DEBUG") >= 2:
        log.warning("graphtune rewritten graph:\n%s", format_graph(result.gm))
    return result


def eager_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` for eager execution whose graphtune op calls go straight to their Python
    implementations, skipping the dispatcher round trip (the IR in ``gm`` keeps the ops)."""
    from graphtune.ir.ops import EAGER_IMPLS

    if not any(n.op == "call_function" and n.target in EAGER_IMPLS for n in gm.graph.nodes):
        return gm
    run = copy_graph_module(gm)
    for n in run.graph.nodes:
        if n.op == "call_function" and n.target in EAGER_IMPLS:
            n.target = EAGER_IMPLS[n.target]
    run.recompile()
    return run


class GraphtunePostGradPass(CustomGraphPass):
    """Inductor post-grad pass: counts graphtune ops that reached Inductor's graph.

    Its ``uuid()`` hashes graphtune's version and the options, so Inductor's FX graph cache
    stays valid (and is invalidated when the options change).
    """

    def __init__(self, options: Options, counter: list[int]) -> None:
        self.options = options
        self.counter = counter

    def __call__(self, graph: fx.Graph) -> None:
        self.counter.append(sum(1 for n in graph.nodes if n.op == "call_function"
                                and getattr(n.target, "namespace", None) == "graphtune"))

    def uuid(self) -> bytes:
        from graphtune import __version__

        return hashlib.sha256(f"graphtune-post-grad:{__version__}:{self.options.key()}".encode()).digest()


class GraphtuneBackend:
    """A ``torch.compile`` backend object carrying options and the reports of what it rewrote.

    Parameters
    ----------
    options : Options
        Validated options; ``options.inductor`` selects Inductor or eager execution.

    Examples
    --------
    >>> import torch, torch.nn.functional as F
    >>> from graphtune.backend import GraphtuneBackend
    >>> from graphtune.flags import Options
    >>> be = GraphtuneBackend(Options(inductor=False))
    >>> f = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), backend=be)
    >>> x = torch.randn(1, 2, 4, 8)
    >>> _ = f(x, x, x)
    >>> be.results[0].count("canonicalize_attention")
    1
    """

    def __init__(self, options: Options | None = None) -> None:
        self.options = options or Options()
        self.results: list[PipelineResult] = []
        self.inductor_graphtune_ops: list[int] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        result = rewrite_graph(gm, example_inputs, self.options)
        self.results.append(result)
        if not self.options.inductor:
            return eager_module(result.gm).forward
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx

        with inductor_config.patch(post_grad_custom_post_pass=GraphtunePostGradPass(self.options, self.inductor_graphtune_ops)):
            return compile_fx(result.gm, example_inputs)


def graphtune_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None, **unused: Any) -> Callable[..., Any]:
    """Entry point of ``torch.compile(model, backend="graphtune", options={...})``.

    ``options`` are :class:`graphtune.flags.Options` fields (e.g. ``{"inductor": False}``); an
    unknown or ill-typed one raises :class:`~graphtune.errors.OptionError`. This path rewrites
    and dispatches; shared-prefix and lean decode need :func:`graphtune.optimize` (module
    docstring).

    Examples
    --------
    >>> import torch, torch.nn.functional as F
    >>> f = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    ...                   backend="graphtune", options={"inductor": False})
    >>> x = torch.randn(1, 2, 4, 8)
    >>> torch.allclose(f(x, x, x), F.scaled_dot_product_attention(x, x, x), atol=1e-6)
    True
    """
    if unused.get("mode") not in (None, "default"):
        raise GraphtuneError(f"the graphtune backend takes no mode (got {unused['mode']!r}); use options=")
    opts = Options.from_kwargs(**(options or {}))
    from graphtune.runtime import install

    install()
    return GraphtuneBackend(opts)(gm, example_inputs)
