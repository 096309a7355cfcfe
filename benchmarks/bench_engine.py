"""graphtune's engine end to end on the real SmolLM2-135M-Instruct, against HF in the same run.

Workloads (issue "Generation engine"):

1. 16 samples of one ~1.5K-token chat prompt, 64 new tokens: engine vs HF ``generate`` and vs HF
   ``generate_batch`` (continuous batching, paged, prefix sharing; transformers >= 5).
2. Ragged 1x4K + 15x256 prompts, 32 new tokens, greedy: engine vs HF ``generate`` (left padded).
3. Batch-1 greedy decode at 1K context: tokens/s and Python overhead per step.
4. KV bytes held, 16 samples x 1.5K: engine vs HF.
5. First call on a new batch shape (capture/compile included) vs plain HF's first call.

Each row reports medians over ``GRAPHTUNE_BENCH_ROUNDS`` interleaved rounds (default 1: the HF
baselines take minutes) and a profile breakdown of one engine run: copies, attention, linear
layers (MLP and projections), other ops, and Python overhead (wall time not inside any op).
``GRAPHTUNE_BENCH_SCALE`` (default 1.0) scales prompt lengths and new tokens down for a quick
run; ``GRAPHTUNE_BENCH_THREADS`` sets torch's threads (default 1: with 2 OpenMP threads on 2
shared cores, barrier waits dominate and medians swing 10x).

Run: ``.venv/bin/python -m pytest -q benchmarks/bench_engine.py -s``
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import pytest
import torch

pytest.importorskip("transformers")

SCALE = float(os.environ.get("GRAPHTUNE_BENCH_SCALE", "1.0"))
ROUNDS = int(os.environ.get("GRAPHTUNE_BENCH_ROUNDS", "1"))
THREADS = int(os.environ.get("GRAPHTUNE_BENCH_THREADS", "1"))

COPY_OPS = {"aten::copy_", "aten::index_copy_", "aten::cat", "aten::index_select", "aten::clone", "aten::_to_copy",
            "aten::index", "aten::gather", "aten::stack", "aten::repeat_interleave", "aten::index_put_"}
ATTN_OPS = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
            "aten::_scaled_dot_product_flash_attention", "aten::scaled_dot_product_attention", "aten::bmm",
            "aten::_softmax"}
LINEAR_OPS = {"aten::mm", "aten::addmm", "mkldnn::_linear_pointwise"}  # the last: tuned cpu.onednn linears


def _n(x: int) -> int:
    return max(1, int(x * SCALE))


@pytest.fixture(scope="module")
def smol():
    from graphtune.models import smollm2

    try:
        model, tok = smollm2()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"SmolLM2 unavailable: {e}")
    prev = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield model, tok
    torch.set_num_threads(prev)


def tune_model_linears(model: Any) -> list:
    """Tune ``model``'s linear layers at this thread count into the benchmark's database, as a
    deployment would once per machine (``graphtune tune --linears``); prints how long it took."""
    from graphtune.runtime.engine.linear import tune_linears

    t0 = time.perf_counter()
    res = tune_linears(model)
    won = sum(r.impl != "cpu.aten" for r in res)
    print(f"\n[tuned linears: {len(res)} shapes at {torch.get_num_threads()} threads in "
          f"{time.perf_counter() - t0:.0f}s; {won} won by a non-default formulation]")
    return res


def chat_prompt(tok: Any, n_tokens: int, topic: str = "the history of computing") -> list[int]:
    """A real chat-template prompt of about ``n_tokens`` tokens (a long system prompt + a question)."""
    sys = ("You are a meticulous assistant. Answer precisely, cite the reasoning, and keep the style concise. "
           f"Background notes on {topic}: ")
    filler = ("Charles Babbage designed the Analytical Engine; Ada Lovelace wrote its first program. Alan Turing "
              "defined computability; von Neumann described the stored-program design. Transistors replaced "
              "valves, integrated circuits replaced transistors, and microprocessors put a computer on one chip. ")
    text = sys
    ids: list[int] = []
    while True:
        msgs = [{"role": "system", "content": text}, {"role": "user", "content": "Summarize the notes in two sentences."}]
        out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = list(out["input_ids"]) if hasattr(out, "keys") else list(out)
        if len(ids) >= n_tokens:
            return ids
        text += filler


def profile_breakdown(fn: Callable[[], Any]) -> dict[str, float]:
    """Seconds in copies, attention, linear layers, other ops, and Python (outside ops) for one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    wall = time.perf_counter() - t
    cats = {"copies": 0.0, "attention": 0.0, "linear": 0.0, "other_ops": 0.0}
    main = None
    for e in p.events():
        if main is None:
            main = e.thread
        if e.thread != main or e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"):
            continue  # top-level ops of the calling thread only (worker threads overlap it)
        us = e.self_cpu_time_total + sum(c.cpu_time_total for c in e.cpu_children)
        s = us / 1e6
        if e.name in COPY_OPS:
            cats["copies"] += s
        elif e.name in ATTN_OPS:
            cats["attention"] += s
        elif e.name in LINEAR_OPS or e.name == "aten::linear" or e.name == "aten::matmul":
            cats["linear"] += s
        elif e.name.startswith("aten::"):
            cats["other_ops"] += s
    cats["python"] = max(0.0, wall - sum(cats.values()))
    cats["wall"] = wall
    return cats


