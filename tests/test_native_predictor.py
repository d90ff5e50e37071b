"""The predictor in the library: read from the exported ONNX, evaluated on the decode thread with no
Python, predicting what onnxruntime predicts, and never changing the output."""

import ctypes
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_preattn.model.layout import read_layout
from edge_preattn.predictors import features, onnx_io
from edge_preattn.predictors.baselines import router_prior
from edge_preattn.predictors.networks import Predictor
from edge_preattn.predictors.predictor_weights import (
    GRAPH_FEATURES,
    MlpWeights,
    Unsupported,
    read_mlp,
    read_predictor_set,
)
from edge_preattn.runtime.cache_runtime import CacheRuntime
from edge_preattn.runtime.options import CacheOptions
from edge_preattn.runtime.slots import SlotBank
from edge_preattn.runtime.stats import RuntimeStats
from edge_preattn.traces.hooks import Hooks

from .test_cache import greedy, host_experts_engine


def random_predictor(
    arch: int,
    n_embd: int,
    n_expert: int,
    hidden: int,
    seed: int,
    prior: np.ndarray | None = None,
    n_extra: int = 0,
) -> Predictor:
    """An untrained predictor with every folded part non-trivial (input statistics, batch norm); with
    `prior` [E, d], a residual on it as if trained: the body's last layer no longer zero, a scale not 1;
    with `n_extra`, that many history-input columns."""
    torch.manual_seed(seed)
    router = None if prior is None else torch.from_numpy(prior)
    model = Predictor(arch, n_embd, n_expert, hidden, n_extra=n_extra, prior=router)
    if prior is not None:
        model.body[-1].reset_parameters()
        model.prior_scale.data.fill_(0.75)
    model.norm.mean.normal_()
    model.norm.std.uniform_(0.5, 2.0)
    if arch == 1:
        batch_norm = model.body[1]
        batch_norm.running_mean.normal_()
        batch_norm.running_var.uniform_(0.5, 2.0)
        batch_norm.weight.data.normal_()
        batch_norm.bias.data.normal_()
    return model.eval()


