"""graphtune's IR: capture, metadata, canonical ops, verifier."""
from graphtune.ir import ops  # noqa: F401  (registers torch.ops.graphtune.*)
from graphtune.ir.args import AttentionArgs
from graphtune.ir.graph import AttentionView, IRGraph, format_graph, verify
from graphtune.ir.meta import TensorMeta, set_val, tensor_meta, val_of

__all__ = ["IRGraph", "AttentionView", "AttentionArgs", "verify", "format_graph", "TensorMeta", "set_val",
           "tensor_meta", "val_of", "ops"]
