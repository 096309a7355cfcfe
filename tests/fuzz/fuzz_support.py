"""Shared pieces of graphtune's differential fuzzer: profiles, the fp64 oracle, tolerances, case specs.

Profiles (``GRAPHTUNE_FUZZ_PROFILE``, or ``HYPOTHESIS_PROFILE`` as the Makefile's ``fuzz`` target sets it):

* ``ci`` (default): a few examples per test, derandomized (the same examples on every run, no example
  database), so ``make test`` is deterministic and bounded.
* ``long``: ``GRAPHTUNE_FUZZ_SCALE`` (default 25) times the ci counts, random seeds, failures saved in
  ``.hypothesis/`` and replayed first on the next run (``make fuzz``).

Cases are drawn as small frozen specs (ints, strings and a seed) and built into tensors by ``build()``,
so a falsifying example prints as a few lines that reproduce it.
"""
from __future__ import annotations

import math
import os
import threading
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

_hp = os.environ.get("HYPOTHESIS_PROFILE")
PROFILE = os.environ.get("GRAPHTUNE_FUZZ_PROFILE") or (_hp if _hp in ("ci", "long") else "ci")
SCALE = int(os.environ.get("GRAPHTUNE_FUZZ_SCALE", "25"))
if PROFILE not in ("ci", "long"):
    raise ValueError(f"GRAPHTUNE_FUZZ_PROFILE must be ci or long, got {PROFILE!r}")

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("graphtune-fuzz-ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("graphtune-fuzz-long", derandomize=False,
                          database=DirectoryBasedExampleDatabase(".hypothesis/graphtune-fuzz"), **_COMMON)


def fuzz_settings(examples: int) -> settings:
    """Settings of one fuzz test: ``examples`` in the ci profile, ``SCALE`` times that in long.

    Not loaded globally (``settings.load_profile``): other hypothesis tests keep their own defaults.
    """
    n = examples if PROFILE == "ci" else examples * SCALE
    return settings(settings.get_profile(f"graphtune-fuzz-{PROFILE}"), max_examples=n)


# Examples run per test (reported by conftest.py's terminal summary).
EXAMPLES: Counter = Counter()
_lock = threading.Lock()


def count_example(name: str) -> None:
    with _lock:
        EXAMPLES[name] += 1


# --------------------------------------------------------------------------------------------
# Oracle and tolerances
# --------------------------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (atol, rtol) of outputs against the fp64 oracle computed from the same (rounded) inputs. fp32:
# summation order only. fp16/bf16: P may be rounded before P@V and the output is rounded once more
# (10 / 7 mantissa bits), as in tests/codegen/lean_decode/test_lean_triton.py.
OUT_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 2e-2)}
# LSE is fp32 everywhere; half-precision inputs only change how the scores were accumulated.
LSE_TOL = {torch.float32: (5e-5, 1e-5), torch.float16: (2e-3, 1e-4), torch.bfloat16: (2e-3, 1e-4)}


