"""Predictors: losses against hand-computed values, training on real traces, ONNX export and the
refusals of `load_predictor_set`."""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edge_preattn import cli
from edge_preattn.errors import UserError
from edge_preattn.predictors import fit, train
from edge_preattn.predictors.networks import (
    LOSSES,
    Predictor,
    distill_loss,
    focal_loss,
    make_loss,
    mse_loss,
    parameter_formula,
    rank_loss,
    ranking_hinge,
    wbce_loss,
)
from edge_preattn.predictors.onnx_io import MANIFEST, load_predictor_set, sha256_bytes
from edge_preattn.traces.collect import CollectSettings, collect
from edge_preattn.traces.trace_set import TraceSet

from .robustness_log import record

LOG2 = math.log(2)
PROMPTS = [
    "Whales are mammals, which means that",
    "def add(a, b):",
    "Convert 72 degrees Fahrenheit to Celsius.",
    "import numpy as np",
    "The capital of France is",
    "Write a function that reverses a string.",
    "for i in range(10):",
    "Explain why the sky is blue.",
]
SETTINGS = train.TrainSettings(  # the paper's recipe (no prior), small
    hidden=64, epochs=4, batch_size=64, lr=3e-3, val_fraction=0.25, patience=10, prior=False, loss="rank"
)


def softplus(z: float) -> float:
    return math.log1p(math.exp(z))


def descending_probs(n_expert: int) -> torch.Tensor:
    # probs: [1, E], expert 0 the router's favourite, all scores distinct
    raw = torch.arange(n_expert, 0, -1, dtype=torch.float32)
    return (raw / raw.sum())[None]


# ---- losses on crafted examples -------------------------------------------------------------------


def test_mse_is_eq5_on_softmax_of_the_logits():
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    value = mse_loss(torch.zeros(1, 4), probs, torch.tensor([[0]]))
    assert value.item() == pytest.approx(0.75**2 + 3 * 0.25**2)  # softmax(0) = 1/4 each
    sigmoid = mse_loss(torch.zeros(1, 4), probs, torch.tensor([[0]]), gating="sigmoid")
    assert sigmoid.item() == pytest.approx(0.5**2 + 3 * 0.5**2)


def test_wbce_positives_are_top_k_and_weights_follow_the_real_top_10():
    logits = torch.zeros(1, 12)
    logits[0, 0], logits[0, 5], logits[0, 11] = 2.0, 1.0, -1.0
    value = wbce_loss(logits, descending_probs(12), torch.tensor([[0, 1]]))
    expected = (
        3.0 * softplus(-2.0)  # expert 0: selected, top-10
        + 3.0 * LOG2  # expert 1: selected, logit 0
        + 3.0 * softplus(1.0)  # expert 5: not selected but in the real top-10
        + 7 * 3.0 * LOG2  # experts 2-4, 6-9: not selected, top-10
        + 0.5 * LOG2  # expert 10: rank 11
        + 0.5 * softplus(-1.0)  # expert 11: rank 12, logit −1
    ) / 12
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_top_tiers_shrink_to_the_number_of_experts():
    probs, ids = descending_probs(4), torch.tensor([[2]])
    assert wbce_loss(torch.zeros(1, 4), probs, ids).item() == pytest.approx(3.0 * LOG2)  # all top-4
    # rank: all four in the top tier, 6 ordered pairs each short of the margin by 0.1
    assert rank_loss(torch.zeros(1, 4), probs, ids).item() == pytest.approx(3.0 * LOG2 + 0.3 * 0.6)


def test_focal_loss_on_even_logits():
    value = focal_loss(torch.zeros(1, 2), torch.tensor([[0.7, 0.3]]), torch.tensor([[0]]))
    # p_t = 1/2 everywhere: α_t (1/2)² log 2 with α = 0.25 (positive) and 0.75 (negative), mean of 2
    assert value.item() == pytest.approx((0.25 + 0.75) * 0.25 * LOG2 / 2)


def test_rank_loss_is_three_tier_bce_plus_lambda_hinge():
    value = rank_loss(torch.zeros(1, 40), descending_probs(40), torch.tensor([[0, 1, 2]]))
    bce = (10 * 3.0 + 20 * 1.5 + 10 * 0.5) / 40 * LOG2
    assert value.item() == pytest.approx(bce + 0.3 * 45 * 0.1, rel=1e-6)  # 45 pairs of the top-10


