"""synth.py: files llama.cpp loads and runs, at the real models' sizes, written atomically and fast."""

import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from edge_preattn import cli
from edge_preattn.errors import UserError
from edge_preattn.model import synth
from edge_preattn.model.presets import PRESETS, expected_params, tensor_plan
from edge_preattn.model.synth import write_synthetic

Q4_0, Q8_0, F32 = (gguf.GGMLQuantizationType[n] for n in ("Q4_0", "Q8_0", "F32"))
BIG = ("qwen3-30b-a3b", "deepseek-v2-lite", "phi-mini-moe")
TINY = ("tiny", "tiny-deepseek2")


def greedy(llama_cpp, path: Path, n: int = 4, prompt: bytes = b"Hello world") -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits that chose them, from stock llama-cpp-python calls."""
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_batch=64, n_threads=2, verbose=False, use_extra_bufts=False)
    try:
        n_vocab = llm.n_vocab()
        llm.eval(llm.tokenize(prompt))
        tokens, rows = [], []
        for _ in range(n):
            logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            rows.append(np.ctypeslib.as_array(logits, shape=(n_vocab,)).copy())  # logits: [n_vocab]
            tokens.append(int(np.argmax(rows[-1])))
            llm.eval([tokens[-1]])
    finally:
        llm.close()
    return tokens, np.stack(rows)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Real writes, made once per module and deleted after it (the 2-layer big presets are ~0.5-1.2 GB)."""
    root = tmp_path_factory.mktemp("synth")
    files: dict[str, synth.SynthResult] = {}

    def get(preset: str) -> synth.SynthResult:
        if preset not in files:
            layers = 2 if preset in BIG else None
            files[preset] = write_synthetic(preset, root / f"{preset}.gguf", layers, progress=False)
        return files[preset]

    yield get
    for result in files.values():
        result.path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def sparse_full(tmp_path_factory):
    """Full-size presets as sparse files (true size, no disk), each read back once with GGUFReader."""
    root = tmp_path_factory.mktemp("sparse")
    cache: dict[str, tuple[synth.SynthResult, gguf.GGUFReader]] = {}

    def get(preset: str):
        if preset not in cache:
            result = write_synthetic(preset, root / f"{preset}.gguf", sparse=True, progress=False)
            cache[preset] = (result, gguf.GGUFReader(result.path))
        return cache[preset]

    return get


@pytest.mark.parametrize("preset", TINY)
def test_tiny_presets_write_in_a_blink_and_generate(llama_lib, tmp_path, preset):
    started = time.monotonic()
    result = write_synthetic(preset, tmp_path / "m.gguf", progress=False)
    assert time.monotonic() - started < 5  # about 0.1 s here; the brief's budget is ~1 s
    assert result.bytes_written == result.path.stat().st_size < 8 * 1024**2
    assert result.params == expected_params(PRESETS[preset])
    tokens, logits = greedy(llama_lib, result.path, n=6)
    assert np.isfinite(logits).all()
    assert 0.3 < logits.std() < 3  # logits of std ≈ 1: weights are scaled, not blown up or vanished
    assert len(set(tokens)) > 1  # not one token forever: the hidden state still depends on the input


@pytest.mark.parametrize("preset", BIG)
def test_two_layers_of_each_real_config_load_and_give_finite_logits(llama_lib, written, preset):
    result = written(preset)
    assert result.params == expected_params(PRESETS[preset], 2)
    _, logits = greedy(llama_lib, result.path, n=3)
    assert logits.shape[1] == PRESETS[preset].n_vocab
    assert np.isfinite(logits).all() and 0.3 < logits.std() < 3