def export_predictors(
    layout, out, arch: int = 2, hidden: int = 32, prior: bool = False, history: tuple[str, ...] = ()
):
    """A predictors folder for every MoE layer of `layout`, as `train` writes it (random weights; with
    `prior`, residuals on the model's own router prior, as `train --prior` makes them; with `history`,
    reading those history inputs, as `train --features` makes them)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, layout.n_embd)).astype(np.float32)
    widths = {f: features.width(f, layout.n_embd, layout.n_expert) for f in history}
    extra = {features.input_name(f): rng.random((8, w)).astype(np.float32) for f, w in widths.items()}
    indices = tuple(layer.index for layer in layout.moe_layers)
    priors = router_prior(layout.path, indices) if prior else {}
    entries = []
    for il in indices:
        model = random_predictor(
            arch, layout.n_embd, layout.n_expert, hidden, il, priors.get(il), n_extra=sum(widths.values())
        )
        entries.append(onnx_io.export_layer(model, out, il, x, extra or None))
    manifest = {
        "fingerprint": layout.fingerprint,
        "k": layout.n_expert_used,
        "n_expert": layout.n_expert,
        "n_embd": layout.n_embd,
        "input": "x_pre",
        "predictors": entries,
    }
    onnx_io.write_manifest(out, manifest | ({"features": list(history)} if history else {}))
    return onnx_io.load_predictor_set(out, fingerprint=layout.fingerprint)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from edge_preattn.model.synth import write_synthetic

    path = tmp_path_factory.mktemp("native") / "tiny.gguf"
    write_synthetic("tiny", path, progress=False)
    return path


@pytest.mark.parametrize(("arch", "prior"), [(1, False), (2, False), (1, True), (2, True)])
def test_the_exported_graph_is_read_with_normalization_and_batch_norm_folded(tmp_path, arch, prior):
    """With a router prior the scale is folded into it, and it reads the raw x (not the normalized one)."""
    router = np.random.default_rng(2).standard_normal((8, 24)).astype(np.float32) if prior else None
    model = random_predictor(arch, 24, 8, 16, seed=3, prior=router)
    entry = onnx_io.export_layer(model, tmp_path, 0, np.zeros((2, 24), np.float32))
    mlp = read_mlp(tmp_path / entry["file"])
    assert mlp.activation == ("gelu" if arch == 1 else "silu")
    assert (mlp.prior_w is not None) == prior
    x = np.random.default_rng(1).standard_normal((5, 24)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert np.abs(mlp.scores(x) - expected).max() < 1e-4


def test_a_graph_it_cannot_read_is_refused_in_one_line(tmp_path):
    class Relu(torch.nn.Module):  # another architecture: ReLU, no input normalization
        def __init__(self) -> None:
            super().__init__()
            self.n_embd = 8
            self.body = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))

        def forward(self, x):
            return self.body(x)

        def parameter_count(self) -> int:  # what export_layer records
            return sum(p.numel() for p in self.parameters())

    entry = onnx_io.export_layer(Relu(), tmp_path, 0, np.zeros((2, 8), np.float32))
    with pytest.raises(Unsupported, match="activation") as caught:
        read_mlp(tmp_path / entry["file"])
    assert "\n" not in str(caught.value)
    (tmp_path / "broken.onnx").write_bytes(b"not a graph")
    with pytest.raises(Unsupported, match="not readable"):
        read_mlp(tmp_path / "broken.onnx")


def test_a_prev_x_graph_is_read_with_its_columns_last(tiny, tmp_path):
    """prev-x (the previous token's activation, patch 22) is a history input the library feeds: its graph
    is read with its n_embd columns after the routing inputs', scores as torch; a set whose manifest names
    an input its graphs lack is still refused (the runtime's feeding: test_history)."""
    torch.manual_seed(3)
    model = Predictor(2, 24, 8, 16, n_extra=2 * 8 + 24, prior=torch.randn(8, 24)).eval()
    model.norm.mean.normal_()
    model.body[-1].reset_parameters()
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 24)).astype(np.float32)
    extra = {name: rng.dirichlet(np.ones(8), 5).astype(np.float32) for name in ("prev_layer", "prev_token")}
    extra["prev_x"] = rng.standard_normal((5, 24)).astype(np.float32)
    mlp = read_mlp(tmp_path / onnx_io.export_layer(model, tmp_path, 0, x, extra)["file"])
    assert mlp.history == ("prev-layer", "prev-token", "prev-x") and mlp.w1.shape == (16, 64)
    assert mlp.n_embd == 24
    assert np.array_equal(mlp.history_columns("prev-token"), mlp.w1[:, 32:40])
    assert np.array_equal(mlp.history_columns("prev-x"), mlp.w1[:, 40:])
    with torch.no_grad():
        expected = model(*(torch.from_numpy(a) for a in (x, *extra.values()))).numpy()
    assert np.abs(mlp.scores(x, extra) - expected).max() < 1e-4
    predictors = export_predictors(read_layout(tiny), tmp_path / "predictors", prior=True)
    predictors.features = ("prev-x",)
    with pytest.raises(Unsupported, match="than its manifest") as caught:
        read_predictor_set(predictors)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("arch", [1, 2])
def test_a_low_rank_first_linear_is_read_as_one_matrix(tmp_path, arch):
    """train --rank: the two Gemms of W1 = B·A are multiplied back into one W1 for the library."""
    torch.manual_seed(arch)
    model = Predictor(arch, 24, 8, 16, n_extra=16, prior=torch.randn(8, 24), rank=3).eval()
    model.body[-1].reset_parameters()
    model.norm.mean.normal_()
    if arch == 1:
        model.body[2].running_mean.normal_()
        model.body[2].running_var.uniform_(0.5, 2.0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 24)).astype(np.float32)
    extra = {name: rng.dirichlet(np.ones(8), 32).astype(np.float32) for name in ("prev_layer", "prev_token")}
    entry = onnx_io.export_layer(model, tmp_path, 0, x, extra)
    mlp = read_mlp(tmp_path / entry["file"])
    assert mlp.w1.shape == (16, 24 + 16) and mlp.history == ("prev-layer", "prev-token")
    expected = onnx_io.onnx_scores(tmp_path / entry["file"], x, extra=extra)
    assert np.abs(mlp.scores(x, extra) - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())


@dataclass(frozen=True)
class NativeRun:
    tokens: list[int]
    logits: np.ndarray
    stats: RuntimeStats
    native: bool  # the library evaluated the predictors
    python_hooks: bool  # some handler was registered: Python ran during the decode


