"""Widened models: zero-padded experts of a real size compute the same function with the same routing."""

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from edge_preattn import cli
from edge_preattn.errors import UserError
from edge_preattn.model import widen
from edge_preattn.model.engine import Engine, EngineConfig, Sampling
from edge_preattn.model.layout import read_layout
from edge_preattn.predictors.onnx_io import load_predictor_set
from edge_preattn.runtime.cache_runtime import record_routing
from edge_preattn.runtime.run import DEFAULT_MODEL, DEFAULT_PREDICTORS

PROMPT = "def fibonacci(n):\n    if n < 2:\n"
N_PREDICT = 12


def tokens_logits_routing(llama_lib, model) -> tuple[list[int], np.ndarray, dict]:
    with Engine(llama_lib, EngineConfig.host_experts(model, 256)) as engine:
        logits: list[np.ndarray] = []
        tokens = [t for t, _ in engine.generate(PROMPT, N_PREDICT, on_logits=logits.append)]
        routing = record_routing(engine, PROMPT, N_PREDICT, Sampling())
    return tokens, np.stack(logits), routing


@pytest.fixture(scope="module")
def widened(tmp_path_factory):
    out = tmp_path_factory.mktemp("wide") / "default-wide.gguf"
    expert_bytes = read_layout(DEFAULT_MODEL).moe_layers[0].bytes_per_expert
    # a little over 3.5 times the bytes: the width 64 -> 225 is rounded up to 256 (whole q8_0 blocks)
    return widen.widen(DEFAULT_MODEL, 3.5 * expert_bytes + 1, out)


def test_widened_experts_have_the_target_size_and_zero_padding(widened):
    assert widened.n_ff_from == 64
    assert widened.n_ff_to == 256
    assert widened.expert_bytes_to == 4 * widened.expert_bytes_from
    layout = read_layout(widened.path)
    assert {layer.bytes_per_expert for layer in layout.moe_layers} == {widened.expert_bytes_to}
    original = {t.name: t for t in gguf.GGUFReader(DEFAULT_MODEL).tensors}
    for tensor in gguf.GGUFReader(widened.path).tensors:
        values = dequantize(tensor.data, tensor.tensor_type)
        before = dequantize(original[tensor.name].data, original[tensor.name].tensor_type)
        if tensor.name.endswith(("ffn_gate_exps.weight", "ffn_up_exps.weight")):
            np.testing.assert_array_equal(values[:, :64], before)
            assert not values[:, 64:].any()
        elif tensor.name.endswith("ffn_down_exps.weight"):
            np.testing.assert_array_equal(values[..., :64], before)
            assert not values[..., 64:].any()
        else:
            np.testing.assert_array_equal(values, before)


def test_a_widened_model_gives_the_originals_tokens_logits_and_routing(llama_lib, widened):
    tokens, logits, routing = tokens_logits_routing(llama_lib, DEFAULT_MODEL)
    wide_tokens, wide_logits, wide_routing = tokens_logits_routing(llama_lib, widened.path)
    assert wide_tokens == tokens
    np.testing.assert_array_equal(wide_logits, logits)
    assert routing.keys() == wide_routing.keys()
    for key, ids in routing.items():
        np.testing.assert_array_equal(wide_routing[key], ids)


def test_the_originals_predictors_serve_the_widened_model(widened):
    original, wide = read_layout(DEFAULT_MODEL), read_layout(widened.path)
    assert wide.fingerprint != original.fingerprint  # a different file layout...
    assert wide.routing_fingerprint == original.routing_fingerprint == original.fingerprint  # ...same routing
    predictors = load_predictor_set(DEFAULT_PREDICTORS, fingerprint=wide.routing_fingerprint)
    assert sorted(predictors.layers) == [layer.index for layer in wide.moe_layers]


def test_expert_bytes_like_a_preset():
    # qwen3-30b-a3b: 3 matrices of 2048 x 768 at q4_0 (18 bytes per 32 weights)
    assert widen.parse_target("qwen3-30b-a3b") == 3 * 2048 * 768 // 32 * 18
    assert widen.parse_target("2MiB") == 2 * 1024**2
    with pytest.raises(UserError, match="neither a preset"):
        widen.parse_target("qwen9")


def test_the_command_refuses_its_own_input_and_dense_models(tmp_path, capsys):
    assert cli.main(["synth", "--widen-from", str(DEFAULT_MODEL), "-o", str(DEFAULT_MODEL)]) == 2
    assert "is the model being widened" in capsys.readouterr().err
    dense = tmp_path / "dense.gguf"
    writer = gguf.GGUFWriter(dense, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert cli.main(["synth", "--widen-from", str(dense), "-o", str(tmp_path / "w.gguf")]) == 2
    assert "needs a Mixture-of-Experts GGUF" in capsys.readouterr().err  # read_layout's check, first
    assert not (tmp_path / "w.gguf").exists()
