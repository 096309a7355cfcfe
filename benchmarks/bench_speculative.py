"""Speculative decoding in graphtune's engine on the real SmolLM2-135M-Instruct, same-run ratios.

Workloads (issue "Speculative verification"):

1. Batch 1, input-grounded ("add type hints to this function", the function from Python's own
   standard library given), greedy, prompt lookup: engine with ``speculative="ngram"`` vs the
   engine without speculation, and vs HF ``generate(prompt_lookup_num_tokens=...)``.
2. Batch 8, mixed input-grounded tasks (code edits, docstrings, comments, a bug fix, extraction,
   a summary), prompt lookup vs the engine without speculation. (An open-ended row in such a batch
   bounds it: the batch takes as many steps as its least predictable row; workload 3 is that row.)
3. Batch 1, open-ended chat: self-speculative (``"layerskip"``), a dynamic draft tree from the
   early exit (``DynamicTreeDrafter``, DySpec-style) and prompt lookup vs no speculation:
   tokens/s and acceptance.

Before the workloads the model's linear layers are tuned for this machine and thread count
(``tune_linears``, what ``graphtune tune --linears`` stores; ~35 s), as a deployment would. Workload
1 also runs the engine with ``ENGINE_TUNED_LINEAR=0`` (F.linear everywhere), so the tuned linears'
share of the speedup and speculation's are reported apart.

Every speculative run's greedy tokens must equal the non-speculative engine's (and HF's) row by row:
the run fails otherwise. Medians over ``GRAPHTUNE_BENCH_ROUNDS`` interleaved rounds (default 3
here), torch on ``GRAPHTUNE_BENCH_THREADS`` threads (default 1), plus a profile of one speculative
run (copies, attention, linear layers, other ops, Python) and the drafter's own time.

Run: ``.venv/bin/python -m pytest -q benchmarks/bench_speculative.py -s`` (~6 min).
"""
from __future__ import annotations

import inspect
import os
import statistics
import time
from typing import Any, Callable

import pytest
import torch

pytest.importorskip("transformers")

from bench_engine import _fmt, profile_breakdown, smol, tune_model_linears  # noqa: E402,F401  (smol: the module's model fixture)

ROUNDS = int(os.environ.get("GRAPHTUNE_BENCH_ROUNDS", "3"))
NEW = int(os.environ.get("GRAPHTUNE_BENCH_SPEC_NEW", "128"))


@pytest.fixture(scope="module", autouse=True)
def tuned_linears(smol):
    """Tune the model's linear layers at this thread count into the benchmark's database (once)."""
    return tune_model_linears(smol[0])


def _chat(tok: Any, user: str) -> list[int]:
    out = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


def _source(obj: Any) -> str:
    return inspect.getsource(obj)


def _tasks() -> list[str]:
    import fnmatch
    import shlex
    import shutil
    import string
    import textwrap

    para = ("The Analytical Engine was a proposed mechanical general-purpose computer designed by Charles "
            "Babbage. It was first described in 1837 as the successor to Babbage's difference engine. The "
            "Analytical Engine incorporated an arithmetic logic unit, control flow in the form of conditional "
            "branching and loops, and integrated memory, making it the first design for a general-purpose "
            "computer that could be described in modern terms as Turing-complete.")
    return [
        "Add type hints to this function. Reply with the full function only.\n\n" + _source(textwrap.indent),
        "Add a docstring to this function. Reply with the full function only.\n\n" + _source(shlex.quote),
        "Rename the variables of this function to clearer names. Reply with the full function.\n\n"
        + _source(shutil.copyfileobj),
        "Rewrite this function with comments on every line.\n\n" + _source(fnmatch.filter),
        "Add type hints to this function. Reply with the full function only.\n\n" + _source(string.capwords),
        "Summarize this paragraph in one sentence.\n\n" + para,
        "List every name of a person mentioned in this text.\n\n" + para,
        "Fix the bug in this function and reply with the corrected function.\n\n"
        "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values) + 1\n",
    ]


