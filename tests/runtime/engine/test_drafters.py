"""Drafters: prompt lookup (n-gram) proposals and the self-speculative early exit."""
from __future__ import annotations

import pytest
import torch

from graphtune.errors import OptionError
from graphtune.runtime.engine.drafters import (Draft, DraftRequest, Drafter, LayerSkipDrafter, NGramDrafter,
                                               make_drafter)


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