def test_ranking_term_is_zero_when_the_margin_holds_and_positive_otherwise():
    probs, ids = torch.tensor([[0.5, 0.3, 0.2]]), torch.tensor([[0]])
    assert ranking_hinge(torch.tensor([[1.0, 0.5, 0.0]]), probs, ids).item() == 0.0
    assert ranking_hinge(torch.tensor([[0.0, 0.0, 0.0]]), probs, ids).item() == pytest.approx(0.3)
    reversed_order = ranking_hinge(torch.tensor([[0.0, 0.5, 1.0]]), probs, ids)
    assert reversed_order.item() == pytest.approx(0.6 + 1.1 + 0.6)
    # equal true scores make no pair: only (0, 1) and (0, 2) count
    tied = ranking_hinge(torch.zeros(1, 3), torch.tensor([[0.4, 0.3, 0.3]]), ids)
    assert tied.item() == pytest.approx(0.2)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_flow(name):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 16, generator=generator, requires_grad=True)
    probs = torch.softmax(torch.randn(8, 16, generator=generator), dim=1)
    ids = probs.topk(4, dim=1).indices
    LOSSES[name](logits, probs, ids).backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_architectures_and_input_normalization():
    x = torch.randn(32, 6) * 3 + 5
    for arch, kinds in ((1, {"BatchNorm1d", "GELU", "Dropout"}), (2, {"SiLU"})):
        model = Predictor(arch, n_embd=6, n_expert=5, hidden=16)
        model.norm.fit(x)
        assert kinds <= {type(m).__name__ for m in model.body}
        assert model.eval()(x).shape == (32, 5)
        normalized = model.norm(x)  # [32, 6]
        assert normalized.mean(dim=0).abs().max() < 1e-5
        assert (normalized.std(dim=0, unbiased=False) - 1).abs().max() < 1e-4


def test_split_is_by_prompt_and_deterministic():
    prompt = np.repeat(np.arange(20), np.arange(1, 21))  # prompt p has p + 1 tokens
    train_mask, val = train.split_by_prompt(prompt, 0.25, seed=3)
    assert len(val) == 5
    assert set(prompt[train_mask]).isdisjoint(val)
    assert set(prompt[~train_mask]) == set(val)
    assert train.split_by_prompt(prompt, 0.25, seed=3)[1] == val
    with pytest.raises(UserError, match="single prompt"):
        train.split_by_prompt(np.zeros(5, np.int32), 0.25, seed=0)


# ---- training, export and loading on real traces ---------------------------------------------------


