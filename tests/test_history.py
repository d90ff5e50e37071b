"""History inputs at run time (patch 17; prev-x, patch 22): predictors trained with `--features
prev-layer,prev-token` or all three inputs run in the library with no Python per token, the output stays
stock's, the library feeds exactly what `features.history` builds from traces of the same prompt, and
its scores are onnxruntime's on those inputs."""

import ctypes
import dataclasses

import numpy as np
import pytest
import torch

from edge_preattn.errors import UserError
from edge_preattn.model.layout import read_layout
from edge_preattn.predictors import features, train
from edge_preattn.predictors.networks import Predictor
from edge_preattn.predictors.onnx_io import export_layer, load_predictor_set
from edge_preattn.predictors.predictor_weights import read_mlp, read_predictor_set
from edge_preattn.runtime.cache_runtime import CacheRuntime
from edge_preattn.runtime.options import CacheOptions
from edge_preattn.runtime.slots import SlotBank
from edge_preattn.traces.collect import CollectSettings, collect
from edge_preattn.traces.trace_set import TraceSet

from .test_cache import PROMPT, greedy, host_experts_engine
from .test_native_predictor import run_native

PROMPTS = (PROMPT, "The quick brown fox jumps over", "import numpy as np\nx = np.zeros(3)\n", "Once upon a")
N_NEW = 8
HISTORY = "prev-layer,prev-token"
ALL_HISTORY = "prev-layer,prev-token,prev-x"
FROM_FIRST = ("prev-token,prev-x", 1024)  # train --lead 1024: every layer from the first MoE layer's state
ROUTER = "prev-token,prev-x,prev-router"  # patch 26: fed in the model's graph only


@pytest.fixture(scope="module", params=["tiny", "tiny-deepseek2"])  # deepseek2: a dense first layer
def tiny(request, tmp_path_factory):
    from edge_preattn.model.synth import write_synthetic

    path = tmp_path_factory.mktemp("history") / f"{request.param}.gguf"
    write_synthetic(request.param, path, progress=False)
    return path


@pytest.fixture(scope="module")
def traces_dir(llama_lib, tiny, tmp_path_factory):
    """Greedy traces of PROMPTS on the tiny model."""
    root = tmp_path_factory.mktemp("history-traces")
    (root / "prompts.txt").write_text("\n".join(p.replace("\n", "\\n") for p in PROMPTS) + "\n")
    settings = CollectSettings(max_new_tokens=N_NEW, greedy=True, n_ctx=256, prompts_per_shard=4)
    collect(tiny, root / "prompts.txt", root / "traces", settings, progress=False)
    return root / "traces"


@pytest.fixture(scope="module", params=[(HISTORY, 0), (ALL_HISTORY, 0), FROM_FIRST])
def traced(tiny, traces_dir, tmp_path_factory, request):
    """The traces, and predictors trained on them with history inputs (the default recipe's router prior
    included), briefly: what matters here is the runtime, not recall. With and without prev-x, and
    (patch 24) every layer predicted from the first MoE layer's activation."""
    return briefly_trained(tiny, traces_dir, tmp_path_factory.mktemp("history-predictors"), *request.param)


def briefly_trained(tiny, traces_dir, root, wanted: str, lead: int):
    """The traces, and a set trained on them with these history inputs and lead (2 epochs, hidden 32)."""
    recipe = dataclasses.replace(
        train.TrainSettings(), epochs=2, hidden=32, features=wanted, val_fraction=0.25, lead=lead
    )
    train.train(traces_dir, root / "predictors", recipe, device="cpu", progress=False)
    layout = read_layout(tiny)
    return TraceSet(traces_dir), load_predictor_set(root / "predictors", fingerprint=layout.fingerprint)


def input_width(predictors, layout) -> int:
    """x and the history inputs: what llama_edge_predictor_get_last returns as a layer's input."""
    return layout.n_embd + sum(features.width(f, layout.n_embd, layout.n_expert) for f in predictors.features)


