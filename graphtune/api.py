"""Public entry points: :func:`optimize` and :func:`explain`."""
from __future__ import annotations

import copy
import functools
import inspect
import logging
import types
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from graphtune.backend import GraphtuneBackend, copy_graph_module, rewrite_graph
from graphtune.codegen.family import families
from graphtune.errors import CaptureError, OptionError
from graphtune.flags import Options
from graphtune.ir.capture import capture, capture_export, capture_fx, normalize_inputs
from graphtune.ir.meta import tensor_meta
from graphtune.rewrites import AttentionSite, PipelineResult
from graphtune.runtime import install as install_runtime
from graphtune.runtime.dispatch import may_serve as dispatch_may_serve
from graphtune.runtime.context import CACHE_NAMES, RequestStates, batch_context, cache_length, find_cache

__all__ = ["optimize", "explain", "Report", "SiteReport"]

log = logging.getLogger("graphtune")


def _is_generation_model(model: nn.Module) -> bool:
    """HF-style causal LMs: ``generate`` + ``config``; they are captured with Dynamo (KV cache objects)."""
    return hasattr(model, "generate") and hasattr(model, "config")


def _output_cache(out: Any) -> Any:
    """The KV cache a forward returned (``cache`` from transformers 5, ``past_key_values`` before)."""
    if isinstance(out, (tuple, list)):
        return None  # return_dict=False: positions vary by model; no state is kept for this call
    for name in CACHE_NAMES:
        c = out.get(name) if isinstance(out, dict) else getattr(out, name, None)  # HF ModelOutput is a dict
        if c is not None:
            return c
    return None


# Forward inputs the runtime reads, or that cannot make two rows' K/V differ.
_READ_INPUTS = frozenset({"input_ids", "attention_mask", "position_ids", "cache_position", "labels",
                          "logits_to_keep", "num_logits_to_keep", *CACHE_NAMES})


def _nothing_planned(ctx: Any) -> bool:
    # no runtime plan, or only lean decode's "unpadded" prefill plan: that one hands the captured
    # graph's materialized causal mask back to SDPA's is_causal, which the eager forward does itself
    return all(getattr(p, "unpadded", False) for p in ctx.plans.values())


def _tuned_may_serve(named: dict[str, Any], ctx: Any) -> bool:
    # tuned dispatch could answer this forward's attention calls (records for its device exist)
    for x in named.values():
        if isinstance(x, torch.Tensor):
            return dispatch_may_serve(x.device, ctx)
    return True  # no tensor input to tell the device: keep the graphtune path


class _OptimizedForward:
    """``forward`` of an optimized generation model: plan the batch, then run the Dynamo-captured,
    graphtune-rewritten forward.

    Dynamo guards are checked per call, and shapes become dynamic after the first recompile, so
    HF ``generate`` compiles the prefill and the decode step once each, not once per step.

    Per-request runtime state (e.g. a shared-prefix plan found at prefill) is kept per KV cache
    object (:class:`~graphtune.runtime.context.RequestStates`), never per model: a plan is used only
    by the forwards that continue the very cache it was built for, from the length it left it at.
    The cache is found under either transformers keyword (``cache=`` from 5.x,
    ``past_key_values=`` before) or positionally.
    """

    # run the model's own forward where the captured graph cannot gain (see __init__); tests of the
    # captured path itself switch it off for the models they build
    PLAIN_WHEN_IDLE = True

    def __init__(self, forward: Any, options: Options) -> None:
        self.backend = GraphtuneBackend(Options(**{**dict(options.items()), "inductor": False}))
        self.compiled = torch.compile(forward, backend=self.backend, dynamic=options.dynamic)
        self.options = options
        self.requests = RequestStates()
        # HF's SDPA attention runs the very ATen kernel graphtune's untuned attention op runs: for a
        # forward no runtime plan and no tuned record applies to, the captured graph could only add
        # Dynamo's guards and its region's Python, so the model's own forward runs instead (exact:
        # it is the oracle). Other attention forms (eager matmul/softmax) gain from the rewrite.
        cfg = getattr(getattr(forward, "__self__", None), "config", None)
        sdpa = getattr(cfg, "_attn_implementation", None) == "sdpa"
        self.plain = forward if sdpa and self.PLAIN_WHEN_IDLE else None
        self.plain_calls = 0  # forwards that ran the plain forward (tests, explain)
        try:  # positional parameter names, to find inputs passed positionally (bound once)
            params = inspect.signature(forward).parameters.values()
            self.positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            self.positional = []
        functools.update_wrapper(self, forward)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        named = {**dict(zip(self.positional, args)), **kwargs}
        input_ids, mask, pos = (x if isinstance(x, torch.Tensor) else None
                                for x in (named.get(n) for n in ("input_ids", "attention_mask", "position_ids")))
        cache = find_cache(self.positional, args, kwargs)
        past = cache_length(cache)  # None: a cache of unknown kind
        state = self.requests.get(cache)
        other = tuple(k for k, x in named.items() if isinstance(x, torch.Tensor) and k not in _READ_INPUTS)
        with batch_context(
            input_ids=input_ids,
            attention_mask=mask,
            past_length=past or 0,  # unknown: 0, and selectors check the calls' own shapes
            state=state,
            options=self.options,
            position_ids=pos,
            other_inputs=other,
        ) as ctx:
            if self.plain is not None and _nothing_planned(ctx) and not _tuned_may_serve(named, ctx):
                self.plain_calls += 1
                out = self.plain(*args, **kwargs)
            else:
                out = self.compiled(*args, **kwargs)
        if cache is None:
            cache = _output_cache(out)  # HF created the cache inside this (prefill) forward
        new = input_ids.shape[-1] if input_ids is not None and input_ids.dim() == 2 else None
        self.requests.put(cache, state, None if past is None or new is None else past + new)
        return out