@pytest.fixture(scope="session")
def traces_dir(llama_lib, moe_ref_a, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predictor-traces")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    settings = CollectSettings(max_new_tokens=16, prompts_per_shard=4, n_ctx=256)
    collect(moe_ref_a, prompts, root / "traces", settings, progress=False)
    return root / "traces"


@pytest.fixture(scope="session")
def trained(traces_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("predictors") / "out"
    manifest = train.train(
        traces_dir, out, SETTINGS, layers=(0, 1), int8=True, fp16=True, device="cpu", progress=False
    )
    return out, manifest


def test_training_lowers_the_loss_and_holds_out_whole_prompts(traces_dir, trained):
    _, manifest = trained
    traces = TraceSet(traces_dir)
    for entry in manifest["predictors"]:
        losses = entry["validation"]["train_loss_per_epoch"]
        assert len(losses) == SETTINGS.epochs and losses[-1] < losses[0]
        assert len(entry["validation"]["recall_at_k_per_epoch"]) == SETTINGS.epochs
    prompt = traces.meta()["prompt"]
    val = manifest["validation_prompts"]
    assert val == train.split_by_prompt(prompt, SETTINGS.val_fraction, SETTINGS.seed)[1]
    assert manifest["validation_tokens"] == int(np.isin(prompt, val).sum())
    assert manifest["train_tokens"] + manifest["validation_tokens"] == len(prompt)
    assert manifest["fingerprint"] == traces.fingerprint


def test_onnx_equals_torch_and_int8_is_reported(traces_dir, trained):
    out, manifest = trained
    traces = TraceSet(traces_dir)
    val = np.isin(traces.meta()["prompt"], manifest["validation_prompts"])
    x = traces.layer(1, "x_pre")[val].astype(np.float32)  # [M, d]
    model = Predictor(SETTINGS.arch, traces.n_embd, traces.n_expert, SETTINGS.hidden)
    checkpoint = torch.load(out / "checkpoints" / "layer-001.pt", weights_only=True)
    model.load_state_dict(checkpoint["best_model"])
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()  # [M, E]
    predictors = load_predictor_set(out, fingerprint=traces.fingerprint)
    assert predictors.layers == (0, 1) and (predictors.k, predictors.n_expert) == (traces.k, traces.n_expert)
    assert np.abs(predictors.scores(1, x) - expected).max() < 1e-4
    entry = manifest["predictors"][1]
    assert entry["export_check"]["max_abs_diff"] < 1e-4 and entry["export_check"]["rows"] == len(x)
    assert fit.val_recall(expected, traces.layer(1, "ids")[val]) == pytest.approx(
        entry["validation"]["best_recall_at_k"]
    )
    int8 = load_predictor_set(out, fingerprint=traces.fingerprint, int8=True)
    assert int8.scores(1, x).shape == expected.shape
    assert 0 <= entry["int8"]["val_recall_at_k"] <= 1
    fp16 = load_predictor_set(out, fingerprint=traces.fingerprint, fp16=True)  # eval --fp16: the fp16 files
    assert fp16.fp16 and not fp16.int8 and entry["fp16"]["bytes"] < entry["bytes"]
    assert 0 < np.abs(fp16.scores(1, x) - expected).max() < 1e-2 * max(1.0, np.abs(expected).max())


def test_rerun_resumes_and_an_interrupted_run_finishes_the_same(traces_dir, trained, tmp_path, monkeypatch):
    out, manifest = trained
    again = train.train(traces_dir, out, SETTINGS, layers=(0, 1), device="cpu", progress=False)
    assert [e["validation"] for e in again["predictors"]] == [e["validation"] for e in manifest["predictors"]]
    with pytest.raises(UserError, match="another run"):
        other = dataclasses.replace(SETTINGS, lr=1e-2)
        train.train(traces_dir, out, other, layers=(0,), device="cpu", progress=False)

    real_save, calls = fit._save, []

    def save_then_stop(path, state):
        real_save(path, state)
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(fit, "_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train.train(traces_dir, tmp_path / "p", SETTINGS, layers=(0,), device="cpu", progress=False)
    monkeypatch.setattr(fit, "_save", real_save)
    resumed = train.train(traces_dir, tmp_path / "p", SETTINGS, layers=(0,), device="cpu", progress=False)
    assert (
        resumed["predictors"][0]["validation"]["recall_at_k_per_epoch"]
        == (manifest["predictors"][0]["validation"]["recall_at_k_per_epoch"])
    )


def _copy(out: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints"))
    return copy


def _edit_manifest(directory: Path, edit) -> None:
    manifest = json.loads((directory / MANIFEST).read_text())
    edit(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def test_loading_refuses_what_it_cannot_trust(trained, tmp_path):
    out, manifest = trained
    with pytest.raises(UserError, match="another model"):
        load_predictor_set(out, fingerprint="0" * 64)
    with pytest.raises(UserError, match=r"no predictors\.json"):
        load_predictor_set(tmp_path)

    tampered = _copy(out, tmp_path / "a")
    with (tampered / "layer-001.onnx").open("ab") as file:
        file.write(b"\0")
    with pytest.raises(UserError, match="sha256"):
        load_predictor_set(tampered)

    escaping = _copy(out, tmp_path / "b")
    outside = tmp_path / "b" / "outside.onnx"  # a valid model with the right sha, but outside the folder
    shutil.copy(out / "layer-000.onnx", outside)

    def point_outside(m: dict) -> None:
        m["predictors"][0]["file"] = "../outside.onnx"

    _edit_manifest(escaping, point_outside)
    with pytest.raises(UserError, match="outside its folder"):
        load_predictor_set(escaping)
    _edit_manifest(escaping, lambda m: m["predictors"][0].update(file=str(outside)))
    with pytest.raises(UserError, match="outside its folder"):
        load_predictor_set(escaping)

    wrong_shape = _copy(out, tmp_path / "c")
    _edit_manifest(wrong_shape, lambda m: m.update(n_expert=m["n_expert"] + 1, future_key="ignored"))
    with pytest.raises(UserError, match="not \\[N, 384\\]"):
        load_predictor_set(wrong_shape)
    _edit_manifest(wrong_shape, lambda m: m.update(n_expert=m["n_expert"] - 1))
    assert load_predictor_set(wrong_shape).n_expert == manifest["n_expert"]  # unknown keys are ignored
    _edit_manifest(wrong_shape, lambda m: m.pop("k"))
    with pytest.raises(UserError, match="'k'"):
        load_predictor_set(wrong_shape)
    assert sha256_bytes((out / "layer-000.onnx").read_bytes()) == manifest["predictors"][0]["sha256"]


def test_cli_trains_one_layer(traces_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["train", str(traces_dir), "--hidden", "32", "--epochs", "1", "--layers", "0", "-o", str(out)]
    assert cli.main(argv) == 0
    assert "validation recall@8" in capsys.readouterr().out
    assert load_predictor_set(out).layers == (0,)


def test_fuzzed_manifests_end_in_a_clean_error_or_a_clean_load(trained, tmp_path):
    """Random byte flips and truncations of predictors.json: a UserError or a working set, nothing else."""
    out, _ = trained
    original = (out / MANIFEST).read_bytes()
    rng = np.random.default_rng(0)
    outcomes = {"error": 0, "loaded": 0}
    directory = _copy(out, tmp_path)
    for _ in range(200):
        data = bytearray(original)
        if rng.random() < 0.3:
            data = data[: int(rng.integers(0, len(data)))]
        else:
            for position in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
                data[position] = int(rng.integers(0, 256))
        (directory / MANIFEST).write_bytes(bytes(data))
        try:
            predictors = load_predictor_set(directory)
            assert (
                predictors.scores(predictors.layers[0], np.zeros((1, predictors.n_embd), np.float32)).shape[0]
                == 1
            )
            outcomes["loaded"] += 1
        except UserError as error:
            assert "\n" not in str(error)
            outcomes["error"] += 1
    assert outcomes["error"] > 0 and sum(outcomes.values()) == 200
    for outcome, count in outcomes.items():
        record("fuzz (predictors.json, seed 0)", "byte flips and cuts", outcome, count)


def test_eval_calibrate_stores_temperatures_and_reports_adaptive_prefetch(
    traces_dir, trained, tmp_path, capsys
):
    out, _ = trained
    directory = _copy(out, tmp_path)
    reports = tmp_path / "reports"
    assert cli.main(["eval", str(traces_dir), str(directory), "-o", str(reports), "--calibrate"]) == 0
    manifest = json.loads((directory / MANIFEST).read_text())
    temperatures = [entry["temperature"] for entry in manifest["calibration"].values()]
    assert len(temperatures) == len(manifest["layers"]) and all(0.05 <= t <= 20 for t in temperatures)
    report = json.loads((reports / "calibration-moe-ref-a.json").read_text())
    rows = [report["targets"][key] for key in sorted(report["targets"], key=float)]
    assert [r["experts_per_token"] for r in rows] == sorted(r["experts_per_token"] for r in rows)
    assert rows[-1]["recall"] == 1.0  # target 1.0: every expert
    assert load_predictor_set(directory).manifest["calibration"]  # still loads (ONNX untouched)
    assert (reports / "calibration-moe-ref-a.png").stat().st_size > 0


# ---- the router prior, history features, soft targets ------------------------------------------


def test_distill_is_the_cross_entropy_to_the_router_probabilities():
    probs = torch.tensor([[0.5, 0.25, 0.25]])
    logits = torch.log(probs)
    assert distill_loss(logits, probs, torch.tensor([[0]])).item() == pytest.approx(
        -(probs * torch.log(probs)).sum().item()  # KL = 0: only the router's entropy is left
    )
    summed = make_loss("rank+distill")(logits, probs, torch.tensor([[0]]))
    assert summed.item() == pytest.approx(
        (rank_loss(logits, probs, torch.tensor([[0]])) + 1.0397).item(), 1e-3
    )
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("rank+nope")


def test_untrained_residual_ranks_as_the_prior_and_exports_it():
    torch.manual_seed(0)
    prior = torch.randn(8, 16)  # [E, d]
    model = Predictor(2, 16, 8, hidden=4, n_extra=8, prior=prior).eval()
    x, extra = torch.randn(32, 16), torch.rand(32, 8)
    model.norm.fit(torch.cat([x, extra], 1))
    assert torch.allclose(model(x, extra), x @ prior.T, atol=1e-5)  # the correction starts at zero
    assert model.parameter_count() == 16 * 8 + (24 * 4 + 4) + (4 * 8 + 8) + 1 + 2 * 24


def test_router_prior_maps_the_pre_attention_state_onto_the_router_input(moe_ref_a):
    import gguf

    from edge_preattn.predictors.baselines import router_prior

    tensors = {t.name: t for t in gguf.GGUFReader(moe_ref_a).tensors}
    weight = {
        n: np.asarray(gguf.dequantize(tensors[n].data, tensors[n].tensor_type), np.float32)
        for n in ("blk.3.attn_norm.weight", "blk.3.ffn_norm.weight", "blk.3.ffn_gate_inp.weight")
    }
    router = weight["blk.3.ffn_gate_inp.weight"].reshape(64, -1)
    normed = np.random.default_rng(0).standard_normal((5, router.shape[1])).astype(np.float32)
    x_pre = normed * weight["blk.3.attn_norm.weight"]  # what the hook captures before attention
    router_input = normed * weight["blk.3.ffn_norm.weight"]  # what the router reads, were attention zero
    prior = router_prior(moe_ref_a, (3,))[3]
    assert np.allclose(x_pre @ prior.T, router_input @ router.T, atol=1e-3)


def test_history_features_shift_within_prompts(traces_dir):
    from edge_preattn.predictors import features

    traces = TraceSet(traces_dir)
    prompt = traces.meta()["prompt"]
    token = features.history(traces, 1, "prev-token")
    probs = traces.layer(1, "probs")
    first = np.r_[True, prompt[1:] != prompt[:-1]]
    assert (token[first] == 0).all() and np.array_equal(token[~first], probs[np.flatnonzero(~first) - 1])
    assert np.array_equal(features.history(traces, 1, "prev-layer"), traces.layer(0, "probs"))
    assert not features.history(traces, 0, "prev-layer").any()
    assert features.parse("prev-token,prev-layer") == ("prev-layer", "prev-token")
    router = features.history(traces, 1, "prev-router")  # the previous token's router input, as stored
    x_router = traces.layer(1, "x_router")
    assert (router[first] == 0).all() and np.array_equal(router[~first], x_router[np.flatnonzero(~first) - 1])
    with pytest.raises(UserError, match="unknown --features"):
        features.parse("next-token")


def test_prior_features_and_distill_train_export_and_evaluate(traces_dir, moe_ref_a, tmp_path):
    from edge_preattn.predictors import evaluate

    settings = dataclasses.replace(
        SETTINGS, epochs=2, prior=True, features="prev-layer,prev-token", loss="rank+distill"
    )
    manifest = train.train(
        traces_dir, tmp_path / "p", settings, layers=(1,), fp16=True, int8=True, device="cpu", progress=False
    )
    entry = manifest["predictors"][0]
    assert manifest["features"] == ["prev-layer", "prev-token"] and manifest["prior"]
    assert entry["export_check"]["max_abs_diff"] < 1e-4
    assert 0 <= entry["fp16"]["val_recall_at_k"] <= 1 and entry["fp16"]["bytes"] < entry["bytes"]
    int8_graph = onnx.load(str(tmp_path / "p" / entry["int8"]["file"])).graph
    assert any(n.op_type == "MatMul" and "prior" in n.input for n in int8_graph.node)  # the prior stays float
    traces = TraceSet(traces_dir)
    pset = load_predictor_set(tmp_path / "p", fingerprint=traces.fingerprint)
    payload = evaluate.evaluate(
        traces, {"p": pset}, "m", priors=evaluate.prior_weights(traces, None, {"p": pset})
    )
    assert {"p", "router-prior"} <= set(payload["methods"])
    assert payload["methods"]["p"]["mean"]["recall_at_k"] > 0.3


def test_a_lead_reads_an_earlier_layer_and_its_prior_divides_by_that_layer(traces_dir, moe_ref_a, tmp_path):
    """train --lead D: layer il's predictor reads the pre-attention state D MoE layers earlier (the
    first layer's past the start), its router prior divides by that layer's attn_norm, eval feeds it
    alike, and the manifest names the layer each predictor reads (what the runtime feeds it)."""
    from edge_preattn.model.layout import read_layout
    from edge_preattn.predictors import evaluate, features
    from edge_preattn.predictors.baselines import router_prior

    assert features.source_layer((0, 1, 2, 3), 3, 1) == 2
    assert features.source_layer((0, 1, 2, 3), 1, 1024) == 0
    assert features.source_layer((1, 3, 5), 5, 1) == 3 and features.source_layer((1, 3, 5), 3, 2) == 1
    traces = TraceSet(traces_dir)
    assert np.array_equal(features.activation(traces, 3, "x_pre", 2), traces.layer(1, "x_pre"))
    assert np.array_equal(features.activation(traces, 3, "x_pre", 0), traces.layer(3, "x_pre"))
    lead = router_prior(moe_ref_a, (3,), "x_pre", {3: 1})[3]
    own = router_prior(moe_ref_a, (3,), "x_pre")[3]
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(moe_ref_a).tensors}
    norm = {
        il: np.asarray(tensors[f"blk.{il}.attn_norm.weight"].data, np.float32).reshape(-1) for il in (1, 3)
    }
    assert np.allclose(lead * norm[1], own * norm[3], rtol=1e-4, atol=1e-6)  # the same router input
    settings = dataclasses.replace(SETTINGS, epochs=1, prior=True, features="prev-token,prev-x", lead=2)
    manifest = train.train(traces_dir, tmp_path / "p", settings, layers=(3,), device="cpu", progress=False)
    assert manifest["lead"] == 2 and manifest["settings"]["lead"] == 2
    pset = load_predictor_set(tmp_path / "p", fingerprint=traces.fingerprint)
    x, _ = evaluate.set_inputs(pset, traces, 3, np.arange(5))
    assert np.array_equal(x, traces.layer(1, "x_pre")[:5])
    assert evaluate.set_name(pset.manifest) == "preattn-arch2+lead2+prior+prev-token+prev-x"
    assert pset.sources == {3: 1} and manifest["predictors"][0]["source_layer"] == 1
    pset.check_fits(read_layout(moe_ref_a))  # the library serves it (tests/test_history.py)
    for lead_value, feature, source, message in (
        (1, "prev-layer", "x_pre", "not known 1 layers ahead"),
        (-1, "", "x_pre", "--lead must be 0"),
        (1, "", "x_prev", "use it with --input x_pre"),
    ):
        bad = dataclasses.replace(SETTINGS, lead=lead_value, features=feature, input=source)
        with pytest.raises(UserError, match=message):
            train.train(traces_dir, tmp_path / "bad", bad, layers=(3,), device="cpu", progress=False)
    assert not (tmp_path / "bad").exists()


def test_prev_router_trains_exports_and_evaluates_and_the_host_predictor_refuses_it(
    traces_dir, moe_ref_a, llama_lib, tmp_path
):
    """The previous token's router input as a history input: trained and exported after prev-x, scored
    by eval, read by the library's reader (its columns of W1 come after prev-x's, d of them); the
    runtime feeds it in the model's graph only (patch 26) and refuses it on the host in one line."""
    from edge_preattn.model.layout import read_layout
    from edge_preattn.predictors import evaluate
    from edge_preattn.predictors.predictor_weights import MlpWeights, read_predictor_set
    from edge_preattn.runtime.cache_runtime import CacheRuntime
    from edge_preattn.runtime.options import CacheOptions

    from .test_cache import host_experts_engine

    settings = dataclasses.replace(SETTINGS, epochs=1, prior=True, features="prev-token,prev-x,prev-router")
    manifest = train.train(traces_dir, tmp_path / "p", settings, layers=(2,), device="cpu", progress=False)
    assert manifest["features"] == ["prev-token", "prev-x", "prev-router"]
    traces = TraceSet(traces_dir)
    pset = load_predictor_set(tmp_path / "p", fingerprint=traces.fingerprint)
    assert read_predictor_set(pset)[2].history == ("prev-token", "prev-x", "prev-router")
    # d 6, E 5: the columns of x, prev-token, prev-x, prev-router
    w1 = np.arange(4 * (3 * 6 + 5), dtype=np.float32).reshape(4, -1)
    history = ("prev-token", "prev-x", "prev-router")
    mlp = MlpWeights(w1, np.zeros(4), "silu", np.zeros((5, 4)), np.zeros(5), history=history)
    assert mlp.n_embd == 6 and np.array_equal(mlp.history_columns("prev-router"), w1[:, 17:])
    payload = evaluate.evaluate(traces, {"p": pset}, "m")
    assert payload["methods"]["p"]["mean"]["recall_at_k"] > 0.3
    layout = read_layout(moe_ref_a)
    with host_experts_engine(llama_lib, moe_ref_a) as engine, pytest.raises(UserError) as caught:
        CacheRuntime.for_layout(engine, layout, CacheOptions(n_slots=16, mode="exact", predictors=pset))
    message = str(caught.value)
    assert "prev-router, a history input the library feeds in the model's graph only" in message
    assert "--predictor-device gpu" in message and "\n" not in message


def test_a_set_with_history_inputs_refuses_a_caller_without_them(tmp_path):
    from edge_preattn.predictors import onnx_io

    model = Predictor(2, 8, 4, hidden=4, n_extra=4)
    x, extra = np.zeros((3, 8), np.float32), {"prev_token": np.zeros((3, 4), np.float32)}
    entry = onnx_io.export_layer(model, tmp_path, 0, x, extra)
    fields = {"fingerprint": "f" * 64, "k": 2, "n_expert": 4, "n_embd": 8, "input": "x_pre"}
    onnx_io.write_manifest(tmp_path, fields | {"features": ["prev-token"], "predictors": [entry]})
    pset = load_predictor_set(tmp_path)
    assert pset.scores(0, x, extra).shape == (3, 4)
    with pytest.raises(UserError, match="history inputs"):
        pset.scores(0, x)


@pytest.mark.parametrize("arch", [1, 2])
@pytest.mark.parametrize("rank", [0, 3])
def test_parameter_formula_counts_the_module(arch, rank):
    """bench/accuracy_ablation.py sizes a Qwen3-30B-A3B set by formula: it is the module's own count."""
    for prior, n_extra in ((False, 0), (True, 10)):
        model = Predictor(
            arch, 12, 5, 16, n_extra=n_extra, prior=torch.randn(5, 12) if prior else None, rank=rank
        )
        parts = parameter_formula(arch, 12, 5, 16, n_extra=n_extra, prior=prior, rank=rank)
        assert parts["total"] == model.parameter_count() == sum(v for k, v in parts.items() if k != "total")
    assert parameter_formula(2, 2048, 128, 128, n_extra=256, prior=True)["total"] == 578305  # the table's


def test_low_rank_trains_exports_and_matches_torch(traces_dir, tmp_path):
    """train --rank R: W1 as two Linears through R columns, fewer numbers, onnxruntime = torch."""
    settings = dataclasses.replace(SETTINGS, epochs=1, rank=4)
    manifest = train.train(traces_dir, tmp_path, settings, layers=(0,), device="cpu", progress=False)
    traces = TraceSet(traces_dir)
    model = Predictor(2, traces.n_embd, traces.n_expert, SETTINGS.hidden, rank=4)
    model.load_state_dict(
        torch.load(tmp_path / "checkpoints" / "layer-000.pt", weights_only=True)["best_model"]
    )
    full = parameter_formula(2, traces.n_embd, traces.n_expert, SETTINGS.hidden)["total"]
    assert manifest["rank"] == 4 and manifest["settings"]["rank"] == 4
    assert manifest["parameters_per_layer"] == model.parameter_count() < full
    x = traces.layer(0, "x_pre")[:64].astype(np.float32)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    found = load_predictor_set(tmp_path, fingerprint=traces.fingerprint).scores(0, x)
    assert np.abs(found - expected).max() < 1e-4
    assert "rank" not in dataclasses.replace(settings, rank=0).as_dict()  # older checkpoints still resume
