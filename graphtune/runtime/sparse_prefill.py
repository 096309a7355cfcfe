"""Sparse prefill in the runtime: an opt-in *selector* (never a graph rewrite) running PBS attention on long prefills.

PBS attention (:mod:`graphtune.codegen.pbs_attention`) is approximate, so it is never inserted by
a rewrite and never on by default. The user opts in with ``optimize(model, sparse_prefill="pbs")``
or ``Engine(model, sparse_prefill="pbs")``; then

* a prefill attention call (queries at the end of an exactly causal key range, no padding) with at
  least ``min_len`` keys runs PBS, layer ``i`` with :meth:`SparsePrefill.for_layer` ``(i)``;
* everything else — decode steps, short prompts, padded batches, speculative verification —
  stays dense and exact.

:class:`SparsePrefill` holds the settings (one :class:`PBSConfig`, optionally per-layer configs
found by ``graphtune tune --accuracy``) and records, per layer, the per-head density chosen at the
last call (:class:`SparseStats`, shown by ``explain`` and the engine's plan).

A PBS failure (a kernel error) falls back to exact dense attention with a warning.

Examples
--------
>>> s = make_sparse("pbs")
>>> s.for_layer(3).tau, s.for_layer(3).permute, s.for_layer(3).sample, s.min_len
(0.94, True, 8, 2048)
>>> make_sparse("block").for_layer(0).permute
False
>>> make_sparse(None) is None
True
"""
from __future__ import annotations

import hashlib
import json
import threading
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

from graphtune import flags
from graphtune.autotune import db as _db
from graphtune.autotune.tuner import is_valid
from graphtune.codegen.pbs_attention.plan import ACCURACY_IMPL
from graphtune.codegen.pbs_attention.op import pbs_attention
from graphtune.codegen.pbs_attention.plan import PBSConfig, PBSPlan, plan_pbs
from graphtune.errors import GraphtuneError, OptionError
from graphtune.ir.ops import flash_cpu
from graphtune.ir.reference import merge_lse
from graphtune.runtime import context
from graphtune.runtime.lean_decode import is_causal_mask, view_key

__all__ = ["SparsePrefill", "SparseStats", "make_sparse", "flag_config", "layer_tiers", "model_key", "tuned_sparse",
           "run_sparse", "select", "install", "uninstall", "describe", "PLAN_NAME", "SHORTHANDS"]

PLAN_NAME = "sparse_prefill"
SHORTHANDS = ("pbs", "block")


@dataclass
class SparseStats:
    """Per-layer density (computed key blocks / causal key blocks, per query head) of the last sparse call."""

    density: dict[int, Tensor] = field(default_factory=dict)  # layer -> [Hq] (batch-mean)
    keys: int = 0  # keys of the last call
    fallbacks: int = 0

    def mean(self) -> float:
        if not self.density:
            return float("nan")
        return float(torch.stack([d.mean() for d in self.density.values()]).mean())

    def describe(self, max_layers: int = 64) -> str:
        if not self.density:
            return "no sparse prefill call yet"
        lines = [f"last sparse prefill: {self.keys} keys, mean density {self.mean():.3f} "
                 f"(computed / causal key blocks){f', {self.fallbacks} dense fallbacks' if self.fallbacks else ''}"]
        for i in sorted(self.density)[:max_layers]:
            d = self.density[i]
            heads = " ".join(f"{x:.2f}" for x in d.tolist())
            lines.append(f"  layer {i:2d}: {float(d.mean()):.3f}  heads [{heads}]")
        return "\n".join(lines)


