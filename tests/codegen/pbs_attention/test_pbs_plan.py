"""The PBS host plan: the key permutation (a permutation inside each earlier segment, by descending
importance, per KV head), the tau-coverage block selection (allowed range, order, coverage and
minimality, monotone in tau, the sink), density, GQA without repeating K/V, and refused inputs.

Pooled and sampled block probabilities, importances and densities are recomputed here by loops
(``pbs_cases.pooled_probs`` / ``sampled_probs``), not with the plan's own helpers.
"""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from graphtune import flags
from graphtune.codegen.pbs_attention.plan import PBSConfig, check_qkv, plan_pbs, sample_rows, score_dtype
from graphtune.errors import PlanError, ShapeError

from pbs_cases import (check_coverage, fuzz_shape, make_qkv, make_structured, pooled_probs, sampled_probs,
                       selected)

# (b, hq, hkv, d, n, m, block, segment): odd n, chunks, GQA and MHA, one segment only, n < block
SHAPES = {
    "gqa3_odd_n": (1, 6, 2, 16, 777, 777, 64, 128),
    "chunk_mid_segment": (2, 4, 1, 24, 700, 700 - 3 * 64, 64, 256),
    "mha_small_blocks": (1, 2, 2, 8, 301, 301 - 4 * 32, 32, 64),
    "single_last_query": (1, 4, 4, 16, 9 * 32 + 1, 1, 32, 64),
    "one_segment": (2, 3, 1, 16, 100, 100, 32, 128),
    "n_below_block": (1, 2, 1, 8, 5, 5, 32, 64),
}


def _plan(name, tau=0.7, permute=True, sink=True, structured=False, seed=0, sample=8, select_per="segment"):
    b, hq, hkv, d, n, m, blk, seg = SHAPES[name]
    if structured:
        q, k, _ = make_structured(b, hq, hkv, d, n, m, seed=seed)
    else:
        q, k, _ = make_qkv(b, hq, hkv, d, n, m, seed=seed)
    return q, k, plan_pbs(q, k, PBSConfig(blk, seg, tau, permute, sink, sample=min(sample, blk), select_per=select_per))


# ----------------------------------------------------------------------------------------- permutation


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("permute", [True, False])
def test_perm_permutes_only_within_earlier_segments_and_is_identity_in_the_last(name, permute):
    q, k, plan = _plan(name, permute=permute, structured=True)
    B, Hkv, N = k.shape[0], k.shape[1], k.shape[2]
    S = plan.config.segment
    assert plan.perm.shape == (B, Hkv, N) and plan.perm.dtype == torch.int64
    last = (N - 1) // S
    ident = torch.arange(N).expand(B, Hkv, N)
    if not permute or last == 0:
        assert torch.equal(plan.perm, ident), "no permutation asked (or one segment): identity"
        return
    for s in range(last):
        seg = plan.perm[..., s * S:(s + 1) * S]
        assert torch.equal(seg.sort(-1).values, torch.arange(s * S, (s + 1) * S).expand_as(seg)), f"segment {s}"
    assert torch.equal(plan.perm[..., last * S:], ident[..., last * S:]), "last segment must keep its order"
    assert not torch.equal(plan.perm, ident), "heavy keys scattered through segments should move"