def run_native(llama_lib, model, layout, predictors, mode, n_slots, **options) -> NativeRun:
    with (
        host_experts_engine(llama_lib, model) as engine,
        CacheRuntime.for_layout(
            engine, layout, CacheOptions(n_slots=n_slots, mode=mode, predictors=predictors, **options)
        ) as runtime,
    ):
        tokens, logits = greedy(engine)
        controller = runtime.controller
        return NativeRun(tokens, logits, controller.stats, controller.native, runtime.hooks is not None)


@pytest.mark.parametrize(("mode", "arch"), [("top1", 2), ("exact", 1), ("overprov", 2), ("adaptive", 2)])
def test_native_prediction_is_bit_identical_and_calls_no_python(llama_lib, tiny, tmp_path, mode, arch):
    layout = read_layout(tiny)
    predictors = export_predictors(layout, tmp_path / "predictors", arch=arch)
    with host_experts_engine(llama_lib, tiny) as engine:
        ref_tokens, ref_logits = greedy(engine)
    run = run_native(llama_lib, tiny, layout, predictors, mode, layout.n_expert_used, extra=2)
    assert run.tokens == ref_tokens and np.array_equal(run.logits, ref_logits)
    assert run.native and not run.python_hooks  # no Python callback at all
    total = run.stats.totals()
    assert total.prefetch_issued > 0 and total.predictor_calls == 0
    assert total.prediction_stale == 0  # made on the decode thread, before each routing


@pytest.mark.parametrize("prior", [False, True])
def test_native_and_onnxruntime_prefetch_the_same_experts(llama_lib, tiny, tmp_path, prior):
    """onnxruntime waited for at each routing makes the same predictions at the same point: the same
    uploads, hits and waste, layer by layer (the predictor is the same function, evaluated twice), and
    so do the loop and the graph (--predictor-threads 1) with a router prior (`train --prior`)."""
    layout = read_layout(tiny)
    predictors = export_predictors(layout, tmp_path / "predictors", prior=prior)
    if prior:  # the prior decides something here: without it the library would predict otherwise
        mlp = read_predictor_set(predictors)[layout.moe_layers[0].index]
        x = np.random.default_rng(5).standard_normal((64, layout.n_embd)).astype(np.float32)
        prior_part = x.astype(np.float64) @ mlp.prior_w.T.astype(np.float64)
        assert (mlp.scores(x).argmax(1) != (mlp.scores(x) - prior_part).argmax(1)).any()
    with host_experts_engine(llama_lib, tiny) as engine:
        ref_tokens, ref_logits = greedy(engine)
    counts = {}
    for engine_name, threads in (("native", 0), ("native", 1), ("onnxruntime", 0)):
        run = run_native(
            llama_lib,
            tiny,
            layout,
            predictors,
            "exact",
            2 * layout.n_expert_used,
            predictor_engine=engine_name,
            predictor_threads=threads,
            wait_for_prefetch=True,
        )
        assert run.native == (engine_name == "native")
        assert run.tokens == ref_tokens and np.array_equal(run.logits, ref_logits)
        counts[engine_name, threads] = {
            il: (c.hits, c.prefetch_hits, c.misses, c.prefetch_issued, c.prefetch_wasted)
            for il, c in run.stats.layers.items()
        }
    assert counts["native", 0] == counts["onnxruntime", 0] == counts["native", 1]


def test_lookahead_in_the_library_keeps_the_output(llama_lib, tiny, tmp_path):
    layout = read_layout(tiny)
    predictors = export_predictors(layout, tmp_path / "predictors")
    with host_experts_engine(llama_lib, tiny) as engine:
        ref_tokens, ref_logits = greedy(engine)
    run = run_native(llama_lib, tiny, layout, predictors, "exact", layout.n_expert_used, lookahead=2)
    assert run.tokens == ref_tokens and np.array_equal(run.logits, ref_logits)
    assert run.native and run.stats.totals().prefetch_issued > 0


def test_unreadable_predictors_fall_back_to_onnxruntime(llama_lib, tiny, tmp_path, caplog):
    layout = read_layout(tiny)
    predictors = export_predictors(layout, tmp_path / "predictors")
    predictors.int8 = True  # as if loaded with --int8: graphs only onnxruntime evaluates
    run = run_native(llama_lib, tiny, layout, predictors, "exact", layout.n_expert_used)
    assert not run.native and run.python_hooks
    assert "run in onnxruntime" in caplog.text


