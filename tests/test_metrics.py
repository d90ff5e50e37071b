"""Accuracy metrics, baselines and `edge-preattn eval`, on hand-made inputs with known answers."""

import json
from pathlib import Path

import numpy as np
import pytest

from edge_preattn import cli
from edge_preattn.errors import UserError
from edge_preattn.predictors import baselines, eval_report, evaluate, metrics, train
from edge_preattn.traces.trace_set import TraceSet

FINGERPRINT = "f" * 64


# ---- metrics -------------------------------------------------------------------------------------


def test_ranked_breaks_ties_by_lower_id_and_clips_to_the_number_of_experts():
    scores = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], np.float16)
    assert metrics.ranked(scores, 3).tolist() == [[1, 2, 0], [0, 1, 2]]
    assert metrics.ranked(scores, 10).shape == (2, 4)


def test_margins():
    assert metrics.margins(1) == (1,)
    assert metrics.margins(2) == (1, 2)
    assert metrics.margins(3) == (1, 2, 3)
    assert metrics.margins(8) == (1, 4, 8)


def test_every_metric_on_a_hand_made_case():
    true = np.array([[0, 1], [0, 1], [0, 1], [2, 3]])  # k = 2
    ranked = np.array([[1, 0, 5, 4], [0, 5, 1, 4], [5, 4, 3, 0], [3, 2, 0, 1]])
    assert metrics.exact_set(ranked, true).tolist() == [1, 0, 0, 1]
    assert metrics.recall_at_k(ranked, true).tolist() == [1, 0.5, 0, 1]
    assert metrics.top1(ranked, true).tolist() == [1, 1, 0, 1]
    assert metrics.recall_at_k_plus_m(ranked, true, 1).tolist() == [1, 1, 0, 1]
    assert metrics.cover_at_k_plus_m(ranked, true, 1).tolist() == [1, 1, 0, 1]
    assert metrics.recall_at_k_plus_m(ranked, true, 2).tolist() == [1, 1, 0.5, 1]
    assert metrics.cover_at_k_plus_m(ranked, true, 2).tolist() == [1, 1, 0, 1]
    summary = metrics.summarize(ranked, true)
    assert summary == {
        "exact_set": 0.5,
        "recall_at_k": 0.625,
        "top1": 0.75,
        "recall_at_k_plus_m": {"1": 0.75, "2": 0.875},
        "cover_at_k_plus_m": {"1": 0.75, "2": 0.75},
    }
    assert metrics.summarize(ranked, true, mask=np.array([0, 0, 1, 1], bool))["recall_at_k"] == 0.5


def test_k_equal_one():
    true = np.array([[3], [1]])
    ranked = np.array([[3, 0], [0, 1]])
    summary = metrics.per_token(ranked, true)
    assert summary["exact_set"].tolist() == summary["recall_at_k"].tolist() == [1, 0]
    assert summary["top1"].tolist() == [1, 0]
    assert list(summary["recall_at_k_plus_m"]) == [1]
    assert summary["recall_at_k_plus_m"][1].tolist() == summary["cover_at_k_plus_m"][1].tolist() == [1, 1]


def test_ties_in_scores_and_duplicates_count_once():
    scores = np.array([[0.5, 0.5, 0.5, 0.1]])  # experts 0, 1, 2 tie: ranked 0, 1, 2
    true = np.array([[2, 0]])
    ranked = metrics.ranked(scores, 4)
    assert metrics.recall_at_k(ranked, true).tolist() == [0.5]
    assert metrics.exact_set(ranked, true).tolist() == [0]
    assert metrics.top1(ranked, true).tolist() == [1]
    assert metrics.cover_at_k_plus_m(ranked, true, 1).tolist() == [1]
    duplicated = np.array([[0, 0, 1, 2]])
    assert metrics.recall_at_k(duplicated, np.array([[0, 1]])).tolist() == [0.5]
    assert metrics.exact_set(duplicated, np.array([[0, 1]])).tolist() == [0]


def test_too_short_a_ranked_list_is_refused_unless_it_holds_every_expert():
    with pytest.raises(ValueError):
        metrics.per_token(np.array([[0, 1]]), np.array([[0, 1]]))
    # E = 3 < 2k: a list of all 3 experts is complete
    assert (
        metrics.summarize(np.array([[1, 0, 2]]), np.array([[0, 2]]), n_expert=3)["cover_at_k_plus_m"]["1"]
        == 1
    )