class _WithOptions:
    """``forward`` of a rewritten ``GraphModule`` (fx/export path): runs it inside a batch context
    carrying the model's options, so runtime selectors honour them (e.g. ``tune=False``)."""

    def __init__(self, forward: Any, options: Options) -> None:
        self.forward, self.options = forward, options
        functools.update_wrapper(self, forward)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with batch_context(options=self.options):
            return self.forward(*args, **kwargs)


def _module_tree_copy(module: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """A copy of ``module``'s whole module tree that shares its parameters and buffers.

    Why not ``copy.copy``: a shallow copy shares the ``_modules``/``_parameters``/hook dicts, so
    ``fast.lm_head = x`` or ``fast.train()`` on the copy would change (or half-change) the caller's
    model. Here every module object and every container dict is new; only tensors are shared
    (no weight is copied). A submodule reachable twice (tied modules) is copied once (``memo``).
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    new = copy.copy(module)  # new __dict__, values shared
    memo[id(module)] = new
    for name, value in list(vars(new).items()):
        # per-module containers: parameters, buffers, hooks, non-persistent buffer names, ...
        if isinstance(value, (dict, set, list)) and name.startswith("_") and name != "_modules":
            setattr(new, name, copy.copy(value))
    new._modules = {k: (None if c is None else _module_tree_copy(c, memo)) for k, c in module._modules.items()}
    return new


def _own_code(fn: Any) -> Any:
    """``fn`` (a function) with a code object of its own.

    Why: Dynamo keeps compiled code, guards and its recompile limit (8) per code object. Every
    optimized model of one class shares ``forward``'s code, and HF's decorators
    (``can_return_tuple``, deprecation wrappers) share one wrapper's code across all model classes;
    past the limit Dynamo silently runs the forward eagerly, without graphtune. A copy of the code
    object gives each optimized model its own cache and limit; behaviour is unchanged.
    """
    if not isinstance(fn, types.FunctionType):
        return fn
    new = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)  # functools.wraps' __wrapped__, HF's markers, ...
    new.__qualname__, new.__doc__, new.__module__ = fn.__qualname__, fn.__doc__, fn.__module__
    return new


def _optimize_dynamo(model: nn.Module, options: Options) -> nn.Module:
    # The copy shares the weights (no memory cost) but has its own module tree and its own
    # `forward`, so HF `generate` on it runs graphtune while the caller's model is left untouched.
    new = _module_tree_copy(model)
    forward = _own_code(type(model).forward).__get__(new)
    new.forward = _OptimizedForward(forward, options)
    if options.engine and callable(getattr(type(model), "generate", None)):
        from graphtune.runtime.engine.hf_generate import EngineGenerate

        # generate through graphtune's engine where it supports the call, HF's loop otherwise
        new.generate = EngineGenerate(new, type(model).generate.__get__(new), options.speculative,
                                      options.sparse_prefill)
    return new


def optimize(model: nn.Module, example_inputs: Any = None, **options: Any) -> nn.Module:
    """Return a module computing the same function with attention through graphtune's ops.

    Parameters
    ----------
    model : nn.Module
        Any PyTorch model; typically a Hugging Face causal LM.
    example_inputs : tensor, tuple or dict, optional
        Inputs for an up-front capture (needed for ``capture="fx"`` / ``"export"``). Without them,
        the model is captured with Dynamo at its first call (graph breaks are fine).
    **options
        Fields of :class:`graphtune.flags.Options` (``capture``, ``validate``, ``shared_prefix``,
        ...). Unknown or ill-typed options raise :class:`~graphtune.errors.OptionError`.

    Returns
    -------
    nn.Module
        Generation models (those with ``generate``): a copy of the module tree sharing the weights
        (parameters and buffers are the same tensors; no memory is copied) whose ``forward`` is
        captured and rewritten, a drop-in for ``generate``. Replacing a submodule of the copy or
        calling ``train()`` on it leaves ``model`` untouched; changing a weight in place changes
        both. Others: the rewritten ``fx.GraphModule``, or ``model`` itself if it has no attention.

    Examples
    --------
    >>> import torch, torch.nn.functional as F, graphtune
    >>> class Attn(torch.nn.Module):
    ...     def forward(self, q, k, v):
    ...         w = torch.softmax(q @ k.transpose(-2, -1) / 8.0, dim=-1)
    ...         return w @ v
    >>> q = torch.randn(1, 2, 5, 64)
    >>> fast = graphtune.optimize(Attn(), (q, q, q))
    >>> torch.allclose(fast(q, q, q), Attn()(q, q, q), atol=1e-5)
    True
    """
    opts = Options.from_kwargs(**options)
    if not isinstance(model, nn.Module):
        raise OptionError(f"optimize expects an nn.Module, got {type(model).__name__}")
    if opts.speculative is not None:
        from graphtune.runtime.engine.drafters import make_drafter

        make_drafter(opts.speculative)  # an unknown shorthand or object fails here, naming itself
        if not opts.engine:
            raise OptionError("speculative=... runs inside graphtune's engine; it needs engine=True")
    if opts.sparse_prefill is not None:
        from graphtune.runtime.sparse_prefill import make_sparse

        # resolved once, with the model (its accuracy-tuned record, if stored): the forward path's
        # planner and the engine behind generate share these settings; an unknown value fails here
        opts = replace(opts, sparse_prefill=make_sparse(opts.sparse_prefill, model))
    install_runtime()
    method = opts.capture
    if method == "auto":
        method = "dynamo" if (_is_generation_model(model) or example_inputs is None) else "fx"
    if method in ("fx", "export"):
        if example_inputs is None:
            raise OptionError(f"capture={opts.capture!r} needs example_inputs")
        try:
            ir = capture_fx(model, example_inputs) if method == "fx" else capture_export(model, example_inputs)
        except CaptureError:
            if opts.capture != "auto":
                raise
            log.info("graphtune: fx capture failed; capturing with Dynamo at the first call")
            return _optimize_dynamo(model, opts)
        with batch_context(options=opts):  # translation validation runs the graph as the user will
            result = rewrite_graph(ir.gm, ir.example_inputs, opts)
        if not result.sites:
            log.info("graphtune.optimize: no attention in %s; returned unchanged", type(model).__name__)
            return model
        result.gm.forward = _WithOptions(result.gm.forward, opts)
        return result.gm
    return _optimize_dynamo(model, opts)


def _plain(value: Any) -> Any:
    """``value`` as plain data (str/int/float/bool/None, tuples, lists, dicts of those).

    Why: captured graphs hand us SymInts (dynamic dims after a recompile) and fake tensors; a
    report that kept them could not be copied, serialized or read after the capture is gone.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.SymInt):
        hint = value.node.hint  # the size seen at capture
        return int(hint) if hint is not None else str(value)
    if isinstance(value, (torch.SymFloat, torch.SymBool)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(_plain(d) for d in value.shape)}:{str(value.dtype).replace('torch.', '')}"
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list, torch.Size)):
        return tuple(_plain(v) for v in value) if not isinstance(value, list) else [_plain(v) for v in value]
    return repr(value)


