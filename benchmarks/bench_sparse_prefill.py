"""PBS sparse prefill on the real SmolLM2-135M-Instruct: speed vs dense causal attention, and what it costs in accuracy.

Workloads (issue "Permuted block-sparse prefill"), same-run ratios, medians over
``GRAPHTUNE_BENCH_ROUNDS`` interleaved rounds (default 2), torch on ``GRAPHTUNE_BENCH_THREADS``
threads (default 1):

0. **Settings** (module fixture): *tuned*: ``graphtune tune --accuracy``'s per-layer choice on 4K
   calibration tokens (Python stdlib sources, tokens 0..4K), bound top-1 >= 99% over the last 1024
   positions (the record in
   ``GRAPHTUNE_DB`` if one is stored for SmolLM2, else tuned here); *uniform*: graphtune's default
   (tau 0.94 of each query block's mass, by 8 sampled rows per block, one set per query segment)
   on every layer; *paper*: the paper's selection (tau 0.9 of pooled block estimates, per query
   block) on every layer. All are evaluated on
   *other* text (tokens 16K..24K). The model's
   linear layers are tuned first (``tune_model_linears``), so the engine rows run what a
   deployment runs: dense and sparse prefill alike get the tuned linears.
1. Prefill attention at 8K, all 30 layers, on the model's real q/k/v: causal SDPA (ATen flash) vs
   PBS (plan + attention), both settings. Per layer: recall, density, relative output error.
2. At equal tau (0.8 .. 0.99), every third layer: recall and density of PBS (sampled rows), the
   no-permutation variant, the paper's pooled estimate and the oracle (true block mass), and the
   density each needs for a mean recall of 0.95 / 0.97.
3. Synthetic 32K, 1 layer, 8 heads (GQA 8/2, d=64, planted heavy keys), tau bisected to the 8K
   real model's mean density: causal SDPA vs PBS.
4. End to end in the engine at 8K: dense vs sparse prefill (``Engine(sparse_prefill=...)``),
   next-token top-1 agreement and KL over the prompt's last 512 positions, greedy continuation
   identity for 32 tokens, and a profile of where the sparse prefill's time goes.
5. Passkey retrieval: a number at 10 depths of ~8K filler, dense vs sparse (``-k passkey``; long).

Run: ``.venv/bin/python -m pytest -q benchmarks/bench_sparse_prefill.py -s`` (~25 min; passkey ~15 more).
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import replace
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from bench_engine import _fmt, profile_breakdown, smol, tune_model_linears  # noqa: E402,F401  (smol: the module's model fixture)

ROUNDS = int(os.environ.get("GRAPHTUNE_BENCH_ROUNDS", "2"))
N = int(os.environ.get("GRAPHTUNE_BENCH_SPARSE_LEN", "8192"))
CALIB = int(os.environ.get("GRAPHTUNE_BENCH_SPARSE_CALIB", "4096"))
_shared: dict[str, Any] = {}


@pytest.fixture(scope="module")
def tuned(smol):
    """Two settings, and the dense 8K capture of the evaluation text.

    ``tuned``: the accuracy-tuned per-layer settings (the record ``graphtune tune --accuracy`` stored
    for SmolLM2 in ``GRAPHTUNE_DB``, else tuned here on calibration tokens 0..4K, bound top-1 >= 99%);
    ``uniform``: the default PBSConfig on every layer, the speed setting; ``paper``: the paper's
    pooled estimate at its tau 0.9 on every layer.
    """
    from graphtune.codegen.pbs_attention.plan import PBSConfig
    from graphtune.runtime.sparse_accuracy import calibration_ids, capture
    from graphtune.runtime.sparse_prefill import SparsePrefill
    from graphtune.runtime.sparse_tune import store, tune_accuracy, tuned_sparse

    model, tok = smol
    tune_model_linears(model)  # the engine runs tuned linears (prefill chunks too), as deployed
    settings = tuned_sparse(model, 2048)
    if settings is None:
        t = time.perf_counter()
        res = tune_accuracy(model, tok, length=CALIB, min_top1=0.99, config=PBSConfig(), progress=print)
        print(res.table(), f"\ntuning took {time.perf_counter() - t:.0f} s")
        assert res.best is not None, "no layer can run sparse with top-1 >= 0.99 on the calibration text"
        store(res)
        settings = tuned_sparse(model, 2048)
    print(f"tuned settings: {settings.source}; sparse layers "
          f"{sorted(i for i, c in settings.layers.items() if c.tau < 1)}")
    ids = calibration_ids(tok, N, offset=2 * N)  # evaluation text: disjoint from the calibration tokens
    cap = capture(model, ids, keep=512)
    return {"tuned": settings, "uniform": SparsePrefill(PBSConfig(), 2048, {}, f"uniform {PBSConfig()}"),
            "paper": SparsePrefill(PBSConfig(tau=0.9, sample=0, select_per="block"), 2048, {},
                                   "paper: uniform tau 0.9, pooled, per block"),
            "ids": ids, "cap": cap}


def _median_times(fns: dict[str, Any], rounds: int = ROUNDS) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def test_prefill_attention_8k_real_qkv_all_layers(benchmark, tuned):
    from graphtune.codegen.pbs_attention.op import pbs_attention
    from graphtune.codegen.pbs_attention.plan import plan_pbs
    from graphtune.codegen.pbs_attention.stats import head_stats
    from graphtune.ir.ops import flash_cpu

    cap = tuned["cap"]

    def dense():
        for q, k, v in cap.qkv:
            flash_cpu(q, k, v, None, True, None)

    def sparse(s):
        def run():
            for i, (q, k, v) in enumerate(cap.qkv):
                cfg = s.for_layer(i)
                if cfg.tau >= 1.0 and i in s.layers:  # a layer tuned dense runs dense
                    flash_cpu(q, k, v, None, True, None)
                else:
                    pbs_attention(q, k, v, plan=plan_pbs(q, k, cfg))
        return run

    med = _median_times({"sdpa_causal": dense, "pbs_uniform": sparse(tuned["uniform"]),
                         "pbs_paper": sparse(tuned["paper"]), "pbs_tuned": sparse(tuned["tuned"])})
    info: dict[str, Any] = {"sdpa_causal_s": med["sdpa_causal"], "tokens": N,
                            "goals": {"speedup_uniform": 3.0, "recall_mean_uniform": 0.95}}
    for name in ("uniform", "paper", "tuned"):
        s = tuned[name]
        rows = []
        for i, (q, k, v) in enumerate(cap.qkv):
            cfg = s.for_layer(i)
            if cfg.tau >= 1.0 and i in s.layers:
                rows.append({"layer": i, "tau": 1.0, "recall": 1.0, "recall_min": 1.0, "density": 1.0, "rel_err": 0.0})
                continue
            st = head_stats(q, k, v, plan_pbs(q, k, cfg))
            rows.append({"layer": i, "tau": cfg.tau, **st.summary()})
        recall = statistics.mean(r["recall"] for r in rows)
        density = statistics.mean(r["density"] for r in rows)
        if name == "uniform":
            _shared["density"] = density
        info.update({f"pbs_{name}_s": med[f"pbs_{name}"], f"speedup_{name}": med["sdpa_causal"] / med[f"pbs_{name}"],
                     f"recall_mean_{name}": recall, f"recall_min_layer_{name}": min(r["recall"] for r in rows),
                     f"density_mean_{name}": density,
                     f"rel_err_mean_{name}": statistics.mean(r["rel_err"] for r in rows), f"layers_{name}": rows})
        print(f"\n8K prefill attention, 30 layers, {s.source}: SDPA {med['sdpa_causal']:.2f}s, PBS "
              f"{med['pbs_' + name]:.2f}s -> {info['speedup_' + name]:.2f}x; recall {recall:.4f} (worst layer "
              f"{info['recall_min_layer_' + name]:.4f}), density {density:.3f}, rel err {info['rel_err_mean_' + name]:.4f}")
        for r in rows:
            print(f"  layer {r['layer']:2d} tau {r['tau']:.2f}: recall {r['recall']:.4f} (min head {r['recall_min']:.4f}) "
                  f"density {r['density']:.3f} rel err {r['rel_err']:.4f}")
    benchmark.extra_info.update(info)
    benchmark.pedantic(lambda: None, rounds=1)


def test_pbs_vs_no_permutation_and_estimators_at_equal_tau(benchmark, tuned):
    """Recall and density at equal tau, every third layer: PBS (sampled rows, one set per query segment:
    the default) vs per-block selection, the no-permutation variant, the paper's pooled estimate (per
    block), and the oracle (true block mass, per segment)."""
    from graphtune.codegen.pbs_attention.plan import PBSConfig, plan_pbs
    from graphtune.codegen.pbs_attention.stats import kept_mass, oracle_plan

    cap = tuned["cap"]
    out: dict[str, Any] = {}
    variants = {"pbs": dict(), "per_block": dict(select_per="block"), "noperm": dict(permute=False),
                "pooled": dict(sample=0, select_per="block"), "oracle": dict()}
    curves: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    layers = list(range(0, len(cap.qkv), 3))  # every third layer: recall needs the full softmax (~3 s a layer)
    out["layers"] = layers
    for tau in (0.8, 0.9, 0.95, 0.97, 0.99):
        for name, kw in variants.items():
            rec, den = [], []
            for q, k, v in (cap.qkv[i] for i in layers):
                cfg = PBSConfig(tau=tau, **kw)
                plan = oracle_plan(q, k, cfg) if name == "oracle" else plan_pbs(q, k, cfg)
                rec.append(float(kept_mass(q, k, plan).mean()))
                den.append(float(plan.density().mean()))
            r, d = statistics.mean(rec), statistics.mean(den)
            out[f"tau{tau}_{name}"] = {"recall": r, "density": d, "recall_min_layer": min(rec)}
            curves[name].append((r, d))
            print(f"tau {tau:.2f} {name:7s}: recall {r:.4f} (worst layer {min(rec):.4f}) density {d:.3f}")

    def density_at(recall: float, pts: list[tuple[float, float]]) -> float | None:
        pts = sorted(pts)
        for (r0, d0), (r1, d1) in zip(pts, pts[1:]):
            if r0 <= recall <= r1 and r1 > r0:
                return d0 + (d1 - d0) * (recall - r0) / (r1 - r0)
        return None

    for target in (0.95, 0.97):
        got = {n: density_at(target, c) for n, c in curves.items()}
        out[f"density_at_recall_{target}"] = got
        print(f"density needed for mean recall {target}: "
              + ", ".join(f"{n} {'-' if d is None else round(d, 3)}" for n, d in got.items()))
    benchmark.extra_info.update(out)
    benchmark.pedantic(lambda: None, rounds=1)


def test_synthetic_32k_one_layer(benchmark, tuned):
    from graphtune.codegen.pbs_attention.key import PBSShape
    from graphtune.codegen.pbs_attention.op import pbs_attention
    from graphtune.codegen.pbs_attention.plan import plan_pbs
    from graphtune.ir.ops import flash_cpu

    n = int(os.environ.get("GRAPHTUNE_BENCH_SPARSE_SYNTH", "32768"))
    target = _shared.get("density")
    if target is None:  # workload 1 not run: the tuned settings' density on the real capture
        from graphtune.codegen.pbs_attention.plan import plan_pbs as _p

        s, cap = tuned["uniform"], tuned["cap"]
        target = statistics.mean(float(_p(q, k, s.for_layer(i)).density().mean()) for i, (q, k, _) in enumerate(cap.qkv))
    q, k, v, cfg, _ = PBSShape(1, 8, 2, 64, n).make_args()
    lo, hi = 0.05, 1.0  # bisect tau to the real model's density
    for _ in range(12):
        mid = (lo + hi) / 2
        d = float(plan_pbs(q, k, replace(cfg, tau=mid)).density().mean())
        lo, hi = (mid, hi) if d < target else (lo, mid)
    cfg = replace(cfg, tau=(lo + hi) / 2)
    plan = plan_pbs(q, k, cfg)
    dens = float(plan.density().mean())
    kr = k.repeat_interleave(4, 1)
    vr = v.repeat_interleave(4, 1)
    med = _median_times({"sdpa_causal": lambda: torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True),
                         "flash_gqa": lambda: flash_cpu(q, k, v, None, True, None),
                         "pbs": lambda: pbs_attention(q, k, v, plan=plan_pbs(q, k, cfg))})
    info = {**{f"{a}_s": b for a, b in med.items()}, "speedup": med["sdpa_causal"] / med["pbs"], "density": dens,
            "target_density": target, "tau": cfg.tau, "tokens": n, "goals": {"speedup": 5.0}}
    print(f"\nsynthetic {n}: SDPA {med['sdpa_causal']:.2f}s, PBS {med['pbs']:.2f}s -> {info['speedup']:.2f}x at density "
          f"{dens:.3f} (tau {cfg.tau:.3f}, target {target:.3f})")
    benchmark.extra_info.update(info)
    benchmark.pedantic(lambda: None, rounds=1)


def test_engine_prefill_8k_end_to_end(benchmark, smol, tuned):
    import itertools

    import graphtune
    from graphtune.runtime.sparse_accuracy import compare_logits, sparse_logits

    model, tok = smol
    ids, cap = tuned["ids"].tolist(), tuned["cap"]
    dense = graphtune.Engine(model, tok)
    engines = {name: graphtune.Engine(model, tok, sparse_prefill=tuned[name]) for name in ("uniform", "paper", "tuned")}
    med = _median_times({"engine_dense": lambda: dense.generate([ids], 1),
                         **{f"engine_pbs_{n}": (lambda e=e: e.generate([ids], 1)) for n, e in engines.items()}})
    want = dense.generate([ids], 32).sequences[0]
    info: dict[str, Any] = {**{f"{k}_s": v for k, v in med.items()},
                            "goals": {"speedup_tuned": 1.5, "top1_last512_tuned": 0.99}}
    for name, eng in engines.items():
        top1, kl = compare_logits(cap.logits, sparse_logits(model, tuned["ids"], tuned[name], keep=512))
        got = eng.generate([ids], 32).sequences[0]
        same = sum(1 for _ in itertools.takewhile(lambda t: t[0] == t[1], zip(want, got)))
        info.update({f"speedup_{name}": med["engine_dense"] / med[f"engine_pbs_{name}"], f"top1_last512_{name}": top1,
                     f"kl_last512_{name}": kl, f"greedy_identical_32_{name}": got == want,
                     f"greedy_common_prefix_{name}": same, f"density_{name}": eng.last_sparse.mean()})
        print(f"\nengine 8K prefill, {tuned[name].source}: dense {med['engine_dense']:.2f}s, PBS "
              f"{med['engine_pbs_' + name]:.2f}s -> {info['speedup_' + name]:.2f}x; top-1 {top1:.4f}, KL {kl:.2e}; "
              f"greedy 32 identical: {got == want} (common prefix {same}); density {eng.last_sparse.mean():.3f}")
    prof = {"dense": profile_breakdown(lambda: dense.generate([ids], 1)),
            **{n: profile_breakdown(lambda e=e: e.generate([ids], 1)) for n, e in engines.items()}}
    for n, p in prof.items():
        print(f"profile {n}: {_fmt(p)}")
    info["profiles"] = prof
    benchmark.extra_info.update(info)
    benchmark.pedantic(lambda: None, rounds=1)


def test_passkey_retrieval_8k(benchmark, smol, tuned):
    import graphtune
    from graphtune.runtime.sparse_accuracy import PASSKEY_DEPTHS, passkey_prompt

    model, tok = smol
    dense = graphtune.Engine(model, tok)
    sparse = graphtune.Engine(model, tok, sparse_prefill=tuned["uniform"])
    tuned_eng = graphtune.Engine(model, tok, sparse_prefill=tuned["tuned"])
    rows = []
    for i, depth in enumerate(PASSKEY_DEPTHS):
        key = 10000 + (7919 * (i + 3)) % 89999
        ids = passkey_prompt(tok, N, depth, key)
        got = {}
        for name, eng in (("dense", dense), ("pbs", sparse), ("pbs_tuned", tuned_eng)):
            out = tok.decode(eng.generate([ids], 8).sequences[0])
            got[name] = str(key) in out
        rows.append({"depth": depth, "key": key, **got})
        print(f"passkey depth {depth:.1f}: " + ", ".join(f"{m} {'ok' if v else 'miss'}" for m, v in got.items()))
    acc = {m: sum(r[m] for r in rows) / len(rows) for m in ("dense", "pbs", "pbs_tuned")}
    print(f"passkey accuracy over {len(rows)} depths at {N} tokens: dense {acc['dense']:.0%}, PBS "
          f"{tuned['uniform'].source} {acc['pbs']:.0%}, PBS tuned {acc['pbs_tuned']:.0%}")
    benchmark.extra_info.update({"rows": rows, **{f"accuracy_{m}": a for m, a in acc.items()},
                                 "goals": {"pbs_minus_dense": 0.0}, "pbs_minus_dense": acc["pbs"] - acc["dense"]})
    benchmark.pedantic(lambda: None, rounds=1)