def test_predictor_c_api_refuses_bad_arguments(llama_lib, tiny, tmp_path):
    layout = read_layout(tiny)
    mlp = read_predictor_set(export_predictors(layout, tmp_path / "predictors"))[layout.moe_layers[0].index]
    with host_experts_engine(llama_lib, tiny) as engine:
        lib = engine.api.lib
        bank = SlotBank(engine.api, engine.ctx, (0,), n_slots=8)
        floats = ctypes.POINTER(ctypes.c_float)
        w1, b1, w2, b2 = (a.ctypes.data_as(floats) for a in (mlp.w1, mlp.b1, mlp.w2, mlp.b2))
        d, h, e = layout.n_embd, mlp.w1.shape[0], layout.n_expert
        good = [engine.ctx, 0, d, h, e, 0, w1, b1, w2, b2, 4, 1.0, 0.0]
        assert lib.llama_edge_predictor_set(*good) == 0
        for index, bad in [
            (0, None),  # no context
            (1, 1),  # layer 1 is not cached
            (2, d + 1),  # not the model's n_embd
            (3, 0),  # no hidden units
            (4, e - 1),  # not the layer's experts
            (5, 3),  # no such activation
            (7, None),
            (10, 0),  # no candidates
            (10, e + 1),
            (12, 1.5),  # a target above 1
            (12, float("nan")),
        ]:
            args = list(good)
            args[index] = bad
            assert lib.llama_edge_predictor_set(*args) in (-1, -2), index
        args = list(good)
        args[11:] = [0.0, 0.9]  # adaptive needs a positive temperature
        assert lib.llama_edge_predictor_set(*args) == -1
        nan = mlp.w2.copy()
        nan[0, 0] = np.nan
        args = list(good)
        args[8] = nan.ctypes.data_as(floats)
        assert lib.llama_edge_predictor_set(*args) == -1  # weights that are not finite
        removed = [engine.ctx, 0, 0, 0, 0, 0, None, None, None, None, 0, 0.0, 0.0]
        assert lib.llama_edge_predictor_set(*removed) == 0
        assert lib.llama_edge_predictor_set_lookahead(engine.ctx, -1) == -1
        assert lib.llama_edge_predictor_set_lookahead(None, 1) == -1
        bank.set_lookahead(2)


@pytest.mark.parametrize("threads", [0, 1])
def test_prior_c_api_refuses_bad_arguments(llama_lib, tiny, tmp_path, threads):
    """The prior needs the layer's predictor, its shapes and finite numbers; NULL removes it. The same
    for the loop and the graph, whose weights are placed anew with the prior."""
    layout = read_layout(tiny)
    mlp = read_predictor_set(export_predictors(layout, tmp_path / "predictors", prior=True))[0]
    with host_experts_engine(llama_lib, tiny) as engine:
        lib = engine.api.lib
        bank = SlotBank(engine.api, engine.ctx, (0,), n_slots=8)
        bank.set_predictor_threads(threads)
        floats = ctypes.POINTER(ctypes.c_float)
        prior = mlp.prior_w.ctypes.data_as(floats)
        d, e = layout.n_embd, layout.n_expert
        assert lib.llama_edge_predictor_set_prior(engine.ctx, 0, prior, e, d) == -2  # no predictor yet
        assert lib.llama_edge_predictor_set_prior(engine.ctx, 0, None, 0, 0) == 0  # nothing to remove
        bank.set_predictor(0, mlp, 4)
        good = [engine.ctx, 0, prior, e, d]
        assert lib.llama_edge_predictor_set_prior(*good) == 0
        for index, bad in [
            (0, None),  # no context
            (1, 1),  # layer 1 is not cached
            (1, -1),
            (3, e - 1),  # not the predictor's experts
            (3, 0),
            (4, d + 1),  # not its n_embd
            (4, -d),
        ]:
            args = list(good)
            args[index] = bad
            assert lib.llama_edge_predictor_set_prior(*args) in (-1, -2), index
        nan = mlp.prior_w.copy()
        nan[1, 2] = np.inf
        assert lib.llama_edge_predictor_set_prior(engine.ctx, 0, nan.ctypes.data_as(floats), e, d) == -1
        bank.set_predictor_prior(0, None)  # removed
        bank.set_predictor_prior(0, mlp.prior_w)
        with pytest.raises(ValueError, match="router prior"):
            bank.set_predictor_prior(0, mlp.prior_w[:, :-1])


