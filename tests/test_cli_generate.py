"""``graphtune generate``: the engine from the command line (small random-weight model: no download)."""
import json

import pytest

from graphtune import cli

pytest.importorskip("transformers")


def test_generate_prints_every_sample_and_tokens_per_second(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a shared system prompt that is long enough to be stored once, then question one\n\n"
                       "a shared system prompt that is long enough to be stored once, then question two\n")
    assert cli.main(["generate", "--model", "llama", "--prompts", str(prompts), "-n", "2", "--sample",
                     "--max-new-tokens", "5", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "engine plan: 4 rows" in out and "1 shared segments" in out
    assert out.count("--- prompt") == 4 and "sample 1" in out
    assert "tokens/s" in out and "20 tokens in" in out


def test_generate_json_is_reproducible_with_a_seed(capsys, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello there\n")
    runs = []
    for _ in range(2):
        assert cli.main(["generate", "--model", "llama", "--prompts", str(prompts), "--sample", "--seed", "7",
                         "--max-new-tokens", "6", "--json"]) == 0
        runs.append(json.loads(capsys.readouterr().out)["tokens"])
    assert runs[0] == runs[1] and len(runs[0][0]) == 6


def test_generate_with_an_empty_prompts_file_exits_2(capsys, tmp_path):
    prompts = tmp_path / "empty.txt"
    prompts.write_text("\n  \n")
    assert cli.main(["generate", "--model", "llama", "--prompts", str(prompts)]) == 2
    captured = capsys.readouterr()
    assert "no prompts" in captured.err + captured.out


def test_generate_speculative_gives_the_same_greedy_tokens_and_reports_acceptance(capsys, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("repeat after me: the quick brown fox jumps over the lazy dog; the quick brown fox\n")
    got = {}
    for spec in (None, "ngram"):
        argv = ["generate", "--model", "llama", "--prompts", str(prompts), "--max-new-tokens", "12", "--json"]
        assert cli.main(argv + (["--speculative", spec] if spec else [])) == 0
        got[spec] = json.loads(capsys.readouterr().out)
    assert got["ngram"]["tokens"] == got[None]["tokens"]
    assert got[None]["speculation"] is None and len(got["ngram"]["speculation"]) == 1
    assert cli.main(["generate", "--model", "llama", "--prompts", str(prompts), "--max-new-tokens", "4",
                     "--speculative", "ngram"]) == 0
    assert "--- speculative (ngram):" in capsys.readouterr().out


def test_command_line_model_names_load_the_real_model_lazily(monkeypatch):
    import graphtune.models_smollm2 as sm
    from graphtune.models import load_named

    monkeypatch.setattr(sm, "smollm2", lambda: ("real model", "tokenizer"))
    assert load_named("smollm2") == ("real model", "tokenizer")
    model, tok = load_named("llama")
    assert tok is None and model.config.model_type == "llama"


def test_generate_sparse_prefill_runs_and_plans_it(capsys, tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("x" * 40 + "\n")
    from graphtune import flags

    with flags.Context(SPARSE_PREFILL_MIN_LEN=32, SPARSE_PREFILL_BLOCK=8, SPARSE_PREFILL_SEGMENT=16):
        assert cli.main(["generate", "--model", "llama", "--prompts", str(p), "--max-new-tokens", "3",
                     "--sparse-prefill", "pbs", "--plan", "--no-chat"]) == 0
    out = capsys.readouterr().out
    assert "sparse prefill (approximate, opt-in)" in out