@pytest.mark.parametrize("name", ["gqa3_odd_n", "chunk_mid_segment", "mha_small_blocks"])
@pytest.mark.parametrize("sample", [0, 4])
@pytest.mark.parametrize("bf16", [False, True])
def test_perm_orders_each_segment_by_descending_last_block_importance(name, sample, bf16):
    """Independent importance: mean over the last query block's rows (sample=0: all of them; else
    ``sample`` evenly spaced ones ending at each block's last row, of every query block in the last
    query's segment: they share one selection) and the group's heads of the causal softmax. fp32
    scores: exactly descending; bf16 scores (where the CPU has them): up to bf16 rounding."""
    if bf16 and score_dtype(torch.device("cpu")) != torch.bfloat16:
        pytest.skip("this CPU computes the selection's scores in fp32")
    with flags.Context(SPARSE_PREFILL_BF16_SCORES=bf16):
        q, k, plan = _plan(name, structured=True, seed=3, sample=sample)
    tol = (lambda x: 0.02 * x + 1e-6) if bf16 else (lambda x: 1e-9)
    B, Hq, M, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G, S, b = Hq // Hkv, plan.config.segment, plan.config.block
    nb = min(b, M)
    firsts = [r for r in range(0, M, b) if (N - M + r) // S == (N - 1) // S]  # first rows: last segment's blocks
    rows_t = range(M - nb, M) if sample == 0 else [min(M - 1, f + (j + 1) * b // sample - 1)
                                                   for f in firsts for j in range(sample)]
    for x in range(B):
        for h in range(Hkv):
            rows = []
            for hq in range(h * G, (h + 1) * G):
                for t in rows_t:
                    pos = N - M + t
                    s = (q[x, hq, t].double() @ k[x, h].double().T) / math.sqrt(D)
                    s[pos + 1:] = float("-inf")
                    rows.append(torch.softmax(s, 0))
            imp = torch.stack(rows).mean(0)
            for s in range((N - 1) // S):
                got = imp[plan.perm[x, h, s * S:(s + 1) * S]]
                assert bool((got[:-1] >= got[1:] - tol(got[1:])).all()), f"batch {x} kv head {h} segment {s} not descending"


def test_perm_is_per_kv_head_and_equals_planning_each_gqa_group_alone():
    q, k, _ = make_structured(2, 12, 3, 16, 600, 600 - 2 * 64, seed=1)
    cfg = PBSConfig(64, 128, 0.6)
    plan = plan_pbs(q, k, cfg)
    assert plan.perm.shape == (2, 3, 600) and plan.kv_index.shape[:3] == (2, 12, plan.q_blocks)
    assert plan.memo["k_perm"].shape == k.shape  # permuted keys per KV head, not per query head
    for h in range(3):
        alone = plan_pbs(q[:, 4 * h:4 * h + 4], k[:, h:h + 1], cfg)
        assert torch.equal(alone.perm[:, 0], plan.perm[:, h]), f"kv head {h}: permutation depends on other groups"
        assert torch.equal(alone.kv_count, plan.kv_count[:, 4 * h:4 * h + 4])
        for x in range(2):
            for hq in range(4):
                for i in range(plan.q_blocks):
                    assert selected(alone, x, hq, i) == selected(plan, x, 4 * h + hq, i)
    # the groups do not share one permutation (each kv head has its own keys)
    assert not torch.equal(plan.perm[:, 0], plan.perm[:, 1])


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numels.append((str(func), tuple(t.shape)))
        return out


def test_plan_never_materializes_k_repeated_per_query_head():
    # Hq=12 over Hkv=3; D=16 and block 32 so no legitimate intermediate has B*Hq*N*D elements
    B, Hq, Hkv, D, N, M = 1, 12, 3, 16, 520, 520 - 4 * 32
    q, k, _ = make_qkv(B, Hq, Hkv, D, N, M)
    with _Shapes() as rec:
        plan_pbs(q, k, PBSConfig(32, 128, 0.8))
    big = [(f, s) for f, s in rec.numels if math.prod(s) == B * Hq * N * D]
    assert not big, f"K repeated per query head: {big}"


# ----------------------------------------------------------------------------------------- selection


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("tau", [0.3, 0.9, 1.0])
def test_kv_index_lists_allowed_blocks_ascending_unique_padded_in_range(name, tau):
    q, k, plan = _plan(name, tau=tau)
    b, S = plan.config.block, plan.config.segment
    B, Hq, nqb, C = plan.kv_index.shape
    N, off = k.shape[2], plan.q_offset
    assert C >= 1 and plan.kv_count.dtype == torch.int32 and plan.kv_index.dtype == torch.int32
    assert nqb == -(-q.shape[2] // b) == plan.q_blocks
    assert int(plan.kv_count.max()) == C or int(plan.kv_count.max()) == 0
    nkb = -(-N // b)
    assert bool((plan.kv_index >= 0).all()) and bool((plan.kv_index < nkb).all()), "pads must stay in range"
    for x in range(B):
        for h in range(Hq):
            for i in range(nqb):
                n = int(plan.kv_count[x, h, i])
                qseg = (off + i * b) // S
                assert n <= qseg * (S // b), "more blocks than earlier segments hold"
                idx = plan.kv_index[x, h, i, :n].tolist()
                assert idx == sorted(set(idx)), f"({x},{h},{i}) not ascending/unique: {idx}"
                assert all(j * b // S < qseg for j in idx), f"({x},{h},{i}) selects a block of its own/later segment"
                if 0 < n < C:
                    assert plan.kv_index[x, h, i, n:].eq(idx[-1]).all(), "pads repeat the last valid block"
                if tau >= 1.0:
                    assert n == qseg * (S // b), "tau=1 keeps every block of the earlier segments"


def test_tau_one_keeps_everything_the_docstring_example():
    q, k = torch.randn(1, 4, 512, 32), torch.randn(1, 2, 512, 32)
    plan = plan_pbs(q, k, PBSConfig(block=64, segment=128, tau=1.0))
    assert plan.kv_count[0, 0].tolist() == [0, 0, 2, 2, 4, 4, 6, 6]
    assert plan.diag_blocks().tolist() == [1, 2, 1, 2, 1, 2, 1, 2]


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("permute", [True, False])
def test_selection_is_the_smallest_top_set_reaching_tau_of_pooled_mass(permute, structured):
    """sample=0 (the paper's estimate), recomputed pooled probabilities: kept mass >= tau for every
    block of a selection group, minimal, and no unkept block outweighs a kept one (``check_coverage``)."""
    for name in ("gqa3_odd_n", "chunk_mid_segment", "mha_small_blocks"):
        for tau in (0.3, 0.6, 0.9):
            q, k, plan = _plan(name, tau=tau, permute=permute, sink=False, structured=structured, seed=2, sample=0)
            p, allowed = pooled_probs(q, k, plan)
            own = torch.zeros(p.shape[:3], dtype=p.dtype)
            assert check_coverage(plan, p, own, allowed, tau, f"{name} tau={tau}", tie=1e-6) > 0


@pytest.mark.parametrize("select_per", ["segment", "block"])
@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("permute", [True, False])
def test_sampled_selection_is_the_smallest_top_set_reaching_tau_of_the_whole_mass(permute, structured, select_per):
    """sample > 0, fp32 scores, recomputed in fp64 by loops (``sampled_probs``): own-segment mass plus
    kept mass >= tau for every block of a selection group, minimal, no unkept block heavier than a kept one."""
    checked = 0
    with flags.Context(SPARSE_PREFILL_BF16_SCORES=False):
        for name in ("gqa3_odd_n", "chunk_mid_segment", "mha_small_blocks", "single_last_query"):
            for tau in (0.5, 0.8, 0.95):
                q, k, plan = _plan(name, tau=tau, permute=permute, sink=False, structured=structured, seed=2,
                                   sample=4, select_per=select_per)
                p, own, allowed = sampled_probs(q, k, plan)
                for i in range(p.shape[2]):
                    total = own[..., i] + p[..., i, :][..., allowed[i]].sum(-1)
                    assert bool(((total - 1.0).abs() < 1e-9).all()), "sampled rows' mass must sum to 1 over causal keys"
                checked += check_coverage(plan, p, own, allowed, tau, f"{name} tau={tau}")
    assert checked > 0


def test_bf16_scores_keep_what_fp32_scores_keep_up_to_rounding():
    """The selection's scores in bf16 (where the CPU has it) rank blocks as fp32 does, up to near ties:
    the fp64 mass they keep is within 0.01 of tau."""
    if score_dtype(torch.device("cpu")) != torch.bfloat16:
        pytest.skip("this CPU computes the selection's scores in fp32")
    q, k, plan = _plan("gqa3_odd_n", tau=0.8, sink=False, structured=True, seed=5, sample=8)
    p, own, _ = sampled_probs(q, k, plan)
    B, Hq, nqb, _ = p.shape
    for x in range(B):
        for h in range(Hq):
            for i in range(nqb):
                mass = float(own[x, h, i]) + sum(p[x, h, i, j].item() for j in selected(plan, x, h, i))
                assert mass >= 0.8 - 0.01, f"({x},{h},{i}): bf16 scores kept {mass:.4f} of the mass, tau 0.8"


@pytest.mark.parametrize("name", ["gqa3_odd_n", "chunk_mid_segment", "single_last_query"])
@pytest.mark.parametrize("permute", [True, False])
@pytest.mark.parametrize("sample", [0, 8])
def test_selection_shrinks_monotonically_as_tau_decreases(name, permute, sample):
    taus = [1.0, 0.95, 0.8, 0.5, 0.2, 0.05]
    plans = [_plan(name, tau=t, permute=permute, structured=True, sample=sample)[2] for t in taus]
    for hi, lo, th, tl in zip(plans, plans[1:], taus, taus[1:]):
        assert torch.equal(hi.perm, lo.perm), "the permutation must not depend on tau"
        assert bool((lo.kv_count <= hi.kv_count).all()), f"tau {tl} keeps more blocks than tau {th}"
        B, Hq, nqb = hi.kv_count.shape
        for x in range(B):
            for h in range(Hq):
                for i in range(nqb):
                    assert selected(lo, x, h, i) <= selected(hi, x, h, i), f"tau {tl} not a subset of tau {th}"
        assert bool((lo.density() <= hi.density() + 1e-7).all())


@pytest.mark.parametrize("name", ["gqa3_odd_n", "chunk_mid_segment", "mha_small_blocks", "single_last_query"])
@pytest.mark.parametrize("permute", [True, False])
def test_sink_block_holding_key_zero_is_added_for_every_query_block_past_segment_zero(name, permute):
    _, _, with_sink = _plan(name, tau=0.05, permute=permute, sink=True, seed=4)
    _, _, without = _plan(name, tau=0.05, permute=permute, sink=False, seed=4)
    b, S = with_sink.config.block, with_sink.config.segment
    B, Hq, nqb = with_sink.kv_count.shape
    G = Hq // with_sink.perm.shape[1]
    for x in range(B):
        for h in range(Hq):
            sink = int((with_sink.perm[x, h // G] == 0).nonzero()) // b
            for i in range(nqb):
                past_zero = (with_sink.q_offset + i * b) // S > 0
                got, base = selected(with_sink, x, h, i), selected(without, x, h, i)
                assert (sink in got) == past_zero, f"({x},{h},{i}): sink block {sink} in {got}"
                assert got == (base | {sink} if past_zero else base), "the sink is added, nothing else changes"


# ----------------------------------------------------------------------------------------- density


def _loop_density(plan):
    b, S = plan.config.block, plan.config.segment
    B, Hq, nqb = plan.kv_count.shape
    out = torch.zeros(B, Hq)
    for x in range(B):
        for h in range(Hq):
            done = causal = 0
            for i in range(nqb):
                a = plan.q_offset // b + i  # absolute key block of the query block
                causal += a + 1
                done += int(plan.kv_count[x, h, i]) + (a - (a * b // S) * (S // b) + 1)
            out[x, h] = done / causal
    return out


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_density_is_one_at_tau_one_and_in_zero_one_otherwise(name):
    _, _, dense = _plan(name, tau=1.0)
    assert torch.equal(dense.density(), torch.ones_like(dense.density()))
    for tau in (0.2, 0.7):
        _, _, sparse = _plan(name, tau=tau, structured=True)
        d = sparse.density()
        assert d.shape == sparse.kv_count.shape[:2]
        assert bool((d > 0).all()) and bool((d <= 1).all())
        torch.testing.assert_close(d, _loop_density(sparse), atol=1e-6, rtol=0)
        assert "density" in sparse.describe() and str(sparse.config) in sparse.describe()


def test_density_drops_below_one_on_long_sparse_problems():
    q, k, plan = _plan("gqa3_odd_n", tau=0.5, structured=True)
    assert float(plan.density().max()) < 0.9


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kw, match", [
    (dict(block=64, segment=96), "segment 96 is not a multiple of block 64"),
    (dict(block=0), "block must be a positive int"),
    (dict(block=True), "block must be a positive int"),
    (dict(segment=-128), "segment must be a positive int"),
    (dict(block=64.0), "block must be a positive int"),
    (dict(tau=0.0), "tau must be a number > 0"),
    (dict(tau=-0.5), "tau must be a number > 0"),
    (dict(tau=float("nan")), "tau must be a number > 0"),
    (dict(tau="0.9"), "tau must be a number > 0"),
    (dict(sample=-1), "sample must be an int in \\[0, block=128\\]"),
    (dict(block=32, segment=64, sample=33), "sample must be an int in \\[0, block=32\\]"),
    (dict(sample=2.0), "sample must be an int"),
    (dict(select_per="head"), "select_per must be 'segment'"),
    (dict(peaks=-1), "peaks must be an int >= 0"),
    (dict(peaks=True), "peaks must be an int >= 0"),
])
def test_bad_config_raises_plan_error_naming_the_field(kw, match):
    with pytest.raises(PlanError, match=match):
        PBSConfig(**kw)


def test_config_str_names_its_knobs():
    assert str(PBSConfig(64, 128, 0.8)) == "b=64 S=128 tau=0.8 sample=8"
    assert str(PBSConfig(64, 128, 0.8, permute=False, sample=0)) == "b=64 S=128 tau=0.8 pooled no-perm"
    assert str(PBSConfig(64, 128, 0.8, select_per="block")) == "b=64 S=128 tau=0.8 sample=8 per-block"
    assert str(PBSConfig(64, 128, 0.8, peaks=2)) == "b=64 S=128 tau=0.8 sample=8 peaks=2"


@pytest.mark.parametrize("sample", [0, 4])
@pytest.mark.parametrize("name", ["gqa3_odd_n", "chunk_mid_segment", "mha_small_blocks"])
def test_a_query_segments_blocks_share_one_selection_and_per_block_does_not(name, sample):
    b_, hq, hkv, d, n, m, blk, seg = SHAPES[name]
    q, k, _ = make_qkv(b_, hq, hkv, d, n, m, seed=4)
    per_seg = plan_pbs(q, k, PBSConfig(blk, seg, 0.6, sample=sample))
    per_blk = plan_pbs(q, k, PBSConfig(blk, seg, 0.6, sample=sample, select_per="block"))
    qseg = [(n - m + i * blk) // seg for i in range(per_seg.q_blocks)]
    differs = False
    for i in range(1, per_seg.q_blocks):
        if qseg[i] == qseg[i - 1]:
            assert torch.equal(per_seg.kv_count[..., i], per_seg.kv_count[..., i - 1]), f"block {i}"
            assert torch.equal(per_seg.kv_index[..., i, :], per_seg.kv_index[..., i - 1, :]), f"block {i}"
            differs |= not torch.equal(per_blk.kv_index[..., i, :], per_blk.kv_index[..., i - 1, :])
    assert differs, "per-block selection must differ between some blocks of a segment (else the case tests nothing)"


@pytest.mark.parametrize("qs, ks, vs, err, match", [
    ((1, 4, 64, 16), (1, 2, 64), (1, 2, 64, 16), ShapeError, "wants q \\[B, Hq, M, D\\]"),
    ((1, 4, 64, 16), (2, 2, 64, 16), (2, 2, 64, 16), ShapeError, "do not match"),
    ((1, 4, 64, 16), (1, 2, 64, 8), (1, 2, 64, 8), ShapeError, "do not match"),
    ((1, 4, 64, 16), (1, 2, 64, 16), (1, 2, 32, 16), ShapeError, "do not match"),
    ((1, 4, 64, 16), (1, 3, 64, 16), (1, 3, 64, 16), ShapeError, "4 query heads are not a multiple of 3 kv heads"),
    ((1, 4, 96, 16), (1, 2, 64, 16), (1, 2, 64, 16), ShapeError, "96 queries over 64 keys"),
    ((1, 4, 0, 16), (1, 2, 64, 16), (1, 2, 64, 16), ShapeError, "0 queries over 64 keys"),
    ((1, 4, 40, 16), (1, 2, 64, 16), (1, 2, 64, 16), PlanError, "start at key 24, not a multiple of block 32"),
])
def test_bad_shapes_are_refused_naming_the_problem(qs, ks, vs, err, match):
    cfg = PBSConfig(32, 64, 0.9)
    q, k, v = torch.randn(qs), torch.randn(ks), torch.randn(vs)
    with pytest.raises(err, match=match):
        check_qkv(q, k, v, cfg)
    with pytest.raises(err, match=match):
        plan_pbs(q, k, cfg, v=v)


def test_check_qkv_returns_the_dimensions():
    q, k, v = make_qkv(2, 6, 3, 8, 100, 100 - 64)
    assert check_qkv(q, k, v, PBSConfig(32, 64)) == (2, 6, 3, 36, 100)


# ----------------------------------------------------------------------------------------- fuzz


@pytest.mark.parametrize("seed", range(6))
def test_fuzzed_plans_are_well_formed(seed):
    s = fuzz_shape(seed)
    q, k, _ = make_qkv(s["b"], s["hq"], s["hkv"], s["d"], s["n"], s["m"], seed=seed)
    cfg = PBSConfig(s["block"], s["segment"], 0.6, peaks=seed % 3)  # 0..2 peak blocks per row too
    plan = plan_pbs(q, k, cfg)
    b, S, N = s["block"], s["segment"], s["n"]
    assert (plan.n, plan.m, plan.q_offset) == (N, s["m"], N - s["m"])
    for seg in range((N - 1) // S):
        blk = plan.perm[..., seg * S:(seg + 1) * S]
        assert torch.equal(blk.sort(-1).values, torch.arange(seg * S, (seg + 1) * S).expand_as(blk))
    qseg = (torch.arange(plan.q_blocks) * b + plan.q_offset) // S
    assert bool((plan.kv_count <= (qseg * (S // b)).to(torch.int32)).all()), s
    assert bool((plan.density() <= 1).all()) and bool((plan.density() > 0).all()), s


def test_sample_rows_are_evenly_spaced_and_end_at_each_blocks_last_row():
    rows = sample_rows(300, PBSConfig(block=64, segment=128, sample=4))
    assert rows.tolist() == [[15, 31, 47, 63], [79, 95, 111, 127], [143, 159, 175, 191], [207, 223, 239, 255],
                             [271, 287, 299, 299]]
    assert sample_rows(64, PBSConfig(block=64, segment=128, sample=64)).tolist() == [list(range(64))]


# ----------------------------------------------------------------------------------------- peak blocks


def _peak_ref(q, k_perm, cfg, n):
    # independent loops: per (batch, head, row), each whole earlier-segment block's bound
    # max over d-sums of max(q_d * kmax_d, q_d * kmin_d); the top `peaks`; OR over the row's group
    from graphtune.codegen.pbs_attention.plan import query_groups
    B, Hq, M, D = q.shape
    G = Hq // k_perm.shape[1]
    b, S = cfg.block, cfg.segment
    nkb, nqb = -(-n // b), -(-M // b)
    grp = query_groups(cfg, n, M).tolist()
    out = torch.zeros(B, Hq, nqb, nkb, dtype=torch.bool)
    for bi in range(B):
        for h in range(Hq):
            for r in range(M):
                own = (n - M + r) // S * S
                bounds = []
                for j in range(nkb):
                    if (j + 1) * b > own:
                        break
                    blk = k_perm[bi, h // G, j * b:(j + 1) * b].double()
                    qd = q[bi, h, r].double()
                    bounds.append((float(torch.maximum(qd * blk.max(0).values, qd * blk.min(0).values).sum()), j))
                for _, j in sorted(bounds, reverse=True)[:cfg.peaks]:
                    for qb in range(nqb):
                        if grp[qb] == grp[r // b]:
                            out[bi, h, qb, j] = True
    return out


@pytest.mark.parametrize("peaks", [1, 2])
@pytest.mark.parametrize("name", ["gqa3_odd_n", "chunk_mid_segment", "mha_small_blocks", "single_last_query"])
def test_peak_blocks_are_each_rows_top_bound_blocks_of_earlier_segments_shared_per_group(name, peaks):
    from graphtune.codegen.pbs_attention.plan import peak_blocks, permute_keys, permute_rows
    b_, hq, hkv, d, n, m, blk, seg = SHAPES[name]
    q, k, _ = make_qkv(b_, hq, hkv, d, n, m, seed=7)
    cfg = PBSConfig(blk, seg, 0.5, sample=min(8, blk), peaks=peaks)
    kp = permute_rows(k, permute_keys(q, k, cfg))
    got = peak_blocks(q, kp, cfg, n)
    assert torch.equal(got, _peak_ref(q, kp, cfg, n))
    assert got.any() or n <= seg  # something past the first segment is always added


def test_the_bound_is_never_below_a_blocks_true_max_score():
    # the property the detector rests on: relu(q).kmax + min(q,0).kmin >= q.k for every key of the block
    g = torch.Generator().manual_seed(3)
    q, kb = torch.randn(50, 16, generator=g), torch.randn(7, 32, 16, generator=g)
    ub = q.clamp_min(0) @ kb.amax(1).T + q.clamp_max(0) @ kb.amin(1).T  # [50, 7]
    true = torch.einsum("rd,jkd->rjk", q, kb).amax(-1)
    assert bool((ub >= true - 1e-5).all())


@pytest.mark.parametrize("sample", [0, 8])
@pytest.mark.parametrize("name", ["gqa3_odd_n", "chunk_mid_segment"])
def test_peaks_only_add_blocks_and_never_change_the_permutation(name, sample):
    b_, hq, hkv, d, n, m, blk, seg = SHAPES[name]
    q, k, _ = make_structured(b_, hq, hkv, d, n, m, seed=2)
    base = plan_pbs(q, k, PBSConfig(blk, seg, 0.6, sample=min(sample, blk)))
    more = plan_pbs(q, k, PBSConfig(blk, seg, 0.6, sample=min(sample, blk), peaks=2))
    assert torch.equal(base.perm, more.perm)
    a, b = _mask(base), _mask(more)
    assert bool((a <= b).all()) and bool((b & ~a).any())
    # and nothing outside earlier segments: tau 1 (every allowed block) contains it
    full = _mask(plan_pbs(q, k, PBSConfig(blk, seg, 1.0, sample=min(sample, blk))))
    assert bool((b <= full).all())


def _mask(plan):
    # [B, Hq, nqb, nkb] bool of the selected blocks
    B, Hq, nqb, _ = plan.kv_index.shape
    out = torch.zeros(B, Hq, nqb, -(-plan.n // plan.config.block), dtype=torch.bool)
    for x in range(B):
        for h in range(Hq):
            for i in range(nqb):
                out[x, h, i, list(selected(plan, x, h, i))] = True
    return out
