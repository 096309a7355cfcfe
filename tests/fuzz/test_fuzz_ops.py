"""Op-level differential fuzzing: every registered implementation, every runtime selector with its plan,
and the canonical ops, against attention computed in float64.

Implementations are discovered from the registry (every module of ``graphtune.codegen`` is imported),
so a new kernel family is fuzzed as soon as it registers; an op without a case generator here fails
``test_every_registered_op_has_a_fuzz_generator``. Triton kernels run in the interpreter
(``TRITON_INTERPRET=1``, tests/conftest.py) on tiny shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given
from hypothesis import strategies as st

from graphtune.autotune.tuner import load_impls
from graphtune.codegen import registry
from graphtune.errors import ShapeError

from fuzz_support import (DTYPES, LSE_TOL, OUT_TOL, AttnCase, assert_matches, attn_cases, count_example,
                          fill_slack, fuzz_settings, lean_cases, merge_cases, ref_attention)

load_impls()  # every family's implementations, CPU and Triton

IMPLS = sorted(registry.all_impls(), key=lambda i: (i.op, i.name))
TRITON = {i.name for i in IMPLS if i.name.startswith("triton.")}


def _examples(impl_name: str, cpu: int) -> int:
    return max(3, cpu // 3) if impl_name in TRITON else cpu


# --------------------------------------------------------------------------------------------
# Implementations (case generators: fuzz_support, and SuffixCase below)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SuffixCase:
    """A shared-prefix row state (``prior``) and each row's own suffix keys, ``lens`` of them valid."""

    dtype: str
    b: int
    hkv: int
    group: int
    lq: int
    prefix: int
    ls: int
    lens: tuple[int, ...] | None
    causal: bool
    scale: float | None
    seed: int

    def build(self):
        g = torch.Generator().manual_seed(self.seed)
        dt, hq = DTYPES[self.dtype], self.hkv * self.group
        r = lambda *s: torch.randn(*s, generator=g).to(dt)  # noqa: E731
        q, d = r(self.b, hq, self.lq, 16), 16
        pk, pv = r(self.b, self.hkv, self.prefix, d), r(self.b, self.hkv, self.prefix, d)
        sk, sv = r(self.b, self.hkv, self.ls, d), r(self.b, self.hkv, self.ls, d)
        lens = None if self.lens is None else torch.tensor(self.lens, dtype=torch.int32)
        prior = None
        if self.prefix:
            o, l = ref_attention(q, pk, pv, None, False, self.scale, True)
            prior = (o.to(dt), l.float())
        # oracle: all prefix keys, then suffix key j < len, bottom-right causal inside the suffix
        n = torch.tensor(self.lens if self.lens is not None else [self.ls] * self.b).view(-1, 1, 1, 1)
        j = torch.arange(self.ls).view(1, 1, 1, -1)
        ok = j < n
        if self.causal and self.lq > 1:
            ok = ok & (j <= n - self.lq + torch.arange(self.lq).view(1, 1, -1, 1))
        prefix_ok = torch.ones(self.b, 1, self.lq, self.prefix, dtype=torch.bool)
        allowed = torch.cat([prefix_ok, ok.expand(-1, 1, self.lq, -1)], -1)
        want = ref_attention(q, torch.cat([pk, sk], 2), torch.cat([pv, sv], 2), allowed, False, self.scale, True)
        return (q, sk, sv, lens, prior, self.causal, self.scale), want


@st.composite
def suffix_cases(draw, dtypes=tuple(DTYPES)) -> SuffixCase:
    b, lq, ls = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 9))
    causal = draw(st.booleans())
    prefix = draw(st.integers(0, 8))
    lens = None
    if draw(st.booleans()):
        lo = lq if causal and lq > 1 else (0 if prefix else 1)
        lens = tuple(draw(st.lists(st.integers(min(lo, ls), ls), min_size=b, max_size=b)))
    if causal and lq > 1 and ls < lq:
        ls = lq
        lens = None if lens is None else tuple(max(x, lq) for x in lens)
    return SuffixCase(draw(st.sampled_from(dtypes)), b, draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 4])), lq,
                      prefix, ls, lens, causal, draw(st.sampled_from([None, 0.3])), draw(st.integers(0, 2**16)))