@dataclass
class SparsePrefill:
    """Settings of sparse prefill: the PBS config (per layer if tuned), the length threshold, the stats sink.

    Parameters
    ----------
    config : PBSConfig
        The config of every layer without its own entry in ``layers``.
    min_len : int
        Shortest key range (prompt) a prefill call must have to run sparse.
    layers : dict, optional
        Layer index -> :class:`PBSConfig` (from ``graphtune tune --accuracy``); a tau >= 1
        entry makes that layer dense.
    source : str
        Where the settings came from (shown by ``explain``).
    """

    config: PBSConfig = field(default_factory=PBSConfig)
    min_len: int = 2048
    layers: Mapping[int, PBSConfig] = field(default_factory=dict)
    source: str = "defaults"
    stats: SparseStats = field(default_factory=SparseStats, compare=False)
    _lock: Any = field(default_factory=threading.Lock, compare=False, repr=False)

    def for_layer(self, layer: int) -> PBSConfig:
        return self.layers.get(layer, self.config)

    def applies(self, keys: int, queries: int) -> bool:
        """Whether a prefill call of ``queries`` at the end of ``keys`` keys runs sparse."""
        b = self.config.block
        return keys >= self.min_len and (keys - queries) % b == 0 and keys > self.config.segment

    def record(self, layer: int, plan: PBSPlan) -> None:
        with self._lock:
            self.stats.density[layer] = plan.density().mean(0).cpu()
            self.stats.keys = plan.n

    def record_dense(self, layer: int, heads: int, keys: int) -> None:
        with self._lock:
            self.stats.density[layer] = torch.ones(heads)
            self.stats.keys = keys

    def describe(self) -> str:
        tuned = f"; per layer: {layer_tiers(self.layers.values())}" if self.layers else ""
        return (f"sparse prefill (approximate, opt-in): PBS {self.config}{tuned} on prefill calls with >= "
                f"{self.min_len} keys; decode dense [{self.source}]")


def layer_tiers(configs: Iterable[PBSConfig]) -> str:
    """How many layers run at each (tau, sampled rows), densest first: ``"1 dense, 7 tau 0.998/16, ..."``."""
    tiers: dict[tuple[float, int], int] = {}
    for c in configs:
        k = (min(1.0, float(c.tau)), c.sample if c.tau < 1.0 else 0)
        tiers[k] = tiers.get(k, 0) + 1
    return ", ".join(f"{n} " + ("dense" if t >= 1.0 else f"tau {t:g}/{r or 'pooled'}")
                     for (t, r), n in sorted(tiers.items(), reverse=True))


def flag_config() -> PBSConfig:
    """The :class:`PBSConfig` the ``SPARSE_PREFILL_*`` flags give (block, segment, tau, sample, select_per, peaks)."""
    return PBSConfig(flags.get("SPARSE_PREFILL_BLOCK"), flags.get("SPARSE_PREFILL_SEGMENT"),
                     flags.get("SPARSE_PREFILL_TAU"), sample=flags.get("SPARSE_PREFILL_SAMPLE"),
                     select_per=flags.get("SPARSE_PREFILL_SELECT_PER"), peaks=flags.get("SPARSE_PREFILL_PEAKS"))


def make_sparse(spec: Any, model: Any = None) -> SparsePrefill | None:
    """The :class:`SparsePrefill` for an option value (``None``/``False``: off); :class:`OptionError` otherwise.

    ``"pbs"`` with a ``model`` uses the per-layer settings ``graphtune tune --accuracy`` stored for that
    model, if the tuning database holds them; else the ``SPARSE_PREFILL_*`` flags.
    """
    if spec is None or spec is False:
        return None
    if isinstance(spec, SparsePrefill):
        return spec
    base = flag_config()
    if isinstance(spec, PBSConfig):
        cfg, src = spec, "given PBSConfig"
    elif spec == "pbs":
        cfg, src = base, "flags"
    elif spec == "block":
        cfg, src = replace(base, permute=False), "flags, no permutation"
    else:
        raise OptionError(f"sparse_prefill={spec!r}: want one of {SHORTHANDS}, a PBSConfig, a SparsePrefill, or None")
    min_len = flags.get("SPARSE_PREFILL_MIN_LEN")
    if min_len < 1:
        raise OptionError(f"GRAPHTUNE_SPARSE_PREFILL_MIN_LEN must be >= 1, got {min_len}")
    if spec == "pbs" and model is not None:
        try:
            tuned = tuned_sparse(model, min_len)
        except Exception as e:  # noqa: BLE001 - an unreadable database must not stop generation
            warnings.warn(f"graphtune sparse prefill: reading accuracy-tuned settings failed ({type(e).__name__}: "
                          f"{e}); using the flags' config", RuntimeWarning, stacklevel=2)
            tuned = None
        if tuned is not None:
            return tuned
        # say so where the settings are shown (explain, Engine.plan): the flags' tau is the throughput
        # setting (next-token top-1 ~0.91 at 8K on SmolLM2), not an accuracy bound
        src = "flags; no accuracy-tuned record for this model: graphtune tune --accuracy makes one"
    return SparsePrefill(cfg, min_len, {}, src)