def test_the_tokenizer_round_trips_text_through_llama_cpp(llama_lib, written):
    llm = llama_lib.Llama(str(written("tiny").path), n_ctx=32, verbose=False, vocab_only=True)
    try:
        text = "Hello world, naïve café ☃\n\tdone"
        ids = llm.tokenize(text.encode(), add_bos=False)
        assert llm.detokenize(ids).decode().strip() == text.strip()
        assert llm.tokenize(b"hi")[0] == llm.token_bos() == 1 and llm.token_eos() == 2
        assert max(ids) < 512 and any(3 <= i < 259 for i in ids)  # byte fallback for what has no piece
    finally:
        llm.close()


@pytest.mark.parametrize("preset", BIG)
def test_full_presets_have_the_model_cards_parameter_count(sparse_full, preset):
    result, reader = sparse_full(preset)
    config = PRESETS[preset]
    counted = sum(int(t.n_elements) for t in reader.tensors)
    assert counted == result.params == expected_params(config)
    assert abs(counted / config.card_params - 1) < 0.01
    # sparse: the true size on paper, almost nothing on disk
    assert result.path.stat().st_size == result.bytes_written
    assert result.path.stat().st_blocks * 512 < 64 * 1024**2
    planned = sum(s.nbytes + (-s.nbytes % 32) for s in tensor_plan(config))
    assert result.bytes_written == int(reader.data_offset) + planned


# (name, ne in ggml order, type) as src/models/<arch>.cpp creates them in the vendored llama.cpp
EXPECTED_TENSORS = {
    "qwen3-30b-a3b": [
        ("token_embd.weight", (2048, 151936), Q4_0),
        ("output.weight", (2048, 151936), Q8_0),
        ("blk.0.attn_q.weight", (2048, 4096), Q4_0),  # 32 heads x 128, wider than n_embd
        ("blk.0.attn_k.weight", (2048, 512), Q4_0),
        ("blk.0.attn_output.weight", (4096, 2048), Q4_0),
        ("blk.0.attn_q_norm.weight", (128,), F32),
        ("blk.47.ffn_gate_inp.weight", (2048, 128), F32),
        ("blk.47.ffn_gate_exps.weight", (2048, 768, 128), Q4_0),
        ("blk.47.ffn_down_exps.weight", (768, 2048, 128), Q4_0),
    ],
    "deepseek-v2-lite": [
        ("blk.0.attn_q.weight", (2048, 16 * 192), Q4_0),  # no q LoRA in Lite
        ("blk.0.attn_kv_a_mqa.weight", (2048, 512 + 64), Q4_0),
        ("blk.0.attn_kv_a_norm.weight", (512,), F32),
        ("blk.0.attn_k_b.weight", (128, 512, 16), Q4_0),  # MLA split, as current converters write it
        ("blk.0.attn_v_b.weight", (512, 128, 16), Q4_0),
        ("blk.0.attn_output.weight", (2048, 2048), Q4_0),
        ("blk.0.ffn_gate.weight", (2048, 10944), Q4_0),  # the one dense leading layer
        ("blk.26.ffn_gate_inp.weight", (2048, 64), F32),
        ("blk.26.ffn_up_exps.weight", (2048, 1408, 64), Q4_0),
        ("blk.26.ffn_down_shexp.weight", (2 * 1408, 2048), Q4_0),
    ],
    "phi-mini-moe": [
        ("output.weight", (4096, 32064), Q8_0),
        ("output.bias", (32064,), F32),
        ("output_norm.bias", (4096,), F32),
        ("blk.0.attn_norm.bias", (4096,), F32),
        ("blk.0.attn_k.weight", (4096, 1024), Q4_0),
        ("blk.0.attn_k.bias", (1024,), F32),
        ("blk.0.attn_output.bias", (4096,), F32),
        ("blk.31.ffn_up_exps.weight", (4096, 960, 16), Q4_0),
    ],
}
ABSENT = {
    "qwen3-30b-a3b": ["blk.48.attn_norm.weight", "blk.0.attn_q.bias"],
    "deepseek-v2-lite": ["blk.0.attn_kv_b.weight", "blk.0.ffn_gate_inp.weight", "blk.1.ffn_gate.weight"],
    "phi-mini-moe": ["blk.0.attn_q_norm.weight"],
}
EXPECTED_KEYS = {
    "qwen3-30b-a3b": {
        "qwen3moe.block_count": 48,
        "qwen3moe.expert_feed_forward_length": 768,
        "qwen3moe.attention.key_length": 128,
        "qwen3moe.attention.head_count_kv": 4,
        "qwen3moe.expert_used_count": 8,
        "qwen3moe.rope.freq_base": 1e6,
    },
    "deepseek-v2-lite": {
        "deepseek2.leading_dense_block_count": 1,
        "deepseek2.expert_shared_count": 2,
        "deepseek2.expert_used_count": 6,
        "deepseek2.attention.kv_lora_rank": 512,
        "deepseek2.attention.key_length_mla": 192,
        "deepseek2.attention.value_length_mla": 128,
        "deepseek2.attention.head_count_kv": 1,
        "deepseek2.rope.dimension_count": 64,
        "deepseek2.expert_gating_func": 1,
        "deepseek2.expert_weights_scale": 1.0,
    },
    "phi-mini-moe": {"phimoe.feed_forward_length": 960, "phimoe.attention.head_count_kv": 8},
}