@dataclass
class SiteReport:
    """One attention site of an explained model (plain data only: safe to copy and serialize)."""

    graph: int
    node: str
    module_path: str
    form: str
    details: dict
    implementation: str
    q_shape: tuple | None = None
    k_shape: tuple | None = None

    def __post_init__(self) -> None:
        self.details = _plain(dict(self.details))
        self.q_shape = _plain(self.q_shape)
        self.k_shape = _plain(self.k_shape)


@dataclass
class Report:
    """What :func:`explain` found: capture method, passes and every attention site.

    Print it for a table; ``to_dict()`` for JSON.
    """

    model: str
    capture: str
    graphs: int
    graph_breaks: int
    passes: dict[str, int] = field(default_factory=dict)
    sites: list[SiteReport] = field(default_factory=list)
    families: dict[str, str] = field(default_factory=dict)  # op family -> how it serves this model
    engine: str = ""  # generation models: the engine's plan for the example batch, or why generate is not routed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"graphtune explain: {self.model}",
                 f"  capture: {self.capture} ({self.graphs} graph{'s' if self.graphs != 1 else ''}, "
                 f"{self.graph_breaks} graph break{'s' if self.graph_breaks != 1 else ''})",
                 "  passes: " + (", ".join(f"{k}={v}" for k, v in self.passes.items()) or "none")]
        if not self.sites:
            lines.append("  no attention sites found: the model is returned unchanged by optimize()")
            return "\n".join(lines)
        lines.append(f"  attention sites: {len(self.sites)}")
        w = max(len(s.module_path or s.node) for s in self.sites)
        for i, s in enumerate(self.sites):
            det = ", ".join(f"{k}={v}" for k, v in s.details.items() if v not in (None, False))
            lines.append(f"  [{i:2d}] {(s.module_path or s.node):<{w}}  {s.form:<12} {det:<40} -> {s.implementation}")
        if self.engine:
            lines.extend("  " + line for line in self.engine.splitlines())
        if self.families:
            lines.append("  op families:")
            w = max(len(n) for n in self.families)
            lines.extend(f"    {n:<{w}}  {text}" for n, text in self.families.items())
        lines.append("  note: shared-prefix and lean decode are per-batch runtime features of graphtune.optimize(); "
                     "torch.compile(backend='graphtune') gets the rewrites and tuned dispatch only")
        return "\n".join(lines)


