"""The tree-attention op family: speculative-decoding verification attention over a KV pool.

``tree_attention(q, k, v, kv_start, ctx_len, cu_q, parent, scale=None) -> (out, lse)``: each row's
packed query tokens (the tree root, then draft tokens in tree order) see the row's whole context
and, among the row's own draft keys, themselves and their ancestors. Host plan in :mod:`.plan`
(the ancestor mask and the CPU batching groups, built once per step), pure-torch reference in
:mod:`.reference`, CPU implementation in :mod:`.cpu`, Triton kernel in :mod:`.triton_kernels`,
the device-dispatching entry point in :mod:`.op`. No runtime selector and no graph op: the
engine's verification step calls the op directly. See ``docs/ops/tree_attention.md``.
"""
from graphtune.codegen.family import OpFamily

FAMILY = OpFamily(
    name="tree_attention",
    summary="speculative verification: packed draft-tree queries over a row's context + ancestor keys",
    ops=("tree_attention",),
    impl_modules={"cpu": ("cpu",), "cuda": ("triton_kernels",)},
    default_impls={"cpu": "cpu.tree_attention", "cuda": "triton.tree_attention"},
    reference="graphtune.codegen.tree_attention.reference:tree_attention_ref",
    shape="graphtune.codegen.tree_attention.key:TreeShape",
    doc="docs/ops/tree_attention.md",
)
