"""Speculative decoding in the engine: exactly the target model's output, at any batch size.

Greedy: identical tokens to the engine without speculation and to HF ``generate`` row by row, for
every drafter (prompt lookup chain and tree, self-speculative early exit, and a scripted drafter
that proposes the true continuation with planted mistakes, so every accepted length from 0 to
all-plus-bonus occurs), batch 1, 4 and 16, ragged prompts, shared prefixes, rows finishing at EOS
at different times, and continuous batching under a KV budget. Sampling: seeded reproducibility,
and the emitted tokens' joint distribution equals the model's own (a total-variation test).
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import graphtune  # noqa: E402
from graphtune import flags  # noqa: E402
from graphtune.errors import OptionError  # noqa: E402
from graphtune.models import build_model  # noqa: E402
from graphtune.runtime.engine.drafters import (Draft, DraftRequest, DynamicTreeDrafter, LayerSkipDrafter,  # noqa: E402
                                               NGramDrafter)
from graphtune.runtime.engine.hf_model import unsupported_reason  # noqa: E402

PAD = 0
_models: dict[str, torch.nn.Module] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _free_verification():
    # goodput decides from measured step times, which vary with the machine's load; these tests
    # count verification steps, so a verified token is declared free (every draft token is verified)
    with flags.Context(ENGINE_SPEC_TOKEN_COST=0.0):
        yield


def _model(family: str = "llama") -> torch.nn.Module:
    if family not in _models:
        _models[family] = build_model(family, "sdpa")
    return _models[family]


def _rand(n: int, g: torch.Generator) -> list[int]:
    return torch.randint(3, 512, (n,), generator=g).tolist()


def _prompts(batch: int, seed: int = 5) -> list[list[int]]:
    """Ragged prompts with repeated phrases (prompt lookup finds matches), some sharing a prefix."""
    g = torch.Generator().manual_seed(seed)
    pre = _rand(20, g)
    out = []
    for i in range(batch):
        phrase = _rand(4 + i % 3, g)
        body = phrase * (2 + i % 3) + _rand(1 + 7 * (i % 4), g)
        out.append(pre + body if i % 2 == 0 else body)
    return out


def _hf_row(model, prompt: list[int], new: int, **kw) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=new, do_sample=False, pad_token_id=PAD, **kw)
    return out[0, len(prompt):].tolist()


class ScriptedDrafter:
    """Proposes each row's true continuation (from a non-speculative run) with planted mistakes:
    row r's draft at step s is wrong from position ``(r + s) % (k + 2)`` on (so 0..k tokens, and
    sometimes all, are right). ``tree=True`` adds a wrong sibling before the right branch."""

    name = "scripted"

    def __init__(self, truth: list[list[int]], prompts: list[list[int]], k: int = 4, tree: bool = False) -> None:
        self.truth, self.prompts, self.k, self.tree, self.step = truth, prompts, k, tree, 0

    def propose(self, request: DraftRequest) -> list[Draft]:
        self.step += 1
        out = []
        for row, hist, budget in zip(request.rows, request.histories, request.budgets):
            done = len(hist) - len(self.prompts[row])
            true = self.truth[row][done:done + budget]
            cut = (row + self.step) % (self.k + 2)
            toks = [t if j < cut else (t + 1) % 512 for j, t in enumerate(true)]
            if self.tree and toks:
                wrong = (toks[0] + 7) % 512
                # a wrong first token as a sibling before the chain: parents [-1, -1, 1, 2, ...]
                out.append(Draft([wrong] + toks, [-1] + [-1] + list(range(1, len(toks))) if len(toks) > 1 else [-1, -1]))
            else:
                out.append(Draft(toks))
        return out


# ------------------------------------------------------------------------------ greedy exactness

@pytest.mark.parametrize("batch", [1, 4, 16])
def test_scripted_drafts_give_the_engines_tokens_at_every_accepted_length(batch):
    model = _model()
    prompts = _prompts(batch)
    new = 12
    ref = graphtune.Engine(model, min_shared=8).generate(prompts, new)
    for tree in (False, True):
        d = ScriptedDrafter(ref.sequences, prompts, k=4, tree=tree)
        res = graphtune.Engine(model, min_shared=8, speculative=d, spec_tokens=5 if tree else 4).generate(prompts, new)
        assert res.sequences == ref.sequences, f"tree={tree}"
        st = res.stats
        assert st.verify_steps > 0 and st.accepted_tokens > 0
        assert st.accepted_tokens < st.proposed_tokens  # mistakes were planted and rejected
        assert st.verify_steps + st.decode_steps < new  # accepted drafts saved forwards
    for r in range(min(batch, 3)):
        assert ref.sequences[r] == _hf_row(model, prompts[r], new)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "gpt_neox", "phi3"])
def test_prompt_lookup_and_layerskip_equal_hf_greedy_on_the_zoo(family):
    model = _model(family)
    if unsupported_reason(model):
        pytest.skip(unsupported_reason(model))
    prompts = _prompts(4, seed=9)
    new = 10
    ref = graphtune.Engine(model, min_shared=8).generate(prompts, new)
    for r, p in enumerate(prompts):
        assert ref.sequences[r] == _hf_row(model, p, new), f"row {r}"
    for spec in ("ngram", NGramDrafter(max_ngram=2, branches=3), LayerSkipDrafter(layers=1, tokens=3),
                 DynamicTreeDrafter(layers=1, tokens=6, top_k=3, width=2)):
        res = graphtune.Engine(model, min_shared=8, speculative=spec).generate(prompts, new)
        assert res.sequences == ref.sequences, f"{family} {spec}"
        assert len(res.speculation) == len(prompts)


def test_rows_finishing_at_eos_at_different_times_match():
    model = _model()
    prompts = _prompts(6, seed=3)
    free = graphtune.Engine(model, min_shared=8).generate(prompts, 14, eos_token_id=[])
    eos = next(seq[k] for seq in free.sequences for k in range(3, len(seq)) if seq[k] not in seq[:k])
    ref = graphtune.Engine(model, min_shared=8).generate(prompts, 14, eos_token_id=eos)
    assert len({len(s) for s in ref.sequences}) > 1, "rows must finish at different times"
    d = ScriptedDrafter(free.sequences, prompts, k=5)
    res = graphtune.Engine(model, min_shared=8, speculative=d, spec_tokens=5).generate(prompts, 14, eos_token_id=eos)
    assert res.sequences == ref.sequences
    for r, p in enumerate(prompts):
        assert res.sequences[r] == _hf_row(model, p, 14, eos_token_id=eos), f"row {r}"


def test_dynamic_tree_drafts_match_at_batch_16_with_eos_and_early_exit_kv_rewritten():
    """The dynamic tree's draft forwards write the first layers' K/V of tree nodes into the slots
    verification rewrites: the output must still be the plain engine's, rows finishing at eos."""
    model = _model()
    prompts = _prompts(16, seed=12)
    free = graphtune.Engine(model, min_shared=8).generate(prompts, 12, eos_token_id=[])
    eos = next(seq[k] for seq in free.sequences for k in range(3, len(seq)) if seq[k] not in seq[:k])
    ref = graphtune.Engine(model, min_shared=8).generate(prompts, 12, eos_token_id=eos)
    with flags.Context(ENGINE_SPEC_MIN_ACCEPT=0.0):  # keep drafting even when the random draft is poor
        res = graphtune.Engine(model, min_shared=8, speculative=DynamicTreeDrafter(layers=2, tokens=8, top_k=4),
                               spec_tokens=8).generate(prompts, 12, eos_token_id=eos)
    assert res.sequences == ref.sequences
    assert res.stats.proposed_tokens > 0 and res.stats.verify_steps > 0
    for r in (0, 7, 15):
        assert res.sequences[r] == _hf_row(model, prompts[r], 12, eos_token_id=eos), f"row {r}"


