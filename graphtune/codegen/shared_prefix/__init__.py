"""The shared-prefix (Hydragen) op family: attention of rows that share prompt prefixes.

The shared prefix KV is read once for all rows sharing it (their queries batched into one matrix
product), the unique suffix per row, and the partial states are merged by log-sum-exp;
multi-level (tree) sharing. Decomposition in :mod:`.decompose`, sharing detection and plans in
:mod:`.plan`, the torch suffix + merge (reference and CPU implementation) in :mod:`.cpu`, the tuning
key in :mod:`.key`, the fused suffix + merge Triton kernel in :mod:`.triton_kernels`; the per-batch
selector (which rows share is data, so it is a runtime choice, not a graph rewrite) in
:mod:`graphtune.runtime.shared_prefix`. See ``docs/ops/shared_prefix.md``.
"""
from graphtune.codegen.family import OpFamily

FAMILY = OpFamily(
    name="shared_prefix",
    summary="shared-prefix (Hydragen) attention: prefix KV read once per sharing group, LSE-merged with suffixes",
    ops=("shared_prefix_suffix_merge",),
    impl_modules={"cpu": ("cpu",), "cuda": ("triton_kernels",)},
    default_impls={"cpu": "cpu.suffix_merge", "cuda": "triton.shared_prefix_suffix_merge"},
    reference="graphtune.codegen.shared_prefix.decompose:suffix_merge_ref",
    shape="graphtune.codegen.shared_prefix.key:SuffixMergeShape",
    selector="graphtune.runtime.shared_prefix",
    priority=10,
    option="shared_prefix",
    flags=("SHARED_PREFIX_MIN_PREFIX", "SHARED_PREFIX_MIN_ROWS"),
    doc="docs/ops/shared_prefix.md",
)
