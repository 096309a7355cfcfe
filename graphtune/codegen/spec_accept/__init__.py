"""The spec_accept op family: lossless acceptance of speculative drafts (greedy, chain and tree rejection sampling).

``greedy_accept``, ``rejection_accept_chain`` and ``rejection_accept_tree`` take a batch of
ragged drafts (flattened, with offsets ``cu_draft``) and the target model's argmaxes or warped
probabilities at every draft position, and return the tokens each row emits and the draft nodes
it keeps (:class:`~graphtune.codegen.spec_accept.layout.AcceptResult`). The ops are in
:mod:`.accept`, their loop references in :mod:`.reference`. They are plain torch with no tuning
knob, so no implementation is registered and nothing is tuned. See ``docs/ops/spec_accept.md``.
"""
from graphtune.codegen.family import OpFamily

FAMILY = OpFamily(
    name="spec_accept",
    summary="lossless speculative-decoding acceptance: greedy, chain and tree (multi-draft) rejection sampling",
    ops=("greedy_accept", "rejection_accept_chain", "rejection_accept_tree"),
    impl_modules={},
    default_impls={},
    reference="graphtune.codegen.spec_accept.reference:rejection_accept_tree_ref",
    doc="docs/ops/spec_accept.md",
)
