"""``graphtune generate``: run graphtune's engine on a prompts file and print the text and tokens/s."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from graphtune.cli import subcommand
from graphtune.errors import OptionError


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (default: the real SmolLM2-135M-Instruct), 'demo', or a family of graphtune.models")
    p.add_argument("--prompts", metavar="FILE", help="one prompt per line ('-': stdin); default: two built-in prompts")
    p.add_argument("-n", "--num-return-sequences", type=int, default=1, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the tokenizer's chat template")
    p.add_argument("--max-kv-tokens", type=int, default=None, help="KV budget in tokens (rows beyond it wait)")
    p.add_argument("--speculative", choices=("ngram", "layerskip", "dytree"), default=None,
                   help="speculative decoding (lossless): prompt lookup, the model's first layers as drafter, "
                        "or a dynamic draft tree from them")
    p.add_argument("--sparse-prefill", choices=("pbs", "block"), default=None,
                   help="approximate block-sparse prefill of long prompts (accuracy-tuned settings if stored)")
    p.add_argument("--plan", action="store_true", help="print the engine's plan before running")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--progress", action="store_true", help="progress line on stderr")


DEFAULT_PROMPTS = ["Write a Python function that returns the square of a number.",
                   "What is the capital of France? Answer in one sentence."]


def _load(name: str) -> tuple[Any, Any]:
    from graphtune.models import load_named

    return load_named(name)


def _encode(tok: Any, prompts: list[str], chat: bool, vocab: int) -> list[list[int]]:
    if tok is None:  # random-weight models have no tokenizer: bytes as token ids
        return [[1] + [3 + b % (vocab - 3) for b in p.encode()] for p in prompts]
    if chat and getattr(tok, "chat_template", None):
        out = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
               for p in prompts]
        return [list(o["input_ids"]) if hasattr(o, "keys") else list(o) for o in out]  # 5.x returns a BatchEncoding
    return [tok(p)["input_ids"] for p in prompts]


@subcommand("generate", "generate text with graphtune's engine (shared prompts once, ragged rows unpadded)", _args)
def _generate(args: argparse.Namespace) -> int:
    from graphtune.runtime.engine import Engine

    if args.prompts:
        text = sys.stdin.read() if args.prompts == "-" else Path(args.prompts).read_text()
        prompts = [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise OptionError(f"--prompts {args.prompts}: no prompts (one per line)")
    else:
        prompts = DEFAULT_PROMPTS
    model, tok = _load(args.model)
    ids = _encode(tok, prompts, not args.no_chat, model.config.vocab_size)
    eng = Engine(model, tok, max_kv_tokens=args.max_kv_tokens, speculative=args.speculative,
                 sparse_prefill=args.sparse_prefill)
    if args.plan:
        print(eng.plan(ids, args.max_new_tokens, args.num_return_sequences))
    t0 = time.perf_counter()
    res = eng.generate(ids, args.max_new_tokens, num_return_sequences=args.num_return_sequences,
                       do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=args.seed, progress=args.progress)
    wall = time.perf_counter() - t0
    s = res.stats
    texts = res.texts or [" ".join(map(str, seq)) for seq in res.sequences]
    if args.json:
        print(json.dumps({"texts": texts, "tokens": res.sequences, "seconds": wall,
                          "tokens_per_s": s.generated_tokens / wall, "prefill_s": s.prefill_s,
                          "decode_s": s.decode_s, "kv_bytes": s.kv_bytes, "hf_kv_bytes": s.hf_kv_bytes,
                          "speculation": None if res.speculation is None else [vars(r) for r in res.speculation]}))
        return 0
    n = args.num_return_sequences
    for r, t in enumerate(texts):
        print(f"--- prompt {r // n}" + (f", sample {r % n}" if n > 1 else "") + f": {prompts[r // n][:70]!r}")
        print(t.strip())
    print(f"--- {s.generated_tokens} tokens in {wall:.2f} s: {s.generated_tokens / wall:.1f} tokens/s "
          f"(prefill {s.prefill_s:.2f} s for {s.prefilled_tokens} of {s.prompt_tokens} prompt tokens, "
          f"decode {s.decode_s:.2f} s over {s.decode_steps} steps); KV {s.kv_bytes / 2**20:.1f} MiB "
          f"vs {s.hf_kv_bytes / 2**20:.1f} MiB for HF generate; torch threads {torch.get_num_threads()}")
    if res.speculation is not None:
        print(f"--- speculative ({args.speculative}): {s.accepted_tokens} of {s.proposed_tokens} draft tokens accepted "
              f"({s.acceptance:.0%}) over {s.verify_steps} verify steps and {s.decode_steps} plain steps")
    return 0
