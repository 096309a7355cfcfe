"""The CPU implementation of op ``shared_prefix_suffix_merge``: suffix attention, then the LSE merge.

Two modes (config ``LOOP``): one masked batched call over the padded suffix buffer (0), or one
call per row over exactly its keys (1). Measured in ``benchmarks/bench_shared_prefix.py``
(``test_suffix_modes_*``): padded wins for decode on this CPU, loop when suffixes are very ragged.
"""
from __future__ import annotations

from graphtune.codegen.registry import Impl, KernelConfig, register_impl, source_hash
from graphtune.codegen.shared_prefix.decompose import (SUFFIX_MODES, merge_partials, suffix_attention,
                                                       suffix_merge_ref)
from graphtune.ir.args import AttentionArgs

__all__ = ["SUFFIX_MERGE_CPU_IMPL", "suffix_merge_cpu"]

OP = "shared_prefix_suffix_merge"
DEFAULT_CONFIG = KernelConfig.make(LOOP=0)


def suffix_merge_cpu(*args, config: KernelConfig = DEFAULT_CONFIG):
    """``suffix_merge_ref`` on the op's arguments in the configured suffix mode."""
    return suffix_merge_ref(*args, mode=SUFFIX_MODES[config.get("LOOP", 0)])


def _supports(args: tuple) -> bool:
    a = AttentionArgs.of((args[0], args[1], args[2]))
    return a.q.device.type == "cpu" and a.q.dim() == 4 and a.k.dim() == 4


def _configs(args: tuple) -> list[KernelConfig]:
    return [KernelConfig.make(LOOP=i) for i in range(len(SUFFIX_MODES))]


SUFFIX_MERGE_CPU_IMPL = register_impl(Impl(
    OP, "cpu.suffix_merge", "cpu", suffix_merge_cpu, DEFAULT_CONFIG, _configs,
    source_hash(suffix_merge_cpu, suffix_merge_ref, suffix_attention, merge_partials), _supports))
