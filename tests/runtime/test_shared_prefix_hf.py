"""HF generate on an optimized model: shared prompts are detected and decoded with the
decomposition, producing exactly the tokens of the plain model."""

import pytest
import torch

pytest.importorskip("transformers")

import graphtune  # noqa: E402
from graphtune.models import build_model  # noqa: E402

ROWS, PROMPT, NEW = 32, 40, 6


@pytest.fixture(scope="module")
def models():
    plain = build_model("llama", "sdpa")
    return plain, graphtune.optimize(plain, engine=False)  # the selectors inside HF's own loop


def test_greedy_generate_of_a_repeated_prompt_gives_identical_tokens(models, spy):
    plain, fast = models
    ids = torch.randint(3, 500, (1, PROMPT)).expand(ROWS, -1)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    want = plain.generate(ids, **kw)
    got = fast.generate(ids, **kw)
    assert torch.equal(got, want)
    layers = plain.config.num_hidden_layers
    # every decode step of every layer was decomposed (translation validation may run one step twice)
    assert len(spy.decode) >= (NEW - 1) * layers
    assert spy.decode[0] == (ROWS, plain.config.num_attention_heads, 1, plain.config.head_dim)
    assert len(spy.prefill) >= layers  # the prompt's attention was computed once, not 32 times


def test_sampling_with_num_return_sequences_gives_identical_tokens(models, spy):
    plain, fast = models
    ids = torch.randint(3, 500, (1, PROMPT))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=True, num_return_sequences=ROWS,
              pad_token_id=0)
    torch.manual_seed(123)
    want = plain.generate(ids, **kw)
    torch.manual_seed(123)
    got = fast.generate(ids, **kw)
    assert torch.equal(got, want)
    assert len(spy.decode) > 0 and len(spy.prefill) > 0
    assert (want[:, PROMPT:] != want[:1, PROMPT:]).any()  # the samples differ: not a degenerate check
