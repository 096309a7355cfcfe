"""Drafters: prompt lookup (n-gram) proposals and the self-speculative early exit."""
from __future__ import annotations

import pytest
import torch

from graphtune.errors import OptionError
from graphtune.runtime.engine.drafters import (Draft, DraftRequest, Drafter, DynamicTreeDrafter, LayerSkipDrafter,
                                               NGramDrafter, make_drafter)


def _req(hist, budget=4, row=0):
    return DraftRequest(rows=[row], histories=[hist], budgets=[budget])


def test_ngram_continues_the_most_recent_occurrence_of_the_longest_suffix():
    d = NGramDrafter(max_ngram=3)
    hist = [1, 2, 3, 4, 9, 9, 2, 3, 5, 6, 7, 1, 2, 3]
    # "1 2 3" occurs at the start only (followed by 4 9 9 2); "2 3" also occurs later (then 5 6 7),
    # but the longest suffix that matches wins
    assert d.propose(_req(hist))[0].tokens == [4, 9, 9, 2]
    d2 = NGramDrafter(max_ngram=2)
    assert d2.propose(_req(hist))[0].tokens == [5, 6, 7, 1]  # "2 3": its most recent occurrence


def test_ngram_without_a_match_proposes_nothing_and_respects_budgets():
    d = NGramDrafter()
    assert d.propose(_req([1, 2, 3, 4]))[0].tokens == []
    assert d.propose(_req([5, 6, 7, 5, 6], budget=0))[0].tokens == []
    assert d.propose(_req([5, 6, 7, 8, 9, 5, 6], budget=2))[0].tokens == [7, 8]


def test_ngram_index_follows_appended_tokens_and_is_per_history():
    d = NGramDrafter(max_ngram=1)
    a, b = [4, 5, 6, 4], [7, 8, 7]
    req = DraftRequest(rows=[0, 1], histories=[a, b], budgets=[2, 2])
    assert [x.tokens for x in d.propose(req)] == [[5, 6], [8, 7]]
    a += [9, 4]  # 4 was followed by 5 then by 9: the most recent wins
    assert d.propose(req)[0].tokens == [9, 4]
    d.reset()
    assert d.propose(req)[0].tokens == [9, 4]  # rebuilt from scratch: same answer


def test_ngram_branches_make_a_tree_with_shared_leading_tokens_merged():
    d = NGramDrafter(max_ngram=1, branches=3)
    hist = [3, 7, 8, 3, 7, 9, 3, 5, 3]
    draft = d.propose(_req(hist, budget=6))[0]
    # continuations of "3", most recent first: [5, 3], [7, 9], [7, 8] -> 7 shared once
    assert draft.tokens == [5, 3, 7, 9, 8]
    assert draft.parents == [-1, 0, -1, 2, 2]
    assert not draft.is_chain


def test_draft_validates_its_tree():
    assert Draft([4, 5]).parents == [-1, 0]
    with pytest.raises(OptionError, match="parent"):
        Draft([4, 5], [-1, 1])
    with pytest.raises(OptionError, match="parents"):
        Draft([4, 5], [-1])


def test_make_drafter_shorthands_and_errors():
    assert isinstance(make_drafter("ngram"), NGramDrafter)
    assert isinstance(make_drafter("layerskip"), LayerSkipDrafter)
    assert isinstance(make_drafter("dytree"), DynamicTreeDrafter)
    assert make_drafter(None) is None
    custom = NGramDrafter(branches=2)
    assert make_drafter(custom) is custom and isinstance(custom, Drafter)
    with pytest.raises(OptionError, match="medusa"):
        make_drafter("medusa")
    with pytest.raises(OptionError, match="int"):
        make_drafter(3)
    with pytest.raises(OptionError):
        NGramDrafter(max_ngram=0)
    with pytest.raises(OptionError, match="early-exit"):
        LayerSkipDrafter().propose(_req([1, 2]))
    with pytest.raises(OptionError, match="tree-exit"):
        DynamicTreeDrafter().propose(_req([1, 2]))
    for bad in (dict(layers=0), dict(tokens=0), dict(top_k=0), dict(width=0)):
        with pytest.raises(OptionError, match=next(iter(bad))):
            DynamicTreeDrafter(**bad)


