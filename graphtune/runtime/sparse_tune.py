"""``graphtune tune --accuracy``: tune sparse prefill per model and per layer under a measured accuracy bound, stored in the tuning DB.

Peers ship one sparsity threshold for every model and layer. graphtune measures, on the user's
model and real text (:func:`~graphtune.runtime.sparse_accuracy.calibration_ids`):

1. one dense prefill, keeping the last positions' logits;
2. **per-layer sensitivity**: for each layer alone, the prompt prefilled with only that layer
   sparse (PBS at the config's ``tau``): the next-token KL to dense and the layer's density.
   Layers differ by orders of magnitude (SmolLM2 at 4K, tau 0.95: layer 18 alone costs KL 1e-2,
   layer 9 5e-5);
3. **a tau per layer**: each layer gets the sparsest rung of a ladder (``ladder``: tau 0.9 ..
   0.998, the rungs from 0.99 up with twice the sampled rows, which their accuracy needs) whose
   *predicted* KL stays under a budget ``beta``, else stays dense. The prediction scales the
   measured KL by ``((1 - tau) / (1 - tau0)) ** 1.5`` (fitted on SmolLM2: uniform tau 0.95 -> 0.99
   -> 0.998 lowers KL 9x then 17x); it only ranks, every candidate is measured end to end. A
   larger ``beta`` makes every layer sparser, so a binary search over the ``beta`` values where
   some layer changes rung finds the sparsest assignment whose top-1 agreement with dense over the
   last positions is ``>= min_top1`` (at most ``max_runs`` prefills).

On SmolLM2 at 8K (other text than the calibration's), per-layer taus are far better than one:
at density 0.57, uniform tau 0.998 reaches top-1 0.990; 5 layers dense, 10 at 0.998 and 15 at
0.99 reach 0.996 (``docs/ops/sparse-prefill.md``).

Cost: ``(L + 1) / 2 + 1 + max_runs`` prefills of ``length`` tokens: the per-layer runs start at
their layer from the dense prefill's recorded layer outputs (about 26.5 for a 30-layer model, 41
before; measured times in ``docs/ops/sparse-prefill.md``).

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
from graphtune.runtime.sparse_accuracy import Capture, calibration_ids, capture, compare_logits, sparse_logits
from graphtune.runtime.sparse_prefill import SparsePrefill, flag_config, layer_tiers, model_key, tuned_sparse

__all__ = ["model_key", "tuned_sparse", "Candidate", "AccuracyTuning", "LayerSensitivity", "layer_sensitivity", "tune_accuracy",
           "store", "POSITIONS", "LADDER", "KL_EXPONENT", "HIGH_TAU", "rung_sample", "assign", "predicted_kl"]

OP = "pbs_attention"


@dataclass
class Candidate:
    """One setting tried: per-layer taus (1.0: dense) and sampled rows, mean density, and (once run) accuracy."""

    name: str
    config: PBSConfig
    layers: dict[int, float]
    density: float
    top1: float | None = None
    kl: float | None = None
    samples: dict[int, int] = field(default_factory=dict)  # layer -> sampled rows (default: config.sample)

    def layer_config(self, i: int) -> PBSConfig:
        return replace(self.config, tau=self.layers.get(i, self.config.tau), sample=self.samples.get(i, self.config.sample))

    def settings(self, min_len: int) -> SparsePrefill:
        return SparsePrefill(self.config, min_len, {i: self.layer_config(i) for i in self.layers}, f"candidate {self.name}")


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
    positions: int = 0  # the last positions top-1 and KL were measured over
    calibration: str = "python stdlib sources"  # what text the bound was measured on

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


def layer_sensitivity(model: Any, ids: torch.Tensor, dense: Capture, config: PBSConfig, keep: int,
                      min_len: int, progress: Callable[[str], None]) -> list[LayerSensitivity]:
    """For each layer: the prompt prefilled with only that layer sparse (``config``), vs dense.

    Layer ``i``'s run starts at layer ``i`` from ``dense``'s recorded layer outputs (a
    :func:`~graphtune.runtime.sparse_accuracy.capture` with ``layer_outputs=True``; without them every
    run starts at layer 0): the layers before it are dense, so they would recompute exactly those.
    """
    n = ModelRunner(model).num_layers
    dense_cfg = replace(config, tau=1.0)
    out = []
    for i in range(n):
        s = SparsePrefill(config, min_len, {j: (config if j == i else dense_cfg) for j in range(n)})
        resume = (i, dense) if len(dense.layer_outputs) >= i else None
        top1, kl = compare_logits(dense.logits, sparse_logits(model, ids, s, keep, resume=resume))
        d = s.stats.density.get(i)
        out.append(LayerSensitivity(i, 1.0 if d is None else float(d.mean()), top1, kl))
        progress(f"layer {i} alone: density {out[-1].density:.3f}, top-1 {top1:.4f}, KL {kl:.2e}")
    return out


# the last calibration positions the bound is measured on, at most. 512 (the earlier default) let the
# binary search keep a setting that met top-1 >= 0.99 by chance: SmolLM2 tuned at 8K with peaks=1
# had 0.9902 on 512 calibration positions and 0.9863 on other text (docs/ops/sparse-prefill.md)
POSITIONS = 2048
LADDER = (0.9, 0.95, 0.97, 0.99, 0.995, 0.998)  # the taus a layer can get, sparsest first (then dense)
KL_EXPONENT = 1.5  # predicted KL(tau) = KL(tau0) * ((1 - tau) / (1 - tau0)) ** KL_EXPONENT
HIGH_TAU = 0.99  # rungs from here up sample twice the rows (SmolLM2 8K, tau 0.995: 8 rows top-1 0.967, 16 rows 0.981)


def rung_sample(config: PBSConfig, tau: float) -> int:
    """Sampled rows a ladder rung uses: the config's, doubled (up to the block) from ``HIGH_TAU`` up; 0 stays 0."""
    s = config.sample
    return min(config.block, 2 * s) if s and tau >= HIGH_TAU else s


