"""Runtime selectors with their plans, fuzzed against attention in float64: shared prefix (plan
detection, the decode decomposition, prefill dedup, the low-level segment API with and without the fused
Triton suffix kernel), lean decode (CPU and Triton paths) and tuned dispatch (a database record for a
random implementation and config).

Each test also counts how often the fast path actually ran and fails if it never did, so the fuzzer
cannot silently test only the default path.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from hypothesis import given, note
from hypothesis import strategies as st

from graphtune import flags
from graphtune.autotune import db as dbmod
from graphtune.autotune import fingerprint
from graphtune.autotune.shapes import ATTENTION_OP, MERGE_OP, key_for_args, key_for_merge_args
from graphtune.autotune.tuner import load_impls
from graphtune.codegen import registry
from graphtune.codegen.shared_prefix.decompose import Segment, shared_prefix_attention
from graphtune.runtime import context, dispatch
from graphtune.runtime import lean_decode as ld
from graphtune.runtime import shared_prefix as sp
from graphtune.runtime.context import batch_context

from fuzz_support import (DTYPES, LSE_TOL, OUT_TOL, assert_matches, attn_cases, count_example, fill_slack,
                          fuzz_settings, lean_cases, merge_cases, ref_attention)


@contextlib.contextmanager
def spying(module, name: str, hits: list):
    """Record the calls of ``module.name`` (looked up as a module global by its callers)."""
    real = getattr(module, name)

    def spy(*a, **kw):
        hits.append(name)
        return real(*a, **kw)

    setattr(module, name, spy)
    try:
        yield hits
    finally:
        setattr(module, name, real)


# --------------------------------------------------------------------------------------------
# Shared prefix
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PrefixCase:
    """Prompts built from a common part, a per-group part and per-row tails (rows may repeat), left
    padded to one length; ``past`` tokens decoded since, and ``lq`` new queries per row.

    K/V at a position is a function of the row's whole key prefix up to it (ids and padding), as in a
    transformer, so rows the plan says share a range really hold identical K/V there.
    """

    dtype: str
    groups: tuple[int, ...]  # group of each row
    tails: tuple[int, ...]  # tail id of each row (equal group and tail: identical prompts)
    common: int
    group_len: int
    tail_lens: tuple[int, ...]  # length of each tail id
    extra_pad: int
    past: int
    lq: int
    hkv: int
    group: int
    mask: str  # bool | additive | none
    min_prefix: int
    scale: float | None
    seed: int

    @property
    def b(self) -> int:
        return len(self.groups)

    def prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        tok = lambda n: torch.randint(3, 500, (n,), generator=g).tolist()  # noqa: E731
        common = tok(self.common)
        per_group = [tok(self.group_len) for _ in range(3)]
        tails = [tok(n) for n in self.tail_lens]
        rows = [common + per_group[gi] + tails[ti] for gi, ti in zip(self.groups, self.tails)]
        P = max(len(r) for r in rows) + self.extra_pad
        ids = torch.zeros(self.b, P, dtype=torch.long)
        mask = torch.zeros(self.b, P, dtype=torch.long)
        for b, r in enumerate(rows):
            if r:
                ids[b, P - len(r):] = torch.tensor(r)
                mask[b, P - len(r):] = 1
        return ids, mask

    def build(self):
        """(prompt ids, prompt mask, q, k, v, 2-D mask over all keys, 4-D call mask, prefill q/k/v/mask)."""
        dt = DTYPES[self.dtype]
        ids, pmask = self.prompts()
        B, P = ids.shape
        g = torch.Generator().manual_seed(self.seed + 1)
        hq, d = self.hkv * self.group, 16
        keyed = torch.where(pmask.bool(), ids, -1 - ids)
        table: dict[tuple, tuple[torch.Tensor, ...]] = {}
        S = P + self.past + self.lq
        k, v = torch.empty(B, self.hkv, S, d), torch.empty(B, self.hkv, S, d)
        qp = torch.empty(B, hq, P, d)  # prefill queries: also a function of the prefix
        for b in range(B):
            for j in range(P):
                key = tuple(keyed[b, : j + 1].tolist())
                if key not in table:
                    table[key] = tuple(torch.randn(*s, generator=g) for s in ((self.hkv, d), (self.hkv, d), (hq, d)))
                k[b, :, j], v[b, :, j], qp[b, :, j] = table[key]
        k[:, :, P:] = torch.randn(B, self.hkv, S - P, d, generator=g)
        v[:, :, P:] = torch.randn(B, self.hkv, S - P, d, generator=g)
        q = torch.randn(B, hq, self.lq, d, generator=g)
        mask2 = torch.cat([pmask, torch.ones(B, S - P, dtype=torch.long)], 1)
        j, i = torch.arange(S), torch.arange(self.lq)
        allowed = mask2.bool()[:, None, None, :] & (j[None, :] <= S - self.lq + i[:, None])[None, None]
        # prefill: padding + top-left causal; a padded query sees no key (its row attends nothing)
        pre = pmask.bool()[:, None, None, :] & (torch.arange(P)[None, :] <= torch.arange(P)[:, None])[None, None]
        m4, pre4 = allowed, pre
        if self.mask == "additive":
            fill = torch.finfo(dt).min
            m4 = torch.zeros(allowed.shape, dtype=dt).masked_fill(~allowed, fill)
            pre4 = torch.zeros(pre.shape, dtype=dt).masked_fill(~pre, fill)
        elif self.mask == "none":
            m4 = None
        return ids, pmask, q.to(dt), k.to(dt), v.to(dt), mask2, m4, (qp.to(dt), k[:, :, :P].to(dt),
                                                                     v[:, :, :P].to(dt), pre4)


@st.composite
def prefix_cases(draw, dtypes=tuple(DTYPES)) -> PrefixCase:
    b = draw(st.integers(2, 5))
    groups = tuple(draw(st.lists(st.integers(0, 2), min_size=b, max_size=b)))
    tails = tuple(draw(st.integers(0, r)) for r in range(b))
    tail_lens = tuple(draw(st.lists(st.integers(0, 3), min_size=b, max_size=b)))
    lq = draw(st.integers(1, 3))
    extra_pad = draw(st.sampled_from([0, 0, 1, 2]))
    padded = extra_pad or len({n for n in tail_lens}) > 1
    mask = draw(st.sampled_from(["bool", "additive"] + ([] if padded or lq > 1 else ["none"])))
    return PrefixCase(draw(st.sampled_from(dtypes)), groups, tails, draw(st.integers(0, 12)), draw(st.integers(0, 6)),
                      tail_lens, extra_pad, draw(st.integers(0, 3)), lq, draw(st.integers(1, 2)),
                      draw(st.sampled_from([1, 2, 4])), mask, draw(st.integers(1, 6)),
                      draw(st.sampled_from([None, 0.3])), draw(st.integers(0, 2**16)))


DENSE_HITS: list = []
DEDUP_HITS: list = []


def _check_shared_prefix(case: PrefixCase) -> None:
    ids, pmask, q, k, v, mask2, m4, (qp, kp, vp, pre4) = case.build()
    tol, ltol = OUT_TOL[q.dtype], LSE_TOL[q.dtype]
    gqa = case.group > 1
    plan = sp.detect_shared_prefixes(ids, pmask, min_prefix=case.min_prefix, min_rows=2)
    note(f"plan: {plan.describe() if plan else None}")
    want_o, want_l = ref_attention(q, k, v, m4, False, case.scale, gqa)
    if plan is not None:
        out, lse = sp.run_dense(plan, q, k, v, m4, case.scale, gqa)
        assert_matches(out, want_o, tol, "run_dense out", case)
        assert_matches(lse, want_l, ltol, "run_dense lse", case)
    # the selector, as an optimized model drives it: plan at the prompt's prefill, then this call
    P = ids.shape[1]
    state: dict = {}
    with flags.Context(SHARED_PREFIX_MIN_PREFIX=case.min_prefix, SHARED_PREFIX_MIN_ROWS=2):
        with batch_context(input_ids=ids, attention_mask=pmask, past_length=0, state=state):
            with spying(sp, "run_dedup", DEDUP_HITS):
                out = torch.ops.graphtune.attention(qp, kp, vp, pre4, False, case.scale, gqa)
            assert_matches(out, ref_attention(qp, kp, vp, pre4, False, case.scale, gqa)[0], tol, "prefill out", case)
        S = k.shape[-2]
        # the new tokens' q/k/v are random per row, so their ids must differ per row too (equal ids at equal
        # positions after an equal cache would mean equal q/k/v, which the planner may rely on)
        new_ids = 1000 + torch.arange(case.b)[:, None] * (S - P) + torch.arange(S - P)[None, :]
        with batch_context(input_ids=new_ids[:, -case.lq:], attention_mask=mask2, past_length=S - case.lq,
                           state=state):
            with spying(sp, "run_dense", DENSE_HITS):
                out = torch.ops.graphtune.attention(q, k, v, m4, False, case.scale, gqa)
            assert_matches(out, want_o, tol, "decode out (selector)", case)


@fuzz_settings(20)
@given(case=prefix_cases())
def _fuzz_shared_prefix(case):
    count_example("selector shared_prefix (plan, run_dense, dedup)")
    _check_shared_prefix(case)


def test_shared_prefix_plans_and_selector_match_fp64():
    sp.install()
    DENSE_HITS.clear(), DEDUP_HITS.clear()
    _fuzz_shared_prefix()
    assert DENSE_HITS, "the shared-prefix decode decomposition never ran"
    assert DEDUP_HITS, "the shared-prefix prefill dedup never ran"


@fuzz_settings(12)
@given(case=prefix_cases(), data=st.data())
def test_shared_prefix_attention_segments_match_fp64(case, data):
    """The low-level API: segments read once, ragged suffixes with their own mask, merged; padded, loop
    and fused (Triton suffix + merge kernel) forms."""
    count_example("shared_prefix_attention (segments, suffix mask, fused)")
    ids, pmask, q, k, v, mask2, m4, _ = case.build()
    plan = sp.detect_shared_prefixes(ids, pmask, min_prefix=case.min_prefix, min_rows=2)
    B, S, lq = q.shape[0], k.shape[-2], case.lq
    starts = plan.suffix_starts if plan is not None else (0,) * B
    segs = []
    for s in plan.segments if plan is not None else ():
        r0 = s.rows[0]
        km = pmask[r0, s.start:s.end].bool()
        segs.append(Segment(torch.tensor(s.rows), k[r0, :, s.start:s.end], v[r0, :, s.start:s.end],
                            None if bool(km.all()) else km))
    lens = torch.tensor([S - e for e in starts])
    Ls = int(lens.max())
    sk, sv = torch.zeros(B, k.shape[1], Ls, 16, dtype=q.dtype), torch.zeros(B, k.shape[1], Ls, 16, dtype=q.dtype)
    smask = torch.zeros(B, 1, lq, Ls, dtype=torch.bool)
    for b, e in enumerate(starts):
        n = S - e
        sk[b, :, :n], sv[b, :, :n] = k[b, :, e:], v[b, :, e:]
        smask[b, :, :, :n] = mask2[b, e:].bool()
    by_lens = (torch.arange(Ls)[None, :] < lens[:, None]).view(B, 1, 1, Ls).expand_as(smask)
    # the suffix mask is needed where left padding reaches into a row's suffix; passing it anyway must not matter
    needs_mask = not torch.equal(smask, by_lens)
    use_mask = needs_mask or data.draw(st.booleans(), label="pass suffix_mask anyway")
    mode = data.draw(st.sampled_from(["padded", "loop"]), label="suffix_mode")
    fused = data.draw(st.sampled_from([False, True]), label="fused")
    note(f"plan: {plan.describe() if plan else None}; suffix mask needed: {needs_mask}")
    out, lse = shared_prefix_attention(q, segs, sk, sv, lens, smask if use_mask else None, is_causal=True,
                                       scale=case.scale, enable_gqa=case.group > 1, suffix_mode=mode, fused=fused)
    # reference mask: padding over all keys + bottom-right causal
    j, i = torch.arange(S), torch.arange(lq)
    allowed = mask2.bool()[:, None, None, :] & (j[None, :] <= S - lq + i[:, None])[None, None]
    want_o, want_l = ref_attention(q, k, v, allowed, False, case.scale, case.group > 1)
    assert_matches(out, want_o, OUT_TOL[q.dtype], f"shared_prefix_attention[{mode}, fused={fused}] out", case)
    assert_matches(lse, want_l, LSE_TOL[q.dtype], f"shared_prefix_attention[{mode}, fused={fused}] lse", case)


# --------------------------------------------------------------------------------------------
# Lean decode
# --------------------------------------------------------------------------------------------

LEAN_CALLS: list = []


@fuzz_settings(25)
@given(case=lean_cases(max_s=24), triton=st.sampled_from([False, False, True]), data=st.data())
def _fuzz_lean(case, triton, data):
    count_example("selector lean_decode (cpu and triton paths)")
    q, k, v, m4, _, scale, gqa = case.build()
    B, S, lq = q.shape[0], k.shape[-2], case.lq
    # The planner reads the HF 2-D mask; the call's own mask decides what is attended. Usually they agree
    # (HF builds one from the other), but the 2-D mask is only a hint: the selector must check the call's.
    last = m4[:, 0, -1] if m4 is not None else torch.ones(B, S, dtype=torch.bool)
    mask2 = (last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2).long()
    relation = data.draw(st.sampled_from(["agree", "agree", "hint differs", "call mask all-visible"]), label="masks")
    if relation != "agree":
        batch_kind = data.draw(st.sampled_from(["left", "right", "window", "mixed"]), label="hint padding")
        for b in range(B):
            kind = batch_kind if batch_kind != "mixed" else data.draw(
                st.sampled_from(["left", "right", "window", "none"]), label="row hint padding")
            lo = 0 if kind in ("right", "none") else data.draw(st.integers(0, S - 1), label="hint start")
            hi = S if kind in ("left", "none") else data.draw(st.integers(lo + 1, S), label="hint end")
            mask2[b] = 0
            mask2[b, lo:hi] = 1
    if relation == "call mask all-visible":
        m4 = data.draw(st.sampled_from([None, "bool", "zeros"]), label="all-visible mask")
        m4 = {None: None, "bool": torch.ones(B, 1, lq, S, dtype=torch.bool),
              "zeros": torch.zeros(B, 1, lq, S, dtype=q.dtype)}[m4]
    want_o, _ = ref_attention(q, k, v, m4, False, scale, gqa)
    with flags.Context(LEAN_MIN_SKEW=0.0, LEAN_TRITON_ON_CPU=triton):
        with batch_context(input_ids=torch.zeros(B, lq, dtype=torch.long), attention_mask=mask2,
                           past_length=S - lq, state={}) as ctx:
            out = torch.ops.graphtune.attention(q, k, v, m4, False, scale, gqa)
            batch = ctx.plans.get(ld.PLAN_NAME)
            if batch is not None and batch.calls:
                LEAN_CALLS.append("triton" if triton else "cpu")
    note(f"mask2: {mask2.tolist()}, lean batch: {batch.describe() if batch is not None else None}")
    assert_matches(out, want_o, OUT_TOL[q.dtype], f"lean selector ({'triton' if triton else 'cpu'}) out", case)


def test_lean_decode_selector_matches_fp64():
    ld.install()
    LEAN_CALLS.clear()
    _fuzz_lean()
    assert "cpu" in LEAN_CALLS, "the lean CPU path never ran"
    assert "triton" in LEAN_CALLS, "the lean Triton path never ran"


# --------------------------------------------------------------------------------------------
# Tuned dispatch
# --------------------------------------------------------------------------------------------

def _put(db, op: str, impl: registry.Impl, cfg: registry.KernelConfig, key) -> None:
    fp = fingerprint.current("cpu")
    db.put(dbmod.Record(op, impl.name, impl.source_hash, fp.device, fp.device_name, fp.versions, key.shape_key,
                        key.q_bucket, key.kv_bucket, cfg.to_dict(), 1.0, 1.0, 1.0, 3, 2.0, "measured", {}))


TUNED_HITS: list = []


def _fuzz_tuned(db_dir):
    @fuzz_settings(20)
    @given(data=st.data())
    def run(data):
        count_example("selector tuned dispatch (database winner)")
        merge = data.draw(st.integers(0, 3), label="merge op?") == 0
        if merge:
            case = data.draw(merge_cases(), label="case")
            outs, lses, want_o, want_l = case.build()
            args, op, key = (outs, lses), MERGE_OP, key_for_merge_args((outs, lses))
            so = sl = None
        else:
            case = data.draw(attn_cases(broadcast=True, long_kv=True), label="case")
            args, op = case.build(), ATTENTION_OP
            key = key_for_args(args, ATTENTION_OP)
            want_o, want_l = ref_attention(*args)
            so, sl = fill_slack(args[3], args[2])
        impls = [i for i in registry.impls_for(op, "cpu") if i.supports(args)]
        if not impls:
            return
        impl = data.draw(st.sampled_from(impls), label="impl")
        cfg = data.draw(st.sampled_from([impl.default_config(args), *impl.configs(args)]), label="config")
        path = str(db_dir / f"t{len(TUNED_HITS)}_{data.draw(st.integers(0, 10**9), label='db')}.db")
        with flags.Context(DB=path):
            try:
                _put(dbmod.get_db(), op, impl, cfg, key)
                dispatch.clear_cache()
                fn = context._select("merge_states" if merge else "attention_with_lse", args)
                if fn is not None and getattr(fn, "impl_name", None) == impl.name:
                    TUNED_HITS.append(impl.name)
                if merge:
                    out, lse = torch.ops.graphtune.merge_states(*args)
                else:
                    out, lse = torch.ops.graphtune.attention_with_lse(*args)
                    out1 = torch.ops.graphtune.attention(*args)
                    assert_matches(out1, want_o, OUT_TOL[args[0].dtype], f"tuned {impl.name}[{cfg}] attention", case,
                                   so)
            finally:
                dispatch.clear_cache()
                dbmod.forget_db(path)
        dt = args[0][0].dtype if merge else args[0].dtype
        assert_matches(out, want_o, OUT_TOL[dt], f"tuned {impl.name}[{cfg}] out", case, so)
        assert_matches(lse, want_l, LSE_TOL[dt], f"tuned {impl.name}[{cfg}] lse", case, sl)

    run()


def test_tuned_dispatch_of_any_winner_matches_fp64(tmp_path):
    load_impls("cpu")
    dispatch.install()
    TUNED_HITS.clear()
    _fuzz_tuned(tmp_path)
    assert len(set(TUNED_HITS)) >= 2, f"tuned dispatch ran database winners only {sorted(set(TUNED_HITS))}"
