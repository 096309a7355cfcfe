"""``graphtune tune --accuracy``: tune sparse prefill per model under a measured accuracy bound, stored in the tuning DB.

Peers ship one sparsity threshold for every model and layer. graphtune measures, on the user's
model and real text (:func:`~graphtune.runtime.sparse_accuracy.calibration_ids`):

1. one dense prefill, keeping the last positions' logits;
2. **per-layer sensitivity**: for each layer alone, the prompt prefilled with only that layer
   sparse (PBS at ``tau``): the next-token KL to dense and the layer's density. Layers differ by
   orders of magnitude (on SmolLM2 at 4K, tau 0.9: layer 7 alone costs KL 9e-3 and 4% of top-1,
   most layers 2e-5..4e-4);
3. layers ordered by KL per unit of attention saved; a binary search finds the longest prefix of
   that order that, sparse together (the rest dense), keeps next-token top-1 agreement with dense
   ``>= min_top1`` over the last positions; the same search again at each higher ``raise_taus``
   (0.97, 0.99: more layers at a higher tau can be sparser than a few at a lower one);
4. the sparsest setting (measured density) that met the bound is kept, and its ``tau`` lowered
   (``refine_taus`` below it: 0.95, 0.9, 0.85, ...) while the bound holds.

Cost: ``L + log2(L) + 1`` prefills of ``length`` tokens, about ``log2(L)`` more per higher tau,
plus a few for the tau refinement (about 45 for a 30-layer model: 850 s for SmolLM2 at 4K on one thread).

The winner is a record of op ``pbs_attention``, kind ``pbs.accuracy`` (a non-kernel record, valid
while the selection code is unchanged), keyed by the model (:func:`model_key`): ``"pbs"``
settings made for that model use it (:func:`tuned_sparse`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from graphtune.autotune import db as _db
from graphtune.autotune import fingerprint
from graphtune.autotune.db_records import Record
from graphtune.codegen.pbs_attention.plan import ACCURACY_IMPL, SELECTION_HASH, PBSConfig
from graphtune.codegen.tuning_key import pow2_bucket
from graphtune.errors import OptionError
from graphtune.runtime.engine.hf_model import ModelRunner
from graphtune.runtime.sparse_accuracy import calibration_ids, capture, compare_logits, sparse_logits
from graphtune.runtime.sparse_prefill import SparsePrefill, flag_config, model_key, tuned_sparse

__all__ = ["model_key", "tuned_sparse", "Candidate", "AccuracyTuning", "LayerSensitivity", "layer_sensitivity", "tune_accuracy",
           "store", "tuned_sparse"]

OP = "pbs_attention"


@dataclass
class Candidate:
    """One setting tried: its per-layer taus, mean density, and (once run) accuracy."""

    name: str
    config: PBSConfig
    layers: dict[int, float]
    density: float
    top1: float | None = None
    kl: float | None = None

    def settings(self, min_len: int) -> SparsePrefill:
        return SparsePrefill(self.config, min_len, {i: replace(self.config, tau=t) for i, t in self.layers.items()},
                             f"candidate {self.name}")


@dataclass
class AccuracyTuning:
    """The outcome of :func:`tune_accuracy` (``best`` None if nothing met the bound)."""

    model: str
    length: int
    min_top1: float
    candidates: list[Candidate] = field(default_factory=list)
    best: Candidate | None = None
    sensitivity: list = field(default_factory=list)  # LayerSensitivity per layer
    record_id: str | None = None
    seconds: float = 0.0

    def table(self) -> str:
        lines = [f"{'layer alone':<40} {'density':>8} {'top-1':>7} {'KL':>9}"]
        lines += [f"layer {x.layer:<34} {x.density:8.3f} {x.top1:7.4f} {x.kl:9.2e}" for x in self.sensitivity]
        lines.append(f"{'candidate':<40} {'density':>8} {'top-1':>7} {'KL':>9}")
        for c in self.candidates:
            t1 = "-" if c.top1 is None else f"{c.top1:.4f}"
            kl = "-" if c.kl is None else f"{c.kl:.2e}"
            mark = "  <- chosen" if c is self.best else ""
            lines.append(f"{c.name:<40} {c.density:8.3f} {t1:>7} {kl:>9}{mark}")
        return "\n".join(lines)


@dataclass
class LayerSensitivity:
    """One layer sparse alone: its density and what it costs the next-token distribution."""

    layer: int
    density: float
    top1: float
    kl: float


def layer_sensitivity(model: Any, ids: torch.Tensor, dense_logits: torch.Tensor, config: PBSConfig, keep: int,
                      min_len: int, progress: Callable[[str], None]) -> list[LayerSensitivity]:
    """For each layer: the prompt prefilled with only that layer sparse (``config``), vs dense."""
    n = ModelRunner(model).num_layers
    dense = replace(config, tau=1.0)
    out = []
    for i in range(n):
        s = SparsePrefill(config, min_len, {j: (config if j == i else dense) for j in range(n)})
        top1, kl = compare_logits(dense_logits, sparse_logits(model, ids, s, keep))
        d = s.stats.density.get(i)
        out.append(LayerSensitivity(i, 1.0 if d is None else float(d.mean()), top1, kl))
        progress(f"layer {i} alone: density {out[-1].density:.3f}, top-1 {top1:.4f}, KL {kl:.2e}")
    return out


def tune_accuracy(model: Any, tokenizer: Any, *, length: int = 4096, min_top1: float = 0.99, keep: int = 512,
                  config: PBSConfig | None = None, max_runs: int = 8, min_len: int | None = None,
                  refine_taus: Sequence[float] = (0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5),
                  raise_taus: Sequence[float] = (0.97, 0.99),
                  progress: Callable[[str], None] | None = None, ids: torch.Tensor | None = None) -> AccuracyTuning:
    """Find the sparsest per-layer PBS setting whose top-1 agreement with dense is ``>= min_top1``.

    See the module docstring. ``config`` gives block, segment and the sparse layers' ``tau``
    (default: the flags'); ``max_runs`` bounds the binary search's end-to-end prefills.
    """
    if not 0.0 < min_top1 <= 1.0:
        raise OptionError(f"--min-top1 must be in (0, 1], got {min_top1}")
    say = progress or (lambda s: None)
    t0 = time.perf_counter()
    cfg = config or flag_config()
    ids = calibration_ids(tokenizer, length) if ids is None else ids
    ml = min_len if min_len is not None else min(ids.numel(), 2 * cfg.segment + cfg.block)
    say(f"dense prefill of {ids.numel()} calibration tokens")
    dense_logits = capture(model, ids, keep, qkv=False).logits
    sens = layer_sensitivity(model, ids, dense_logits, cfg, keep, ml, say)
    res = AccuracyTuning(model_key(model), ids.numel(), min_top1, sensitivity=sens)
    order = sorted(sens, key=lambda x: x.kl / max(1e-6, 1.0 - x.density))
    L = len(sens)

    def candidate(j: int, tau: float) -> Candidate:
        sparse = {x.layer for x in order[:j]}
        layers = {x.layer: (tau if x.layer in sparse else 1.0) for x in sens}
        # a layer's density at another tau is not measured: the measured one bounds it from above
        dens = sum(x.density if x.layer in sparse else 1.0 for x in sens) / L
        name = ("all layers" if j == L else f"{j} least sensitive layers") + f", tau {tau:g}"
        return Candidate(name, replace(cfg, tau=tau), layers, dens)

    tried: dict[tuple[int, float], Candidate] = {}

    def ok(j: int, tau: float = cfg.tau) -> bool:
        c = tried[(j, tau)] = candidate(j, tau)
        s = c.settings(ml)
        c.top1, c.kl = compare_logits(dense_logits, sparse_logits(model, ids, s, keep))
        c.density = s.stats.mean() if s.stats.density else c.density
        say(f"end to end: {c.name} (density {c.density:.3f}): top-1 {c.top1:.4f}, KL {c.kl:.2e}")
        return c.top1 >= min_top1

    runs = 0

    def most_layers(tau: float, lo: int, budget: int) -> int:
        # binary search: the most layers (of the sensitivity order) that meet the bound at `tau`, given
        # that `lo` layers are known to (0: none); at most `budget` prefills
        nonlocal runs
        hi, used = L, 0
        while lo < hi and used < max(1, budget):
            mid = hi if used == 0 else (lo + hi + 1) // 2  # all layers first: the common case on big models
            used += 1
            runs += 1
            if ok(mid, tau):
                lo = mid
            else:
                hi = mid - 1
        if lo > 0 and (lo, tau) not in tried:  # the search ended on a bound it never ran
            runs += 1
            if not ok(lo, tau):
                lo = 0
        return lo

    n0 = most_layers(cfg.tau, 0, max_runs)
    # a higher tau on more layers can be sparser than cfg.tau on few: search each (fewer prefills:
    # at least as many layers as at a lower tau meet the bound, so the search starts there)
    for t in sorted(x for x in raise_taus if x > cfg.tau):
        most_layers(t, n0, max(1, max_runs // 2))

    def met() -> list[tuple[int, float]]:
        return [key for key, c in tried.items() if key[0] > 0 and c.top1 is not None and c.top1 >= min_top1]

    best_key = min(met(), key=lambda key: tried[key].density, default=None)
    # then a lower tau for the chosen layers, while the bound holds
    for t in (x for x in refine_taus if best_key is not None and x < best_key[1]):
        if runs >= max_runs * 2 + len(refine_taus) + len(raise_taus):
            break
        runs += 1
        if not ok(best_key[0], t):
            break
        best_key = min(met(), key=lambda key: tried[key].density)
    res.candidates = [tried[k] for k in sorted(tried, key=lambda k: (-k[0], -k[1]))]
    res.best = tried.get(best_key) if best_key is not None else None
    res.seconds = time.perf_counter() - t0
    return res


def store(res: AccuracyTuning) -> Record | None:
    """Write ``res.best`` to the tuning database (``None``: nothing met the bound, nothing written)."""
    c = res.best
    if c is None:
        return None
    fp = fingerprint.current("cpu")
    rec = Record(op=OP, impl=ACCURACY_IMPL, source_hash=SELECTION_HASH, device="any", device_name="any",
                 versions=fp.versions, shape_key=f"model_{res.model}", q_bucket=pow2_bucket(res.length),
                 kv_bucket=pow2_bucket(res.length),
                 config={"params": {"BLOCK": c.config.block, "SEGMENT": c.config.segment,
                                    "PERMUTE": int(c.config.permute), "SINK": int(c.config.sink),
                                    "SAMPLE": c.config.sample}},
                 median_us=None, p20_us=None, p80_us=None, n_samples=0, default_us=None, mode="static",
                 details={"layers": {str(i): t for i, t in c.layers.items()}, "top1": c.top1, "kl": c.kl,
                          "density": c.density, "min_top1": res.min_top1, "candidate": c.name, "tau": c.config.tau,
                          "calibration": "python stdlib sources", "length": res.length})
    got = _db.get_db().put(rec)
    res.record_id = got.record_id
    return got
