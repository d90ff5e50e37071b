"""The engine counters: host synchronizations, Python callbacks and native predictions per token, as
the library counts them, in the cache stats, `run --stats-json` and the run summary."""

import json

import numpy as np
import pytest

from edge_preattn import cli
from edge_preattn.controller import CacheRuntime
from edge_preattn.layout import read_layout
from tests.test_cache import greedy, host_experts_engine
from tests.test_native_predictor import export_predictors


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from edge_preattn.synth import write_synthetic

    path = tmp_path_factory.mktemp("counters") / "tiny.gguf"
    write_synthetic("tiny", path, progress=False)
    return path


@pytest.fixture(scope="module")
def predictors(tiny, tmp_path_factory):
    return export_predictors(read_layout(tiny), tmp_path_factory.mktemp("counters") / "predictors")


def counters(llama_lib, model, mode, **options) -> dict:
    layout = read_layout(model)
    with (
        host_experts_engine(llama_lib, model) as engine,
        CacheRuntime.for_layout(engine, layout, n_slots=layout.n_expert_used, mode=mode, **options) as rt,
    ):
        greedy(engine)
        return rt.bank.engine_stats()


def test_python_callbacks_and_graph_splits_per_mode(llama_lib, tiny, predictors):
    n_layers = len(read_layout(tiny).moe_layers)
    lru = counters(llama_lib, tiny, "lru")
    native = counters(llama_lib, tiny, "exact", predictors=predictors)
    ahead = counters(llama_lib, tiny, "exact", predictors=predictors, lookahead=1)
    python = counters(llama_lib, tiny, "exact", predictors=predictors, predictor_engine="onnxruntime")
    assert lru["callbacks"] == native["callbacks"] == ahead["callbacks"] == 0
    assert python["callbacks"] >= python["ubatches"] - 1  # a pre-attention call per layer and decode step
    assert lru["native_predictions"] == python["native_predictions"] == 0
    # one prediction per layer and decode step, and the prompt's last row in the last layer; lookahead 1
    # adds one for every layer but the first (the prompt's last layer too, from the layer before)
    decode_steps = native["ubatches"] - 1
    assert native["native_predictions"] == n_layers * decode_steps + 1
    assert ahead["native_predictions"] == native["native_predictions"] + (n_layers - 1) * decode_steps + 1
    # lru splits the graph once per cached layer (its routing); prediction adds the pre-attention split
    assert lru["eval_splits"] < native["eval_splits"]
    assert 0 < lru["host_syncs"] < native["host_syncs"]
    for stats in (lru, native, python):
        assert stats["async_uploads"] == 0  # the CPU backend queues nothing: every copy is timed
        assert stats["sync_upload_ns"] > 0


def test_run_reports_the_counters(llama_lib, tiny, tmp_path, capsys):
    stats_file = tmp_path / "stats.json"
    argv = ["run", "-m", str(tiny), "-n", "8", "--mode", "lru", "--slots", "4"]
    assert cli.main([*argv, "--stats-json", str(stats_file)]) == 0
    stats = json.loads(stats_file.read_text())
    assert stats["python_callbacks_per_token"] == 0 and stats["stale_predictions"] == 0
    assert stats["host_syncs_per_token"] >= stats["eval_splits_per_token"] > 0
    assert stats["copy_busy_ms_per_token"] > 0 and stats["ubatches"] == 8
    assert "host synchronizations" in capsys.readouterr().err


def test_the_copy_queue_is_refused_on_the_cpu_and_the_run_stays_exact(llama_lib, tiny, predictors):
    """The CPU backend has no events: the queue stays off, uploads stay synchronous (and timed)."""
    layout = read_layout(tiny)
    with host_experts_engine(llama_lib, tiny) as engine:
        ref_tokens, ref_logits = greedy(engine)
    with (
        host_experts_engine(llama_lib, tiny) as engine,
        CacheRuntime.for_layout(
            engine, layout, n_slots=layout.n_expert_used, mode="exact", predictors=predictors, copy_queue=True
        ) as runtime,
    ):
        tokens, logits = greedy(engine)
        assert not runtime.controller.copy_queue
        assert runtime.bank.engine_stats()["async_uploads"] == 0
        lib = engine.api.lib
        assert lib.llama_edge_cache_set_copy_queue(None, True) == -1
        assert lib.llama_edge_cache_set_copy_queue(engine.ctx, True) == -5  # LLAMA_EDGE_ERR_BACKEND
        assert lib.llama_edge_cache_set_copy_queue(engine.ctx, False) == 0
    assert tokens == ref_tokens and np.array_equal(logits, ref_logits)
    with host_experts_engine(llama_lib, tiny) as engine:
        assert engine.api.lib.llama_edge_cache_set_copy_queue(engine.ctx, True) == -2  # no cache