def test_speculation_under_a_kv_budget_with_waiting_rows_matches():
    model = _model()
    prompts = _prompts(8, seed=4)
    ref = graphtune.Engine(model, min_shared=8).generate(prompts, 9)
    d = ScriptedDrafter(ref.sequences, prompts, k=3)
    budget = max(len(p) for p in prompts) + 9 + 3 + 30
    res = graphtune.Engine(model, min_shared=8, speculative=d, spec_tokens=3, max_kv_tokens=budget).generate(prompts, 9)
    assert res.stats.admissions > 1
    assert res.sequences == ref.sequences


def test_optimize_speculative_generate_equals_hf_and_reports_per_row_stats():
    model = _model()
    prompts = _prompts(4, seed=7)
    L = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (L - len(p)) + p for p in prompts])
    mask = (torch.arange(L)[None] >= torch.tensor([L - len(p) for p in prompts])[:, None]).long()
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        want = model.generate(ids, **kw)
    fast = graphtune.optimize(model, speculative="ngram")
    got = fast.generate(ids, **kw)
    assert fast.generate.last_route == "graphtune engine"
    assert torch.equal(got, want)
    assert len(fast.generate.last_speculation) == len(prompts)
    with pytest.raises(OptionError, match="medusa"):
        graphtune.optimize(model, speculative="medusa")
    with pytest.raises(OptionError, match="engine"):
        graphtune.optimize(model, speculative="ngram", engine=False)


