"""The PBS-attention op family: permuted block-sparse prefill attention (approximate, opt-in).

``pbs_attention(q, k, v, scale=None, *, plan=None, config=PBSConfig()) -> (out, lse)``: causal
prefill attention of the last ``M`` query positions over ``N`` keys, computing only each query
block's own segment (dense, causal) and the key blocks :func:`.plan.plan_pbs` selected from
earlier segments after permuting keys within segments. Host plan in :mod:`.plan`, pure-torch
reference in :mod:`.reference`, CPU implementation in :mod:`.cpu`, Triton kernel in
:mod:`.triton_kernels`, entry point in :mod:`.op`. Approximate, so never a graph rewrite: the
runtime selector :mod:`graphtune.runtime.sparse_prefill` applies it to long prefills when the
user opts in (``optimize(model, sparse_prefill="pbs")``). See ``docs/ops/sparse-prefill.md``.
"""
from graphtune.codegen.family import OpFamily

FAMILY = OpFamily(
    name="pbs_attention",
    summary="permuted block-sparse prefill: keys permuted within segments, tau-coverage block selection (approximate)",
    ops=("pbs_attention",),
    impl_modules={"cpu": ("cpu",), "cuda": ("triton_kernels",)},
    default_impls={"cpu": "cpu.gather", "cuda": "triton.pbs"},
    reference="graphtune.codegen.pbs_attention.reference:pbs_attention_ref",
    shape="graphtune.codegen.pbs_attention.key:PBSShape",
    selector="graphtune.runtime.sparse_prefill",
    priority=8,
    option="sparse_prefill",
    flags=("SPARSE_PREFILL_MIN_LEN", "SPARSE_PREFILL_TAU", "SPARSE_PREFILL_BLOCK", "SPARSE_PREFILL_SEGMENT"),
    doc="docs/ops/sparse-prefill.md",
)
