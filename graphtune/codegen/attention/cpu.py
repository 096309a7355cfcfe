"""CPU implementations of graphtune's attention ops, with real knobs for the autotuner.

Every implementation takes the op's exact argument tuple
``(q, k, v, attn_mask, is_causal, scale, enable_gqa)`` plus ``config=KernelConfig`` and returns
``(out, lse)`` with :func:`graphtune.ir.reference.attention_ref` semantics (including
``lse = -inf`` and ``out = 0`` for rows that attend to nothing):

``cpu.flash``
    ATen's flash kernel (``_scaled_dot_product_flash_attention_for_cpu``). Knob ``THREADS``:
    intra-op threads for the call (0 = ``GRAPHTUNE_NUM_THREADS``, else torch's setting), set
    and restored around the call (switching costs ~0.3 µs, measured). Default config: the
    plain ATen path with torch's threads, i.e. exactly what the op does untuned.
``cpu.split_kv``
    Flash-decoding on the CPU: the keys are cut into ``SPLITS`` chunks, each chunk's partial
    attention comes from the flash kernel with its LSE, and the partials are merged. ``BATCHED=1``
    folds the chunks into the head dimension so one kernel call parallelises over
    ``heads x SPLITS`` work items (pays for long-KV decode with few heads, where ATen's kernel
    only has ``B*H`` items to spread over cores); ``BATCHED=0`` runs the chunks one after another
    (cache-sized chunks). ``FOLD=1`` also folds the GQA query group into rows. Rows whose LSE is
    too large for an fp32 chunk LSE to keep the chunk's key count (a row of HF's ``finfo.min``
    fill: SDPA's mean of V) are recomputed in one piece (``_exact_rows``).
``cpu.gqa_fold``
    Grouped-query decode: the ``G = Hq/Hkv`` query heads sharing a kv head become ``G*L`` rows of
    one head, so K/V are streamed once per kv head instead of once per query head. ``THREADS``.
``cpu.math``
    fp32 matmul + softmax (GQA folded, no K/V repeat), blocked over ``BLOCK_M`` query rows to
    bound the ``[rows, S]`` score buffer. Wins at small shapes where the flash kernel's
    per-call setup dominates; also the only one that takes ``Ev != E``.

Registry callbacks (``supports``, ``configs``) get the op's argument tuple and read it through
:class:`~graphtune.ir.args.AttentionArgs`. Masks and causality become one additive mask with
:func:`~graphtune.ir.reference.additive_mask`; split-KV partials merge with
:func:`~graphtune.ir.reference.merge_lse`. ``merge_states``'s CPU implementation (``cpu.torch``)
lives in :mod:`graphtune.codegen.merge_states.cpu`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

from graphtune import flags
from graphtune.codegen.registry import Impl, KernelConfig, register_impl, source_hash
from graphtune.ir.args import AttentionArgs, softmax_scale
from graphtune.ir.ops import as_4d, attention_cpu, fix_empty_rows, flash_cpu
from graphtune.ir.reference import additive_mask, merge_lse

__all__ = [
    "flash_attention",
    "split_kv_attention",
    "gqa_fold_attention",
    "math_attention",
    "thread_choices",
]

_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------

def thread_choices() -> list[int]:
    """THREADS values worth trying: 0 (torch's setting) plus powers of two below/at the cores."""
    cur = torch.get_num_threads()
    cores = max(1, torch.get_num_threads(), _cores())
    out, t = [0], 1
    while t <= cores:
        if t != cur:
            out.append(t)
        t *= 2
    if cores not in out and cores != cur:
        out.append(cores)
    return out


def _cores() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    # THREADS=0 follows GRAPHTUNE_NUM_THREADS, then torch's own setting.
    if n <= 0:
        n = flags.get("NUM_THREADS")
    prev = torch.get_num_threads()
    if n <= 0 or n == prev:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _fold_q(q: Tensor, hkv: int) -> Tensor:
    # q: [B, Hq, L, E] -> [B, Hkv, G*L, E]  (row g*L + l is query head hkv*G + g, position l)
    B, Hq, L, E = q.shape
    return q.reshape(B, hkv, (Hq // hkv) * L, E)


def _mask_ls(m: Tensor | None, L: int, S: int) -> Tensor | None:
    # rank-4 mask -> [Bm, Hm, L, S] (zero-stride views): folding and splitting index the query and
    # key dims, which a mask broadcasting over them (size 1) does not have
    return None if m is None else m.expand(m.shape[0], m.shape[1], L, S)


def _fold_mask(m: Tensor | None, hq: int, hkv: int) -> Tensor | None:
    # m: [Bm, Hm, L, S] (see _mask_ls), Hm in (1, Hq) -> [Bm, Hkv, G*L, S] (materialised: heads may differ)
    if m is None:
        return None
    Bm, _, L, S = m.shape
    return m.expand(Bm, hq, L, S).reshape(Bm, hkv, (hq // hkv) * L, S)


def _unbroadcast(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Equal batch dims and k/v heads (the op hands implementations SDPA's broadcasting made explicit)."""
    return (q.dim() == k.dim() == v.dim() and q.shape[:-3] == k.shape[:-3] == v.shape[:-3]
            and k.shape[-3] == v.shape[-3] and k.shape[-3] > 0 and q.shape[-3] % k.shape[-3] == 0)


def _flash_supports(args: tuple) -> bool:
    a = AttentionArgs.of(args)
    q, k, v = a.q, a.k, a.v
    return (q.device.type == "cpu" and q.dim() in (3, 4) and _unbroadcast(q, k, v) and v.shape[-1] == q.shape[-1]
            and q.shape[-2] > 0 and k.shape[-2] > 0 and q.dtype in (torch.float32, torch.bfloat16, torch.float16))


# Folding or splitting a masked/causal call materialises the mask per query head: cap that
# temporary so that tuning a long prefill cannot exhaust the machine's memory.
_MAX_TMP_BYTES = 64 << 20


def _mask_fits(args: tuple | AttentionArgs, limit: int = _MAX_TMP_BYTES) -> bool:
    a = AttentionArgs.of(args)
    if a.attn_mask is None and not a.is_causal:
        return True
    q = a.q
    B = q.shape[0] if q.dim() == 4 else 1
    return B * q.shape[-3] * q.shape[-2] * a.k.shape[-2] * 4 <= limit


def _squeeze_back(q: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    return (out.squeeze(0), lse.squeeze(0)) if q.dim() == 3 else (out, lse)


# ----------------------------------------------------------------------------------------
# cpu.flash
# ----------------------------------------------------------------------------------------

def flash_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *,
                    config: KernelConfig = KernelConfig.make(THREADS=0)):
    """ATen flash attention with a scoped thread count; returns ``(out, lse)``.

    Examples
    --------
    >>> q = torch.randn(1, 4, 3, 16)
    >>> out, lse = flash_attention(q, q, q, is_causal=True, config=KernelConfig.make(THREADS=1))
    >>> out.shape, lse.shape
    (torch.Size([1, 4, 3, 16]), torch.Size([1, 4, 3]))
    """
    with _threads(config.get("THREADS", 0)):
        if attn_mask is None:
            return attention_cpu(q, k, v, None, is_causal, scale, enable_gqa)
        # causality joins the mask so that rows emptied by both are found and given lse = -inf
        m = additive_mask(attn_mask, is_causal, q.shape[-2], k.shape[-2], q.dtype, rank=4)
        out, lse = flash_cpu(as_4d(q), as_4d(k), as_4d(v), m, False, scale)
        return _squeeze_back(q, out, lse)


def _flash_configs(args: tuple) -> list[KernelConfig]:
    return [KernelConfig.make(THREADS=t) for t in thread_choices()]


# ----------------------------------------------------------------------------------------
# cpu.split_kv
# ----------------------------------------------------------------------------------------

_MIN_CHUNK = 128  # keys per chunk below which the per-chunk overhead dominates (measured)


def split_kv_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *,
                       config: KernelConfig = KernelConfig.make(SPLITS=4, BATCHED=1, FOLD=0)):
    """Split-KV (flash-decoding) attention on the CPU; returns ``(out, lse)``.

    Examples
    --------
    >>> q, k = torch.randn(1, 8, 1, 64), torch.randn(1, 2, 1000, 64)
    >>> cfg = KernelConfig.make(SPLITS=4, BATCHED=1, FOLD=1)
    >>> out, lse = split_kv_attention(q, k, k, enable_gqa=True, config=cfg)
    >>> torch.allclose(out, attention_cpu(q, k, k, enable_gqa=True)[0], atol=1e-5)
    True
    """
    splits, batched, fold = config["SPLITS"], config.get("BATCHED", 1), config.get("FOLD", 0)
    q4, k4, v4 = as_4d(q), as_4d(k), as_4d(v)  # q: [B, Hq, L, E]  k, v: [B, Hkv, S, E]
    B, Hq, L, E = q4.shape
    Hkv, S = k4.shape[1], k4.shape[2]
    splits = max(1, min(splits, S))
    chunk = -(-S // splits)
    mask = _mask_ls(additive_mask(attn_mask, is_causal, L, S, q.dtype, rank=4), L, S)  # [Bm, Hm, L, S]
    q_rows, mask_rows = q4, mask  # unfolded, for _exact_rows
    fold = fold and Hq != Hkv
    if fold:
        q4, mask = _fold_q(q4, Hkv), _fold_mask(mask, Hq, Hkv)
    if batched:
        out, lse = _split_batched(q4, k4, v4, mask, scale, splits, chunk)
    else:
        outs, lses = [], []
        for s0 in range(0, S, chunk):
            mc = None if mask is None else mask[..., s0:s0 + chunk]
            o, l = flash_cpu(q4, k4[:, :, s0:s0 + chunk], v4[:, :, s0:s0 + chunk], mc, False, scale)
            outs.append(o)
            lses.append(l)
        out, lse = merge_lse(torch.stack(outs, 2), torch.stack(lses, 2), 2)
    out = out.to(q.dtype)
    if fold:
        out, lse = out.reshape(B, Hq, L, -1), lse.reshape(B, Hq, L)
    _exact_rows(q_rows, k4, v4, mask_rows, scale, out, lse)
    return _squeeze_back(q, out, lse)


# Merging chunks by their LSEs is exact only while an fp32 LSE resolves the chunks' key counts and
# sums: a chunk's lse = m + log(l) keeps log(l) to ulp(m). Above 2^8 (ulp 2^-15) the weights could
# be off by more than fp32 attention's own rounding; at a huge finite fill (HF's finfo.min masks: a
# row whose every key carries it is SDPA's mean of V) log(l) is lost entirely and uneven chunks came
# out weighted equally. Rows whose merged |lse| reaches this are recomputed in one piece instead.
_EXACT_LSE = 2.0 ** 8


def _exact_rows(q4: Tensor, k4: Tensor, v4: Tensor, mask: Tensor | None, scale: float | None,
                out: Tensor, lse: Tensor) -> None:
    """Recompute, in place, the rows of a split-KV result whose LSE is too large for the merge.

    q4: [B, Hq, L, E]  k4, v4: [B, Hkv, S, E]  mask: [Bm, Hm, L, S] additive (causality included) or
    None  out: [B, Hq, L, Ev]  lse: [B, Hq, L]. Each affected (batch, kv head) runs through
    :func:`math_attention` over all keys (SDPA's fp32 arithmetic: scores + mask, max-shifted, so a
    row of one fill averages V), blocked so that its score buffer stays within ``_MAX_TMP_BYTES``.
    Rows with no keys (lse = -inf) are left alone. Typically no row qualifies: one vectorised test.
    """
    bad = torch.isfinite(lse) & (lse.abs() >= _EXACT_LSE)
    if not bool(bad.any()):
        return
    B, Hq, L, _ = q4.shape
    Hkv, S = k4.shape[1], k4.shape[2]
    G = Hq // Hkv
    bad_g = bad.view(B, Hkv, G * L)  # row g*L + l of kv head hk is query head hk*G + g, position l
    step = max(1, _MAX_TMP_BYTES // (4 * S))
    for b, hk in bad_g.any(-1).nonzero().tolist():
        rows = bad_g[b, hk].nonzero().squeeze(1)
        for r0 in range(0, rows.numel(), step):
            r = rows[r0:r0 + step]
            h, i = hk * G + r // L, r % L
            m = None
            if mask is not None:
                m = mask[b if mask.shape[0] > 1 else 0, h if mask.shape[1] > 1 else 0, i]  # [n, S]
                m = m.expand(r.numel(), S)[None, None]
            o, l = math_attention(q4[b, h, i][None, None], k4[b, hk][None, None], v4[b, hk][None, None], m,
                                  False, scale, False, config=KernelConfig.make(BLOCK_M=step))
            out[b, h, i] = o[0, 0].to(out.dtype)
            lse[b, h, i] = l[0, 0]


def _split_batched(q4, k4, v4, mask, scale, splits, chunk):
    # Chunks become extra kv heads: kv head (h, s) = h*splits + s. Query heads are repeated so
    # that ATen's GQA mapping (query head j -> kv head j // G) pairs them up.
    B, H, R, E = q4.shape
    Hkv, S = k4.shape[1], k4.shape[2]
    G = H // Hkv
    pad = splits * chunk - S
    if pad:
        k4 = torch.nn.functional.pad(k4, (0, 0, 0, pad))
        v4 = torch.nn.functional.pad(v4, (0, 0, 0, pad))
        pm = torch.zeros(splits * chunk, dtype=q4.dtype)
        pm[S:] = _NEG_INF
        mask = pm.view(1, 1, 1, -1) if mask is None else torch.nn.functional.pad(mask, (0, pad), value=_NEG_INF)
    ks = k4.reshape(B, Hkv * splits, chunk, E)  # zero-copy when k4 is contiguous
    vs = v4.reshape(B, Hkv * splits, chunk, v4.shape[-1])
    qs = q4.view(B, Hkv, 1, G, R, E).expand(B, Hkv, splits, G, R, E).reshape(B, Hkv * splits * G, R, E)
    ms = None
    if mask is not None:
        Bm = mask.shape[0]
        # [Bm, Hm, R, splits*chunk] -> [Bm, Hkv*splits*G, R, chunk] in the same head order as qs
        mm = mask.expand(Bm, H, R, splits * chunk).reshape(Bm, Hkv, G, R, splits, chunk)
        ms = mm.permute(0, 1, 4, 2, 3, 5).reshape(Bm, Hkv * splits * G, R, chunk)
    o, l = flash_cpu(qs, ks, vs, ms, False, scale)
    o = o.view(B, Hkv, splits, G, R, -1)
    l = l.view(B, Hkv, splits, G, R)
    out, lse = merge_lse(o, l, 2)  # [B, Hkv, G, R, Ev]
    return out.reshape(B, H, R, -1), lse.reshape(B, H, R)


def _split_supports(args: tuple) -> bool:
    a = AttentionArgs.of(args)
    return _flash_supports(a) and a.k.shape[-2] >= 2 * _MIN_CHUNK and _mask_fits(a)


def _split_configs(args: tuple) -> list[KernelConfig]:
    a = AttentionArgs.of(args)
    q, k = a.q, a.k
    S, L = k.shape[-2], q.shape[-2]
    gqa = q.dim() >= 3 and q.shape[-3] != k.shape[-3]
    out = []
    s = 2
    while s <= 32 and S // s >= _MIN_CHUNK:
        for batched in (1, 0):
            for fold in ((0, 1) if gqa else (0,)):
                # the sequential form only pays with a long chunk list over few query rows
                if not batched and L > 16:
                    continue
                out.append(KernelConfig.make(SPLITS=s, BATCHED=batched, FOLD=fold))
        s *= 2
    return out


# ----------------------------------------------------------------------------------------
# cpu.gqa_fold
# ----------------------------------------------------------------------------------------

def gqa_fold_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *,
                       config: KernelConfig = KernelConfig.make(THREADS=0)):
    """GQA attention with the query group folded into rows; returns ``(out, lse)``.

    Examples
    --------
    >>> q, k = torch.randn(2, 8, 1, 32), torch.randn(2, 2, 300, 32)
    >>> out, lse = gqa_fold_attention(q, k, k, enable_gqa=True)
    >>> torch.allclose(lse, attention_cpu(q, k, k, enable_gqa=True)[1], atol=1e-5)
    True
    """
    q4, k4, v4 = as_4d(q), as_4d(k), as_4d(v)
    B, Hq, L, E = q4.shape
    Hkv, S = k4.shape[1], k4.shape[2]
    with _threads(config.get("THREADS", 0)):
        # causality is per position l, not per folded row, so it travels as a mask
        mask = _fold_mask(_mask_ls(additive_mask(attn_mask, is_causal, L, S, q.dtype, rank=4), L, S), Hq, Hkv)
        out, lse = flash_cpu(_fold_q(q4, Hkv), k4, v4, mask, False, scale)
    return _squeeze_back(q, out.reshape(B, Hq, L, -1), lse.reshape(B, Hq, L))


def _fold_supports(args: tuple) -> bool:
    a = AttentionArgs.of(args)
    return _flash_supports(a) and bool(a.enable_gqa) and a.q.shape[-3] != a.k.shape[-3] and _mask_fits(a)


# ----------------------------------------------------------------------------------------
# cpu.math
# ----------------------------------------------------------------------------------------

def math_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *,
                   config: KernelConfig = KernelConfig.make(BLOCK_M=256)):
    """fp32 matmul + softmax attention, blocked over query rows; returns ``(out, lse)``.

    Examples
    --------
    >>> q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 24)
    >>> math_attention(q, k, v, config=KernelConfig.make(BLOCK_M=2))[0].shape
    torch.Size([1, 2, 5, 24])
    """
    q4, k4, v4 = as_4d(q), as_4d(k), as_4d(v)
    B, Hq, L, E = q4.shape
    Hkv, S = k4.shape[1], k4.shape[2]
    s = softmax_scale(scale, E)
    mask = additive_mask(attn_mask, is_causal, L, S, torch.float32, rank=4)
    if mask is not None:
        mask = mask.expand(mask.shape[0], Hq, L, S).reshape(mask.shape[0], Hkv, Hq // Hkv, L, S)
    qf = q4.float().reshape(B, Hkv, Hq // Hkv, L, E)  # [B, Hkv, G, L, E]
    kt = k4.float().transpose(-2, -1).unsqueeze(2)  # [B, Hkv, 1, E, S]
    vf = v4.float().unsqueeze(2)  # [B, Hkv, 1, S, Ev]
    bm = max(1, config.get("BLOCK_M", 256))
    outs, lses = [], []
    for r0 in range(0, L, bm):
        sc = torch.matmul(qf[..., r0:r0 + bm, :], kt).mul_(s)  # [B, Hkv, G, bm, S]
        if mask is not None:
            sc = sc + mask[..., r0:r0 + bm, :]
        # max-shift, exp, normalise (exp(sc - lse) loses log(#keys) in rows at a finfo.min fill)
        mx = sc.amax(dim=-1, keepdim=True)
        mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))  # empty rows: exp(-inf) = 0
        p = torch.exp(sc.sub_(mx))
        den = p.sum(dim=-1, keepdim=True)
        outs.append(torch.matmul(p.div_(torch.where(den > 0, den, torch.ones_like(den))), vf))
        lses.append(torch.where(den > 0, mx + torch.log(den), torch.full_like(mx, _NEG_INF)).squeeze(-1))
    out = torch.cat(outs, dim=-2).reshape(B, Hq, L, -1).to(q.dtype)
    lse = torch.cat(lses, dim=-1).reshape(B, Hq, L)
    return _squeeze_back(q, out, lse)


def _score_bytes(args: tuple | AttentionArgs, block: int) -> int:
    a = AttentionArgs.of(args)
    q = a.q
    B = q.shape[0] if q.dim() == 4 else 1
    return B * q.shape[-3] * min(block, q.shape[-2]) * a.k.shape[-2] * 4


def _math_supports(args: tuple) -> bool:
    a = AttentionArgs.of(args)
    q, k = a.q, a.k
    return (q.device.type == "cpu" and q.dim() in (3, 4) and _unbroadcast(q, k, a.v) and q.shape[-2] > 0
            and k.shape[-2] > 0 and _score_bytes(a, 1) <= 4 * _MAX_TMP_BYTES and _mask_fits(a, 4 * _MAX_TMP_BYTES))


def _math_configs(args: tuple) -> list[KernelConfig]:
    a = AttentionArgs.of(args)
    L = a.q.shape[-2]
    blocks = sorted({b for b in (64, 256, 1024) if b < L} | {min(L, 1024)})
    fits = [b for b in blocks if _score_bytes(a, b) <= 4 * _MAX_TMP_BYTES] or [1]
    return [KernelConfig.make(BLOCK_M=b) for b in fits]


# ----------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------

_HELPERS = (_threads, additive_mask, _fold_q, _mask_ls, _fold_mask, flash_cpu, fix_empty_rows, merge_lse)
_ATTN = "attention_with_lse"

register_impl(Impl(_ATTN, "cpu.flash", "cpu", flash_attention, KernelConfig.make(THREADS=0), _flash_configs,
                   source_hash(flash_attention, *_HELPERS), _flash_supports))
register_impl(Impl(_ATTN, "cpu.split_kv", "cpu", split_kv_attention,
                   KernelConfig.make(SPLITS=4, BATCHED=1, FOLD=0), _split_configs,
                   source_hash(split_kv_attention, _split_batched, _exact_rows, math_attention, *_HELPERS),
                   _split_supports))
register_impl(Impl(_ATTN, "cpu.gqa_fold", "cpu", gqa_fold_attention, KernelConfig.make(THREADS=0),
                   _flash_configs, source_hash(gqa_fold_attention, *_HELPERS), _fold_supports))
register_impl(Impl(_ATTN, "cpu.math", "cpu", math_attention, KernelConfig.make(BLOCK_M=256), _math_configs,
                   source_hash(math_attention, *_HELPERS), _math_supports))
