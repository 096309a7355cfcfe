"""Cross-compilation for sm_80/sm_90 without a GPU, and the static resource model.

The default configs of both kernels are compiled for both targets (ptxas runs for real; the
cubin is read with cuobjdump) and must not spill, must fit the target's shared memory and
must leave room for at least one resident block.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # same process as the interpreter tests

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from graphtune import flags  # noqa: E402
from graphtune.codegen.attention.triton_kernels import attention_compile_spec, attention_default_config  # noqa: E402
from graphtune.codegen.crosscompile import (  # noqa: E402
    ARCH_LIMITS,
    CompileJob,
    CompileSpec,
    KernelResources,
    _score,
    blocks_per_sm,
    compile_for_target,
    compile_impl,
    compile_many,
    occupancy,
    static_rank,
)
from graphtune.codegen.merge_states.triton_kernels import MERGE_DEFAULT_CONFIG, merge_compile_spec  # noqa: E402
from graphtune.codegen.registry import KernelConfig  # noqa: E402
from graphtune.errors import KernelError  # noqa: E402


def _meta(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _attn_args(L, S, D, hq=8, hkv=8):
    return (_meta(2, hq, L, D), _meta(2, hkv, S, D), _meta(2, hkv, S, D), None, True, None, hq != hkv)


ATTN_CASES = {
    "prefill_d64": _attn_args(512, 512, 64),
    "prefill_d128": _attn_args(512, 512, 128),
    "prefill_d256": _attn_args(512, 512, 256),
    "decode_gqa4_d128": _attn_args(1, 2048, 128, hq=32, hkv=8),
}
# the kernel's other compiled paths (masks, non-causal, bf16 MMA, fp32 FMA dots), one target each
VARIANT_CASES = {
    "bool_mask_noncausal_fp16_d128": ((_meta(2, 8, 512, 128),) * 3 + (_meta(2, 1, 512, 512, dtype=torch.bool),
                                                                      False, None, False), 90),
    "float_mask_bf16_d64": ((_meta(2, 8, 512, 64, dtype=torch.bfloat16),) * 3
                            + (_meta(2, 1, 1, 512, dtype=torch.bfloat16), False, None, False), 80),
    "fp32_d64": ((_meta(2, 8, 512, 64, dtype=torch.float32),) * 3 + (None, True, None, False), 80),
}


def _assert_launchable(res: KernelResources, arch: int) -> None:
    lim = ARCH_LIMITS[arch]
    assert res.arch == arch
    assert 0 < res.registers <= 255
    assert res.spill_bytes == 0, f"ptxas spilled {res.spill_bytes} bytes"
    assert res.shared_mem_bytes <= lim.smem_per_block
    assert occupancy(res, arch) > 0


def _merge_args():
    return [_meta(4, 32, 1, 128)] * 3, [_meta(4, 32, 1, dtype=torch.float32)] * 3


@pytest.fixture(scope="module")
def default_resources():
    # one batch (one worker process under TRITON_INTERPRET=1) for every default config x arch
    jobs, keys = [], []
    for arch in (80, 90):
        for case, args in ATTN_CASES.items():
            cfg = attention_default_config(args)
            spec = attention_compile_spec(args, cfg)
            jobs.append(CompileJob(spec.fn, spec.args, spec.kwargs, cfg.num_warps, cfg.num_stages, arch))
            keys.append((case, arch))
        spec = merge_compile_spec(_merge_args(), MERGE_DEFAULT_CONFIG)
        jobs.append(CompileJob(spec.fn, spec.args, spec.kwargs, MERGE_DEFAULT_CONFIG.num_warps,
                               MERGE_DEFAULT_CONFIG.num_stages, arch))
        keys.append(("merge", arch))
    for case, (args, arch) in VARIANT_CASES.items():
        cfg = attention_default_config(args)
        spec = attention_compile_spec(args, cfg)
        jobs.append(CompileJob(spec.fn, spec.args, spec.kwargs, cfg.num_warps, cfg.num_stages, arch))
        keys.append((case, arch))
    # the same merge job again: served from the disk cache the first one wrote
    jobs.append(jobs[keys.index(("merge", 90))])
    keys.append(("merge_again", 90))
    # tl.arange needs a power of two: the compiler error must come back as a value
    spec = merge_compile_spec(_merge_args(), MERGE_DEFAULT_CONFIG)
    jobs.append(CompileJob(spec.fn, spec.args, dict(spec.kwargs, BLOCK_R=3), 4, 1, 90))
    keys.append(("bad", 90))
    return dict(zip(keys, compile_many(jobs)))


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_default_configs_compile_without_spills(default_resources, case, arch):
    res = default_resources[(case, arch)]
    assert isinstance(res, KernelResources), res
    _assert_launchable(res, arch)
    cfg = attention_default_config(ATTN_CASES[case])
    assert (res.num_warps, res.num_stages) == (cfg.num_warps, cfg.num_stages)


@pytest.mark.parametrize("case", list(VARIANT_CASES))
def test_attention_mask_dtype_variants_compile_without_spills(default_resources, case):
    arch = VARIANT_CASES[case][1]
    res = default_resources[(case, arch)]
    assert isinstance(res, KernelResources), res
    _assert_launchable(res, arch)


@pytest.mark.parametrize("arch", [80, 90])
def test_merge_default_config_compiles_without_spills(default_resources, arch):
    res = default_resources[("merge", arch)]
    assert isinstance(res, KernelResources), res
    _assert_launchable(res, arch)


def test_results_are_cached_on_disk_next_to_the_tuning_db(default_resources):
    first, again = default_resources[("merge", 90)], default_resources[("merge_again", 90)]
    assert again == first  # same record, compile time included: it was read back, not recompiled
    cache = Path(flags.get("DB")).parent / "crosscompile"
    assert any(json.loads(f.read_text()) == first.to_dict() for f in cache.glob("*.json"))


def test_compile_errors_come_back_as_kernel_errors(default_resources, monkeypatch):
    bad = default_resources[("bad", 90)]
    assert isinstance(bad, KernelError) and "sm_90" in str(bad)
    import graphtune.codegen.crosscompile as xc

    monkeypatch.setattr(xc, "compile_many", lambda jobs: [bad])
    with pytest.raises(KernelError, match="sm_90"):
        compile_for_target(None, (), {}, MERGE_DEFAULT_CONFIG, 90)


def test_occupancy_matches_hand_computed_limits():
    def res(regs, smem, warps, arch=80):
        return KernelResources("k", arch, regs, 0, smem, warps, 2)

    # 128 regs x 4 warps: 16 KiB regs/block -> 4 blocks; 32 KiB (+1 KiB reserved) smem -> 4 blocks
    assert blocks_per_sm(res(128, 32 * 1024, 4), 80) == 4 and occupancy(res(128, 32 * 1024, 4)) == 0.25
    # 255 regs round up to 256/thread: 8 warps by registers -> 2 blocks of 4 warps
    assert blocks_per_sm(res(255, 0, 4), 80) == 2
    # shared memory bound: 100 KiB fits once on sm_80 (164 KiB), twice on sm_90 (228 KiB)
    assert blocks_per_sm(res(32, 100 * 1024, 4), 80) == 1
    assert blocks_per_sm(res(32, 100 * 1024, 4, 90), 90) == 2
    # warp bound: 32 regs, 8 warps -> 64 / 8 = 8 blocks -> full occupancy
    assert occupancy(res(32, 0, 8)) == 1.0
    # over the per-block limit: cannot launch at all
    assert blocks_per_sm(res(32, 164 * 1024, 4), 80) == 0 and blocks_per_sm(res(32, 164 * 1024, 4, 90), 90) == 1
    with pytest.raises(KernelError, match="sm_75"):
        occupancy(res(32, 0, 4), 75)


def test_score_rejects_spills_and_unlaunchable_prefers_full_waves_and_busy_sms():
    spec = CompileSpec(fn=None, args=(), kwargs={}, programs=4 * 108)
    good = KernelResources("k", 80, 128, 0, 32 * 1024, 4, 2)
    assert _score(KernelResources("k", 80, 255, 64, 0, 4, 2), spec, 80) == float("-inf")
    assert _score(KernelResources("k", 80, 64, 0, 200 * 1024, 4, 2), spec, 80) == float("-inf")
    assert _score(good, spec, 80) == pytest.approx(1.0)
    # one program more than a full wave leaves most of the second wave idle
    worse = CompileSpec(fn=None, args=(), kwargs={}, programs=4 * 108 + 1)
    assert 0 < _score(good, worse, 80) < 0.6
    # a 54-program grid (decode, few heads) keeps half the SMs idle and one block per SM:
    # 8 warps per block hide latency twice as well as 4
    small = CompileSpec(fn=None, args=(), kwargs={}, programs=54)
    assert _score(good, small, 80) == pytest.approx(0.5 * 0.25)
    assert _score(KernelResources("k", 80, 128, 0, 32 * 1024, 8, 2), small, 80) == pytest.approx(0.5 * 0.5)


def test_static_rank_orders_configs_and_reports_resources():
    outs, lses = [_meta(64, 8, 1, 128)] * 2, [_meta(64, 8, 1, dtype=torch.float32)] * 2
    broken = KernelConfig.make(num_warps=4, num_stages=1, BLOCK_R=3)  # does not compile
    configs = [MERGE_DEFAULT_CONFIG, KernelConfig.make(num_warps=1, num_stages=1, BLOCK_R=1),
               KernelConfig.make(num_warps=8, num_stages=1, BLOCK_R=64), broken]
    ranked = static_rank("triton.merge_states", (outs, lses), configs, 90)
    assert sorted(map(str, configs)) == sorted(str(c) for c, _, _ in ranked)
    scores = [s for _, s, _ in ranked]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    assert ranked[-1][0] == broken and ranked[-1][1] == float("-inf") and ranked[-1][2] is None
    for cfg, score, res in ranked[:-1]:
        assert res is not None and res.arch == 90 and (res.num_warps == cfg.num_warps)
        assert (score == float("-inf")) == (res.spill_bytes > 0 or blocks_per_sm(res, 90) == 0)


def test_unknown_impl_raises():
    with pytest.raises(KernelError, match="no cross-compilation spec"):
        static_rank("triton.nope", (), None, 90)
    with pytest.raises(KernelError, match="no cross-compilation spec"):
        compile_impl("triton.nope", (), MERGE_DEFAULT_CONFIG, 90)