def _fmt(b: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}s" for k, v in b.items())


def timed(fns: dict[str, Callable[[], Any]], rounds: int = ROUNDS) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds per implementation over interleaved rounds, and each one's last result."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    outs: dict[str, Any] = {}
    for _ in range(rounds):
        for name, f in fns.items():
            t = time.perf_counter()
            outs[name] = f()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, outs


def test_n_samples_16_of_1500_token_prompt_64_new(benchmark, smol):
    from transformers import GenerationConfig

    import graphtune

    model, tok = smol
    ids = chat_prompt(tok, _n(1500))
    n, new = 16, _n(64)
    eng = graphtune.Engine(model, tok)
    x = torch.tensor([ids])
    kw = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.95, num_return_sequences=n, max_new_tokens=new,
              min_new_tokens=new, pad_token_id=tok.pad_token_id)
    fns = {
        "engine": lambda: eng.generate([ids], new, num_return_sequences=n, do_sample=True, temperature=0.8, top_k=50,
                                       top_p=0.95, seed=0, eos_token_id=[]),
        "hf_generate": lambda: model.generate(x, attention_mask=torch.ones_like(x), **kw),
    }
    if hasattr(model, "generate_batch"):
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        gc = GenerationConfig(max_new_tokens=new, do_sample=True, temperature=0.8, top_k=50, top_p=0.95,
                              num_return_sequences=n, eos_token_id=-1)
        blocks = (len(ids) + new) * n // 64 + 64
        fns["hf_generate_batch"] = lambda: model.generate_batch(
            [ids], generation_config=gc, continuous_batching_config=ContinuousBatchingConfig(num_blocks=blocks, page_size=64))
    med, outs = timed(fns)
    res = outs["engine"]
    assert all(len(s) == new for s in res.sequences)
    info = {f"{k}_s": v for k, v in med.items()}
    for k in med:
        if k != "engine":
            info[f"speedup_vs_{k}"] = med[k] / med["engine"]
    info["kv_bytes_engine"], info["kv_bytes_hf"] = res.stats.kv_bytes, res.stats.hf_kv_bytes
    info["goals"] = {"speedup_vs_hf_generate": 8.0, "speedup_vs_hf_generate_batch": 2.0}  # the (graphtune report)
    info["profile_engine"] = profile_breakdown(fns["engine"])
    benchmark.extra_info.update(info)
    print(f"\n[16 samples x {len(ids)}-token prompt, {new} new] " + ", ".join(f"{k} {v:.1f}s" for k, v in med.items()))
    print("  " + ", ".join(f"{k} {v:.2f}x" for k, v in info.items() if k.startswith("speedup")))
    print(f"  engine profile: {_fmt(info['profile_engine'])}")
    print(f"  sample text: {res.texts[0][:160]!r}")
    benchmark.pedantic(lambda: None, rounds=1)


def test_ragged_1x4k_15x256_32_new_vs_hf_left_padded(benchmark, smol):
    import graphtune

    model, tok = smol
    long_ = chat_prompt(tok, _n(4096), "operating systems")
    shorts = [chat_prompt(tok, _n(256), f"topic {i}: " + "x" * i) for i in range(15)]
    prompts = [long_] + shorts
    new = _n(32)
    eng = graphtune.Engine(model, tok)
    L = max(map(len, prompts))
    pad = tok.pad_token_id
    x = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    fns = {"engine": lambda: eng.generate(prompts, new, eos_token_id=[]),
           "hf_generate": lambda: model.generate(x, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                                 do_sample=False, pad_token_id=pad)}
    med, outs = timed(fns)
    hf = outs["hf_generate"][:, L:].tolist()
    same = sum(a == b for a, b in zip(hf, outs["engine"].sequences))
    info = {"engine_s": med["engine"], "hf_generate_s": med["hf_generate"],
            "speedup": med["hf_generate"] / med["engine"], "goal": 5.0, "rows_identical": same,
            "profile_engine": profile_breakdown(fns["engine"])}
    benchmark.extra_info.update(info)
    print(f"\n[ragged 1x{len(long_)} + 15x~{len(shorts[0])}, {new} new] engine {med['engine']:.1f}s, HF "
          f"{med['hf_generate']:.1f}s: {info['speedup']:.2f}x; greedy rows identical {same}/16")
    print(f"  engine profile: {_fmt(info['profile_engine'])}")
    benchmark.pedantic(lambda: None, rounds=1)


