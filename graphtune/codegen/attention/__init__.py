"""The attention op family: ``graphtune.attention`` / ``attention_with_lse`` (out and log-sum-exp).

Every attention form a model writes is rewritten to this one canonical op (an exact graph
rewrite, :mod:`graphtune.rewrites.attention`); its implementations are chosen per call by the
tuned dispatch. CPU implementations in :mod:`.cpu` (ATen flash, split-KV, GQA fold, blocked
math), the Triton forward kernel in :mod:`.triton_kernels`. See ``docs/ops/attention.md``.
"""
from graphtune.codegen.family import OpFamily

FAMILY = OpFamily(
    name="attention",
    summary="canonical attention with LSE: every SDPA/eager/baddbmm form becomes graphtune.attention",
    ops=("attention_with_lse",),
    graph_ops=("attention", "attention_with_lse"),
    impl_modules={"cpu": ("cpu",), "cuda": ("triton_kernels",)},
    default_impls={"cpu": "cpu.flash", "cuda": "triton.attention_fwd"},
    reference="graphtune.ir.reference:attention_ref",
    shape="graphtune.codegen.attention.key:AttentionShape",
    flags=("DISABLE_TRITON",),
    doc="docs/ops/attention.md",
)