def split_history(predictors, layout, history_part: np.ndarray) -> dict[str, np.ndarray]:
    """The history inputs of one row, by feature (FEATURES order, prev-x's n_embd columns last)."""
    widths = [features.width(f, layout.n_embd, layout.n_expert) for f in predictors.features]
    return dict(zip(predictors.features, np.split(history_part, np.cumsum(widths)[:-1]), strict=True))


def test_a_history_graph_is_read_with_its_inputs_columns_apart(tmp_path):
    """The Concat of x and the history inputs before the normalization: the same scores as torch, and
    each input's columns of the first layer where set_predictor_history takes them."""
    torch.manual_seed(0)
    model = Predictor(2, 24, 8, 16, n_extra=16, prior=torch.randn(8, 24)).eval()
    model.norm.mean.normal_()
    model.body[-1].reset_parameters()
    rng = np.random.default_rng(1)
    extra = {name: rng.dirichlet(np.ones(8), 5).astype(np.float32) for name in ("prev_layer", "prev_token")}
    x = rng.standard_normal((5, 24)).astype(np.float32)
    mlp = read_mlp(tmp_path / export_layer(model, tmp_path, 0, x, extra)["file"])
    assert mlp.history == ("prev-layer", "prev-token") and mlp.w1.shape == (16, 40)
    with torch.no_grad():
        expected = model(*(torch.from_numpy(a) for a in (x, *extra.values()))).numpy()
    assert np.abs(mlp.scores(x, extra) - expected).max() < 1e-4
    assert np.array_equal(mlp.history_columns("prev-token"), mlp.w1[:, 32:])


# patch 23: the predictor as nodes of the model's graph, with residency decided between tokens
IN_GRAPH = {"predictor_device": "gpu", "residency": "token", "miss": "cpu"}


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("top1", {}),
        ("exact", {"predictor_threads": 1}),
        ("exact", {"miss": "cpu"}),
        ("top1", IN_GRAPH),
        ("exact", IN_GRAPH),
    ],
)
def test_history_predictors_run_in_the_library_with_no_python_and_stock_output(
    llama_lib, tiny, traced, mode, options
):
    layout = read_layout(tiny)
    _, predictors = traced
    trained_with = (HISTORY, ALL_HISTORY, FROM_FIRST[0])
    assert predictors.features in [features.parse(wanted) for wanted in trained_with]
    with host_experts_engine(llama_lib, tiny) as engine:
        ref_tokens, ref_logits = greedy(engine)
    run = run_native(llama_lib, tiny, layout, predictors, mode, layout.n_expert_used, **options)
    assert run.tokens == ref_tokens and np.array_equal(run.logits, ref_logits)
    assert run.native and not run.python_hooks  # no Python callback at all
    assert run.stats.totals().prefetch_issued > 0


@pytest.mark.parametrize("options", [{}, {"predictor_threads": 1}, IN_GRAPH])
def test_the_runtime_feeds_what_training_read_and_scores_as_onnxruntime(llama_lib, tiny, traced, options):
    """After each decoded token, every layer's last native prediction read x and the history inputs of
    that token's trace row (features.history: the probabilities bit for bit, float16 as stored), and
    scored them as onnxruntime does: on the host (a loop, a CPU graph) and as nodes of the model's graph,
    whose history inputs the graph itself keeps. The prompt's own tokens route together, so their
    prev-token input exists at decode time only (features.py): the comparison starts at the first decoded
    token. With a lead (patch 24) x is the first MoE layer's activation, the history inputs the layer's
    own."""
    check_feeding(llama_lib, tiny, *traced, options)


