"""``graphtune tune --accuracy``: tune sparse prefill per model under a measured accuracy bound, stored in the tuning DB.

Peers ship one sparsity threshold for every model and layer. graphtune measures, on the user's
model and real text (:func:`~graphtune.runtime.sparse_accuracy.calibration_ids`):

1. one dense prefill, keeping every layer's ``q, k, v`` and the last positions' logits;
2. per layer and candidate ``tau``: the attention *recall* and *density* of the PBS plan
   (:func:`graphtune.codegen.pbs_attention.stats.kept_mass`: cheap, no model forward);
3. candidate settings: a uniform ``tau``, or per layer the sparsest ``tau`` whose recall reaches a
   target ``r`` (layers whose attention is spread get a larger tau, peaked ones a smaller);
4. each candidate, sparsest first, runs the prompt end to end; the first whose next-token top-1
   agreement with dense over the last positions is ``>= min_top1`` wins (the densest candidate is
   the fallback, reported as failing the bound).

The winner is a record of op ``pbs_attention``, implementation ``pbs.accuracy`` (valid while the
selection code is unchanged), keyed by the model (:func:`model_key`): ``SparsePrefill``
settings made for that model with ``"pbs"`` (:func:`tuned_sparse`) use it.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from graphtune.autotune import db as _db
from graphtune.autotune import fingerprint
from graphtune.autotune.db_records import Record
from graphtune.autotune.tuner import is_valid
from graphtune.codegen.pbs_attention.plan import ACCURACY_IMPL, SELECTION_HASH, PBSConfig, plan_pbs
from graphtune.codegen.pbs_attention.stats import kept_mass
from graphtune.codegen.tuning_key import pow2_bucket
from graphtune.errors import OptionError
from graphtune.runtime.sparse_accuracy import Capture, calibration_ids, capture, compare_logits, sparse_logits
from graphtune.runtime.sparse_prefill import SparsePrefill

__all__ = ["model_key", "Candidate", "AccuracyTuning", "tune_accuracy", "store", "tuned_sparse", "recall_table"]

OP = "pbs_attention"
TAUS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
RECALL_TARGETS = (0.85, 0.9, 0.93, 0.95, 0.97, 0.99)


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
    record_id: str | None = None
    seconds: float = 0.0

    def table(self) -> str:
        lines = [f"{'candidate':<26} {'density':>8} {'top-1':>7} {'KL':>9}"]
        for c in self.candidates:
            t1 = "-" if c.top1 is None else f"{c.top1:.4f}"
            kl = "-" if c.kl is None else f"{c.kl:.5f}"
            mark = "  <- chosen" if c is self.best else ""
            lines.append(f"{c.name:<26} {c.density:8.3f} {t1:>7} {kl:>9}{mark}")
        return "\n".join(lines)


def recall_table(cap: Capture, config: PBSConfig, taus: Sequence[float]) -> dict[float, list[tuple[float, float]]]:
    """``tau -> [(recall, density) per layer]`` of PBS plans on the captured ``q, k, v`` (worst head's recall)."""
    out: dict[float, list[tuple[float, float]]] = {}
    for tau in taus:
        cfg = replace(config, tau=tau)
        rows = []
        for q, k, v in cap.qkv:
            plan = plan_pbs(q, k, cfg)
            rec = kept_mass(q, k, plan).mean(-1)  # [B, Hq]
            rows.append((float(rec.min()), float(plan.density().mean())))
        out[tau] = rows
    return out


def _candidates(table: dict[float, list[tuple[float, float]]], config: PBSConfig,
                targets: Sequence[float]) -> list[Candidate]:
    taus = sorted(table)
    L = len(next(iter(table.values())))
    cands = [Candidate(f"uniform tau={t:g}", config, {i: t for i in range(L)},
                       sum(d for _, d in table[t]) / L) for t in taus]
    for r in targets:
        layers, dens = {}, 0.0
        for i in range(L):
            # the sparsest tau whose worst head keeps >= r of the attention mass; else dense
            ok = [t for t in taus if table[t][i][0] >= r]
            t = min(ok) if ok else 1.0
            layers[i] = t
            dens += table[t][i][1] if t in table else 1.0
        cands.append(Candidate(f"recall>={r:g} per layer", config, layers, dens / L))
    uniq: dict[tuple, Candidate] = {}
    for c in cands:
        uniq.setdefault(tuple(sorted(c.layers.items())), c)
    return sorted(uniq.values(), key=lambda c: c.density)


def tune_accuracy(model: Any, tokenizer: Any, *, length: int = 4096, min_top1: float = 0.99, keep: int = 512,
                  config: PBSConfig | None = None, taus: Sequence[float] = TAUS,
                  targets: Sequence[float] = RECALL_TARGETS, max_runs: int = 6, min_len: int | None = None,
                  progress: Callable[[str], None] | None = None, ids: torch.Tensor | None = None) -> AccuracyTuning:
    """Find the sparsest PBS setting whose top-1 agreement with dense is ``>= min_top1`` (see the module docstring).

    ``max_runs`` bounds the end-to-end prefills (each ~ one dense prefill of ``length`` tokens).
    """
    if not 0.0 < min_top1 <= 1.0:
        raise OptionError(f"--min-top1 must be in (0, 1], got {min_top1}")
    say = progress or (lambda s: None)
    t0 = time.perf_counter()
    cfg = config or PBSConfig()
    ids = calibration_ids(tokenizer, length) if ids is None else ids
    say(f"dense prefill of {ids.numel()} calibration tokens")
    cap = capture(model, ids, keep)
    say("recall/density of every layer at each tau")
    table = recall_table(cap, cfg, taus)
    res = AccuracyTuning(model_key(model), ids.numel(), min_top1, _candidates(table, cfg, targets))
    ml = min_len if min_len is not None else min(ids.numel(), 2 * cfg.segment + cfg.block)
    cap.qkv.clear()
    for c in res.candidates[: max(1, max_runs)]:
        say(f"end to end: {c.name} (density {c.density:.3f})")
        c.top1, c.kl = compare_logits(cap.logits, sparse_logits(model, ids, c.settings(ml), keep))
        if c.top1 >= min_top1:
            res.best = c
            break
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
                                    "PERMUTE": int(c.config.permute), "SINK": int(c.config.sink)}},
                 median_us=None, p20_us=None, p80_us=None, n_samples=0, default_us=None, mode="static",
                 details={"layers": {str(i): t for i, t in c.layers.items()}, "top1": c.top1, "kl": c.kl,
                          "density": c.density, "min_top1": res.min_top1, "candidate": c.name,
                          "calibration": "python stdlib sources", "length": res.length})
    got = _db.get_db().put(rec)
    res.record_id = got.record_id
    return got


def tuned_sparse(model: Any, min_len: int) -> SparsePrefill | None:
    """The accuracy-tuned settings the database holds for ``model`` (newest valid record), or None."""
    store_ = _db.get_db()
    if store_ is None:
        return None
    recs = [r for r in store_.records("op = ? AND impl = ? AND shape_key = ?", (OP, ACCURACY_IMPL, f"model_{model_key(model)}"))
            if is_valid(r)]
    if not recs:
        return None
    r = max(recs, key=lambda x: x.created_at)
    p = r.config.get("params", {})
    base = PBSConfig(int(p["BLOCK"]), int(p["SEGMENT"]), 0.9, bool(p.get("PERMUTE", 1)), bool(p.get("SINK", 1)))
    layers = {int(i): replace(base, tau=float(t)) for i, t in r.details.get("layers", {}).items()}
    return SparsePrefill(base, min_len, layers,
                         f"tuned record {r.record_id[:10]}: top-1 {r.details.get('top1', float('nan')):.4f} >= "
                         f"{r.details.get('min_top1')} on {r.details.get('length')} tokens")