# a draft "model" over 6 tokens: after token t the likeliest next tokens are t+1 (p=0.6), t+2
# (0.3), then the rest; so the likeliest path from root token 0 is 1, 2, 3, ... and the tree
# should grow deep along it and put second choices where their path probability is high
_NEXT = torch.tensor([[0.6 if (j - i) % 6 == 1 else 0.3 if (j - i) % 6 == 2 else 0.1 / 4 for j in range(6)]
                      for i in range(6)])


def _hook(calls):
    def tree_exit(trees, layers):
        calls.append([None if t is None else (list(t[0]), list(t[1])) for t in trees])
        out = []
        for t in trees:
            if t is None:
                out.append(None)
                continue
            seq = [0] + t[0]  # the root (last accepted token 0), then the nodes
            out.append(torch.stack([_NEXT[x].log() for x in seq]))
        return out
    return tree_exit


def test_dynamic_tree_grows_the_likeliest_paths_up_to_the_budget():
    calls = []
    req = DraftRequest(rows=[0, 1], histories=[[0], [0]], budgets=[6, 0], tree_exit=_hook(calls))
    d = DynamicTreeDrafter(layers=1, tokens=6, top_k=2, width=2).propose(req)
    a, b = d
    assert len(b) == 0 and all(c[1] is None for c in calls)  # a row without budget is never run
    assert len(a) == 6 and len(calls) == 3  # width 2 per round: 3 draft forwards
    # round 1: root's children 1 (0.6) and 2 (0.3); round 2: 1->2 (0.36), then one of the tied
    # 1->3 and 2->3 (0.18 each, the tie broken by rounding), ahead of 2->4 (0.09)
    assert a.tokens[:4] == [1, 2, 2, 3] and a.parents[:3] == [-1, -1, 0] and a.parents[3] in (0, 1)
    # round 3: 1->2->3 (0.216) first, then the other 0.18 node, ahead of 0.108 and below
    assert a.tokens[4] == 3 and a.parents[4] == 2
    assert a.tokens[5] == 3 and {a.parents[3], a.parents[5]} == {0, 1}
    paths = []
    for j in range(len(a)):
        p, k = 1.0, j
        while k >= 0:
            prev = 0 if a.parents[k] < 0 else a.tokens[a.parents[k]]
            p *= float(_NEXT[prev, a.tokens[k]])
            k = a.parents[k]
        paths.append(p)
    # every node kept is at least as likely as any node left out of the candidates it beat
    assert min(paths) >= 0.18 - 1e-6
    assert a.probs is None  # greedy: deterministic children


def test_dynamic_tree_sampling_draws_children_with_their_distribution():
    from graphtune.runtime.engine.sampling import Sampling

    gens = [torch.Generator().manual_seed(5)]
    req = DraftRequest(rows=[0], histories=[[0]], budgets=[4], tree_exit=_hook([]),
                       sampling=Sampling(do_sample=True), generators=gens)
    d = DynamicTreeDrafter(layers=1, tokens=4, top_k=3, width=2).propose(req)[0]
    assert len(d) == 4 and d.probs is not None and d.probs.shape == (4, 6)
    for j in range(4):  # q of each node is the distribution after its parent
        prev = 0 if d.parents[j] < 0 else d.tokens[d.parents[j]]
        torch.testing.assert_close(d.probs[j], _NEXT[prev])


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_early_exit_hidden_is_the_first_layers_then_the_final_norm(family):
    pytest.importorskip("transformers")
    from graphtune.models import build_model
    from graphtune.runtime.engine.hf_model import ModelRunner

    model = build_model(family, "sdpa", num_hidden_layers=3)
    r = ModelRunner(model)
    ids = torch.randint(3, 500, (7,))
    pos = torch.arange(7)
    blocks, norm = r.decoder_blocks()
    with torch.no_grad():
        out = model.base_model(input_ids=ids[None], position_ids=pos[None], output_hidden_states=True)
        hooks = [len(b._forward_hooks) for b in blocks]  # HF 5 adds its own capture hooks on first use
        for k in (1, 2):
            want = norm(out.hidden_states[k])[0]
            torch.testing.assert_close(r.early_exit_hidden(ids, pos, k), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r.early_exit_hidden(ids, pos, 3), out.last_hidden_state[0], atol=1e-5, rtol=1e-5)
    assert [len(b._forward_hooks) for b in blocks] == hooks  # the early-exit hook is removed
    with pytest.raises(ValueError):
        r.early_exit_hidden(ids, pos, 4)
