"""The roofline cost model (graphtune/codegen/costmodel.py) and static_rank's use of it."""
import math

import pytest
import torch

pytest.importorskip("triton")

from graphtune.codegen import costmodel  # noqa: E402
from graphtune.codegen import crosscompile as cc  # noqa: E402
from graphtune.codegen.costmodel import GPU_PEAKS, doc_shapes, efficiency, predict, traffic  # noqa: E402
from graphtune.codegen.crosscompile import KernelResources  # noqa: E402
from graphtune.codegen.family import family, load_impl_modules  # noqa: E402
from graphtune.codegen.registry import KernelConfig, get_impl  # noqa: E402
from graphtune.errors import KernelError  # noqa: E402

F16 = torch.float16
RES = KernelResources("k", 90, registers=96, spill_bytes=0, shared_mem_bytes=40 * 1024, num_warps=4, num_stages=2)


def _attn(B, hq, hkv, L, S, D=128, causal=False):
    q = torch.empty(B, hq, L, D, dtype=F16, device="meta")
    kv = torch.empty(B, hkv, S, D, dtype=F16, device="meta")
    return (q, kv, kv, None, causal)


def _cfg(bm, bn=64, w=4, s=2):
    return KernelConfig.make(num_warps=w, num_stages=s, BLOCK_M=bm, BLOCK_N=bn)