def model_key(model: Any) -> str:
    """A short hash of the model's architecture config and a sample of its weights (which model this is)."""
    cfg = getattr(model, "config", None)
    d = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {}
    d = {k: v for k, v in d.items() if k not in ("_name_or_path", "name_or_path", "transformers_version",
                                                   "_attn_implementation", "attn_implementation", "torch_dtype",
                                                   "dtype", "_commit_hash")}
    h = hashlib.sha256(type(model).__name__.encode() + json.dumps(d, sort_keys=True, default=str).encode())
    for p in list(model.parameters())[:2]:
        h.update(p.detach().reshape(-1)[:4096].float().numpy().tobytes())
    return h.hexdigest()[:16]


def tuned_sparse(model: Any, min_len: int) -> SparsePrefill | None:
    """The accuracy-tuned settings (``graphtune tune --accuracy``, the database holds for ``model`` (newest valid record), or None."""
    store_ = _db.get_db()
    if store_ is None:
        return None
    recs = [r for r in store_.records("op = ? AND impl = ? AND shape_key = ?",
                                      ("pbs_attention", ACCURACY_IMPL, f"model_{model_key(model)}")) if is_valid(r)]
    if not recs:
        return None
    r = max(recs, key=lambda x: x.created_at)
    p = r.config.get("params", {})
    base = PBSConfig(int(p["BLOCK"]), int(p["SEGMENT"]), 0.9, bool(p.get("PERMUTE", 1)), bool(p.get("SINK", 1)),
                     sample=int(p.get("SAMPLE", 0)),
                     select_per="segment" if p.get("PER_SEGMENT", 0) else "block", peaks=int(p.get("PEAKS", 0)))
    samples = r.details.get("samples", {})  # per-layer sampled rows (records before per-layer taus: none)
    layers = {int(i): replace(base, tau=float(t), sample=int(samples.get(i, base.sample)))
              for i, t in r.details.get("layers", {}).items()}
    return SparsePrefill(base, min_len, layers,
                         f"tuned record {r.record_id[:10]}: top-1 {r.details.get('top1', float('nan')):.4f} >= "
                         f"{r.details.get('min_top1')} on {r.details.get('length')} tokens")


def run_sparse(settings: SparsePrefill, layer: int, q: Tensor, k: Tensor, v: Tensor,
               scale: float | None) -> tuple[Tensor, Tensor]:
    """PBS attention of one layer's prefill call (``q [B,Hq,M,D]`` the last ``M`` of ``k, v [B,Hkv,N,D]``);
    exact dense causal attention (with a warning) if PBS fails."""
    cfg = settings.for_layer(layer)
    if layer in settings.layers and cfg.tau >= 1.0:  # a layer tuned dense: exact attention, no plan
        settings.record_dense(layer, q.shape[1], k.shape[2])
        return _dense(q, k, v, scale)
    try:
        plan = plan_pbs(q, k, cfg, scale, v)
        out = pbs_attention(q, k, v, cfg, scale, plan=plan)
    except GraphtuneError:
        raise
    except Exception as e:  # noqa: BLE001 - a kernel failure must not lose the forward
        settings.stats.fallbacks += 1
        warnings.warn(f"graphtune sparse prefill: PBS attention failed on layer {layer} ({type(e).__name__}: {e}); "
                      "using dense attention", RuntimeWarning, stacklevel=2)
        return _dense(q, k, v, scale)
    settings.record(layer, plan)
    return out