# ---- baselines -----------------------------------------------------------------------------------


def test_popularity_counts_and_fill():
    order = baselines.popularity_order(np.array([[0, 1], [1, 2], [1, 3], [2, 0]]), 5)
    assert order.tolist() == [1, 0, 2, 3, 4]  # 1 ×3; 0 and 2 ×2 (lower id first); 3 ×1; 4 never
    assert baselines.popularity(order, 2, 3).tolist() == [[1, 0, 2], [1, 0, 2]]
    assert baselines.fill(np.array([[3, 4], [0, 1]]), order, 4).tolist() == [[3, 4, 1, 0], [0, 1, 2, 3]]


def test_prev_token_restarts_at_each_prompt():
    ids = np.array([[0, 1], [2, 3], [4, 0], [1, 2]])
    prompt = np.array([7, 7, 8, 8])
    order = np.array([1, 0, 2, 3, 4])
    assert baselines.prev_token(ids, prompt, order, 3).tolist() == [
        [1, 0, 2],
        [0, 1, 2],
        [1, 0, 2],
        [4, 0, 1],
    ]
    assert metrics.summarize(baselines.oracle(ids, order, 4), ids)["exact_set"] == 1.0


def test_lru_hits_by_hand():
    ids = np.array([[0, 1], [1, 2], [0, 3], [2, 1]])  # k = 2, 3 slots
    # cache (LRU → MRU) before each token: [], [0 1], [0 1 2], [2 0 3] (1 evicted)
    hits, first = baselines.lru_simulate(ids, np.zeros(4), 3)
    assert hits.tolist() == [0, 1, 1, 1]
    assert first.tolist() == [False, True, True, True]
    two_prompts = np.array([0, 0, 1, 1])
    assert baselines.lru_simulate(ids, two_prompts, 3)[0].tolist() == [0, 1, 0, 0]  # cleared at prompt 1
    assert baselines.lru_simulate(ids, two_prompts, 3, carry=True)[0].tolist() == [0, 1, 1, 1]
    scored = baselines.lru(ids, np.zeros(4), 3)
    assert scored["recall_at_k"].tolist() == [0, 0.5, 0.5, 0.5]
    assert scored["exact_set"].tolist() == [0, 0, 0, 0]
    # all of a token's experts are looked up before any is inserted: no self-eviction of a hit
    assert baselines.lru_simulate(np.array([[0, 1], [2, 0]]), np.zeros(2), 2)[0].tolist() == [0, 1]


def test_lru_of_k_slots_is_the_previous_token():
    rng = np.random.default_rng(0)
    ids = np.stack([rng.choice(8, 3, replace=False) for _ in range(200)])  # k = 3 of 8
    prompt = np.repeat(np.arange(5), 40)
    order = np.arange(8)
    later = ~baselines.first_of_prompt(prompt)
    lru_recall = baselines.lru(ids, prompt, 3)["recall_at_k"]
    prev_recall = metrics.recall_at_k(baselines.prev_token(ids, prompt, order, 6), ids)
    assert np.array_equal(lru_recall[later], prev_recall[later])
    assert (lru_recall[~later] == 0).all()
    assert baselines.lru_capacities(8, 64) == (8, 16, 32)
    assert baselines.lru_capacities(2, 4) == (2,)


# ---- eval on a fake trace folder -----------------------------------------------------------------

D, E, K, LAYERS = 16, 8, 2, (0, 1, 2)


