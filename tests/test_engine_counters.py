"""The engine counters: host synchronizations, Python callbacks and native predictions per token, as
the library counts them, in the cache stats, `run --stats-json` and the run summary."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_preattn import cli
from edge_preattn.model.layout import read_layout
from edge_preattn.runtime.cache_runtime import CacheRuntime
from edge_preattn.runtime.options import CacheOptions

from .test_cache import greedy, host_experts_engine
from .test_native_predictor import export_predictors, rewrite_weight_matrices


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from edge_preattn.model.synth import write_synthetic

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
        CacheRuntime.for_layout(
            engine, layout, CacheOptions(n_slots=layout.n_expert_used, mode=mode, **options)
        ) as rt,
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
            engine,
            layout,
            CacheOptions(n_slots=layout.n_expert_used, mode="exact", predictors=predictors, copy_queue=True),
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


def run_packaged(tmp_path, *options: str) -> tuple[str, dict]:
    """`edge-preattn run` on the packaged model in a process of its own (one library per process, and
    the cache's offload setting is read at import): (the text it printed, its --stats-json)."""
    stats_file = tmp_path / f"stats{len(list(tmp_path.iterdir()))}.json"
    command = [sys.executable, "-m", "edge_preattn.cli", "run", "-n", "32", "--temp", "0"]
    command += ["--stats-json", str(stats_file)]
    done = subprocess.run([*command, *options], capture_output=True, text=True, check=True, timeout=600)
    return done.stdout, json.loads(stats_file.read_text())


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["top1", "exact", "oracle"])
def test_the_copy_queue_keeps_greedy_tokens_on_the_gpu(tmp_path, mode):
    """Prefetches on the copy queue, the compute stream waiting on their events: the same greedy text
    as stock all-on-GPU, with uploads queued (not timed), and no Python per token."""
    stock, _ = run_packaged(tmp_path, "--mode", "off")
    text, stats = run_packaged(tmp_path, "--mode", mode, "--copy-queue")
    assert text == stock
    assert stats["async_uploads"] > 0 and stats["python_callbacks_per_token"] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["lru", "exact", "oracle"])
def test_copies_waited_on_the_device_keep_greedy_tokens(tmp_path, mode):
    """Residency between tokens with the copy queue: the compute stream waits for a layer's copies at its
    routing node, the host does not (patches 20, 21). Same greedy text as stock all-on-GPU; the oracle,
    whose uploads are all decided between tokens, costs the two synchronizations of a ubatch and no more."""
    stock, _ = run_packaged(tmp_path, "--mode", "off")
    text, stats = run_packaged(tmp_path, "--mode", mode, "--copy-queue", "--residency", "token")
    assert text == stock
    assert stats["python_callbacks_per_token"] == 0
    if mode == "oracle":
        assert stats["async_uploads"] > 0 and stats["host_syncs_per_token"] <= 2.2


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["top1", "exact", "overprov"])
def test_predictors_in_the_graph_prefetch_on_the_device_with_the_stock_text(tmp_path, mode):
    """Patch 23: the predictor as graph nodes on the GPU, its prefetch decided and copied by the device
    and waited for at the routing node: the same greedy text as stock all-on-GPU, the device's uploads
    counted, and no host synchronization per layer: the scheduler's before each ubatch and the routing
    log's read after it (the device's state comes back on the compute stream)."""
    stock, _ = run_packaged(tmp_path, "--mode", "off")
    text, stats = run_packaged(tmp_path, "--mode", mode, "--residency", "token", "--predictor-device", "gpu")
    assert text == stock
    assert stats["python_callbacks_per_token"] == 0 and stats["prefetch_issued"] > 0
    assert stats["host_syncs_per_token"] <= 2.2


def scrambled_packaged_predictors(out: Path) -> str:
    """The packaged predictors with every weight matrix replaced by large random values: finite, so they
    pass every check and run in the library, and predicting nonsense (a copy of the folder)."""
    import shutil

    shutil.copytree(Path(cli.__file__).parent / "onnx_models" / "edge-moe-default", out)
    rng = np.random.default_rng(7)
    rewrite_weight_matrices(out, lambda array: (rng.standard_normal(array.shape) * 1e3).astype(array.dtype))
    return str(out)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "placement",
    [
        ("--residency", "routing"),
        ("--residency", "token"),
        ("--residency", "token", "--predictor-device", "gpu"),
    ],
)
def test_a_nonsense_predictor_on_the_gpu_never_changes_the_text(tmp_path, placement):
    """Issue 20 on CUDA: predictions that are all wrong cost uploads, never a token (patch 23: also when the
    device decides and copies them itself)."""
    predictors = scrambled_packaged_predictors(tmp_path / "scrambled")
    stock, _ = run_packaged(tmp_path, "--mode", "off")
    options = ["--mode", "exact", "--copy-queue", *placement, "--predictors", predictors]
    text, stats = run_packaged(tmp_path, *options)
    assert text == stock
    assert stats["python_callbacks_per_token"] == 0 and stats["prefetch_issued"] > 0