def check_feeding(llama_lib, tiny, traces: TraceSet, predictors, options: dict) -> None:
    """test_the_runtime_feeds_what_training_read_and_scores_as_onnxruntime's check of one set."""
    layout = read_layout(tiny)
    rows = np.flatnonzero(traces.meta()["prompt"] == 0)  # PROMPTS[0] is PROMPT
    n_prompt = int((traces.meta()["phase"][rows] == 0).sum())
    n_embd, n_expert = layout.n_embd, layout.n_expert
    seen: list[dict[int, tuple[np.ndarray, np.ndarray]]] = []
    with (
        host_experts_engine(llama_lib, tiny) as engine,
        CacheRuntime.for_layout(
            engine,
            layout,
            CacheOptions(n_slots=layout.n_expert_used, mode="exact", predictors=predictors, **options),
        ) as runtime,
    ):
        bank = runtime.bank

        def after_decode(_logits) -> None:
            seen.append(
                {
                    il: bank.last_prediction(il, input_width(predictors, layout), n_expert)
                    for il in bank.layers
                }
            )

        tokens = [t for t, _ in engine.generate(PROMPT, N_NEW, on_logits=after_decode)]
        assert runtime.engine_counters()["python_callbacks_per_token"] == 0
    assert tokens == list(traces.meta()["tokens"][rows[n_prompt:]])  # the same run as the traces'
    history = {(il, f): features.history(traces, il, f) for il in bank.layers for f in predictors.features}
    fed_nonzero = dict.fromkeys(predictors.features, 0)
    for step, last in enumerate(seen[1:]):  # seen[s]: after decoding the token at trace row n_prompt + s - 1
        row = rows[n_prompt + step]
        for il, (inputs, scores) in last.items():
            x, history_part = inputs[:n_embd], inputs[n_embd:]  # the history in the graph's input order
            fed = split_history(predictors, layout, history_part)
            read = features.activation(traces, il, "x_pre", predictors.lead)[row]
            assert np.allclose(x, read, rtol=1e-3, atol=1e-3)
            for f in predictors.features:
                assert np.array_equal(fed[f], history[il, f][row].astype(np.float32)), (step, il, f)
                fed_nonzero[f] += bool(fed[f].any())
            extra = {features.input_name(f): fed[f][None] for f in predictors.features}
            expected = predictors.scores(il, x[None], extra)[0]
            assert np.abs(scores - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
    # prev-layer is zeros at the first MoE layer only; prev-token and prev-x at none of the decoded tokens
    if "prev-layer" in predictors.features:
        assert fed_nonzero["prev-layer"] == (len(seen) - 1) * (len(bank.layers) - 1)
    assert fed_nonzero["prev-token"] == (len(seen) - 1) * len(bank.layers)
    for f in ("prev-x", "prev-router"):
        if f in predictors.features:
            assert fed_nonzero[f] == (len(seen) - 1) * len(bank.layers), f


@pytest.fixture(scope="module", params=[0, FROM_FIRST[1]], ids=["own-layer", "from-first"])
def router_traced(tiny, traces_dir, tmp_path_factory, request):
    """The traces, and predictors that read the previous token's router input (patch 26) beside its
    routing and pre-attention state, at their own layer and from the first MoE layer's state."""
    root = tmp_path_factory.mktemp("router-predictors")
    return briefly_trained(tiny, traces_dir, root, ROUTER, request.param)


def test_prev_router_is_fed_in_the_graph_as_training_read_it_with_stock_output(
    llama_lib, tiny, router_traced
):
    """patch 26: in the model's graph the library keeps each layer's last router input row (float16, as
    the traces store it) and feeds it to the next token's prediction at that layer: the trace's
    prev-router row bit for bit at every decoded token, scored as onnxruntime, and stock's logits."""
    traces, predictors = router_traced
    check_feeding(llama_lib, tiny, traces, predictors, IN_GRAPH)
    layout = read_layout(tiny)
    with host_experts_engine(llama_lib, tiny) as engine:
        ref_tokens, ref_logits = greedy(engine)
    run = run_native(llama_lib, tiny, layout, predictors, "exact", layout.n_expert_used, **IN_GRAPH)
    assert run.tokens == ref_tokens and np.array_equal(run.logits, ref_logits)
    assert run.native and not run.python_hooks and run.stats.totals().prefetch_issued > 0


def test_history_predictors_refuse_what_cannot_feed_them_in_one_line(llama_lib, tiny, traced):
    layout = read_layout(tiny)
    _, predictors = traced
    for options, reason in (
        ({"lookahead": 1}, "--lookahead"),
        ({"predictor_engine": "onnxruntime"}, "--predictor-engine native"),
    ):
        with host_experts_engine(llama_lib, tiny) as engine, pytest.raises(UserError, match=reason) as caught:
            CacheRuntime.for_layout(
                engine,
                layout,
                CacheOptions(n_slots=layout.n_expert_used, mode="exact", predictors=predictors, **options),
            )
        assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="--predictor-engine native"):
        predictors.scores(predictors.layers[0], np.zeros((1, layout.n_embd), np.float32))


