"""The merge_states op family: exact log-sum-exp merge of partial attention states.

``merge_states(outs, lses) -> (out, lse)`` combines attention computed over disjoint key sets
(the building block of split-KV, shared-prefix and lean decode). CPU implementation in
:mod:`.cpu`, Triton kernel in :mod:`.triton_kernels`. See ``docs/ops/merge_states.md``.
"""
from graphtune.codegen.family import OpFamily

FAMILY = OpFamily(
    name="merge_states",
    summary="exact LSE merge of partial attention states over disjoint key sets",
    ops=("merge_states",),
    graph_ops=("merge_states",),
    impl_modules={"cpu": ("cpu",), "cuda": ("triton_kernels",)},
    default_impls={"cpu": "cpu.torch", "cuda": "triton.merge_states"},
    reference="graphtune.ir.reference:merge_states_ref",
    shape="graphtune.codegen.merge_states.key:MergeShape",
    doc="docs/ops/merge_states.md",
)