@pytest.mark.parametrize("preset", BIG)
def test_tensor_names_shapes_types_and_keys_are_what_llama_cpp_loads(sparse_full, preset):
    _, reader = sparse_full(preset)
    tensors = {t.name: (tuple(int(d) for d in t.shape), t.tensor_type) for t in reader.tensors}
    for name, ne, ggml_type in EXPECTED_TENSORS[preset]:
        assert tensors[name] == (ne, ggml_type), name
    assert not set(ABSENT[preset]) & set(tensors)
    assert all(t == F32 for name, (_, t) in tensors.items() if "norm" in name or name.endswith(".bias"))
    for key, value in EXPECTED_KEYS[preset].items():
        assert reader.fields[key].contents() == pytest.approx(value), key
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == PRESETS[preset].n_vocab


@pytest.mark.parametrize("preset", ["tiny", "qwen3-30b-a3b"])
def test_a_sparse_write_has_the_exact_size_and_header_of_a_real_one(written, tmp_path, preset):
    real = written(preset)
    layers = 2 if preset in BIG else None
    sparse = write_synthetic(preset, tmp_path / "s.gguf", layers, sparse=True, progress=False)
    assert sparse.path.stat().st_size == real.path.stat().st_size == sparse.bytes_written
    plan = tensor_plan(PRESETS[preset], layers)
    header = sparse.bytes_written - sum(s.nbytes + (-s.nbytes % 32) for s in plan)
    with open(real.path, "rb") as a, open(sparse.path, "rb") as b:
        assert a.read(header) == b.read(header)


def test_seeds_are_reproducible_and_fewer_layers_are_a_prefix(tmp_path):
    a, b, c = (
        write_synthetic("tiny", tmp_path / f"{n}.gguf", seed=s, progress=False)
        for n, s in (("a", 0), ("b", 0), ("c", 1))
    )
    assert a.path.read_bytes() == b.path.read_bytes() != c.path.read_bytes()
    short = write_synthetic("tiny", tmp_path / "short.gguf", n_layers=2, progress=False)
    full = {t.name: t.data for t in gguf.GGUFReader(a.path).tensors}
    kept = {t.name: t.data for t in gguf.GGUFReader(short.path).tensors}
    assert "blk.2.attn_q.weight" not in kept and "blk.1.attn_q.weight" in kept
    for name, data in kept.items():
        assert np.array_equal(data, full[name]), name