def test_batch1_decode_tokens_per_s_at_1k_context(benchmark, smol):
    import graphtune

    model, tok = smol
    ids = chat_prompt(tok, _n(1024), "compilers")
    new = _n(64)
    eng = graphtune.Engine(model, tok)
    x = torch.tensor([ids])

    def eng_decode() -> tuple[float, Any]:
        r = eng.generate([ids], new, eos_token_id=[])
        return r.stats.decode_s, r

    def hf_decode() -> tuple[float, Any]:
        t = time.perf_counter()
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=1, do_sample=False, pad_token_id=0)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0)
        return time.perf_counter() - t - t1, out

    rounds = max(3, ROUNDS)
    e, h = [], []
    for _ in range(rounds):
        e.append(eng_decode())
        h.append(hf_decode())
    te, th = statistics.median(x[0] for x in e), statistics.median(x[0] for x in h)
    steps = new - 1
    prof = profile_breakdown(lambda: eng.generate([ids], new, eos_token_id=[]))
    info = {"engine_tok_s": steps / te, "hf_tok_s": steps / th, "ratio": th / te, "goal": 1.0,
            "python_overhead_ms_per_step": prof["python"] / new * 1e3, "profile_engine": prof}
    benchmark.extra_info.update(info)
    print(f"\n[batch 1, {len(ids)}-token context, {new} new] decode engine {info['engine_tok_s']:.1f} tok/s, "
          f"HF {info['hf_tok_s']:.1f} tok/s: {info['ratio']:.2f}x; Python overhead "
          f"{info['python_overhead_ms_per_step']:.2f} ms/step")
    benchmark.pedantic(lambda: None, rounds=1)


def test_kv_bytes_held_16_samples_x_1500(benchmark, smol):
    import graphtune

    model, tok = smol
    ids = chat_prompt(tok, _n(1500))
    plan = graphtune.Engine(model, tok).plan([ids], max_new_tokens=_n(64), num_return_sequences=16)
    ratio = plan.hf_kv_bytes / plan.kv_bytes
    benchmark.extra_info.update({"engine_bytes": plan.kv_bytes, "hf_bytes": plan.hf_kv_bytes, "hf_over_engine": ratio,
                                 "goal_hf_over_engine": 8.0})
    print(f"\n[KV held, 16 x {len(ids)}] engine {plan.kv_bytes / 2**20:.1f} MiB, HF {plan.hf_kv_bytes / 2**20:.1f} "
          f"MiB: 1/{ratio:.1f} of HF's")
    benchmark.pedantic(lambda: None, rounds=1)


def test_first_call_on_new_batch_shape_vs_plain_hf_first_call(benchmark, smol):
    import graphtune

    model, tok = smol
    prompts = [chat_prompt(tok, _n(n), f"first call {n}") for n in (300, 420, 180, 512)]
    new = _n(16)
    L = max(map(len, prompts))
    pad = tok.pad_token_id
    x = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad)
    t = time.perf_counter()
    fast = graphtune.optimize(model)
    out_fast = fast.generate(x, **kw)  # first call: optimize + engine (nothing is captured)
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    out_hf = model.generate(x, **kw)
    t_hf = time.perf_counter() - t
    info = {"graphtune_first_s": t_fast, "hf_first_s": t_hf, "ratio": t_hf / t_fast, "goal": 1.0,
            "route": fast.generate.last_route, "identical": bool(torch.equal(out_fast, out_hf))}
    benchmark.extra_info.update(info)
    print(f"\n[first call, 4 ragged chat prompts, {new} new] optimize+generate {t_fast:.1f}s, plain HF {t_hf:.1f}s: "
          f"{info['ratio']:.2f}x ({info['route']}; identical tokens: {info['identical']})")
    benchmark.pedantic(lambda: None, rounds=1)