def _implementation_of(site: AttentionSite, q: tuple | None, k: tuple | None) -> str:
    from graphtune.runtime import describe

    return describe.implementation(site, q, k)


def _family_lines(opts: Options) -> dict[str, str]:
    # one line per declared op family: what it is and how this model's options use it
    out = {}
    for f in families():
        if f.selector:
            on = getattr(opts, f.option) if f.option else True
            how = f"runtime selector, priority {f.priority}, {'on' if on else 'off'}" + (
                f" (option {f.option})" if f.option else "")
        else:
            how = "served per call by tuned dispatch" if f.graph_ops else "called directly by the engine"
        out[f.name] = f"{f.summary} [{how}]"
    return out


def _engine_text(model: nn.Module, args: tuple, kwargs: dict, opts: Options) -> str:
    # the engine's plan for the example batch (its rows: input_ids without the padding)
    if not (_is_generation_model(model) and opts.engine):
        return ""
    from graphtune.runtime.engine import Engine
    from graphtune.runtime.engine.hf_model import unsupported_reason

    reason = unsupported_reason(model)
    if reason:
        return f"generate: Hugging Face's loop ({reason})"
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return "generate: graphtune engine"
    mask = kwargs.get("attention_mask")
    rows = [ids[b][mask[b].bool()].tolist() if isinstance(mask, torch.Tensor) else ids[b].tolist()
            for b in range(ids.shape[0])]
    gen = vars(model).get("generate")  # an optimized model's engine keeps its last call's statistics
    eng = getattr(gen, "_engine", None)
    if not isinstance(eng, Engine):
        eng = Engine(model, speculative=opts.speculative or getattr(gen, "speculative", None),
                     sparse_prefill=opts.sparse_prefill or getattr(gen, "sparse_prefill", None))
    return "generate: graphtune engine\n" + str(eng.plan(rows))


def explain(model: nn.Module, example_inputs: Any, **options: Any) -> Report:
    """Capture and rewrite ``model`` on ``example_inputs`` without changing it; report every attention site.

    Examples
    --------
    >>> import torch, torch.nn.functional as F, graphtune
    >>> class Attn(torch.nn.Module):
    ...     def forward(self, q, k, v):
    ...         return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> q = torch.randn(1, 2, 5, 64)
    >>> rep = graphtune.explain(Attn(), (q, q, q))
    >>> [s.form for s in rep.sites]
    ['sdpa']
    """
    opts = Options.from_kwargs(**options)
    install_runtime()
    if isinstance(vars(model).get("forward"), _OptimizedForward):
        # an optimize()d model: explain the model it wraps (capturing the wrapper would see
        # graphtune's own compiled region as a graph break)
        model = _module_tree_copy(model)
        del model.forward
    method = opts.capture
    if method == "auto" and _is_generation_model(model):
        method = "dynamo"
    args, kwargs = normalize_inputs(example_inputs)
    graphs = capture(model, kwargs if kwargs else args, method)
    report = Report(type(model).__name__, graphs.method, len(graphs), graphs.graph_breaks,
                    families=_family_lines(opts), engine=_engine_text(model, args, kwargs, opts))
    for gi, ir in enumerate(graphs):
        gm = copy_graph_module(ir.gm)
        result: PipelineResult = rewrite_graph(gm, ir.example_inputs, opts)
        for p in result.passes:
            report.passes[p.name] = report.passes.get(p.name, 0) + p.matches
        nodes = {n.name: n for n in result.gm.graph.nodes}
        for site in result.sites:
            node = nodes.get(site.node)
            qm = tensor_meta(node.args[0]) if node is not None else None
            km = tensor_meta(node.args[1]) if node is not None else None
            q = tuple(qm.shape) if qm else None
            k = tuple(km.shape) if km else None
            report.sites.append(SiteReport(gi, site.node, site.module_path, site.form, dict(site.details),
                                           _implementation_of(site, q, k), q, k))
    return report