def test_weights_have_their_planned_scale_and_every_expert_is_distinct(written):
    reader = gguf.GGUFReader(written("tiny-deepseek2").path)
    weights = {t.name: dequantize(t.data, t.tensor_type) for t in reader.tensors}
    plan = {spec.name: spec for spec in tensor_plan(PRESETS["tiny-deepseek2"])}
    assert set(weights) == set(plan)
    for name, w in weights.items():
        if plan[name].init == "ones":
            assert (w == 1).all(), name
        else:
            assert w.std() == pytest.approx(plan[name].std, rel=0.15), name
            assert abs(w.mean()) < 0.1 * w.std(), name
    fan_in = weights["blk.0.attn_q.weight"].shape[-1]  # numpy order: the last axis is ggml's ne[0]
    assert plan["blk.0.attn_q.weight"].std == pytest.approx(fan_in**-0.5)
    assert plan["blk.1.ffn_down_exps.weight"].std < plan["blk.1.ffn_up_exps.weight"].std  # residual writer
    experts = weights["blk.1.ffn_up_exps.weight"]  # experts: [n_expert, n_ff_exp, n_embd]
    assert np.linalg.matrix_rank(experts.reshape(len(experts), -1)) == len(experts)
    assert "blk.0.ffn_gate_exps.weight" not in weights and "blk.0.ffn_gate.weight" in weights


def test_routing_of_a_random_model_is_spread_over_experts(llama_lib, written):
    from edge_preattn.model.engine import Engine, EngineConfig
    from edge_preattn.traces.hooks import Hooks

    chosen: dict[int, list[np.ndarray]] = {}
    with Engine(llama_lib, EngineConfig(str(written("tiny").path), n_ctx=128)) as engine:
        if engine.api.patch_version() < 2:
            pytest.skip("this llama.cpp build has no routing hook")
        with Hooks(
            engine.api, engine.ctx, None, lambda r: chosen.setdefault(r.layer, []).append(r.ids.copy())
        ):
            list(engine.generate("The quick brown fox jumps over the lazy dog, 0123456789 times.", 4))
    assert sorted(chosen) == [0, 1, 2, 3]
    # the last layer's FFN runs only on the rows llama.cpp outputs (one per step): judge the others
    for layer in (0, 1, 2):
        ids = np.concatenate(chosen[layer])  # ids: [n_tokens, 4]
        assert len(ids) >= 16
        assert len(np.unique(ids)) >= 12, layer  # of 16 experts
        assert len({tuple(sorted(row)) for row in ids}) > len(ids) // 2, layer


def test_an_interrupted_write_leaves_nothing_behind(tmp_path, monkeypatch):
    real_chunks = synth._chunks

    def interrupted(spec, seed):
        yield from real_chunks(spec, seed)
        if "ffn_up_exps" in spec.name:
            raise KeyboardInterrupt

    monkeypatch.setattr(synth, "_chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic("tiny", tmp_path / "m.gguf", progress=False)
    assert os.listdir(tmp_path) == []


def test_bad_requests_are_one_line_user_errors(tmp_path, capsys):
    for kwargs in (
        {"preset": "qwen9"},
        {"preset": "tiny", "n_layers": 0},
        {"preset": "tiny", "n_layers": 5},
        {"preset": "tiny", "qtype": "q2_k"},
        {"preset": "tiny", "path": tmp_path / "no" / "m.gguf"},
    ):
        with pytest.raises(UserError) as error:
            write_synthetic(**{"path": tmp_path / "m.gguf", **kwargs}, progress=False)
        assert "\n" not in str(error.value)
    assert cli.main(["synth", "--preset", "tiny", "--layers", "9", "-o", str(tmp_path / "m.gguf")]) == 2
    assert "between 1 and 4" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_the_command_writes_and_reports_its_rate(tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert (
        cli.main(["synth", "--preset", "tiny-deepseek2", "--layers", "2", "--type", "q4_0", "-o", str(out)])
        == 0
    )
    assert "MB/s" in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    assert reader.fields["deepseek2.block_count"].contents() == 2
    assert reader.fields["deepseek2.leading_dense_block_count"].contents() == 1
    assert {t.tensor_type for t in reader.tensors} == {Q4_0, Q8_0, F32}  # q8_0: output.weight