def ref_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                  is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                  bottom_right: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA semantics in float64 (batch dims broadcast as ``matmul`` does), graphtune's convention for
    rows that attend to nothing (``out = 0``, ``lse = -inf``). Returns fp64 ``(out, lse)``."""
    q, k, v = q.double(), k.double(), v.double()
    if enable_gqa and q.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * s
    L, S = q.shape[-2], k.shape[-2]
    if is_causal:
        off = S - L if bottom_right else 0
        allowed = torch.arange(S)[None, :] <= torch.arange(L)[:, None] + off
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    if scores.shape[-1] == 0:  # no keys at all
        return scores.new_zeros(*scores.shape[:-1], v.shape[-1]), scores.new_full(scores.shape[:-1], float("-inf"))
    # max-shifted: a row of equal huge finite fills (finfo.min) has its lse rounded to the fill itself
    m = scores.amax(dim=-1, keepdim=True)
    live = torch.isfinite(m)
    p = torch.exp(scores - torch.where(live, m, 0.0))
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.where(live, torch.matmul(p, v) / torch.where(live, denom, 1.0), 0.0)
    lse = torch.where(live, m + torch.log(denom), float("-inf")).squeeze(-1)
    return out, lse


def ref_merge(outs, lses) -> tuple[torch.Tensor, torch.Tensor]:
    """``merge_states`` in float64: partials weighted by ``exp(lse)``; rows with no keys anywhere give 0, -inf."""
    o = torch.stack([x.double() for x in outs])
    l = torch.stack([x.double() for x in lses])
    m = l.amax(0)
    live = torch.isfinite(m)
    w = torch.exp(l - torch.where(live, m, 0.0))
    den = w.sum(0)
    out = torch.where(live[..., None], (w[..., None] * o).sum(0) / torch.where(live, den, 1.0)[..., None], 0.0)
    return out, torch.where(live, m + torch.log(den), float("-inf"))


def fill_slack(mask: torch.Tensor | None, v: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """Extra (out, lse) tolerance of rows whose every key carries a large finite fill (e.g. ``-1e4``).

    Every fp32 kernel, SDPA included, rounds ``score + fill`` to fp32: at ``|fill| = 1e4`` the scores keep only
    ~1e-3 of resolution, so such a row's softmax is off by ~``|fill| * 2**-23`` relative, which the float64
    oracle does not do. Rows with a visible key, and rows at ``finfo.min`` (the scores vanish entirely, in fp32
    and float64 alike) get no slack. Returns tensors broadcastable to ``[..., L, 1]`` and ``[..., L]``.
    """
    if mask is None or mask.dtype == torch.bool:
        return None, None
    m = mask.double()
    top = torch.where(torch.isfinite(m), m, float("-inf")).amax(dim=-1)  # [..., L]: the row's largest mask value
    mag = torch.where((top < -1.0) & (top > -1e30), -top, 0.0)
    vmax = float(v.abs().max()) if v.numel() else 0.0
    return (mag * 2.0**-21 * vmax)[..., None], mag * 2.0**-21


def assert_matches(got: torch.Tensor, want: torch.Tensor, tol: tuple[float, float], what: str,
                   case: Any = None, slack: torch.Tensor | None = None) -> None:
    """``|got - want| <= atol + rtol * |want| (+ slack)`` elementwise (``want`` fp64), infinities equal, no NaN."""
    if tuple(got.shape) != tuple(want.shape):
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != reference {tuple(want.shape)}\ncase: {case}")
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    if bool(torch.isnan(g).any()) and not bool(torch.isnan(w).any()):
        idx = torch.isnan(g).nonzero()[0].tolist()
        raise AssertionError(f"{what}: NaN at {idx}\ncase: {case}")
    inf_w = torch.isinf(w)
    if not torch.equal(torch.isinf(g) & (g == w), inf_w):
        idx = (torch.isinf(g) != inf_w).nonzero()
        idx = idx[0].tolist() if idx.numel() else (inf_w & (g != w)).nonzero()[0].tolist()
        raise AssertionError(f"{what}: infinity mismatch at {idx}: got {g[tuple(idx)].item()}, "
                             f"want {w[tuple(idx)].item()}\ncase: {case}")
    atol, rtol = tol
    gf, wf = torch.where(inf_w, 0.0, g), torch.where(inf_w, 0.0, w)
    err = (gf - wf).abs()
    bound = atol + rtol * wf.abs()
    if slack is not None:
        bound = bound + torch.broadcast_to(slack.double().cpu(), bound.shape)
    bad = err > bound
    if bool(bad.any()):
        i = int(torch.argmax(err - bound))
        idx = list(torch.unravel_index(torch.tensor(i), err.shape)) if err.dim() else []
        idx = [int(x) for x in idx]
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.numel()} elements off; worst at {idx}: got "
                             f"{gf.flatten()[i].item():.6g}, want {wf.flatten()[i].item():.6g} (max err "
                             f"{err.max().item():.3g}, atol {atol}, rtol {rtol})\ncase: {case}")


# --------------------------------------------------------------------------------------------
# Attention cases
# --------------------------------------------------------------------------------------------

FILLS = ("-inf", "min", "-1e4")


def _fill_value(fill: str, dtype: torch.dtype) -> float:
    return {"-inf": float("-inf"), "min": torch.finfo(dtype).min, "-1e4": -1e4}[fill]


@dataclass(frozen=True)
class AttnCase:
    """One attention problem; ``build()`` makes ``(q, k, v, attn_mask, is_causal, scale, enable_gqa)``.

    ``q_batch``/``kv_batch`` are the leading dims (``()`` for rank 3). ``mask_shape`` names the dims the
    mask keeps (the others are 1 or absent, SDPA broadcasting): letters B, H, L, S; ``rank`` trims
    leading broadcast dims. ``padding`` gives each mask row one contiguous key range; ``empty`` query
    positions attend to no key; ``causal_mask`` adds bottom-right causality into the mask itself.
    """

    dtype: str
    q_batch: tuple[int, ...]
    kv_batch: tuple[int, ...]
    hq: int
    hkv: int
    lq: int
    s: int
    d: int
    dv: int
    gqa: bool
    is_causal: bool
    mask: str  # none | bool | additive
    mask_shape: str  # e.g. "BHLS", "BLS" (B,1,L,S), "LS", "S", "BS" (B,1,1,S)
    mask_rank: int
    padding: str  # none | left | right | window
    causal_mask: bool
    empty: tuple[int, ...]
    fill: str
    bias: bool
    scale: float | None
    seed: int
    min_keys: int = 1  # padding leaves each mask row at least this many keys
    causal_abs: bool = False  # causal_mask aligned to the last key (HF's decode mask), not the row's last real key

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def build(self) -> tuple:
        g = torch.Generator().manual_seed(self.seed)
        dt = self.torch_dtype
        q = torch.randn(*self.q_batch, self.hq, self.lq, self.d, generator=g).to(dt)
        k = torch.randn(*self.kv_batch, self.hkv, self.s, self.d, generator=g).to(dt)
        v = torch.randn(*self.kv_batch, self.hkv, self.s, self.dv, generator=g).to(dt)
        return q, k, v, self.build_mask(g), self.is_causal, self.scale, self.gqa

    def build_mask(self, g: torch.Generator) -> torch.Tensor | None:
        if self.mask == "none":
            return None
        B = max([*self.q_batch, *self.kv_batch, 1])
        dims = {"B": B, "H": self.hq, "L": self.lq, "S": self.s}
        shape = [dims[c] if c in self.mask_shape else 1 for c in "BHLS"]
        nb, nh, L, S = shape
        allowed = torch.ones(nb, nh, L, S, dtype=torch.bool)
        j = torch.arange(S)
        for b in range(nb):
            lo, hi = 0, S
            if self.padding != "none" and S > 1:
                n = int(torch.randint(min(self.min_keys, S), S + 1, (1,), generator=g))
                lo = {"left": S - n, "right": 0}.get(self.padding, int(torch.randint(0, S - n + 1, (1,), generator=g)))
                hi = lo + n
            allowed[b] &= (j >= lo) & (j < hi)
            if self.causal_mask and L > 1:
                allowed[b] &= j[None, :] <= ((S if self.causal_abs else hi) - L + torch.arange(L))[:, None]
        for i in self.empty:
            if i < L:
                allowed[:, :, i] = False
        m = allowed
        if self.mask == "additive":
            fill = _fill_value(self.fill, self.torch_dtype)
            base = (torch.randn(m.shape, generator=g) if self.bias else torch.zeros(m.shape))
            m = base.to(self.torch_dtype).masked_fill(~allowed, fill)
        while m.dim() > self.mask_rank and m.shape[0] == 1:
            m = m[0]
        return m


def _sizes(draw, long_kv: bool) -> tuple[int, int]:
    lq = draw(st.integers(1, 6))
    if long_kv and draw(st.booleans()):
        return lq, draw(st.integers(250, 520))
    return lq, draw(st.integers(1, 12))


@st.composite
def attn_cases(draw, dtypes=tuple(DTYPES), broadcast: bool = False, long_kv: bool = False, max_d: int = 16,
               rank3: bool = True) -> AttnCase:
    """Random attention problems: shapes, dtypes, GQA ratios, causal variants, masks of every kind
    and broadcast shape, padding, fully masked rows, cached lengths (``lq < s``) and ``lq > s``."""
    dtype = draw(st.sampled_from(dtypes))
    rank = 3 if rank3 and draw(st.integers(0, 5)) == 0 else 4
    B = draw(st.integers(1, 3))
    q_batch = (B,) if rank == 4 else ()
    kv_batch = q_batch
    if broadcast and draw(st.integers(0, 3)) == 0:
        # SDPA broadcasting: kv batch 1 under q batch B, q batch 1 under kv batch B, q rank 3 with kv rank 4
        kind = draw(st.sampled_from(["kv1", "q1", "q3"]))
        if kind == "kv1":
            q_batch, kv_batch = (max(B, 2),), (1,)
        elif kind == "q1":
            q_batch, kv_batch = (1,), (max(B, 2),)
        else:
            q_batch, kv_batch = (), (B,)
    hkv = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 1, 2, 3, 4]))
    gqa = group > 1 or draw(st.booleans())
    lq, s = _sizes(draw, long_kv)
    d = draw(st.sampled_from([x for x in (4, 8, 16, 32) if x <= max_d]))
    dv = d if draw(st.integers(0, 4)) else draw(st.sampled_from([x for x in (4, 8, 16) if x <= max_d]))
    mask = draw(st.sampled_from(["none", "bool", "additive", "additive"]))
    is_causal = mask == "none" and draw(st.booleans())
    mask_shape, mask_rank, padding, causal_mask, empty, fill, bias = "BHLS", 4, "none", False, (), "-inf", False
    if mask != "none":
        mask_shape = draw(st.sampled_from(["BHLS", "BLS", "LS", "S", "BS", "HLS"]))
        # the mask's rank: at least what it keeps (B needs rank 4, H rank 3), leading 1s optional
        # ... and no more than the output's (a rank-4 mask over rank-3 q would make the output rank 4)
        out_rank = 3 + (1 if q_batch or kv_batch else 0)
        mask_rank = min(out_rank, draw(st.integers(4 if "B" in mask_shape else 3 if "H" in mask_shape else 2, 4)))
        padding = draw(st.sampled_from(["none", "left", "right", "window"]))
        causal_mask = "L" in mask_shape and draw(st.booleans())
        if "L" in mask_shape and draw(st.integers(0, 3)) == 0:
            empty = tuple(sorted(draw(st.sets(st.integers(0, lq - 1), min_size=1, max_size=lq))))
        if mask == "additive":
            fill = draw(st.sampled_from(FILLS))
            bias = draw(st.booleans())
    scale = draw(st.sampled_from([None, None, 0.05, 0.5, 1.7]))
    seed = draw(st.integers(0, 2**16))
    return AttnCase(dtype, q_batch, kv_batch, hkv * group, hkv, lq, s, d, dv, gqa, is_causal, mask, mask_shape,
                    mask_rank, padding, causal_mask, empty, fill, bias, scale, seed)


@dataclass(frozen=True)
class MergeCase:
    """Partial attention states over disjoint key sets of one problem; merged, they are the whole.

    The oracle merges the given (rounded) partials in float64: it equals the whole problem's attention
    except in rows whose every key carries one huge finite fill, where a partial's LSE cannot hold its
    key count (``fill + log n`` rounds to ``fill`` even in float64).
    """

    attn: AttnCase
    parts: int
    assign: tuple[int, ...]  # part of each key (-1: in no part... never: every key is in one part)
    rank: int

    def build(self):
        q, k, v, mask, causal, scale, gqa = self.attn.build()
        outs, lses = [], []
        for p in range(self.parts):
            idx = torch.tensor([j for j, a in enumerate(self.assign) if a == p], dtype=torch.long)
            m = None if mask is None else mask.index_select(-1, idx)
            o, l = ref_attention(q, k.index_select(-2, idx), v.index_select(-2, idx), m, False, scale, gqa)
            outs.append(o.to(q.dtype).reshape(o.shape[-self.rank:]))
            lses.append(l.float().reshape(l.shape[-self.rank + 1:]))
        want_o, want_l = ref_merge(outs, lses)
        return outs, lses, want_o, want_l


@st.composite
def merge_cases(draw, dtypes=tuple(DTYPES)) -> MergeCase:
    a = draw(attn_cases(dtypes=dtypes, rank3=False))
    a = replace(a, is_causal=False, kv_batch=a.q_batch, hkv=a.hq, gqa=False,
                mask_shape=a.mask_shape if a.mask != "none" else "BHLS")
    parts = draw(st.integers(1, 4))
    assign = tuple(draw(st.lists(st.integers(0, parts - 1), min_size=a.s, max_size=a.s)))
    rank = draw(st.integers(2, 4))
    if rank < 4:  # outs [H, L, D] or [L, D]: one batch row (and one head)
        a = replace(a, q_batch=(1,), kv_batch=(1,), hq=a.hq if rank == 3 else 1, hkv=a.hq if rank == 3 else 1)
    return MergeCase(a, parts, assign, rank)


@st.composite
def lean_cases(draw, dtypes=tuple(DTYPES), max_s: int = 40) -> AttnCase:
    """Decode-shaped calls with an HF padding mask (+ bottom-right causal for several queries)."""
    lq = draw(st.integers(1, 4))
    s = draw(st.integers(lq, max_s))
    group = draw(st.sampled_from([1, 2, 4]))
    hkv = draw(st.integers(1, 2))
    mask = draw(st.sampled_from(["bool", "additive", "none"]))
    causal = lq > 1 and mask != "none" and draw(st.booleans())
    padding = "none" if mask == "none" else draw(st.sampled_from(["left", "right", "window", "none"]))
    b = draw(st.integers(1, 4))
    return AttnCase(draw(st.sampled_from(dtypes)), (b,), (b,), hkv * group, hkv, lq, s, 16, 16, group > 1, False,
                    mask, "BLS", 4, padding, causal, (), draw(st.sampled_from(["-inf", "min"])), False,
                    draw(st.sampled_from([None, 0.25])), draw(st.integers(0, 2**16)), min_keys=lq if causal else 1,
                    causal_abs=causal and draw(st.booleans()))