def test_a_callers_pre_attention_hook_sees_the_activation_beside_the_native_predictor(
    llama_lib, tiny, tmp_path
):
    """The observation copies the activation once for both; the caller's hook gets what it always got."""
    layout = read_layout(tiny)
    predictors = export_predictors(layout, tmp_path / "predictors")
    seen: dict[int, list[np.ndarray]] = {}
    with host_experts_engine(llama_lib, tiny) as engine:
        with Hooks(engine.api, engine.ctx, lambda il, x: seen.setdefault(il, []).append(x.copy())):
            greedy(engine)
        expected = seen
    seen = {}
    with (
        host_experts_engine(llama_lib, tiny) as engine,
        CacheRuntime.for_layout(
            engine, layout, CacheOptions(n_slots=layout.n_expert_used, mode="exact", predictors=predictors)
        ) as runtime,
        Hooks(engine.api, engine.ctx, lambda il, x: seen.setdefault(il, []).append(x.copy())),
    ):
        greedy(engine)
        assert runtime.controller.native and runtime.bank.engine_stats()["native_predictions"] > 0
    assert seen.keys() == expected.keys()
    for il, calls in expected.items():
        assert len(seen[il]) == len(calls)
        assert all(np.array_equal(a, b) for a, b in zip(seen[il], calls, strict=True))


def test_predictor_graphs_on_a_cpu_backend_predict_what_the_loop_predicts(llama_lib, tiny, tmp_path):
    """--predictor-threads: the same predictor as a ggml graph on a pool of threads names the same
    experts (float rounding aside: random weights have no near ties), and the output stays stock's."""
    layout = read_layout(tiny)
    predictors = export_predictors(layout, tmp_path / "predictors", arch=1)
    with host_experts_engine(llama_lib, tiny) as engine:
        ref_tokens, ref_logits = greedy(engine)
    counts = {}
    for threads in (0, 1):  # 1: the graph on one thread (a second would wait at barriers on a loaded CI box)
        run = run_native(
            llama_lib, tiny, layout, predictors, "exact", 2 * layout.n_expert_used, predictor_threads=threads
        )
        assert run.native and run.tokens == ref_tokens and np.array_equal(run.logits, ref_logits)
        counts[threads] = {
            il: (c.hits, c.prefetch_hits, c.misses, c.prefetch_issued, c.prefetch_wasted)
            for il, c in run.stats.layers.items()
        }
    assert counts[0] == counts[1]
    with host_experts_engine(llama_lib, tiny) as engine:
        bank = SlotBank(engine.api, engine.ctx, (0,), n_slots=8)
        lib = engine.api.lib
        assert lib.llama_edge_predictor_set_threads(engine.ctx, -1) == -1
        assert lib.llama_edge_predictor_set_threads(None, 1) == -1
        bank.set_predictor_threads(1)
        bank.set_predictor(0, read_predictor_set(predictors)[0], 4)
        assert lib.llama_edge_predictor_set_threads(engine.ctx, 2) == -2  # a predictor is placed already


def rewrite_weight_matrices(folder: Path, replace: Callable[[np.ndarray], np.ndarray]) -> None:
    """Every weight matrix (2-D initializer: the Gemm weights) of a predictor folder's ONNX files
    replaced by `replace(matrix)`, and the manifest's hashes rewritten, so the set still loads."""
    import onnx
    from onnx import numpy_helper

    manifest = json.loads((folder / onnx_io.MANIFEST).read_text())
    for entry in manifest["predictors"]:
        path = folder / entry["file"]
        model = onnx.load(str(path))
        for tensor in model.graph.initializer:
            array = numpy_helper.to_array(tensor)
            if array.ndim == 2:
                tensor.CopyFrom(numpy_helper.from_array(replace(array), tensor.name))
        onnx.save(model, str(path))
        entry.update(sha256=onnx_io.sha256_bytes(path.read_bytes()), bytes=path.stat().st_size)
    onnx_io.write_manifest(folder, {key: value for key, value in manifest.items() if key != "format"})


GARBAGE = {  # weights that pass the library's check (finite) and still predict nonsense: (weight, whether
    # the library prefetches on such scores)
    "huge (scores overflow to inf and NaN)": (3e38, False),
    "random, far from trained": (None, True),
}