@dataclass(frozen=True)
class TreeCase:
    """A speculative-verification step: rows of ``ctxs`` context keys and ``ns`` tree tokens in a KV pool."""

    dtype: str
    hkv: int
    group: int
    ctxs: tuple[int, ...]
    ns: tuple[int, ...]
    forest: bool
    packed: bool  # rows back to back in reverse order (else evenly spaced: the CPU path batches them)
    scale: float | None
    seed: int

    def build(self):
        g = torch.Generator().manual_seed(self.seed)
        dt, d = DTYPES[self.dtype], 16
        par, cu = [], [0]
        for n in self.ns:
            par += [-1] + [int(torch.randint(-1 if self.forest else 0, j, (), generator=g)) for j in range(1, n)]
            cu.append(cu[-1] + n)
        sizes = [c + n for c, n in zip(self.ctxs, self.ns)]
        if self.packed:
            starts, s = [0] * len(sizes), 1
            for i in reversed(range(len(sizes))):
                starts[i], s = s, s + sizes[i]
        else:
            starts = [i * (max(sizes) + 2) for i in range(len(sizes))]
        S = max(a + b for a, b in zip(starts, sizes)) + 2
        r = lambda *sh: torch.randn(*sh, generator=g).to(dt)  # noqa: E731
        q, k, v = r(self.hkv * self.group, cu[-1], d), r(self.hkv, S, d), r(self.hkv, S, d)
        i64 = lambda xs: torch.tensor(xs, dtype=torch.int64)  # noqa: E731
        args = (q, k, v, i64(starts), i64(list(self.ctxs)), i64(cu), i64(par), self.scale)
        # oracle: per row, the context and the token's own ancestor chain (walked here), in float64
        outs, lses = [], []
        for i, (s0, c) in enumerate(zip(starts, self.ctxs)):
            n = self.ns[i]
            ok = torch.zeros(n, c + n, dtype=torch.bool)
            ok[:, :c] = True
            for j in range(n):
                m = j
                while m >= 0:
                    ok[j, c + m] = True
                    m = par[cu[i] + m]
            o, l = ref_attention(q[:, cu[i]:cu[i + 1]], k[:, s0:s0 + c + n], v[:, s0:s0 + c + n], ok, False,
                                 self.scale, True)
            outs.append(o)
            lses.append(l)
        return args, (torch.cat(outs, 1), torch.cat(lses, 1))


@st.composite
def tree_cases(draw, dtypes=tuple(DTYPES)) -> TreeCase:
    b = draw(st.integers(1, 3))
    ns = tuple(draw(st.lists(st.integers(1, 6), min_size=b, max_size=b)))
    if draw(st.booleans()):  # equal rows: the CPU path's batched groups
        ns = (ns[0],) * b
    ctxs = tuple(draw(st.lists(st.integers(0, 12), min_size=b, max_size=b)))
    if draw(st.booleans()):
        ctxs = (ctxs[0],) * b
    return TreeCase(draw(st.sampled_from(dtypes)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3])), ctxs,
                    ns, draw(st.booleans()), draw(st.booleans()), draw(st.sampled_from([None, 0.3])),
                    draw(st.integers(0, 2**16)))


def _check_built_impl(impl, case, choose):
    # cases whose build() gives (op args, (out, lse) of the fp64 oracle): tree attention, PBS
    args, (want_o, want_l) = case.build()
    if not impl.supports(args):
        raise _Unsupported
    dt = args[0].dtype
    for cfg in choose(_configs(impl, args)):
        out, lse = impl.fn(*args, config=cfg)
        assert_matches(out, want_o, OUT_TOL[dt], f"{impl.name}[{cfg}] out", case)
        assert_matches(lse, want_l, LSE_TOL[dt], f"{impl.name}[{cfg}] lse", case)


