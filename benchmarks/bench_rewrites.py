"""Cost of the rewrite pipeline on a 12-layer model's Dynamo graph, against capture itself.

``run_pipeline`` runs once per captured graph (and per Dynamo recompile), so its cost must be
small next to Dynamo's capture of the same model. Baselines measured in the same run: copying
the graph (the harness's own cost, subtracted) and the Dynamo capture. Run:
``pytest benchmarks/bench_rewrites.py``; the summary line is printed at the end.
"""
import statistics
import time

import pytest
import torch
import torch.fx as fx

from graphtune.rewrites import run_pipeline

RESULTS: dict[str, float] = {}


def _capture_12_layers():
    pytest.importorskip("transformers")
    from graphtune.models import build_model

    model = build_model("llama", "eager", num_hidden_layers=12)
    ids = torch.randint(3, 200, (2, 16))
    graphs = []

    def collect(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    t = time.perf_counter()
    with torch.no_grad():
        torch.compile(model, backend=collect, dynamic=False)(ids)
    RESULTS["dynamo_capture_ms"] = (time.perf_counter() - t) * 1e3
    return graphs[0]


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    g = fx.Graph()
    g.output(g.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, g)


@pytest.fixture(scope="module")
def llama12():
    return _capture_12_layers()


def _median_ms(fn, rounds=9):
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def test_graph_copy_baseline(benchmark, llama12):
    benchmark(_copy, llama12)
    RESULTS["copy_ms"] = _median_ms(lambda: _copy(llama12))


def _pipeline_on_copy(gm):
    res = run_pipeline(_copy(gm))
    assert res.count("canonicalize_attention") == 12
    return res


def test_run_pipeline_12_layers(benchmark, llama12):
    benchmark(_pipeline_on_copy, llama12)
    RESULTS["copy_plus_pipeline_ms"] = _median_ms(lambda: _pipeline_on_copy(llama12))


def test_zz_summary():
    if not {"copy_ms", "copy_plus_pipeline_ms", "dynamo_capture_ms"} <= RESULTS.keys():
        pytest.skip("run the whole file")
    pipeline = RESULTS["copy_plus_pipeline_ms"] - RESULTS["copy_ms"]
    print(f"\nrun_pipeline on 12-layer Llama graph: {pipeline:.1f} ms median "
          f"(graph copy {RESULTS['copy_ms']:.1f} ms subtracted); Dynamo capture {RESULTS['dynamo_capture_ms']:.0f} ms; "
          f"pipeline / capture = {pipeline / RESULTS['dynamo_capture_ms']:.3f}")