def assign(sens: Sequence[LayerSensitivity], base_tau: float, ladder: Sequence[float], beta: float) -> dict[int, float]:
    """Layer -> tau: the sparsest ``ladder`` rung whose predicted KL is ``<= beta``, else 1.0 (dense)."""
    out = {}
    for x in sens:
        out[x.layer] = next((t for t in sorted(ladder) if predicted_kl(x, base_tau, t) <= beta), 1.0)
    return out


def predicted_kl(x: LayerSensitivity, base_tau: float, tau: float) -> float:
    """The KL layer ``x`` alone is predicted to cost at ``tau``, from its measurement at ``base_tau``."""
    return x.kl * (max(1e-9, 1.0 - tau) / max(1e-9, 1.0 - base_tau)) ** KL_EXPONENT


def tune_accuracy(model: Any, tokenizer: Any, *, length: int = 4096, min_top1: float = 0.99, keep: int | None = None,
                  config: PBSConfig | None = None, max_runs: int = 10, min_len: int | None = None,
                  ladder: Sequence[float] = LADDER,
                  progress: Callable[[str], None] | None = None, ids: torch.Tensor | None = None,
                  calibration: str | None = None) -> AccuracyTuning:
    """Find the sparsest per-layer PBS setting whose top-1 agreement with dense is ``>= min_top1``.

    See the module docstring. ``config`` gives block, segment, sampled rows and the ``tau`` the
    sensitivity is measured at (default: the flags'); ``ladder`` the taus a layer can get;
    ``max_runs`` bounds the search's end-to-end prefills; ``keep`` is how many last positions the
    bound is measured on (default ``min(POSITIONS, length // 4)``); ``calibration`` names what ``ids``
    are, for the record (default: the stdlib sources of :func:`calibration_ids`).
    """
    if not 0.0 < min_top1 <= 1.0:
        raise OptionError(f"--min-top1 must be in (0, 1], got {min_top1}")
    if not ladder or not all(0.0 < float(t) < 1.0 for t in ladder):
        raise OptionError(f"the tau ladder must be taus in (0, 1), got {tuple(ladder)}")
    say = progress or (lambda s: None)
    t0 = time.perf_counter()
    cfg = config or flag_config()
    ids = calibration_ids(tokenizer, length) if ids is None else ids
    keep = min(POSITIONS, max(1, ids.numel() // 4)) if keep is None else keep
    ml = min_len if min_len is not None else min(ids.numel(), 2 * cfg.segment + cfg.block)
    say(f"dense prefill of {ids.numel()} calibration tokens")
    dense = capture(model, ids, keep, qkv=False, layer_outputs=True)  # each layer's output: the runs below resume
    dense_logits = dense.logits
    sens = layer_sensitivity(model, ids, dense, cfg, keep, ml, say)
    dense.layer_outputs.clear()  # N x hidden floats per layer: not needed past the sensitivity runs
    res = AccuracyTuning(model_key(model), ids.numel(), min_top1, sensitivity=sens, positions=int(dense_logits.shape[0]))
    if calibration is not None:
        res.calibration = calibration
    base = float(cfg.tau)
    # every budget at which some layer changes rung, ascending: a larger one is sparser everywhere
    betas = sorted({predicted_kl(x, base, t) for x in sens for t in ladder})

    def candidate(beta: float) -> Candidate:
        taus = assign(sens, base, ladder, beta)
        c = Candidate("", cfg, taus, float("nan"), samples={i: rung_sample(cfg, t) for i, t in taus.items() if t < 1.0})
        c.name = f"KL budget {beta:.1e}: {layer_tiers(c.layer_config(i) for i in taus)}"
        return c

    def ok(j: int) -> bool:
        c = tried[j] = candidate(betas[j])
        s = c.settings(ml)
        c.top1, c.kl = compare_logits(dense_logits, sparse_logits(model, ids, s, keep))
        c.density = s.stats.mean()
        say(f"end to end: {c.name} (density {c.density:.3f}): top-1 {c.top1:.4f}, KL {c.kl:.2e}")
        return c.top1 >= min_top1

    tried: dict[int, Candidate] = {}
    lo, hi, runs = -1, len(betas) - 1, 0  # lo: the largest budget known to meet the bound (-1: none)
    while lo < hi and runs < max(1, max_runs):
        mid = hi if runs == 0 else (lo + hi + 1) // 2  # the sparsest first: it often holds on big models
        runs += 1
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    met = [c for c in tried.values() if c.top1 is not None and c.top1 >= min_top1]
    res.candidates = [tried[j] for j in sorted(tried, reverse=True)]
    res.best = min(met, key=lambda c: c.density) if met else None
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
                                    "SAMPLE": c.config.sample,
                                    "PER_SEGMENT": int(c.config.select_per == "segment"),
                                    "PEAKS": c.config.peaks}},
                 median_us=None, p20_us=None, p80_us=None, n_samples=0, default_us=None, mode="static",
                 details={"layers": {str(i): t for i, t in c.layers.items()},
                          "samples": {str(i): r for i, r in c.samples.items()}, "top1": c.top1, "kl": c.kl,
                          "density": c.density, "min_top1": res.min_top1, "candidate": c.name, "tau": c.config.tau,
                          "calibration": res.calibration, "length": res.length,
                          "positions": res.positions})
    got = _db.get_db().put(rec)
    res.record_id = got.record_id
    return got
