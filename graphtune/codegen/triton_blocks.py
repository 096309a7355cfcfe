"""Building blocks shared by graphtune's Triton kernels: constants, online softmax, LSE epilogue, LSE merge.

Every attention-like kernel (``attention/``, ``shared_prefix/``, ``lean_decode/``) keeps a running
softmax state per query row over blocks of keys, FlashAttention-2 style:

* ``m`` — the running max of the scores (log2 domain: ``score * log2(e)``, unless the kernel keeps
  natural-domain scores, see ``NATURAL`` below), ``-inf`` while the row has seen no key;
* ``l`` — the running sum of ``exp2(score - m)``, ``0`` while the row has seen no key;
* ``acc`` — the fp32 running ``sum_j exp2(score_j - m) * v_j``, ``[rows, head dim]``.

:func:`softmax_init` (empty state) or :func:`softmax_init_from_lse` (a prior ``(out, lse)``
as one virtual key block) start it, :func:`online_softmax_step` folds in one block of scores and
its V tile, :func:`softmax_epilogue` turns it into ``(out, natural-log lse)``. The merge kernels
(``merge_states/``, lean's reduction) combine finished ``(out, lse)`` partials with
:func:`lse_merge_step` and :func:`lse_merge_epilogue`.

Rows that see no key: ``m`` stays ``-inf`` and ``l`` stays 0 (the exponent uses ``m_safe = 0``
instead of ``-inf`` so that ``(-inf) - (-inf)`` never makes a NaN), and the epilogues give
``out = 0, lse = -inf`` — the convention of :func:`graphtune.ir.reference.attention_ref` and
:func:`graphtune.ir.reference.merge_states_ref`. A row whose keys all carry one finite fill
(HF's ``finfo.min``) is not empty: it averages V, as SDPA does.

``@triton.jit`` functions called from a kernel are inlined by Triton. Cross-compiled for sm_80 and
sm_90, the kernels that call these blocks have the same PTX instructions as the hand-inlined code
they replaced (some independent instructions in another order) and the same registers, spills and
shared memory (``docs/kernels.md``). Two things keep it so, both measured:

* blocks do not call other blocks, and kernels do not wrap their own code in helpers: under line
  info (Triton's default) every inlined call adds scope labels to the PTX, and ptxas allocates
  registers around them (a ``finite_or_zero`` call nested in :func:`online_softmax_step` took
  the sm_90 decode attention kernel from 80 to 96 registers, with the same instructions);
* loads stay where the hand-written kernels had them: :func:`online_softmax_step` loads the V tile
  itself, after the softmax arithmetic (the tile loaded before the call: 168 -> 209 registers on
  sm_80 for 64x64 fp16 prefill tiles).

Kernels put the blocks they call into their tuning source hash with :func:`jit_deps`, so editing
a block invalidates the tuning records of every kernel using it.
"""
from __future__ import annotations

import re
from typing import Any

import triton
import triton.language as tl

__all__ = [
    "LOG2E",
    "LN2",
    "finite_or_zero",
    "softmax_init",
    "softmax_init_from_lse",
    "online_softmax_step",
    "softmax_epilogue",
    "lse_merge_step",
    "lse_merge_epilogue",
    "BLOCKS",
    "jit_deps",
]

# Triton reads only constexpr globals inside @triton.jit code; host code uses ``LOG2E.value``.
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): log(x) = log2(x) * LN2


