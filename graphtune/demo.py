"""``make demo``: graphtune end to end on the built-in default model.

1. build a small Llama (seeded random weights, no downloads);
2. tune its attention shapes on this machine (small budget) and show the chosen configs;
3. optimize it and print the ``explain`` report;
4. batched HF ``generate`` with and without graphtune: timings and whether tokens are identical;
5. a shared-prompt batch (``num_return_sequences``): the shared-prefix speedup.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch

import graphtune
from graphtune.models import demo_model


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def _tune(model: torch.nn.Module, batch: int, prompt: int, new_tokens: int, budget_s: float) -> None:
    from graphtune.autotune import AttentionShape, summary_table, tune_shapes

    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    shapes = [
        AttentionShape(batch, cfg.num_attention_heads, cfg.num_key_value_heads, prompt, prompt, hd, "float32", True),
        AttentionShape(batch, cfg.num_attention_heads, cfg.num_key_value_heads, 1, prompt + new_tokens, hd, "float32", False),
    ]
    results = tune_shapes(shapes, budget_s=budget_s)
    print(summary_table(results))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--tune-budget", type=float, default=20.0, help="seconds of tuning (0 skips)")
    p.add_argument("--shared-prompt", type=int, default=1024, help="prompt length of the shared-prompt batch")
    p.add_argument("--num-return-sequences", type=int, default=16)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = demo_model()
    cfg = model.config
    print(f"demo model: Llama, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv heads, random weights (seed 0)")
    ids = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt))
    mask = torch.ones_like(ids)

    if args.tune_budget > 0:
        _section(f"tuning attention shapes ({args.tune_budget:.0f}s budget)")
        _tune(model, args.batch, args.prompt, args.new_tokens, args.tune_budget)

    _section("optimize + explain")
    fast = graphtune.optimize(model)
    print(graphtune.explain(model, {"input_ids": ids[:, :16], "attention_mask": mask[:, :16]}))

    _section(f"batched generate: batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens")
    gen = dict(attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        fast.generate(ids, **gen)  # capture + warm-up (prefill and decode graphs)
        t_plain, ref = _median_time(lambda: model.generate(ids, **gen), 3)
        t_fast, out = _median_time(lambda: fast.generate(ids, **gen), 3)
    print(f"plain HF generate : {t_plain * 1e3:8.1f} ms (median of 3)")
    print(f"graphtune generate: {t_fast * 1e3:8.1f} ms (median of 3)  ratio plain/graphtune = {t_plain / t_fast:.2f}x")
    print(f"identical tokens  : {torch.equal(out, ref)}")

    if args.shared_prompt > 0 and args.num_return_sequences > 1:
        n = args.num_return_sequences
        _section(f"shared-prompt batch: one {args.shared_prompt}-token prompt x {n} rows")
        # The same prompt repeated (what num_return_sequences does; transformers 5 allows that only
        # with sampling): greedy keeps the comparison exact. graphtune detects the sharing at prefill.
        prompt = torch.randint(3, cfg.vocab_size, (1, args.shared_prompt)).expand(n, -1).contiguous()
        sgen = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            fast.generate(prompt, **sgen)
            t_plain, ref = _median_time(lambda: model.generate(prompt, **sgen), 2)
            t_fast, out = _median_time(lambda: fast.generate(prompt, **sgen), 2)
        print(f"plain HF generate : {t_plain * 1e3:8.1f} ms")
        print(f"graphtune generate: {t_fast * 1e3:8.1f} ms  speedup {t_plain / t_fast:.2f}x "
              "(shared-prefix attention + prefill dedup)")
        print(f"identical tokens  : {torch.equal(out, ref)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