@dataclass(frozen=True)
class PBSCase:
    """A PBS prefill call: the last ``m`` of ``n`` positions' queries, the plan's knobs."""

    dtype: str
    b: int
    hkv: int
    group: int
    n: int
    m: int
    block: int
    segment: int
    tau: float
    permute: bool
    scale: float | None
    seed: int

    def build(self):
        from graphtune.codegen.pbs_attention.plan import PBSConfig, plan_pbs

        g = torch.Generator().manual_seed(self.seed)
        dt, d = DTYPES[self.dtype], 16
        r = lambda *sh: torch.randn(*sh, generator=g).to(dt)  # noqa: E731
        q, k, v = r(self.b, self.hkv * self.group, self.m, d), r(self.b, self.hkv, self.n, d), r(self.b, self.hkv, self.n, d)
        pbs = PBSConfig(self.block, self.segment, self.tau, self.permute)
        plan = plan_pbs(q, k, pbs, self.scale)
        # oracle mask, walked here from the plan's block lists and permutation (original key indices)
        off, hq = self.n - self.m, self.hkv * self.group
        ok = torch.zeros(self.b, hq, self.m, self.n, dtype=torch.bool)
        for bb in range(self.b):
            for h in range(hq):
                for t in range(self.m):
                    pos = off + t
                    i = t // self.block
                    for j in plan.kv_index[bb, h, i, : int(plan.kv_count[bb, h, i])].tolist():
                        for key in plan.perm[bb, h // self.group, j * self.block:(j + 1) * self.block].tolist():
                            ok[bb, h, t, key] = True
                    ok[bb, h, t, (pos // self.segment) * self.segment:pos + 1] = True
        want = ref_attention(q, k, v, ok, False, self.scale, True)
        return (q, k, v, pbs, self.scale), want


@st.composite
def pbs_cases(draw, dtypes=tuple(DTYPES)) -> PBSCase:
    block = draw(st.sampled_from([16, 32]))
    segment = block * draw(st.sampled_from([1, 2, 4]))
    n = draw(st.integers(segment + 1, 5 * segment))
    m = n - block * draw(st.integers(0, (n - 1) // block))
    return PBSCase(draw(st.sampled_from(dtypes)), draw(st.integers(1, 2)), draw(st.integers(1, 2)),
                   draw(st.sampled_from([1, 3])), n, m, block, segment, draw(st.sampled_from([0.3, 0.8, 1.0])),
                   draw(st.booleans()), draw(st.sampled_from([None, 0.3])), draw(st.integers(0, 2**16)))


@dataclass(frozen=True)
class LinearCase:
    """A ``linear`` call: ``x [rows, k]`` (possibly a transposed view) times ``w [n, k]`` (+ bias)."""

    dtype: str
    rows: int
    n: int
    k: int
    bias: bool
    strided_x: bool  # x as the transpose of a [k, rows] tensor: not contiguous
    seed: int

    def build(self):
        g = torch.Generator().manual_seed(self.seed)
        dt = DTYPES[self.dtype]
        x = torch.randn(self.k, self.rows, generator=g).to(dt).t() if self.strided_x else \
            torch.randn(self.rows, self.k, generator=g).to(dt)
        w = (torch.randn(self.n, self.k, generator=g) / self.k ** 0.5).to(dt)
        b = torch.randn(self.n, generator=g).to(dt) if self.bias else None
        want = x.double() @ w.double().T + (b.double() if b is not None else 0.0)
        return (x, w, b), (want, None)


@st.composite
def linear_cases(draw, dtypes=tuple(DTYPES)) -> LinearCase:
    rows = draw(st.one_of(st.integers(1, 6), st.integers(7, 40)))
    return LinearCase(draw(st.sampled_from(dtypes)), rows, draw(st.integers(1, 70)), draw(st.integers(1, 70)),
                      draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 2**16)))


def _check_linear_impl(impl, case, choose):
    args, (want, _) = case.build()
    if not impl.supports(args):
        raise _Unsupported
    dt = args[0].dtype
    for cfg in choose(_configs(impl, args)):
        out, lse = impl.fn(*args, config=cfg)
        assert lse is None, f"{impl.name}[{cfg}] returned an LSE\ncase: {case}"
        assert out.dtype == dt and out.is_contiguous(), f"{impl.name}[{cfg}]: {out.dtype}, contiguous {out.is_contiguous()}"
        # the output is rounded to the input dtype once more than the fp64 oracle
        assert_matches(out, want, OUT_TOL[dt], f"{impl.name}[{cfg}] out", case)


class _Unsupported(Exception):
    """The implementation declines these arguments (``supports()`` is False, or a documented refusal)."""


def _configs(impl: registry.Impl, args: tuple) -> list[registry.KernelConfig]:
    return [impl.default_config(args), *impl.configs(args)]


def _check_attention_impl(impl, case, choose):
    args = case.build()
    if not impl.supports(args):
        raise _Unsupported
    want_o, want_l = ref_attention(*args)
    so, sl = fill_slack(args[3], args[2])
    for cfg in choose(_configs(impl, args)):
        out, lse = impl.fn(*args, config=cfg)
        assert_matches(out, want_o, OUT_TOL[case.torch_dtype], f"{impl.name}[{cfg}] out", case, so)
        assert_matches(lse, want_l, LSE_TOL[case.torch_dtype], f"{impl.name}[{cfg}] lse", case, sl)


def _check_merge_impl(impl, case, choose):
    outs, lses, want_o, want_l = case.build()
    if not impl.supports((outs, lses)):
        raise _Unsupported
    dt = outs[0].dtype
    for cfg in choose(_configs(impl, (outs, lses))):
        out, lse = impl.fn(outs, lses, config=cfg)
        assert_matches(out, want_o, OUT_TOL[dt], f"{impl.name}[{cfg}] out", case)
        assert_matches(lse, want_l, LSE_TOL[dt], f"{impl.name}[{cfg}] lse", case)


def _check_lean_impl(impl, case, choose):
    args = case.build()
    if not impl.supports(args):
        raise _Unsupported
    want_o, want_l = ref_attention(*args)
    # lean decode serves padding (+ causal over each row's real keys) masks only; HF's causal mask over
    # right/window padding (aligned to the last key, not the row's) may be refused with ShapeError
    not_lean_mask = case.causal_abs and case.padding in ("right", "window")
    for cfg in choose(_configs(impl, args)):
        try:
            out, lse = impl.fn(*args, config=cfg)
        except ShapeError:
            if not not_lean_mask:
                raise
            raise _Unsupported from None
        assert_matches(out, want_o, OUT_TOL[case.torch_dtype], f"{impl.name}[{cfg}] out", case)
        assert_matches(lse, want_l, LSE_TOL[case.torch_dtype], f"{impl.name}[{cfg}] lse", case)


def _check_suffix_merge_impl(impl, case, choose):
    (q, k, v, lens, prior, causal, scale), (want_o, want_l) = case.build()
    args = (q, k, v, lens, None if prior is None else prior[0], None if prior is None else prior[1], None, causal, scale,
            True)
    if not impl.supports(args):
        raise _Unsupported
    for cfg in choose(_configs(impl, args)):
        out, lse = impl.fn(*args, config=cfg)
        assert_matches(out, want_o, OUT_TOL[q.dtype], f"{impl.name}[{cfg}] out", case)
        assert_matches(lse, want_l, LSE_TOL[q.dtype], f"{impl.name}[{cfg}] lse", case)


def _attn(**kw) -> AttnCase:
    base = dict(dtype="float32", q_batch=(1,), kv_batch=(1,), hq=2, hkv=1, lq=1, s=257, d=4, dv=4, gqa=True,
                is_causal=False, mask="none", mask_shape="BHLS", mask_rank=4, padding="none", causal_mask=False,
                empty=(), fill="-inf", bias=False, scale=None, seed=0)
    return AttnCase(**{**base, **kw})


# Cases every implementation of the op runs with every one of its configs, in every profile: each once
# found a wrong answer or a crash (issue 8 item 5; /tmp/fuzz_findings.md F1-F4).
ATTENTION_REGRESSIONS = (
    _attn(q_batch=(2,), kv_batch=(1,), s=3),  # SDPA batch broadcasting: supports() must decline or compute it
    _attn(q_batch=(1,), kv_batch=(2,), s=3),
    _attn(q_batch=(), kv_batch=(1,), s=3),
    _attn(mask="additive", empty=(0,), fill="min"),  # a row fully masked by finfo.min: SDPA's mean of V
    _attn(mask="additive", empty=(0,), fill="min", s=10, d=16, dv=16),
    _attn(mask="bool", mask_shape="S", lq=2, s=3),  # a key mask broadcast over the queries, GQA
)

# op -> (case strategy for an implementation, check, regression cases); a new op needs an entry here
OP_CHECKS = {
    "attention_with_lse": (lambda impl: attn_cases(broadcast=True, long_kv=impl.name not in TRITON),
                           _check_attention_impl, ATTENTION_REGRESSIONS),
    "merge_states": (lambda impl: merge_cases(), _check_merge_impl, ()),
    "lean_decode": (lambda impl: lean_cases(), _check_lean_impl, ()),
    "shared_prefix_suffix_merge": (lambda impl: suffix_cases(), _check_suffix_merge_impl, ()),
    "tree_attention": (lambda impl: tree_cases(), _check_built_impl, ()),
    "pbs_attention": (lambda impl: pbs_cases(), _check_built_impl, ()),
    "linear": (lambda impl: linear_cases(), _check_linear_impl,
               (LinearCase("float32", 3, 49, 17, True, True, 1), LinearCase("bfloat16", 1, 8, 64, False, False, 2))),
}


def test_every_registered_op_has_a_fuzz_generator():
    assert IMPLS, "no implementation registered"
    missing = sorted({i.op for i in IMPLS} - set(OP_CHECKS))
    assert not missing, f"ops without a fuzz case generator in {__file__}: {missing}"


@pytest.mark.parametrize("impl_name", [f"{i.op}:{i.name}" for i in IMPLS])
def test_registered_impl_with_any_of_its_configs_matches_fp64(impl_name):
    op, name = impl_name.split(":")
    impl = registry.get_impl(op, name)
    if op not in OP_CHECKS:
        pytest.fail(f"no fuzz case generator for op {op!r}")
    cases, check, regressions = OP_CHECKS[op]
    for case in regressions:
        count_example(f"impl {impl_name}")
        try:
            check(impl, case, lambda cfgs: cfgs)
        except _Unsupported:
            pass

    @fuzz_settings(_examples(name, 15))
    @given(case=cases(impl), data=st.data())
    def run(case, data):
        count_example(f"impl {impl_name}")
        try:
            check(impl, case, lambda cfgs: [data.draw(st.sampled_from(cfgs), label="config")])
        except _Unsupported:
            assume(False)

    run()


# --------------------------------------------------------------------------------------------
# Canonical ops
# --------------------------------------------------------------------------------------------

def _sdpa_rejects(args) -> bool:
    """Whether SDPA itself refuses these arguments (then graphtune must raise too, not answer)."""
    q, k, v, mask, causal, scale, gqa = args
    m = mask if mask is None or mask.dtype == torch.bool else mask.double()
    try:
        F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m, is_causal=causal,
                                       scale=scale, enable_gqa=gqa)
    except RuntimeError:
        return True
    return False


@fuzz_settings(30)
@given(case=attn_cases(broadcast=True, long_kv=True))
@example(case=_attn(q_batch=(2,), kv_batch=(1,), s=3))  # issue 8 item 5: out-of-bounds reads
@example(case=_attn(q_batch=(1,), kv_batch=(2,), s=3))  # ... and a shape other than SDPA's
@example(case=_attn(q_batch=(), kv_batch=(2,), s=3))  # ... and ShapeError for q of rank 3, kv of rank 4
@example(case=_attn(mask="additive", empty=(0,), fill="min", s=10))
def test_canonical_attention_ops_match_sdpa_semantics_in_fp64(case):
    count_example("op graphtune.attention(_with_lse)")
    args = case.build()
    if _sdpa_rejects(args):  # then graphtune must raise too, never answer
        with pytest.raises(Exception):
            torch.ops.graphtune.attention(*args)
        return
    want_o, want_l = ref_attention(*args)
    so, sl = fill_slack(args[3], args[2])
    out = torch.ops.graphtune.attention(*args)
    assert_matches(out, want_o, OUT_TOL[case.torch_dtype], "graphtune.attention out", case, so)
    out2, lse = torch.ops.graphtune.attention_with_lse(*args)
    assert_matches(out2, want_o, OUT_TOL[case.torch_dtype], "graphtune.attention_with_lse out", case, so)
    assert_matches(lse, want_l, LSE_TOL[case.torch_dtype], "graphtune.attention_with_lse lse", case, sl)


@fuzz_settings(15)
@given(case=merge_cases())
def test_canonical_merge_states_matches_fp64(case):
    count_example("op graphtune.merge_states")
    outs, lses, want_o, want_l = case.build()
    out, lse = torch.ops.graphtune.merge_states(outs, lses)
    assert_matches(out, want_o, OUT_TOL[outs[0].dtype], "graphtune.merge_states out", case)
    assert_matches(lse, want_l, LSE_TOL[outs[0].dtype], "graphtune.merge_states lse", case)
