"""``graphtune tune --validate-static``: does the static ranking order configs like the device does?

For each problem, every config of each Triton implementation (capped by ``--budget Nc``) is
ranked by the roofline cost model (:mod:`graphtune.codegen.costmodel`, through
``crosscompile.static_rank`` for the target) and measured on the device (the tuner's
:class:`~graphtune.autotune.measure.Bench`: checked against the reference, then timed). The
report is the Spearman rank correlation between predicted and measured times, per problem and
averaged. On a GPU the target defaults to the device's own architecture. On the CPU the Triton
kernels only run under ``TRITON_INTERPRET=1``; the interpreter's times say nothing about a GPU,
so a CPU run tests the plumbing, not the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from graphtune.errors import OptionError

__all__ = ["spearman", "ValidationRow", "validate_static", "validation_table", "predicted_table"]


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):  # ties share their average rank
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); ``nan`` below 3 pairs or for a constant side.

    >>> spearman([1, 2, 3, 4], [10, 20, 30, 40]), spearman([1, 2, 3], [3, 2, 1])
    (1.0, -1.0)
    >>> round(spearman([1, 2, 3, 4], [1, 3, 2, 4]), 3)
    0.8
    """
    if len(xs) != len(ys):
        raise OptionError(f"spearman: {len(xs)} predictions but {len(ys)} measurements")
    if len(xs) < 3:
        return float("nan")
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else float("nan")