def _dense(q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> tuple[Tensor, Tensor]:
    # exact causal attention of the last M queries over N keys: the N - M earlier keys unmasked, the
    # last M causally (ATen's is_causal is top-left aligned), merged by LSE — as the engine's dense chunks
    M, N = q.shape[2], k.shape[2]
    if q.device.type != "cpu":
        from graphtune.codegen.pbs_attention.reference import dense_causal_ref

        return dense_causal_ref(q, k, v, scale)
    o2, l2 = flash_cpu(q, k[:, :, N - M:], v[:, :, N - M:], None, True, scale)
    if M == N:
        return o2, l2
    o1, l1 = flash_cpu(q, k[:, :, :N - M], v[:, :, :N - M], None, False, scale)
    out, lse = merge_lse(torch.stack([o1, o2]), torch.stack([l1, l2]), 0)
    return out.to(q.dtype), lse


# ---------------------------------------------------------------- the selector (optimize's forward path)

@dataclass
class _ForwardPlan:
    settings: SparsePrefill
    keys: int
    calls: int = 0  # attention calls served (layer = call index: layers run in order)
    masks: dict[Any, bool] = field(default_factory=dict)


def _planner(ctx: context.BatchContext) -> None:
    spec = getattr(ctx.options, "sparse_prefill", None)
    if spec is None or ctx.past_length:  # off, or a decode step: nothing to do
        return
    if isinstance(spec, SparsePrefill):  # optimize() resolved it
        settings = spec
    else:  # options built elsewhere (a backend): resolve once per request
        cached = ctx.state.get("sparse_settings")
        if cached is None or cached[0] is not spec:
            cached = ctx.state["sparse_settings"] = (spec, make_sparse(spec))
        settings = cached[1]
        if settings is None:
            return
    ids, mask = ctx.input_ids, ctx.attention_mask
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[1] < settings.min_len:
        return
    if isinstance(mask, Tensor) and int(torch.count_nonzero(mask)) != mask.numel():
        return  # padded rows: PBS has no padding support; stay dense and exact
    ctx.plans[PLAN_NAME] = _ForwardPlan(settings, int(ids.shape[1]))


def _causal_call(plan: _ForwardPlan, q: Tensor, k: Tensor, mask: Any, is_causal: bool) -> bool:
    M, N = q.shape[2], k.shape[2]
    if N != plan.keys or M != N:
        return False
    if mask is None:
        return bool(is_causal)
    key = view_key(mask)
    ok = plan.masks.get(key)
    if ok is None:
        ok = plan.masks[key] = is_causal_mask(mask, q.shape[0], M, N)
    return ok


def select(op: str, args: tuple, ctx: context.BatchContext | None) -> Callable[..., Any] | None:
    """The PBS implementation for a long causal prefill call of an opted-in model, else None."""
    if ctx is None or op not in ("attention", "attention_with_lse"):
        return None
    plan = ctx.plans.get(PLAN_NAME)
    if plan is None:
        return None
    q, k, v, mask, is_causal = args[:5]
    if not isinstance(q, Tensor) or q.dim() != 4 or not _causal_call(plan, q, k, mask, is_causal):
        return None
    if not plan.settings.applies(k.shape[2], q.shape[2]):
        return None

    def impl(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
        layer = plan.calls
        plan.calls += 1
        out, lse = run_sparse(plan.settings, layer, q, k, v, scale)
        return (out, None) if op == "attention" else (out, lse)

    return impl


def describe(site: Any, q_shape: tuple | None, k_shape: tuple | None) -> str | None:
    """How sparse prefill serves an attention site (for ``graphtune.explain``): only when opted in."""
    return None


def install(priority: int = 8) -> None:
    """Register the sparse-prefill planner and selector (idempotent).

    >>> install(); uninstall()
    """
    context.register_feature(context.Feature(PLAN_NAME, select, priority, plan=_planner, exact=False))


def uninstall() -> None:
    context.unregister_feature(PLAN_NAME)