def _timed(fns: dict[str, Callable[[], Any]]) -> tuple[dict[str, float], dict[str, Any]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    outs: dict[str, Any] = {}
    for _ in range(ROUNDS):
        for name, f in fns.items():
            t = time.perf_counter()
            outs[name] = f()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, outs


def _spec_line(res: Any) -> str:
    s = res.stats
    per = res.speculation or []
    mean = statistics.mean(r.mean_accepted for r in per if r.steps) if any(r.steps for r in per) else 0.0
    return (f"acceptance {s.acceptance:.2f} ({s.accepted_tokens}/{s.proposed_tokens}), {mean:.2f} tokens per "
            f"verify step, {s.verify_steps} verify + {s.decode_steps} plain steps, drafter {s.draft_s:.2f}s")


def test_batch1_input_grounded_prompt_lookup(benchmark, smol):
    import graphtune

    model, tok = smol
    ids = _chat(tok, _tasks()[0])
    from graphtune import flags

    plain = graphtune.Engine(model, tok)
    spec = graphtune.Engine(model, tok, speculative="ngram")
    with flags.Context(ENGINE_TUNED_LINEAR=False):
        untuned = graphtune.Engine(model, tok)
        untuned_spec = graphtune.Engine(model, tok, speculative="ngram")
    x = torch.tensor([ids])
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id)
    fns = {
        "engine": lambda: plain.generate([ids], NEW),
        "engine_ngram": lambda: spec.generate([ids], NEW),
        "engine_untuned_linears": lambda: untuned.generate([ids], NEW),
        "engine_ngram_untuned_linears": lambda: untuned_spec.generate([ids], NEW),
        "hf_prompt_lookup": lambda: model.generate(x, attention_mask=torch.ones_like(x), prompt_lookup_num_tokens=10, **kw),
        "hf_generate": lambda: model.generate(x, attention_mask=torch.ones_like(x), **kw),
    }
    med, outs = _timed(fns)
    want = outs["engine"].sequences[0]
    assert outs["engine_ngram"].sequences[0] == want, "speculative greedy output differs from the engine's"
    for k in ("engine_untuned_linears", "engine_ngram_untuned_linears"):
        assert outs[k].sequences[0] == want, f"{k}: greedy output differs from the engine's"
    hf = outs["hf_generate"][0, len(ids):].tolist()
    n_tok = len(want)
    info = {f"{k}_s": v for k, v in med.items()}
    info.update(goals={"speedup_vs_engine": 2.0, "speedup_vs_hf_prompt_lookup": 1.5},
                speedup_vs_engine=med["engine"] / med["engine_ngram"],
                speedup_vs_hf_prompt_lookup=med["hf_prompt_lookup"] / med["engine_ngram"],
                speedup_vs_hf_generate=med["hf_generate"] / med["engine_ngram"],
                tuned_linears_speedup_engine=med["engine_untuned_linears"] / med["engine"],
                speculation_speedup_untuned_linears=med["engine_untuned_linears"] / med["engine_ngram_untuned_linears"],
                threads=torch.get_num_threads(),
                hf_identical=hf[:n_tok] == want[:len(hf)], acceptance=outs["engine_ngram"].stats.acceptance,
                tokens=n_tok, profile_engine_ngram=profile_breakdown(fns["engine_ngram"]))
    benchmark.extra_info.update(info)
    print(f"\n[batch 1, add type hints, prompt {len(ids)} tokens, {n_tok} new] "
          + ", ".join(f"{k} {v:.2f}s ({n_tok / v:.1f} tok/s)" for k, v in med.items()))
    print(f"  engine+ngram: {info['speedup_vs_engine']:.2f}x vs engine, {info['speedup_vs_hf_prompt_lookup']:.2f}x vs "
          f"HF prompt lookup, {info['speedup_vs_hf_generate']:.2f}x vs HF generate; identical to HF greedy: "
          f"{info['hf_identical']}")
    print(f"  tuned linears alone: engine {info['tuned_linears_speedup_engine']:.2f}x faster than with F.linear; "
          f"speculation with F.linear linears: {info['speculation_speedup_untuned_linears']:.2f}x "
          f"({torch.get_num_threads()} threads)")
    print(f"  {_spec_line(outs['engine_ngram'])}")
    print(f"  engine+ngram profile: {_fmt(info['profile_engine_ngram'])}")
    print(f"  text: {outs['engine_ngram'].texts[0][:200]!r}")
    benchmark.pedantic(lambda: None, rounds=1)


