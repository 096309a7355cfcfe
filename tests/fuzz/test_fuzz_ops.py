"""Op-level differential fuzzing: every registered implementation, every runtime selector with its plan,
and the canonical ops, against attention computed in float64.

Implementations are discovered from the registry (every module of ``graphtune.codegen`` is imported),
so a new kernel family is fuzzed as soon as it registers; an op without a case generator here fails
``test_every_registered_op_has_a_fuzz_generator``. Triton kernels run in the interpreter
(``TRITON_INTERPRET=1``, tests/conftest.py) on tiny shapes.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

import graphtune.codegen
from graphtune.codegen import registry
from graphtune.errors import ShapeError

from fuzz_support import (DTYPES, LSE_TOL, OUT_TOL, assert_matches, attn_cases, count_example, fuzz_settings,
                          lean_cases, merge_cases, ref_attention)

for _m in pkgutil.iter_modules(graphtune.codegen.__path__):
    importlib.import_module(f"graphtune.codegen.{_m.name}")

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
        allowed = torch.cat([torch.ones(self.b, 1, self.lq, self.prefix, dtype=torch.bool), ok.expand(-1, 1, self.lq, -1)], -1)
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


def _pick_config(data, impl: registry.Impl, args: tuple) -> registry.KernelConfig:
    cfgs = [impl.default_config(args), *impl.configs(args)]
    return data.draw(st.sampled_from(cfgs), label="config")


def _check_attention_impl(data, impl):
    case = data.draw(attn_cases(broadcast=True, long_kv=impl.name not in TRITON), label="case")
    args = case.build()
    assume(impl.supports(args))
    cfg = _pick_config(data, impl, args)
    out, lse = impl.fn(*args, config=cfg)
    want_o, want_l = ref_attention(*args)
    assert_matches(out, want_o, OUT_TOL[case.torch_dtype], f"{impl.name}[{cfg}] out", case)
    assert_matches(lse, want_l, LSE_TOL[case.torch_dtype], f"{impl.name}[{cfg}] lse", case)


def _check_merge_impl(data, impl):
    case = data.draw(merge_cases(), label="case")
    outs, lses, want_o, want_l = case.build()
    assume(impl.supports((outs, lses)))
    cfg = _pick_config(data, impl, (outs, lses))
    out, lse = impl.fn(outs, lses, config=cfg)
    dt = outs[0].dtype
    assert_matches(out, want_o, OUT_TOL[dt], f"{impl.name}[{cfg}] out", case)
    assert_matches(lse, want_l, LSE_TOL[dt], f"{impl.name}[{cfg}] lse", case)


def _check_lean_impl(data, impl):
    case = data.draw(lean_cases(), label="case")
    args = case.build()
    assume(impl.supports(args))
    cfg = _pick_config(data, impl, args)
    # lean decode serves padding (+ causal over each row's real keys) masks only; HF's causal mask over
    # right/window padding (aligned to the last key, not the row's) may be refused with ShapeError
    not_lean_mask = case.causal_abs and case.padding in ("right", "window")
    try:
        out, lse = impl.fn(*args, config=cfg)
    except ShapeError:
        if not not_lean_mask:
            raise
        assume(False)
    want_o, want_l = ref_attention(*args)
    assert_matches(out, want_o, OUT_TOL[case.torch_dtype], f"{impl.name}[{cfg}] out", case)
    assert_matches(lse, want_l, LSE_TOL[case.torch_dtype], f"{impl.name}[{cfg}] lse", case)


def _check_suffix_merge_impl(data, impl):
    case = data.draw(suffix_cases(), label="case")
    (q, k, v, lens, prior, causal, scale), (want_o, want_l) = case.build()
    args = (q, k, v, lens, None if prior is None else prior[0], None if prior is None else prior[1], causal, scale)
    assume(impl.supports(args))
    cfg = _pick_config(data, impl, args)
    out, lse = impl.fn(*args, config=cfg)
    assert_matches(out, want_o, OUT_TOL[q.dtype], f"{impl.name}[{cfg}] out", case)
    assert_matches(lse, want_l, LSE_TOL[q.dtype], f"{impl.name}[{cfg}] lse", case)


# op -> how to fuzz one of its implementations (a new op needs an entry here)
OP_CHECKS = {
    "attention_with_lse": _check_attention_impl,
    "merge_states": _check_merge_impl,
    "lean_decode": _check_lean_impl,
    "shared_prefix_suffix_merge": _check_suffix_merge_impl,
}


def test_every_registered_op_has_a_fuzz_generator():
    assert IMPLS, "no implementation registered"
    missing = sorted({i.op for i in IMPLS} - set(OP_CHECKS))
    assert not missing, f"ops without a fuzz case generator in {__file__}: {missing}"


@pytest.mark.parametrize("impl_name", [f"{i.op}:{i.name}" for i in IMPLS])
def test_registered_impl_with_any_of_its_configs_matches_fp64(impl_name):
    op, name = impl_name.split(":")
    impl = registry.get_impl(op, name)
    check = OP_CHECKS.get(op)
    if check is None:
        pytest.fail(f"no fuzz case generator for op {op!r}")

    @fuzz_settings(_examples(name, 15))
    @given(data=st.data())
    def run(data):
        count_example(f"impl {impl_name}")
        check(data, impl)

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
def test_canonical_attention_ops_match_sdpa_semantics_in_fp64(case):
    count_example("op graphtune.attention(_with_lse)")
    args = case.build()
    if _sdpa_rejects(args):  # then graphtune must raise too, never answer
        with pytest.raises(Exception):
            torch.ops.graphtune.attention(*args)
        return
    want_o, want_l = ref_attention(*args)
    out = torch.ops.graphtune.attention(*args)
    assert_matches(out, want_o, OUT_TOL[case.torch_dtype], "graphtune.attention out", case)
    out2, lse = torch.ops.graphtune.attention_with_lse(*args)
    assert_matches(out2, want_o, OUT_TOL[case.torch_dtype], "graphtune.attention_with_lse out", case)
    assert_matches(lse, want_l, LSE_TOL[case.torch_dtype], "graphtune.attention_with_lse lse", case)


@fuzz_settings(15)
@given(case=merge_cases())
def test_canonical_merge_states_matches_fp64(case):
    count_example("op graphtune.merge_states")
    outs, lses, want_o, want_l = case.build()
    out, lse = torch.ops.graphtune.merge_states(outs, lses)
    assert_matches(out, want_o, OUT_TOL[outs[0].dtype], "graphtune.merge_states out", case)
    assert_matches(lse, want_l, LSE_TOL[outs[0].dtype], "graphtune.merge_states lse", case)