@pytest.mark.parametrize("threads", [0, 1])
@pytest.mark.parametrize("mode", ["top1", "exact", "adaptive"])
@pytest.mark.parametrize("fault", list(GARBAGE))
def test_garbage_weights_in_the_library_never_change_the_output(
    llama_lib, tiny, tmp_path, monkeypatch, fault, mode, threads
):
    """The library's predictor runs without Python's checks of its scores (finite, in range): infinite,
    NaN or absurd scores may only cost uploads, never change a token or a logit (nor crash)."""
    from edge_preattn.predictors import predictor_weights

    layout = read_layout(tiny)
    predictors = export_predictors(layout, tmp_path / "predictors")
    rng = np.random.default_rng(3)

    weight, prefetches = GARBAGE[fault]

    def garbage(array: np.ndarray) -> np.ndarray:
        if weight is None:
            return (rng.standard_normal(array.shape) * 1e4).astype(np.float32)
        return np.full_like(array, weight)

    bad = {
        il: MlpWeights(garbage(m.w1), garbage(m.b1), m.activation, garbage(m.w2), garbage(m.b2))
        for il, m in read_predictor_set(predictors).items()
    }
    monkeypatch.setattr(predictor_weights, "read_predictor_set", lambda _predictors: bad)  # past its check
    with host_experts_engine(llama_lib, tiny) as engine:
        ref_tokens, ref_logits = greedy(engine)
    run = run_native(
        llama_lib, tiny, layout, predictors, mode, 2 * layout.n_expert_used, predictor_threads=threads
    )
    assert run.native and (run.stats.totals().prefetch_issued > 0) == prefetches
    assert run.tokens == ref_tokens and np.array_equal(run.logits, ref_logits)


def test_a_predictor_file_with_nan_weights_is_switched_off_and_the_output_stays(
    llama_lib, tiny, tmp_path, caplog
):
    """Not refused at load (the manifest's hashes match): the library's reader finds it differs from
    onnxruntime and leaves it to onnxruntime, whose NaN scores switch prediction off layer by layer."""
    layout = read_layout(tiny)
    out = tmp_path / "predictors"
    export_predictors(layout, out)
    rewrite_weight_matrices(out, lambda array: np.full_like(array, np.nan))
    predictors = onnx_io.load_predictor_set(out, fingerprint=layout.fingerprint)
    with host_experts_engine(llama_lib, tiny) as engine:
        ref_tokens, ref_logits = greedy(engine)
    run = run_native(llama_lib, tiny, layout, predictors, "exact", 2 * layout.n_expert_used)
    assert not run.native and run.stats.totals().prefetch_issued == 0
    assert run.tokens == ref_tokens and np.array_equal(run.logits, ref_logits)
    assert "differs from onnxruntime by nan" in caplog.text
    assert caplog.text.count("prediction is off for that layer") == len(layout.moe_layers)


# ids without "gpu", which marks the tests that need a GPU
@pytest.mark.parametrize("device", ["cpu", "gpu"], ids=["on-the-host", "in-the-graph"])
def test_predictors_with_every_history_input_fit_moe_ref_a_s_graph_with_stock_output(
    llama_lib, moe_ref_a, tmp_path, device
):
    """Patch 23 on a trained model: predictors reading every history input, as nodes of the graph (gpu)
    with the host side and the routing log beside them, fit the scheduler's graph (moe-ref-a's was too
    small for them once) and keep stock's text; on the host (cpu) likewise, less prev-router (patch 26
    feeds it in the graph only)."""
    layout = read_layout(moe_ref_a)
    history = tuple(f for f in features.FEATURES if device == "gpu" or f not in GRAPH_FEATURES)
    predictors = export_predictors(layout, tmp_path / "predictors", prior=True, history=history)
    with host_experts_engine(llama_lib, moe_ref_a) as engine:
        ref_tokens, ref_logits = greedy(engine)
    options = {"residency": "token", "miss": "cpu", "predictor_device": device}
    run = run_native(llama_lib, moe_ref_a, layout, predictors, "exact", 2 * layout.n_expert_used, **options)
    assert run.tokens == ref_tokens and np.array_equal(run.logits, ref_logits)
    assert run.native and not run.python_hooks and run.stats.totals().prefetch_issued > 0