@dataclass
class ValidationRow:
    """One problem x implementation: (config, predicted µs, measured µs) per config that ran, and rho."""

    shape: Any
    impl: str
    pairs: list[tuple[str, float, float]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def rho(self) -> float:
        return spearman([p for _, p, _ in self.pairs], [m for _, _, m in self.pairs])


def _device_arch(device: str) -> int:
    import torch

    major, minor = torch.cuda.get_device_capability(torch.device(device))
    return major * 10 + minor


def validate_static(shapes: Sequence[Any], *, device: str = "cpu", target: str | None = None,
                    max_configs: int | None = None, reps: int = 5,
                    progress: Callable[[str], None] | None = None) -> list[ValidationRow]:
    """Predicted vs measured time of every config of every Triton implementation of each shape.

    ``target`` (``"sm_90"``) is the architecture the predictions are for: the device's own on a
    GPU (default), ``sm_90`` on the CPU. An implementation that does not support a problem on
    ``device`` is skipped; :class:`OptionError` when nothing could run (a CPU without
    ``TRITON_INTERPRET=1``).

    Examples
    --------
    >>> from graphtune.autotune.validate_static import validate_static
    >>> from graphtune.autotune.shapes import MergeShape
    >>> rows = validate_static([MergeShape(2, 1, 2, 4, 16)], max_configs=3)  # doctest: +SKIP
    >>> len(rows[0].pairs)  # doctest: +SKIP
    3
    """
    from graphtune.autotune.measure import Bench, Candidate
    from graphtune.autotune.tuner import _to, check_device, load_impls
    from graphtune.codegen.costmodel import predict
    from graphtune.codegen.crosscompile import blocks_per_sm, static_rank
    from graphtune.codegen.registry import impls_for

    dev = check_device(device)
    if target is None:
        arch = _device_arch(device) if dev.type == "cuda" else 90
    else:
        from graphtune.autotune.fingerprint import for_target

        arch = int(for_target(target).device.split("sm_")[1])
    if arch not in (80, 90):  # the reference parts of the model; an H200 is sm_90
        arch = 90 if arch > 90 else 80
    load_impls()
    rows: list[ValidationRow] = []
    skipped: list[str] = []
    for shape in shapes:
        meta = shape.meta_args()
        args = _to(shape.make_args(0), dev)
        bench: Bench | None = None
        for impl in impls_for(shape.op, "cuda"):
            if not impl.supports(args):
                skipped.append(f"{impl.name} cannot run on {device} for {shape}")
                if progress:
                    progress(f"skipped: {skipped[-1]}")
                continue
            dflt = impl.default_config(meta)
            cfgs = [dflt, *[c for c in impl.configs(meta) if c != dflt]]
            cfgs = cfgs[:max_configs] if max_configs else cfgs
            row = ValidationRow(shape, impl.name)
            if progress:
                progress(f"{shape}: {impl.name}: cross-compiling {len(cfgs)} config(s) for sm_{arch}")
            ranked = static_rank(impl.name, meta, cfgs, arch)
            bench = bench or Bench(shape.op, args)
            for i, (cfg, _, res) in enumerate(ranked):
                pred = predict(impl.name, meta, cfg, res, arch, blocks=blocks_per_sm(res, arch) if res else 0).time_us
                if progress:
                    progress(f"{shape}: {impl.name}: measuring {cfg} ({i + 1}/{len(ranked)})")
                c = Candidate(impl, cfg)
                m = bench.check(c) or bench.time(c, reps)
                if m.ok and math.isfinite(pred):
                    row.pairs.append((str(cfg), pred, m.median_us))
                else:
                    row.failed.append(f"{cfg}: {m.error or 'predicted inf (spills or does not fit)'}")
            rows.append(row)
    if not rows:
        raise OptionError(f"{'; '.join(skipped[:3]) or 'no Triton implementation'}: measure on a GPU (--device cuda) "
                          "or, on the CPU, under TRITON_INTERPRET=1 (tiny shapes)")
    return rows


def validation_table(rows: Sequence[ValidationRow]) -> str:
    """Plain text: per problem and implementation, configs, Spearman rho, predicted and measured best; the mean."""
    out = [("shape", "impl", "configs", "spearman", "predicted best", "measured best", "failed")]
    rhos = []
    for r in rows:
        pb = min(r.pairs, key=lambda t: t[1])[0] if r.pairs else "-"
        mb = min(r.pairs, key=lambda t: t[2])[0] if r.pairs else "-"
        rho = r.rho
        if not math.isnan(rho):
            rhos.append(rho)
        out.append((str(r.shape), r.impl, str(len(r.pairs)), "-" if math.isnan(rho) else f"{rho:+.2f}", pb, mb,
                    str(len(r.failed))))
    widths = [max(len(row[i]) for row in out) for i in range(len(out[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in out]
    lines.insert(1, "  ".join("-" * w for w in widths))
    mean = f"{sum(rhos) / len(rhos):+.2f}" if rhos else "- (fewer than 3 configs ran per problem)"
    lines.append(f"mean Spearman rho over {len(rhos)} problem(s): {mean}")
    return "\n".join(lines)


def predicted_table(arch: int = 90, family_names: Sequence[str] = ("attention", "lean_decode", "shared_prefix",
                                                                   "tree_attention"),
                    max_configs: int | None = 10) -> str:
    """Markdown: configs of each family's Triton implementation for the ``docs/kernels.md`` problems
    (:func:`graphtune.codegen.costmodel.doc_shapes`), ranked by predicted time on ``sm_<arch>``.

    Each problem gets its default config and ``max_configs - 1`` others spread evenly over its
    pruned space (``None``: all); every one is cross-compiled (cached next to the tuning database).
    ``python -m graphtune.autotune.validate_static 90`` prints it.
    """
    from graphtune.codegen.costmodel import doc_shapes, hbm_bytes, predict
    from graphtune.codegen.crosscompile import blocks_per_sm, static_rank
    from graphtune.codegen.family import family, load_impl_modules
    from graphtune.codegen.registry import get_impl

    load_impl_modules("cuda")
    lines = ["| problem | rank | config | regs | smem KiB | eff | MB moved | GFLOP | bound | predicted µs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in family_names:
        impl_name = family(name).default_impls["cuda"]
        for shape in doc_shapes()[name]:
            meta = shape.meta_args()
            impl = get_impl(shape.op, impl_name)
            dflt = impl.default_config(meta)
            rest = [c for c in impl.configs(meta) if c != dflt]
            if max_configs and len(rest) > max_configs - 1:  # an even spread over the space (tile sizes vary)
                rest = [rest[round(i * (len(rest) - 1) / max(1, max_configs - 2))] for i in range(max_configs - 1)]
            ranked = static_rank(impl_name, meta, [dflt, *dict.fromkeys(rest)], arch)
            for i, (cfg, _, res) in enumerate(ranked):
                blocks = blocks_per_sm(res, arch) if res else 0
                p = predict(impl_name, meta, cfg, res, arch, blocks=blocks)
                moved = hbm_bytes(p.traffic, blocks, arch)
                cfg_s = ",".join(f"{k}={v}" for k, v in cfg.to_dict().get("params", {}).items())
                cfg_s += f";w{cfg.num_warps};s{cfg.num_stages}" + (" (default)" if cfg == dflt else "")
                lines.append(f"| {name}: {shape} | {i + 1} | {cfg_s} | {res.registers if res else '-'} | "
                             f"{res.shared_mem_bytes / 1024 if res else 0:.0f} | {p.efficiency:.2f} | "
                             f"{moved / 1e6:.1f} | {p.traffic.flops / 1e9:.2f} | {p.bound} | {p.time_us:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m graphtune.autotune.validate_static [ARCH]: docs/kernels.md's table
    import sys

    print(predicted_table(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