@triton.jit
def finite_or_zero(m):
    """``m`` with ``-inf`` (a row with no key or no partial yet) replaced by 0: a safe exponent offset."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def softmax_init(BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The empty state ``(m = -inf, l = 0, acc = 0)`` of ``BLOCK_M`` rows with ``BLOCK_DV`` output lanes."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    return m_i, l_i, acc


@triton.jit
def softmax_init_from_lse(o, lse):
    """The state of a finished prior ``(o, natural-log lse)`` as one virtual key block of log-weight ``lse``:
    ``m = lse * log2(e)``, ``l = 1``, ``acc = o``; rows with ``lse = -inf`` (no prior key) start empty
    (``l = 0``, ``acc = 0``, whatever ``o`` holds)."""
    m_i = lse.to(tl.float32) * LOG2E
    l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
    acc = tl.where(l_i[:, None] > 0, o.to(tl.float32), 0.0)
    return m_i, l_i, acc


@triton.jit
def online_softmax_step(m_i, l_i, acc, s, v_ptrs, v_mask, NATURAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        DOT_UPCAST: tl.constexpr):
    """Fold one block of scores ``s [M, N]`` (fp32, ``-inf`` where masked) and its V tile (loaded here from
    ``v_ptrs [N, DV]`` where ``v_mask``, else 0) into the state ``(m_i [M], l_i [M], acc [M, DV])``;
    returns the new state.

    ``NATURAL=False``: ``s`` is in the log2 domain (``q.k * scale * log2(e)``), exponentiated directly.
    ``NATURAL=True``: ``s`` and ``m_i`` are natural-domain (``q.k * scale + bias``, rounded like SDPA)
    and only the differences from the row max, always finite, are converted to log2 (``bias * log2(e)``
    would overflow to ``-inf`` at a ``finfo.min`` fill). P is cast to V's dtype for the MMA at
    ``DOT_PRECISION``, fp32 accumulation; ``DOT_UPCAST`` instead multiplies fp32 copies with IEEE
    products (fp32 inputs; the interpreter, whose bf16 ``tl.dot`` is wrong: a product of two 16-bit
    floats is exact in fp32).
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # finite_or_zero, written out (module docstring): a row with no key yet keeps m = -inf, l = 0
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    if NATURAL:
        p = tl.math.exp2((s - m_safe[:, None]) * LOG2E)
        alpha = tl.math.exp2((m_i - m_safe) * LOG2E)
    else:
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    # V is loaded only now, after the softmax arithmetic (module docstring)
    v = tl.load(v_ptrs, mask=v_mask, other=0.0)
    acc = acc * alpha[:, None]
    if DOT_UPCAST:
        acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def softmax_epilogue(m_i, l_i, acc, NATURAL: tl.constexpr):
    """``(out = acc / l, natural-log lse)`` of a state; rows that saw no key (``l = 0``) get ``out = 0``
    (their ``acc`` is 0) and ``lse = -inf``. ``NATURAL`` as in :func:`online_softmax_step` (``m_i``'s domain)."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if NATURAL:
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe) * LN2)
    else:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    return out, lse


@triton.jit
def lse_merge_step(acc, denom, m_safe, lse_n, o_n, MASK_EMPTY: tl.constexpr):
    """Add partial ``(o_n [R, D], lse_n [R])`` to ``(acc, denom)`` with weight ``exp(lse_n - m_safe)``.

    ``m_safe``: :func:`finite_or_zero` of the max LSE over all partials (a first pass). A partial with
    ``lse = -inf`` (no keys) weighs 0. ``MASK_EMPTY``: its output is also masked out with a ``where``,
    so NaN or garbage left in an empty partial cannot leak into the result (``merge_states``, whose
    partials come from anywhere); else ``acc += w * o`` compiles to one fused multiply-add (lean's
    reduction, whose partial kernel writes 0 for rows without keys).
    """
    w = tl.exp(lse_n.to(tl.float32) - m_safe)  # exp(-inf) = 0
    if MASK_EMPTY:
        acc += tl.where(w[:, None] > 0, w[:, None] * o_n.to(tl.float32), 0.0)
    else:
        acc += w[:, None] * o_n.to(tl.float32)
    denom += w
    return acc, denom


@triton.jit
def lse_merge_epilogue(acc, denom, m_safe):
    """``(out = acc / denom, lse = m_safe + log(denom))``; rows whose partials are all empty get
    ``out = 0, lse = -inf``."""
    empty = denom == 0.0
    d_safe = tl.where(empty, 1.0, denom)
    return acc / d_safe[:, None], tl.where(empty, float("-inf"), m_safe + tl.log(d_safe))


# Every block, for jit_deps (a new block must be listed here to reach the kernels' source hashes).
BLOCKS: tuple[Any, ...] = (finite_or_zero, softmax_init, softmax_init_from_lse, online_softmax_step,
                           softmax_epilogue, lse_merge_step, lse_merge_epilogue)
_CONSTANTS = {"LOG2E": LOG2E, "LN2": LN2}


def _py(fn: Any) -> Any:
    return getattr(fn, "fn", fn)  # JITFunction / InterpretedFunction -> the python function


def jit_deps(kernel: Any) -> tuple[Any, ...]:
    """What of this module ``kernel`` uses, directly or through other blocks, for its source hash.

    Returns the blocks' python functions (the same source whether Triton compiles or interprets)
    and ``"NAME=value"`` strings for the constants, in a fixed order:
    ``source_hash(kernel.fn, *jit_deps(kernel))``.

    >>> from graphtune.codegen.merge_states.triton_kernels import _merge_states_kernel
    >>> [getattr(d, "__name__", d) for d in jit_deps(_merge_states_kernel)]
    ['finite_or_zero', 'lse_merge_step', 'lse_merge_epilogue']
    """
    import inspect

    def names(fn: Any) -> set[str]:
        return set(re.findall(r"\b\w+\b", inspect.getsource(_py(fn))))

    used: set[str] = set()
    todo = [kernel]
    while todo:
        found = names(todo.pop())
        for b in BLOCKS:
            name = _py(b).__name__
            if name in found and name not in used:
                used.add(name)
                todo.append(b)
        used.update(c for c in _CONSTANTS if c in found)
    return (tuple(_py(b) for b in BLOCKS if _py(b).__name__ in used)
            + tuple(f"{c}={v.value!r}" for c, v in _CONSTANTS.items() if c in used))