def test_low_acceptance_turns_speculation_off_for_the_row():
    model = _model()
    prompts = _prompts(2, seed=8)
    ref = graphtune.Engine(model).generate(prompts, 40)

    class Wrong:
        name = "wrong"

        def propose(self, request):
            return [Draft([(h[-1] + 1) % 512] * b) for h, b in zip(request.histories, request.budgets)]

    res = graphtune.Engine(model, speculative=Wrong()).generate(prompts, 40)
    assert res.sequences == ref.sequences
    assert all(s.accepted == 0 for s in res.speculation)
    assert all(s.off_steps > 0 for s in res.speculation), "speculation must stop for rows it does not pay for"
    assert res.stats.decode_steps > res.stats.verify_steps


def test_chain_acceptance_copies_no_kv_and_tree_acceptance_copies_only_the_accepted_path(monkeypatch):
    model = _model()
    prompts = _prompts(3, seed=2)
    ref = graphtune.Engine(model).generate(prompts, 10)
    from graphtune.runtime.engine import speculative as sp

    moved = []
    real = sp.Speculator._keep

    def spy(self, leaf, path):
        base = leaf.slot + leaf.filled + 1
        moved.append(sum(1 for i, j in enumerate(path) if base + j != base + i))
        return real(self, leaf, path)

    monkeypatch.setattr(sp.Speculator, "_keep", spy)
    graphtune.Engine(model, speculative=ScriptedDrafter(ref.sequences, prompts)).generate(prompts, 10)
    assert moved and not any(moved)  # chains: the accepted tokens already follow the row's keys
    moved.clear()
    res = graphtune.Engine(model, speculative=ScriptedDrafter(ref.sequences, prompts, tree=True),
                           spec_tokens=5).generate(prompts, 10)
    assert res.sequences == ref.sequences
    assert any(moved)  # the right branch sits after a wrong sibling: its tokens move down by one


# ------------------------------------------------------------------------------ sampling

