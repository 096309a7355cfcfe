"""Roofline cost model of the Triton kernels: predicted time per config for a GPU we do not have.

Static mode (:func:`graphtune.codegen.crosscompile.static_rank`) cross-compiles every config and
reads its registers, spills and shared memory; this module turns that plus the tile shapes into a
predicted time::

    predicted = max(bytes / HBM_BW, kv_reads / L2_BW, flops / PEAK) / efficiency(occupancy)
                + launches * LAUNCH_US

* ``bytes``: HBM traffic of the config, from its tile shapes. The formula is per implementation
  (:data:`TRAFFIC`, written out in ``docs/kernels.md``); the term that differs between configs is
  how often K/V are re-read: an attention program streams its kv head's keys once per query block
  of ``BLOCK_M`` rows, so K/V traffic is ``ceil(G * L / BLOCK_M)`` times the K/V size. Re-reads
  are served by L2 while the K/V the resident programs read at once fits (:func:`hbm_bytes`);
  all of them (``kv_reads``) still stream through L2, whose bandwidth is the third ceiling: it is
  what makes a compute-bound prefill prefer large query tiles.
* ``flops``: matrix-product work including the padding of partial tiles (``BLOCK_M`` rows,
  ``BLOCK_N`` keys, ``BLOCK_D`` lanes), at the tensor-core peak for fp16/bf16 and the fp32 FMA
  peak for fp32 (the kernels use IEEE fp32 dots, not TF32).
* ``efficiency``: the share of the GPU the grid keeps busy, in (0, 1] (:func:`efficiency`):
  latency hiding (resident blocks per SM from :func:`~graphtune.codegen.crosscompile.blocks_per_sm`,
  saturating at 16 of 64 warp slots), busy SMs (a grid smaller than the SM count idles the rest)
  and wave quantization (a partial last wave).

The static *score* that ``static_rank`` returns is ``ideal / predicted``: ``ideal`` is the same
roofline with K/V read once, no padding and full efficiency, a property of the problem alone, so
scores of different configs and implementations of one problem compare, and lie in (0, 1].

Peaks (:data:`GPU_PEAKS`) are of the reference parts the resource model uses (A100 SXM for
sm_80, H100 SXM for sm_90), dense, without sparsity. L2 hits on re-read K/V are not modelled:
the model over-charges small ``BLOCK_M``, which is the direction a measured run corrects.

Examples
--------
>>> import torch
>>> from graphtune.codegen.costmodel import traffic
>>> from graphtune.codegen.registry import KernelConfig
>>> q = torch.empty(1, 8, 256, 64, dtype=torch.float16, device="meta")
>>> k = torch.empty(1, 8, 1024, 64, dtype=torch.float16, device="meta")
>>> small = traffic("triton.attention_fwd", (q, k, k), KernelConfig.make(BLOCK_M=32, BLOCK_N=64))
>>> big = traffic("triton.attention_fwd", (q, k, k), KernelConfig.make(BLOCK_M=128, BLOCK_N=64))
>>> round(small.kv_bytes / big.kv_bytes)  # 8 query blocks re-read K/V, 2 do
4
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from graphtune.codegen.registry import KernelConfig
from graphtune.errors import KernelError

__all__ = ["GPUPeak", "GPU_PEAKS", "Traffic", "Prediction", "TRAFFIC", "LAUNCH_US", "traffic", "hbm_bytes", "efficiency",
           "predict", "has_model", "score", "doc_shapes"]

LAUNCH_US = 2.0  # per kernel launch: what a near-empty grid still costs
WARP_SLOTS = 64  # resident warps per SM on sm_80 and sm_90


@dataclass(frozen=True)
class GPUPeak:
    """Roofline ceilings of one reference part (bytes/s, flop/s; dense)."""

    part: str
    hbm_bytes_per_s: float
    tensor_flops: float  # fp16/bf16 tensor cores
    fp32_flops: float  # fp32 FMA (IEEE fp32 dots, elementwise work)
    l2_bytes: float  # K/V re-reads hit here while the K/V being read at once fits
    l2_bytes_per_s: float  # every K/V read, hit or miss, streams through L2 (approximate, microbenchmarks)
    num_sms: int  # as crosscompile.ARCH_LIMITS (tested equal)


GPU_PEAKS: dict[int, GPUPeak] = {
    80: GPUPeak("A100-SXM4", 2.0e12, 312e12, 19.5e12, 40e6, 5.0e12, 108),
    90: GPUPeak("H100-SXM5", 3.35e12, 990e12, 67e12, 50e6, 10.0e12, 132),
}


def _peak(arch: int) -> GPUPeak:
    try:
        return GPU_PEAKS[arch]
    except KeyError:
        raise KernelError(f"no roofline peaks for sm_{arch}; known: {sorted(GPU_PEAKS)}") from None


@dataclass(frozen=True)
class Traffic:
    """HBM bytes and flops of one config (``bytes``/``flops``) and of the ideal kernel (``ideal_*``)."""

    bytes: float
    flops: float
    ideal_bytes: float
    ideal_flops: float
    kv_bytes: float  # the part of ``bytes`` that is K/V (re-)reads
    tensor_cores: bool  # flops run on tensor cores (fp16/bf16 dots)
    launches: int = 1
    kv_once: float = 0.0  # K/V bytes read once (``kv_bytes - kv_once`` are re-reads)
    kv_streams: int = 1  # distinct K/V sequences (batch x kv heads); one program reads one of them


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _p2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _keys_per_block(kv_len: int, q_len: int, rows_per_block: int, causal: bool) -> float:
    # rows are group-major (row = g * L + i): a block spans min(BLOCK_M, L) consecutive queries of one
    # head; a causal block (bottom-right, offset S - L) reads keys up to its last query, on average
    # offset + (L + span) / 2
    if not causal:
        return float(kv_len)
    span = min(rows_per_block, q_len)
    return float(min(kv_len, kv_len - q_len + (q_len + span) / 2))


def _attention_like(B: int, hq: int, hkv: int, L: int, S: int, D: int, Dv: int, e: int, bm: int, bn: int,
                    causal: bool, extra_bytes: float = 0.0, mask_elem: int = 0, launches: int = 1) -> Traffic:
    """Folded-GQA flash attention: grid ``B * Hkv * ceil(G*L / BLOCK_M)``, each program reads its Q tile and
    the kv head's keys once (``kb`` keys per block), writes O and the LSE."""
    rows = max(1, hq // hkv * L)
    m = _cdiv(rows, bm)
    kb = _keys_per_block(S, L, bm, causal)
    kb_pad = _cdiv(max(1, math.ceil(kb)), bn) * bn
    kv = e * B * hkv * m * kb * (D + Dv)
    qo = e * B * hq * L * (D + Dv) + 4 * B * hq * L  # Q in, O out, fp32 LSE out
    kc = (S - L + (L + 1) / 2) if causal else S  # keys a row really sees
    mask = mask_elem * B * hq * L * kc
    flops = 2.0 * B * hkv * (m * bm) * kb_pad * (_p2(max(16, D)) + _p2(max(16, Dv)))
    ideal_flops = 2.0 * B * hq * L * kc * (D + Dv)
    once = e * B * hkv * S * (D + Dv)
    return Traffic(kv + qo + mask + extra_bytes, flops, once + qo + mask + extra_bytes, ideal_flops, kv, e < 4,
                   launches, kv_once=min(kv, once), kv_streams=B * hkv)


def _attention(op_args: tuple, config: KernelConfig) -> Traffic:
    from graphtune.codegen.attention.triton_kernels import AttnProblem

    p = AttnProblem.from_args(op_args)
    e = p.dtype.itemsize
    mask_elem = 0 if not p.mask_kind else (1 if p.mask_kind == 2 else e)
    return _attention_like(p.batch, p.hq, p.hkv, p.q_len, p.kv_len, p.head_dim, p.head_dim_v, e,
                           config["BLOCK_M"], config["BLOCK_N"], p.is_causal, mask_elem=mask_elem)


def _suffix_merge(op_args: tuple, config: KernelConfig) -> Traffic:
    # suffix attention of every row over its own Ls keys, merged with the prior (shared-prefix) state:
    # attention's traffic over the suffix, plus the prior's out and LSE read once
    q, k, _, _, prior_out, *rest = (*op_args, None, None, None)[:10]
    B, hq, L, D = (int(x) for x in q.shape)
    hkv, S = int(k.shape[1]), int(k.shape[2])
    e = q.dtype.itemsize
    causal = bool(rest[2]) if len(rest) > 2 and rest[2] is not None else False
    prior = (e * D + 4) * B * hq * L if prior_out is not None else 0.0
    return _attention_like(B, hq, hkv, L, S, D, D, e, config["BLOCK_M"], config["BLOCK_N"], causal and L > 1,
                           extra_bytes=prior)


def _tree(op_args: tuple, config: KernelConfig) -> Traffic:
    # per (row, kv head): ceil(G * max_n / BLOCK_M) query blocks, each reading the row's context and its
    # draft keys once; meta index tensors: the context is estimated as pool slots / rows - max_n
    from graphtune.codegen.tree_attention.triton_kernels import _rows_of

    q, k, _, kv_start = op_args[:4]
    hq, T, D = (int(x) for x in q.shape)
    hkv, slots = int(k.shape[0]), int(k.shape[1])
    B = int(kv_start.shape[0]) if isinstance(kv_start, torch.Tensor) else len(kv_start)
    rows, _ = _rows_of(op_args)
    n = max(1, rows // max(1, hq // hkv))
    ctx = max(0, slots // max(1, B) - n)
    t = _attention_like(B, hq, hkv, n, ctx + n, D, D, q.dtype.itemsize, config["BLOCK_M"], config["BLOCK_N"], False)
    return t


def _lean(op_args: tuple, config: KernelConfig) -> Traffic:
    # stream-K: every KV tile is read exactly once (BLOCK_M covers all G*L rows of a kv head); each of W
    # workers' segments (at most W + B*Hkv) writes an fp32 partial [rows, D] + LSE that the reduce
    # kernel reads back. Meta tensors: every row is modelled at the padded length S
    from graphtune.codegen.lean_decode.triton_kernels import gpu_plan

    q, k = op_args[0], op_args[1]
    B, hq, L, D = (int(x) for x in q.shape)
    hkv, S = int(k.shape[1]), int(k.shape[2])
    e = q.dtype.itemsize
    rows, bn = hq // hkv * L, config["BLOCK_N"]
    bm, bd = max(16, _p2(rows)), max(16, _p2(D))
    W = gpu_plan([max(1, S)] * B, hkv, D, 132).num_workers
    seg = W + B * hkv
    kv = e * B * hkv * S * 2 * D
    partials = 2 * 4 * seg * rows * (D + 1) + e * seg * rows * D  # written + read back, Q per segment
    out = e * B * hq * L * D + 4 * B * hq * L
    flops = 2.0 * B * hkv * bm * (_cdiv(S, bn) * bn) * 2 * bd
    ideal = e * B * hkv * S * 2 * D + e * B * hq * L * D + out
    return Traffic(kv + partials + out, flops, ideal, 2.0 * B * hq * L * S * 2 * D, kv, e < 4, launches=2,
                   kv_once=kv, kv_streams=B * hkv)


def _merge(op_args: tuple, config: KernelConfig) -> Traffic:
    # N partial states [R, D] + LSEs read once, one state written; ~4 fp32 operations per element
    from graphtune.codegen.merge_states.triton_kernels import _rows_dim

    outs, _ = op_args
    n = len(outs)
    rows, d = _rows_dim(op_args)
    e = outs[0].dtype.itemsize
    by = (n + 1) * rows * (d * e + 4)
    return Traffic(by, 4.0 * n * rows * d, by, 4.0 * n * rows * d, 0.0, False)


# impl name -> fn(op_args, config) -> Traffic; the formulas are written out in docs/kernels.md
TRAFFIC: dict[str, Callable[[tuple, KernelConfig], Traffic]] = {
    "triton.attention_fwd": _attention,
    "triton.lean_decode": _lean,
    "triton.shared_prefix_suffix_merge": _suffix_merge,
    "triton.tree_attention": _tree,
    "triton.merge_states": _merge,
}


def has_model(impl_name: str) -> bool:
    """Whether :data:`TRAFFIC` has a formula for ``impl_name``."""
    return impl_name in TRAFFIC


def traffic(impl_name: str, op_args: tuple, config: KernelConfig) -> Traffic:
    """HBM bytes and flops of ``impl_name`` for op arguments (meta tensors fine) and a config.

    Raises
    ------
    KernelError
        No formula for ``impl_name``.
    """
    if impl_name not in TRAFFIC:
        raise KernelError(f"no roofline traffic model for {impl_name!r}; modelled: {sorted(TRAFFIC)}")
    return TRAFFIC[impl_name](op_args, config)


def efficiency(res, blocks: int, programs: int, arch: int) -> float:
    """Share of the GPU a grid of ``programs`` keeps busy, in [0, 1]; 0 when it spills or cannot launch.

    ``res`` is the config's ``KernelResources`` (``num_warps``, ``spill_bytes``), ``blocks`` its
    resident blocks per SM (:func:`graphtune.codegen.crosscompile.blocks_per_sm`). ``latency * busy
    * tail``: resident warps per SM (saturating at 16 of 64), SMs with work, and the useful fraction
    of the last wave.

    >>> from graphtune.codegen.crosscompile import KernelResources
    >>> res = KernelResources("k", 90, registers=128, spill_bytes=0, shared_mem_bytes=32 * 1024,
    ...                       num_warps=4, num_stages=2)
    >>> efficiency(res, 4, 132 * 4, 90), efficiency(res, 4, 66, 90)  # 4 blocks per SM by registers
    (1.0, 0.125)
    """
    sms = _peak(arch).num_sms
    if blocks <= 0 or res.spill_bytes > 0:
        return 0.0
    programs = max(1, programs)
    per_sm = min(blocks, _cdiv(programs, sms))
    latency = min(1.0, per_sm * res.num_warps / WARP_SLOTS / 0.25)
    busy = min(1.0, programs / sms)
    slots = blocks * sms
    tail = 1.0 if programs <= slots else programs / (_cdiv(programs, slots) * slots)
    return latency * busy * tail


def hbm_bytes(t: Traffic, blocks: int, arch: int) -> float:
    """``t.bytes`` less the K/V re-reads L2 serves: the ``blocks * num_sms`` programs resident at once
    read at most ``resident * kv_once / kv_streams`` distinct K/V bytes; the share of that working
    set beyond L2 is the share of re-reads that miss."""
    rereads = t.kv_bytes - t.kv_once
    if rereads <= 0:
        return t.bytes
    pk = _peak(arch)
    ws = min(t.kv_once, t.kv_once / max(1, t.kv_streams) * max(1, blocks) * pk.num_sms)
    miss = max(0.0, 1.0 - pk.l2_bytes / ws) if ws > 0 else 0.0
    return t.bytes - rereads * (1.0 - miss)


@dataclass(frozen=True)
class Prediction:
    """Predicted time of one config (µs; ``inf`` when it spills, does not fit or failed to compile)."""

    time_us: float
    memory_us: float
    l2_us: float
    compute_us: float
    efficiency: float
    ideal_us: float
    traffic: Traffic

    @property
    def bound(self) -> str:
        """``"memory"`` (HBM), ``"l2"`` (K/V re-reads) or ``"compute"``: the largest of the three terms."""
        return max((self.memory_us, "memory"), (self.l2_us, "l2"), (self.compute_us, "compute"))[1]

    @property
    def score(self) -> float:
        """``ideal / predicted`` in (0, 1]; ``-inf`` for an infinite prediction (static_rank's convention)."""
        return self.ideal_us / self.time_us if math.isfinite(self.time_us) else float("-inf")


def predict(impl_name: str, op_args: tuple, config: KernelConfig, res, arch: int, *, blocks: int,
            programs: int | None = None) -> Prediction:
    """Roofline prediction for one cross-compiled config.

    ``res``: its ``KernelResources`` (``None``: it did not compile); ``blocks``: its resident blocks
    per SM (:func:`graphtune.codegen.crosscompile.blocks_per_sm`); ``programs``: the grid size (from
    the implementation's compile spec when omitted).

    Examples
    --------
    >>> import torch
    >>> from graphtune.codegen.costmodel import predict
    >>> from graphtune.codegen.crosscompile import KernelResources
    >>> from graphtune.codegen.registry import KernelConfig
    >>> q = torch.empty(8, 32, 1, 128, dtype=torch.float16, device="meta")
    >>> kv = torch.empty(8, 8, 4096, 128, dtype=torch.float16, device="meta")
    >>> res = KernelResources("k", 90, 96, 0, 40 * 1024, 4, 2)
    >>> p = predict("triton.attention_fwd", (q, kv, kv), KernelConfig.make(BLOCK_M=16, BLOCK_N=64), res, 90,
    ...             blocks=5, programs=64)
    >>> p.bound, round(p.memory_us, 1)  # 134 MB of K/V over 3.35 TB/s
    ('memory', 40.1)
    """
    t = traffic(impl_name, op_args, config)
    pk = _peak(arch)
    peak = pk.tensor_flops if t.tensor_cores else pk.fp32_flops
    mem, comp = hbm_bytes(t, blocks, arch) / pk.hbm_bytes_per_s * 1e6, t.flops / peak * 1e6
    l2 = t.kv_bytes / pk.l2_bytes_per_s * 1e6
    ideal = max(t.ideal_bytes / pk.hbm_bytes_per_s, t.ideal_flops / peak) * 1e6 + t.launches * LAUNCH_US
    if programs is None:
        from graphtune.codegen.compile_spec import compile_spec_builders

        programs = compile_spec_builders()[impl_name](op_args, config).programs
    eff = 0.0 if res is None else efficiency(res, blocks, programs, arch)
    time_us = max(mem, l2, comp) / eff + t.launches * LAUNCH_US if eff > 0 else float("inf")
    return Prediction(time_us, mem, l2, comp, eff, ideal, t)


def score(impl_name: str, op_args: tuple, config: KernelConfig, res, arch: int, *, blocks: int,
          programs: int) -> float | None:
    """``static_rank``'s score of one compiled config: the roofline's ``ideal / predicted``; ``None`` when
    the implementation has no traffic formula (``static_rank`` then keeps its resource heuristic)."""
    if not has_model(impl_name):
        return None
    return predict(impl_name, op_args, config, res, arch, blocks=blocks, programs=programs).score


# ======================================================================================
# The problems of docs/kernels.md's table (graphtune.autotune.validate_static.predicted_table) and of sweeps
# ======================================================================================


def doc_shapes() -> dict[str, tuple]:
    """Two problems per modelled family (a decode-like and a prefill-like one), fp16: ``docs/kernels.md``'s
    table and the default shapes of ``graphtune tune --all-families``."""
    from graphtune.codegen.attention.key import AttentionShape
    from graphtune.codegen.lean_decode.key import LeanShape
    from graphtune.codegen.merge_states.key import MergeShape
    from graphtune.codegen.shared_prefix.key import SuffixMergeShape
    from graphtune.codegen.tree_attention.key import TreeShape

    f16 = "float16"
    return {
        "attention": (AttentionShape(8, 32, 8, 1, 4096, 128, f16), AttentionShape(1, 32, 8, 2048, 2048, 128, f16, True)),
        "lean_decode": (LeanShape((8192,) + (512,) * 7, 32, 8, 128, 1, f16), LeanShape((2048,) * 16, 32, 8, 128, 4, f16)),
        "shared_prefix": (SuffixMergeShape(16, 32, 8, 1, 256, 128, f16), SuffixMergeShape(4, 32, 8, 64, 512, 128, f16, True)),
        "tree_attention": (TreeShape(8, 32, 8, 128, 4096, 16, "tree", f16), TreeShape(32, 32, 8, 128, 1024, 64, "chain", f16)),
        "merge_states": (MergeShape(4, 8, 32, 1, 128, f16), MergeShape(2, 1, 32, 2048, 128, f16)),
    }