def test_batch8_mixed_tasks_prompt_lookup(benchmark, smol):
    import graphtune

    model, tok = smol
    prompts = [_chat(tok, t) for t in _tasks()]
    plain = graphtune.Engine(model, tok)
    spec = graphtune.Engine(model, tok, speculative="ngram")
    fns = {"engine": lambda: plain.generate(prompts, NEW), "engine_ngram": lambda: spec.generate(prompts, NEW)}
    med, outs = _timed(fns)
    same = sum(a == b for a, b in zip(outs["engine"].sequences, outs["engine_ngram"].sequences))
    assert same == len(prompts), f"speculative greedy output differs on {len(prompts) - same} rows"
    res = outs["engine_ngram"]
    acc = [round(r.acceptance, 2) for r in res.speculation]
    info = {"engine_s": med["engine"], "engine_ngram_s": med["engine_ngram"],
            "speedup_vs_engine": med["engine"] / med["engine_ngram"], "goal_speedup_vs_engine": 1.5,
            "acceptance": res.stats.acceptance,
            "acceptance_per_row": acc, "profile_engine_ngram": profile_breakdown(fns["engine_ngram"])}
    benchmark.extra_info.update(info)
    gen = res.stats.generated_tokens
    print(f"\n[batch 8 mixed tasks, prompts {min(map(len, prompts))}..{max(map(len, prompts))} tokens, {gen} new] "
          f"engine {med['engine']:.2f}s, engine+ngram {med['engine_ngram']:.2f}s: {info['speedup_vs_engine']:.2f}x; "
          f"rows identical {same}/{len(prompts)}")
    print(f"  {_spec_line(res)}; per row {acc}")
    print(f"  engine+ngram profile: {_fmt(info['profile_engine_ngram'])}")
    benchmark.pedantic(lambda: None, rounds=1)


def test_batch1_open_chat_self_speculative(benchmark, smol):
    import graphtune

    model, tok = smol
    ids = _chat(tok, "Write a short story about a lighthouse keeper who finds a message in a bottle.")
    engines = {"engine": graphtune.Engine(model, tok),
               "engine_layerskip": graphtune.Engine(model, tok, speculative=graphtune.LayerSkipDrafter(layers=8, tokens=3)),
               # DySpec-style trees from a deeper early exit (its argmax agrees with the model's on
               # ~22% of positions after 20 layers, 3% after 8): top-4 children per node, 8 nodes
               "engine_dytree": graphtune.Engine(model, tok, speculative=graphtune.DynamicTreeDrafter(
                   layers=20, tokens=8, top_k=4, width=4)),
               "engine_ngram": graphtune.Engine(model, tok, speculative="ngram")}
    fns = {k: (lambda e=e: e.generate([ids], NEW)) for k, e in engines.items()}
    med, outs = _timed(fns)
    want = outs["engine"].sequences[0]
    for k in engines:
        assert outs[k].sequences[0] == want, f"{k}: speculative greedy output differs"
    n_tok = len(want)
    info = {f"{k}_s": v for k, v in med.items()}
    for k in engines:
        if k != "engine":
            info[f"{k}_speedup"] = med["engine"] / med[k]
            info[f"{k}_acceptance"] = outs[k].stats.acceptance
    benchmark.extra_info.update(info)
    print(f"\n[batch 1 open chat, {n_tok} new] " + ", ".join(f"{k} {n_tok / v:.1f} tok/s" for k, v in med.items()))
    for k in engines:
        if k != "engine":
            print(f"  {k}: {info[f'{k}_speedup']:.2f}x vs engine; {_spec_line(outs[k])}")
    benchmark.pedantic(lambda: None, rounds=1)