def test_seeded_sampling_with_speculation_is_reproducible():
    model = _model()
    prompts = _prompts(3, seed=6)
    kw = dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.9, seed=123)
    runs = [graphtune.Engine(model, speculative="ngram").generate(prompts, 12, **kw).sequences for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    other = graphtune.Engine(model, speculative="ngram").generate(prompts, 12, **{**kw, "seed": 124}).sequences
    assert other != runs[0]


def _tiny() -> torch.nn.Module:
    return build_model("llama", "sdpa", vocab_size=8, seed=3, init_std=0.5)


def test_sampled_tokens_with_speculation_follow_the_models_distribution():
    """Tokens 2 and 3 (both from verification steps: token 1 comes from the prefill) have the
    model's own joint distribution sum_x1 p(x1) p(x2 | x1) p(x3 | x1, x2)."""
    model = _tiny()
    prompt = [1, 2, 3, 4, 5, 6, 2, 3]
    V, T = 8, 0.8
    with torch.no_grad():
        p1 = model(torch.tensor([prompt])).logits[0, -1].float().div(T).softmax(-1)  # [V]
        one = torch.tensor([prompt + [a] for a in range(V)])
        p2 = model(one).logits[:, -1].float().div(T).softmax(-1)  # [V(x1), V(x2)]
        two = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
        p3 = model(two).logits[:, -1].float().div(T).softmax(-1).view(V, V, V)  # [x1, x2, x3]
    joint = (p1[:, None, None] * p2[:, :, None] * p3).sum(0)  # [x2, x3]
    a = int(joint.sum(1).argmax())
    b = int(joint[a].argmax())

    class Guess:  # a deterministic (one-hot) chain: the likeliest second token, then its likeliest follower
        name = "guess"

        def propose(self, request):
            return [Draft([a, b][:k]) for k in request.budgets]

    n = 4000
    # (verified tokens are free here: goodput verifies every draft token even at 4000 rows)
    res = graphtune.Engine(model, speculative=Guess(), spec_tokens=2, min_shared=4).generate(
        [prompt], 4, num_return_sequences=n, do_sample=True, temperature=T, seed=11, eos_token_id=[])
    assert res.stats.accepted_tokens > n // 4 and res.stats.accepted_tokens < res.stats.proposed_tokens
    counts = torch.zeros(V, V)
    for s in res.sequences:
        counts[s[1], s[2]] += 1
    tv = 0.5 * (counts / n - joint).abs().sum().item()
    # sampling noise alone: E[TV] <= 0.5 * sum_i sqrt(p_i / n) <= 0.5 * sqrt(V * V / n) ~ 0.06 here
    assert tv < 0.1, f"total variation {tv:.3f}"


def test_sampled_tokens_with_a_dynamic_tree_follow_the_models_distribution():
    """As above with the dynamic tree: children sampled with replacement from the early-exit
    draft (several per position), verified by recursive rejection over the tree."""
    model = _tiny()
    prompt = [1, 2, 3, 4, 5, 6, 2, 3]
    V, T = 8, 0.8
    with torch.no_grad():
        p1 = model(torch.tensor([prompt])).logits[0, -1].float().div(T).softmax(-1)
        p2 = model(torch.tensor([prompt + [a] for a in range(V)])).logits[:, -1].float().div(T).softmax(-1)
        two = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
        p3 = model(two).logits[:, -1].float().div(T).softmax(-1).view(V, V, V)
    joint = (p1[:, None, None] * p2[:, :, None] * p3).sum(0)  # [x2, x3]
    n = 3000
    with flags.Context(ENGINE_SPEC_MIN_ACCEPT=0.0, ENGINE_SPEC_TOKEN_COST=0.0):  # verify every node
        res = graphtune.Engine(model, speculative=DynamicTreeDrafter(layers=1, tokens=4, top_k=2, width=2),
                               spec_tokens=4, min_shared=4).generate(
            [prompt], 4, num_return_sequences=n, do_sample=True, temperature=T, seed=21, eos_token_id=[])
    assert res.stats.accepted_tokens > n // 4
    counts = torch.zeros(V, V)
    for s in res.sequences:
        counts[s[1], s[2]] += 1
    tv = 0.5 * (counts / n - joint).abs().sum().item()
    assert tv < 0.1, f"total variation {tv:.3f}"  # sampling noise alone: E[TV] ~ 0.07 at n = 3000


def test_hf_prompt_lookup_argument_runs_the_engines_ngram_drafter():
    model = _model()
    prompt = _prompts(1, seed=10)[0]
    x = torch.tensor([prompt])
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        want = model.generate(x, **kw)
    fast = graphtune.optimize(model)
    got = fast.generate(x, prompt_lookup_num_tokens=3, max_matching_ngram_size=2, **kw)
    assert fast.generate.last_route == "graphtune engine"
    assert torch.equal(got, want)
    assert fast.generate.last_speculation is not None  # the n-gram drafter ran


def test_goodput_verifies_only_draft_tokens_that_raise_expected_tokens_per_second():
    from graphtune.runtime.engine.speculative import CostModel, Speculator
    from graphtune.runtime.engine.sampling import Sampling

    class Row:
        def __init__(self, i):
            self.index = i

    with flags.Context(ENGINE_SPEC_TOKEN_COST=0.2):  # a verified token costs 0.2 of a forward's fixed cost
        sp = Speculator(NGramDrafter(), 8, None, None, Sampling(), None)
    for i in range(3):
        sp.add_row(i, [1, 2])
    sp.rows[0].hits, sp.rows[0].tests = [9.0, 9.0], [10.0, 10.0]  # alpha 0.9
    sp.rows[1].hits, sp.rows[1].tests = [7.0, 7.0], [10.0, 10.0]  # alpha 0.7
    sp.rows[2].hits, sp.rows[2].tests = [1.0, 1.0], [10.0, 10.0]  # alpha 0.1
    keep = sp.allot([Row(0), Row(1), Row(2)], [Draft([5] * 8)] * 3)
    # a token pays while alpha^k * seconds > b * tokens (module docstring): the confident row gets a
    # long draft, the unsure one a short one, the hopeless one none
    assert keep[0] > keep[1] > keep[2] == 0, keep
    assert sp.stats[2].off_steps == 1
    # greedy measures: one decode step of 1 token at 40 ms, verify steps of 6 tokens at 70 ms
    cm = CostModel()
    for _ in range(3):
        cm.observe(1, 0.040)
        cm.observe(6, 0.070)
    a, b = cm.coeffs()
    assert abs(b - 0.006) < 1e-9 and abs(a - 0.034) < 1e-9
    assert CostModel(fixed=0.15).coeffs() == (1.0, 0.15)