def test_attention_kv_traffic_is_one_read_per_query_block():
    args = _attn(2, 32, 8, 512, 4096)  # G*L = 2048 rows per kv head
    one_read = 2 * 2 * 8 * 4096 * 2 * 128  # bytes of K and V
    for bm in (16, 64, 128):
        assert traffic("triton.attention_fwd", args, _cfg(bm)).kv_bytes == one_read * (2048 // bm)


def test_causal_attention_reads_about_half_the_keys_of_full_attention():
    full = traffic("triton.attention_fwd", _attn(1, 8, 8, 2048, 2048), _cfg(64))
    causal = traffic("triton.attention_fwd", _attn(1, 8, 8, 2048, 2048, causal=True), _cfg(64))
    assert 0.5 <= causal.kv_bytes / full.kv_bytes <= 0.52
    assert 0.5 <= causal.ideal_flops / full.ideal_flops <= 0.51


def test_lean_decode_reads_kv_once_whatever_block_n():
    load_impl_modules("cuda")
    from graphtune.codegen.lean_decode.key import LeanShape

    meta = LeanShape((1024,) * 4, 8, 2, 64, 1, "float16").meta_args()
    kv = {bn: traffic("triton.lean_decode", meta, KernelConfig.make(num_warps=4, num_stages=2, BLOCK_N=bn)).kv_bytes
          for bn in (32, 64, 128)}
    assert set(kv.values()) == {2 * 4 * 2 * 1024 * 2 * 64}


def test_every_modelled_family_moves_at_least_the_ideal_bytes_and_flops_for_every_config():
    load_impl_modules("cuda")
    for name, shapes in doc_shapes().items():
        impl = get_impl(shapes[0].op, family(name).default_impls["cuda"])
        assert costmodel.has_model(impl.name), name
        for shape in shapes:
            meta = shape.meta_args()
            for cfg in impl.configs(meta):
                t = traffic(impl.name, meta, cfg)
                assert 0 < t.ideal_bytes <= t.bytes and 0 < t.ideal_flops <= t.flops * (1 + 1e-9), (name, cfg)


def test_decode_is_memory_bound_and_long_prefill_compute_bound_on_h100():
    dec = predict("triton.attention_fwd", _attn(8, 32, 8, 1, 4096), _cfg(16), RES, 90, blocks=5, programs=64)
    pre = predict("triton.attention_fwd", _attn(1, 32, 8, 4096, 4096, causal=True), _cfg(128, w=8), RES, 90,
                  blocks=5, programs=1024)
    assert dec.bound == "memory" and pre.bound == "compute"
    # decode: 2 * 8 * 8 * 4096 * 128 * 2 bytes of K/V over 3.35 TB/s, then the launch
    assert dec.memory_us == pytest.approx(8 * 8 * 4096 * 256 * 2 / 3.35e12 * 1e6, rel=0.02)


def test_h100_predicts_a_shorter_time_than_a100_for_the_same_kernel():
    args, cfg = _attn(4, 32, 8, 1024, 1024, causal=True), _cfg(64)
    a100 = predict("triton.attention_fwd", args, cfg, RES, 80, blocks=5, programs=512)
    h100 = predict("triton.attention_fwd", args, cfg, RES, 90, blocks=5, programs=512)
    assert h100.time_us < a100.time_us
    assert GPU_PEAKS[90].hbm_bytes_per_s > GPU_PEAKS[80].hbm_bytes_per_s


def test_score_is_in_zero_one_and_a_spilling_config_scores_minus_inf():
    args = _attn(2, 32, 8, 512, 4096)
    p = predict("triton.attention_fwd", args, _cfg(64), RES, 90, blocks=5, programs=256)
    assert 0 < p.score <= 1
    spill = KernelResources("k", 90, 255, 64, 40 * 1024, 4, 2)
    assert predict("triton.attention_fwd", args, _cfg(64), spill, 90, blocks=5, programs=256).score == float("-inf")
    assert math.isinf(predict("triton.attention_fwd", args, _cfg(64), None, 90, blocks=5, programs=256).time_us)


def test_efficiency_falls_with_fewer_programs_than_sms():
    assert cc.blocks_per_sm(RES, 90) == 5
    assert efficiency(RES, 5, 132 * 5, 90) == pytest.approx(1.0)  # 5 resident blocks per SM, one full wave
    assert efficiency(RES, 5, 33, 90) < 0.25
    assert efficiency(RES, 0, 132 * 5, 90) == 0.0  # cannot launch


def test_peaks_describe_the_parts_of_the_occupancy_model():
    for arch, peak in GPU_PEAKS.items():
        assert peak.num_sms == cc.ARCH_LIMITS[arch].num_sms


def test_l2_serves_kv_rereads_while_the_resident_working_set_fits():
    # 8 kv heads x 2 MB of K/V fit in H100's 50 MB L2: 32 query blocks re-read it from L2, not HBM
    t = traffic("triton.attention_fwd", _attn(1, 32, 8, 512, 4096), _cfg(64))
    assert t.kv_bytes == 32 * t.kv_once
    assert costmodel.hbm_bytes(t, 5, 90) == pytest.approx(t.bytes - t.kv_bytes + t.kv_once)
    # 64 streams x 16 MB do not: most re-reads go to HBM
    big = traffic("triton.attention_fwd", _attn(8, 32, 8, 512, 32768), _cfg(64))
    assert costmodel.hbm_bytes(big, 5, 90) > 0.9 * big.bytes


def test_unknown_impl_or_arch_raises_kernel_error_naming_it():
    with pytest.raises(KernelError, match="triton.nope"):
        traffic("triton.nope", (), _cfg(16))
    with pytest.raises(KernelError, match="sm_75"):
        predict("triton.attention_fwd", _attn(1, 8, 8, 1, 64), _cfg(16), RES, 75, blocks=5, programs=8)


def test_static_rank_prefers_fewer_kv_rereads_when_resources_are_equal(monkeypatch):
    # memory-bound GQA verify (G*L = 256 rows, 8K keys): BLOCK_M=128 reads K/V 2x per kv head, 16 reads it 16x
    monkeypatch.setattr(cc, "compile_many", lambda jobs: [RES for _ in jobs])
    args = _attn(8, 32, 8, 64, 8192)
    ranked = cc.static_rank("triton.attention_fwd", args, [_cfg(16), _cfg(128, w=8)], 90)
    assert [c["BLOCK_M"] for c, _, _ in ranked] == [128, 16]
    assert ranked[0][1] > 2 * ranked[1][1]


def test_static_rank_scores_real_cross_compiled_configs_with_the_roofline():
    ranked = cc.static_rank("triton.attention_fwd", _attn(1, 4, 2, 64, 256, D=64), [_cfg(16), _cfg(64)], 90)
    assert all(0 < s <= 1 and r is not None and r.spill_bytes == 0 for _, s, r in ranked)
    best, _, res = ranked[0]
    p = predict("triton.attention_fwd", _attn(1, 4, 2, 64, 256, D=64), best, res, 90, blocks=cc.blocks_per_sm(res, 90))
    assert p.score == pytest.approx(ranked[0][1])


def test_compute_bound_prefill_prefers_large_query_tiles_through_the_l2_term():
    # K/V re-reads hit L2 (8 heads x 1 MB) but still stream through it: BLOCK_M=16 re-reads 8x more than 128
    args = _attn(1, 32, 8, 2048, 2048, causal=True)
    small = predict("triton.attention_fwd", args, _cfg(16), RES, 90, blocks=5, programs=8 * 512)
    big = predict("triton.attention_fwd", args, _cfg(128, w=8), RES, 90, blocks=5, programs=8 * 64)
    assert small.bound == "l2" and big.bound == "compute"
    assert big.time_us < small.time_us
    assert small.memory_us == pytest.approx(big.memory_us)  # HBM bytes equal: the re-reads are L2 hits