def test_history_c_api_refuses_bad_arguments(llama_lib, tiny, traced):
    layout = read_layout(tiny)
    _, predictors = traced
    if "prev-layer" not in predictors.features:
        pytest.skip("the columns of every history input are taken from a set that reads them all")
    first, il, other = (layer.index for layer in layout.moe_layers[:3])
    mlp = read_predictor_set(predictors)[il]
    floats = ctypes.POINTER(ctypes.c_float)
    w_layer, w_token = (mlp.history_columns(f) for f in ("prev-layer", "prev-token"))
    # prev-x's columns [n_hidden, n_embd]; a set without it gets random ones here (the C API takes them)
    has_x = "prev-x" in mlp.history
    w_x = mlp.history_columns("prev-x") if has_x else np.ones((mlp.w1.shape[0], layout.n_embd), np.float32)
    h, e, d = mlp.w1.shape[0], layout.n_expert, layout.n_embd
    with host_experts_engine(llama_lib, tiny) as engine:
        lib = engine.api.lib
        bank = SlotBank(engine.api, engine.ctx, (first, il), n_slots=8)
        x_pointer = w_x.ctypes.data_as(floats)
        good = [
            engine.ctx,
            il,
            w_layer.ctypes.data_as(floats),
            first,
            w_token.ctypes.data_as(floats),
            h,
            e,
            x_pointer,
            d,
            None,  # prev-router's columns
        ]
        assert lib.llama_edge_predictor_set_history(*good) == -2  # no predictor yet
        assert bank.last_prediction(il, input_width(predictors, layout), e) is None
        bank.set_predictor(il, mlp, 4)
        assert lib.llama_edge_predictor_set_history(*good) == 0
        nan, nan_x = w_token.copy(), w_x.copy()
        nan[0, 0] = nan_x[-1, -1] = np.nan
        dense = [i for i in range(first) if i not in {layer.index for layer in layout.moe_layers}]
        for index, bad in [
            (0, None),  # no context
            (1, other),  # not a cached layer
            (3, il),  # not a layer before il
            (3, other),
            (3, -2),
            *[(3, d) for d in dense],  # not a MoE layer (deepseek2's dense first layer)
            (4, nan.ctypes.data_as(floats)),  # not finite
            (5, h + 1),  # not the predictor's hidden units
            (6, e - 1),  # not its experts
            (7, nan_x.ctypes.data_as(floats)),  # prev-x's columns not finite
            (8, d + 1),  # not the predictor's activation width
            (8, 0),
            (9, nan_x.ctypes.data_as(floats)),  # prev-router's columns not finite
            (9, x_pointer),  # patch 26: prev-router on a predictor the host evaluates
        ]:
            args = list(good)
            args[index] = bad
            assert lib.llama_edge_predictor_set_history(*args) in (-1, -2), index
        assert lib.llama_edge_predictor_set_lookahead(engine.ctx, 1) == -2  # history: no lookahead
        assert (
            lib.llama_edge_predictor_set_history(engine.ctx, il, None, 0, None, 0, 0, None, 0, None) == 0
        )  # removed
        bank.set_lookahead(1)
        assert lib.llama_edge_predictor_set_history(*good) == -2  # and the other way round
        bank.set_lookahead(0)
        bank.set_predictor_history(il, mlp, -1)  # -1: the prev-layer input is zeros
        assert lib.llama_edge_predictor_get_last(None, il, None, 0, None, 0) == -1