def write_traces(
    directory: Path, prompts: int = 8, prefill: int = 6, decode: int = 5
) -> dict[int, np.ndarray]:
    """A trace folder in collect's format (2 shards); returns each layer's router weight [E, D]."""
    rng = np.random.default_rng(1)
    routers = {il: rng.standard_normal((E, D)).astype(np.float32) for il in LAYERS}
    directory.mkdir()
    shards = []
    for number, group in enumerate((range(0, prompts // 2), range(prompts // 2, prompts))):
        n = len(group) * (prefill + decode)
        arrays = {
            "tokens": rng.integers(0, 100, n).astype(np.int32),
            "positions": np.tile(np.arange(prefill + decode), len(group)).astype(np.int32),
            "prompt": np.repeat(np.array(list(group)), prefill + decode).astype(np.int32),
            "phase": np.tile(np.r_[np.zeros(prefill), np.ones(decode)], len(group)).astype(np.int8),
        }
        x = rng.standard_normal((n, D)).astype(np.float32)
        arrays["L000.x_prev"] = x.astype(np.float16)
        for il in LAYERS:
            x_pre = x + 0.3 * rng.standard_normal((n, D)).astype(np.float32)  # the residual drifts
            x_router = x_pre + 0.3 * rng.standard_normal((n, D)).astype(np.float32)
            logits = x_router @ routers[il].T  # [n, E]
            probs = np.exp(logits - logits.max(1, keepdims=True))
            arrays[f"L{il:03d}.x_pre"] = x_pre.astype(np.float16)
            arrays[f"L{il:03d}.x_router"] = x_router.astype(np.float16)
            arrays[f"L{il:03d}.probs"] = (probs / probs.sum(1, keepdims=True)).astype(np.float16)
            arrays[f"L{il:03d}.ids"] = metrics.ranked(logits, K).astype(np.int16)
            x = x_router
        shard = directory / f"shard-{number:05d}"
        shard.mkdir()
        for name, array in arrays.items():
            np.save(shard / f"{name}.npy", array)
        shards.append({"name": shard.name, "tokens": n})
    layout = {"arch": "fake", "n_layer": 3, "n_embd": D, "n_expert": E, "n_expert_used": K}
    layout |= {"gating": "softmax", "moe_layers": list(LAYERS)}
    manifest = {"model": "/models/fake-moe.gguf", "fingerprint": FINGERPRINT, "layout": layout}
    (directory / "manifest.json").write_text(json.dumps(manifest | {"settings": {}, "shards": shards}))
    return routers


class StandIn:
    """The PredictorSet API: scores = x @ (the true router)ᵀ, so accuracy is high but not perfect."""

    def __init__(self, routers, source="x_pre", arch=2, val=(1, 6), fingerprint=FINGERPRINT):
        self.routers, self.layers, self.k, self.n_expert, self.n_embd = routers, LAYERS, K, E, D
        self.manifest = {"fingerprint": fingerprint, "input": source, "arch": arch, "loss": "wbce"}
        self.manifest["validation_prompts"] = list(val)

    def scores(self, il: int, x: np.ndarray) -> np.ndarray:
        assert x.dtype == np.float32 and x.shape[1] == D
        return x @ self.routers[il].T


def check_block(block: dict, n_layers: int) -> None:
    for name in metrics.METRICS:
        assert len(block["per_layer"][name]) == n_layers
        assert 0 <= block["mean"][name] <= 1 and 0 <= block["first_layer"][name] <= 1
    for name in metrics.MARGIN_METRICS:
        assert set(block["per_layer"][name]) == {str(m) for m in metrics.margins(K)}
        for values in block["per_layer"][name].values():
            assert len(values) == n_layers and all(0 <= v <= 1 for v in values)


def test_eval_writes_well_formed_results(tmp_path):
    routers = write_traces(tmp_path / "traces")
    sets = {"preattn-arch2": StandIn(routers), "cross-layer": StandIn(routers, "x_prev")}
    payload = evaluate.evaluate(TraceSet(tmp_path / "traces"), sets, "fake")
    paths = eval_report.write_reports(payload, tmp_path / "out", "fake")
    written = json.loads(paths[0].read_text())
    assert written == json.loads(json.dumps(payload))
    assert {"model", "fingerprint", "k", "n_expert", "moe_layers", "heldout_tokens", "methods"} <= set(
        written
    )
    assert written["heldout_tokens"] == 2 * 11 and written["moe_layers"] == list(LAYERS)
    assert set(written["methods"]) == {
        "preattn-arch2", "cross-layer", "popularity", "prev-token", "lru-2", "lru-4", "oracle",
    }  # fmt: skip
    for name, method in written["methods"].items():
        check_block(method, len(LAYERS))
        assert set(method["subsets"]) == {"prefill", "decode"}, name
        for subset in method["subsets"].values():
            check_block(subset, len(LAYERS))
    oracle = written["methods"]["oracle"]["mean"]
    assert oracle["exact_set"] == oracle["top1"] == oracle["cover_at_k_plus_m"]["1"] == 1.0
    pre, cross = (written["methods"][n]["mean"]["recall_at_k"] for n in ("preattn-arch2", "cross-layer"))
    assert pre > cross > written["methods"]["popularity"]["mean"]["recall_at_k"]
    assert "| preattn-arch2 |" in paths[1].read_text()
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths[2:])


def test_eval_refuses_another_model_and_another_split(tmp_path):
    routers = write_traces(tmp_path / "traces")
    traces = TraceSet(tmp_path / "traces")
    with pytest.raises(UserError, match="another model"):
        evaluate.evaluate(traces, {"p": StandIn(routers, fingerprint="0" * 64)}, "fake")
    with pytest.raises(UserError, match="other prompts"):
        evaluate.evaluate(traces, {"p": StandIn(routers), "x": StandIn(routers, "x_prev", val=(2,))}, "f")


def test_eval_command(tmp_path, monkeypatch, capsys):
    routers = write_traces(tmp_path / "traces")
    made = {"pre": StandIn(routers, arch=1), "xl": StandIn(routers, "x_prev")}
    monkeypatch.setattr(
        evaluate, "load_set", lambda directory, fingerprint, int8, fp16=False: made[directory.name]
    )
    out = tmp_path / "results"
    argv = ["eval", str(tmp_path / "traces"), str(tmp_path / "pre"), "--cross-layer", str(tmp_path / "xl")]
    assert cli.main([*argv, "-o", str(out)]) == 0
    written = json.loads((out / "accuracy-fake-moe.json").read_text())
    assert list(written["methods"])[:2] == ["preattn-arch1", "cross-layer"]
    assert "recall@k by phase" in capsys.readouterr().out
    swapped = ["eval", str(tmp_path / "traces"), str(tmp_path / "xl")]
    assert cli.main([*swapped, "-o", str(out)]) == 2  # a cross-layer set given as the pre-attention one
    assert "--cross-layer" in capsys.readouterr().err


def test_eval_reads_predictors_written_by_onnx_io(tmp_path):
    torch = pytest.importorskip("torch")
    from edge_preattn.predictors import onnx_io
    from edge_preattn.predictors.networks import Predictor

    write_traces(tmp_path / "traces")
    traces = TraceSet(tmp_path / "traces")
    out = tmp_path / "predictors"
    out.mkdir()
    torch.manual_seed(0)
    entries = [
        onnx_io.export_layer(Predictor(2, D, E, hidden=8), out, il, traces.layer(il, "x_pre")[:32])
        for il in LAYERS
    ]
    fields = {"fingerprint": FINGERPRINT, "k": K, "n_expert": E, "n_embd": D, "input": "x_pre", "arch": 2}
    onnx_io.write_manifest(out, fields | {"loss": "rank", "validation_prompts": [3], "predictors": entries})
    pset = evaluate.load_set(out, FINGERPRINT)
    payload = evaluate.evaluate(traces, {"preattn-arch2": pset}, "fake")
    assert payload["heldout_tokens"] == 11
    check_block(payload["methods"]["preattn-arch2"], len(LAYERS))
    with pytest.raises(UserError):
        evaluate.load_set(out, "0" * 64)


def test_eval_heldout_scores_every_prompt_and_refuses_unnamed_traces(tmp_path):
    routers = write_traces(tmp_path / "traces")
    write_traces(tmp_path / "other", prompts=6)
    traces, other = TraceSet(tmp_path / "traces"), TraceSet(tmp_path / "other")
    named = StandIn(routers)
    named.manifest["traces_id"] = train.traces_id(traces)
    with pytest.raises(UserError, match="--heldout"):
        evaluate.evaluate(other, {"p": named}, "fake")  # its validation indices mean nothing there
    payload = evaluate.evaluate(traces, {"p": named}, "fake", heldout=other)
    assert payload["heldout_tokens"] == len(other.meta()["prompt"])
    assert payload["heldout_prompts"] == sorted(set(other.meta()["prompt"].tolist()))
    assert payload["heldout_traces"] == str(other.directory)
    with pytest.raises(UserError, match="trained on"):
        evaluate.evaluate(traces, {"p": named}, "fake", heldout=traces)


def test_router_prior_row_is_the_router_on_the_mapped_pre_attention_state(tmp_path):
    routers = write_traces(tmp_path / "traces")
    traces = TraceSet(tmp_path / "traces")
    priors = {il: routers[il] for il in LAYERS}  # unit norms: the prior is the router itself
    payload = evaluate.evaluate(traces, {"p": StandIn(routers)}, "fake", priors=priors)
    row, stand_in = payload["methods"]["router-prior"], payload["methods"]["p"]
    assert row["per_layer"]["recall_at_k"] == stand_in["per_layer"]["recall_at_k"]