def test_prev_x_is_the_token_before_in_its_ubatch_or_the_one_before_and_zeros_first(llama_lib, tiny, traced):
    """patch 22: prev-x is zeros for a sequence's first token; for a ubatch's first row, the last row the
    layer saw in the ubatch before; for a later row, the row before it in the same ubatch (prompt rows
    too); float16-rounded, as the traces store it. The scores are onnxruntime's on what was fed."""
    _, predictors = traced
    if "prev-x" not in predictors.features or predictors.lead:
        pytest.skip("a set without prev-x, or with a lead (which predicts one-token ubatches only)")
    layout = read_layout(tiny)
    d, e = layout.n_embd, layout.n_expert
    width = input_width(predictors, layout)

    def fp16(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float16).astype(np.float32)

    # 12 slots: a ubatch of 2 or 3 tokens (× k = 4) reads the bank, and no layer is ever settled
    options = CacheOptions(n_slots=12, mode="exact", predictors=predictors)
    with (
        host_experts_engine(llama_lib, tiny) as engine,
        CacheRuntime.for_layout(engine, layout, options) as runtime,
    ):
        bank = runtime.bank
        tokens = engine.tokenize("The quick brown fox jumps")[:4]
        assert len(tokens) == 4

        def decode(chunk: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
            engine.decode(chunk)
            seen = {il: bank.last_prediction(il, width, e) for il in bank.layers}
            for il, (inputs, scores) in seen.items():
                fed = split_history(predictors, layout, inputs[d:])
                extra = {features.input_name(f): fed[f][None] for f in predictors.features}
                expected = predictors.scores(il, inputs[None, :d], extra)[0]
                assert np.abs(scores - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max()), il
            return {
                il: (inputs[:d], split_history(predictors, layout, inputs[d:])["prev-x"])
                for il, (inputs, _) in seen.items()
            }

        one_by_one = []
        for token in tokens:
            one_by_one.append(decode([token]))
        for il in bank.layers:
            assert not one_by_one[0][il][1].any()  # the sequence's first token
            for step in range(1, 4):  # the last row of the ubatch before
                assert np.array_equal(one_by_one[step][il][1], fp16(one_by_one[step - 1][il][0])), (step, il)
        engine.reset()
        together = decode(tokens[:1]), decode(tokens[1:3])  # the last row of [t1, t2] reads t1's row
        for il in bank.layers:
            assert not together[0][il][1].any()  # zeros again after the reset
            assert np.allclose(together[1][il][0], one_by_one[2][il][0], rtol=1e-3, atol=1e-3)
            assert np.allclose(together[1][il][1], fp16(one_by_one[1][il][0]), rtol=1e-2, atol=1e-2), il
            assert together[1][il][1].any()
        after = decode(tokens[3:])  # and the next ubatch's first row, the last row of [t1, t2]
        for il in bank.layers:
            assert np.array_equal(after[il][1], fp16(together[1][il][0])), il


def test_lead_c_api_refuses_bad_arguments_and_a_new_predictor_reads_its_own_layer(llama_lib, tiny, traced):
    """patch 24: llama_edge_predictor_set_source takes a cached layer at or before il, after il's
    predictor, and refuses a prev-layer input or a lookahead beside a lead (neither is known that early)."""
    layout = read_layout(tiny)
    _, predictors = traced
    if predictors.lead:
        pytest.skip("run once per model, with a set that reads prev-layer")
    first, il, other = (layer.index for layer in layout.moe_layers[:3])
    mlp = read_predictor_set(predictors)[il]
    with host_experts_engine(llama_lib, tiny) as engine:
        lib = engine.api.lib
        bank = SlotBank(engine.api, engine.ctx, (first, il), n_slots=8)
        assert lib.llama_edge_predictor_set_source(engine.ctx, il, first) == -2  # no predictor yet
        bank.set_predictor(il, mlp, 4)
        for args in ((None, il, first), (engine.ctx, other, first)):  # no context, an uncached layer
            assert lib.llama_edge_predictor_set_source(*args) in (-1, -2), args
        for source in (other, -1):  # a later layer (and not cached), none
            assert lib.llama_edge_predictor_set_source(engine.ctx, il, source) == -1, source
        dense = [i for i in range(first) if i not in {layer.index for layer in layout.moe_layers}]
        for layer in dense:  # deepseek2's dense first layer: not a cached one
            assert lib.llama_edge_predictor_set_source(engine.ctx, il, layer) == -1
        bank.set_predictor_history(il, mlp, first)  # a prev-layer input: not known a layer ahead
        assert lib.llama_edge_predictor_set_source(engine.ctx, il, first) == -2
        assert lib.llama_edge_predictor_set_source(engine.ctx, il, il) == 0  # its own layer: always
        bank.set_predictor(il, mlp, 4)  # a new predictor reads its own layer, without history
        bank.set_predictor_source(il, first)
        with pytest.raises(ValueError, match="status -2"):
            bank.set_lookahead(1)
        with pytest.raises(ValueError, match="status -2"):
            bank.set_predictor_history(il, mlp, first)
        bank.set_predictor(il, mlp, 4)
        bank.set_lookahead(1)  # the new predictor reads il's own output again
        assert lib.llama_edge_predictor_set_source(engine.ctx, il, first) == -2  # and the other way round


def test_run_with_a_lead_set_says_how_far_ahead_and_keeps_its_text(llama_lib, tiny, traced, tmp_path, capsys):
    """`run` with predictors trained with --lead: the summary and the stats JSON say how many layers ahead
    the prediction runs, and the greedy text is stock's (`--mode off`)."""
    import json

    from edge_preattn import cli

    _, predictors = traced
    if not predictors.lead:
        pytest.skip("a set without a lead")
    argv = ["run", "-m", str(tiny), "-n", "12", "--temp", "0", "-p", PROMPT]
    assert cli.main([*argv, "--mode", "off"]) == 0
    stock = capsys.readouterr().out
    stats_file = tmp_path / "stats.json"
    for extra in ([], ["--residency", "token", "--predictor-device", "gpu"]):
        cached = ["--mode", "exact", "--slots", "4", "--predictors", str(predictors.directory), *extra]
        assert cli.main([*argv, *cached, "--stats-json", str(stats_file)]) == 0
        out = capsys.readouterr()
        stats = json.loads(stats_file.read_text())
        moe_layers = len(read_layout(tiny).moe_layers)
        assert out.out == stock and stats["predictor_lead"] == moe_layers - 1
        assert f"up to {moe_layers - 1} layers ahead" in out.err and stats["native_predictions_per_token"] > 0


@pytest.mark.parametrize("options", [{"predictor_threads": 1}, IN_GRAPH])
def test_fp16_predictors_score_near_onnxruntime_and_keep_stock_text(llama_lib, tiny, traced, options):
    """patch 25: graph predictors with float16 matrices (a CPU graph, or nodes of the model's graph) score
    within float16's rounding of onnxruntime's float32 scores on the inputs they were fed, not bit for
    bit (so the float16 weights are what ran), and the text stays stock's."""
    _, predictors = traced
    layout = read_layout(tiny)
    width = input_width(predictors, layout)
    with host_experts_engine(llama_lib, tiny) as engine:
        ref_tokens, _ = greedy(engine, PROMPT, N_NEW)
    errors = []
    with (
        host_experts_engine(llama_lib, tiny) as engine,
        CacheRuntime.for_layout(
            engine,
            layout,
            CacheOptions(
                n_slots=layout.n_expert_used,
                mode="exact",
                predictors=predictors,
                predictor_fp16=True,
                **options,
            ),
        ) as runtime,
    ):
        bank, d = runtime.bank, layout.n_embd

        def after_decode(_logits) -> None:
            for il in bank.layers:
                last = bank.last_prediction(il, width, layout.n_expert)
                if last is None:
                    continue
                inputs, scores = last
                fed = split_history(predictors, layout, inputs[d:])
                extra = {features.input_name(f): fed[f][None] for f in predictors.features}
                expected = predictors.scores(il, inputs[None, :d], extra)[0]
                errors.append(np.abs(scores - expected).max() / max(1.0, np.abs(expected).max()))

        tokens = [t for t, _ in engine.generate(PROMPT, N_NEW, on_logits=after_decode)]
    assert tokens == ref_tokens and errors
    assert 0 < max(errors) <= 2e-2, max(errors)


def test_bench_runs_the_lead_set_in_its_own_configurations(lib_dir, tiny, traced, tmp_path, capsys):
    """`bench --lead-predictors`: the "+lead" configurations run that set (stock's tokens, its placement
    says so); a set trained without --lead is refused in one line."""
    import json

    from edge_preattn import cli

    _, predictors = traced
    argv = ["bench", str(tiny), "--vram-budget", "50%", "-c", "256", "-n", "4", "--rounds", "1"]
    argv += ["--configs", "lru,exact+lead", "--lead-predictors", str(predictors.directory)]
    argv += ["-o", str(tmp_path)]
    argv += ["--stock-lib", str(lib_dir)]  # the patched library: inert when off, enough for the harness
    if not predictors.lead:
        assert cli.main(argv) == 2
        assert "was trained without --lead: give it as --predictors" in capsys.readouterr().err
        return
    assert cli.main(argv) == 0
    result = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    lead = next(config for config in result["configs"] if config["name"] == "exact+lead")
    assert lead["tokens_equal_stock"] and lead["placement"].endswith("with the --lead-predictors set")
    capsys.readouterr()


@pytest.mark.gpu
@pytest.mark.parametrize("fp16", [False, True])
def test_graph_predictors_on_the_gpu_keep_stock_greedy_text(tiny, router_traced, tmp_path, fp16):
    """Patches 24-26 on CUDA: every history input (prev-router too) fed in the model's graph, at each
    layer's own pre-attention output or every layer predicted from the first MoE layer's (its copies
    launched on the copy queue at the first layer and waited for at each layer's routing node), with
    float32 or float16 matrices: the greedy text of stock all-on-GPU, the device prefetching, no Python
    per token and no host synchronization per layer."""
    import json
    import subprocess
    import sys

    _, predictors = router_traced
    argv = [sys.executable, "-m", "edge_preattn.cli", "run", "-m", str(tiny), "-n", "24", "--temp", "0"]
    argv += ["-p", PROMPT]
    stock = subprocess.run([*argv, "--mode", "off"], capture_output=True, text=True, check=True, timeout=600)
    stats_file = tmp_path / f"stats-{fp16}.json"
    cached = ["--mode", "exact", "--slots", "4", "--copy-queue", "--residency", "token"]
    cached += ["--predictor-device", "gpu", "--predictors", str(predictors.directory)]
    cached += ["--predictor-fp16"] * fp16 + ["--stats-json", str(stats_file)]
    done = subprocess.run([*argv, *cached], capture_output=True, text=True, check=True, timeout=600)
    stats = json.loads(stats_file.read_text())
    assert done.stdout == stock.stdout
    lead = len(read_layout(tiny).moe_layers) - 1 if predictors.lead else 0
    assert stats["predictor_lead"] == lead and stats["prefetch_issued"] > 0
    assert stats["python_callbacks_per_token"] == 0 and stats["host_syncs_per_token"] <= 2.2
