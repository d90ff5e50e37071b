"""layout.py: MoE layouts of tiny GGUFs written here, of moe-ref-a, and refusals of bad files."""

import dataclasses
import hashlib
import json
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from edge_preattn import cli
from edge_preattn.errors import UserError
from edge_preattn.model.gguf_header import model_fingerprint
from edge_preattn.model.layout import (
    ExpertTensor,
    MoeLayer,
    MoeLayout,
    plan_slots,
    read_layout,
)

from .robustness_log import record

Q8_0, Q4_0, F16, F32 = (gguf.GGMLQuantizationType[n] for n in ("Q8_0", "Q4_0", "F16", "F32"))
BLOCK_BYTES = {Q8_0: 34, Q4_0: 18}  # bytes per block of 32 values, written out by hand
MiB = 1024**2


def _shared_dir() -> Path:
    near = Path(__file__).resolve().parents[2] / "shared"
    return near if near.is_dir() else Path("/work/shared")


REF_MODEL = _shared_dir() / "models" / "moe-ref-a.gguf"


class Gguf:
    """A GGUF being assembled: metadata plus tensors in ggml order, kept for byte comparisons."""

    def __init__(self, arch: str, seed: int = 0) -> None:
        self.arch, self.kv, self.tensors = arch, {}, {}
        self.rng = np.random.default_rng(seed)

    def hp(self, **values: object) -> "Gguf":
        """`attention__head_count=4` sets `<arch>.attention.head_count`."""
        for key, value in values.items():
            self.kv[f"{self.arch}.{key.replace('__', '.')}"] = value
        return self

    def tensor(self, name: str, ggml_type: gguf.GGMLQuantizationType, *ne: int) -> np.ndarray:
        np_shape = tuple(reversed(ne))
        if ggml_type in BLOCK_BYTES:  # raw blocks: (..., ne1, ne0 / 32 * block bytes) uint8
            byte_shape = (*np_shape[:-1], np_shape[-1] // 32 * BLOCK_BYTES[ggml_type])
            data = self.rng.integers(0, 256, size=byte_shape, dtype=np.uint8)
            data.reshape(-1, BLOCK_BYTES[ggml_type])[:, 1] &= 0xBF  # finite float16 scales (|d| < 2)
        else:
            data = self.rng.standard_normal(np_shape).astype(np.float16 if ggml_type == F16 else np.float32)
        self.tensors[name] = (data, ggml_type, int(np.prod(ne)))
        return data

    def write(self, path: Path) -> Path:
        writer = gguf.GGUFWriter(str(path), self.arch)
        for key, value in self.kv.items():
            if isinstance(value, bool):
                writer.add_bool(key, value)
            elif isinstance(value, int):
                writer.add_uint32(key, value)
            elif isinstance(value, float):
                writer.add_float32(key, value)
            else:
                writer.add_string(key, value)
        for name, (data, ggml_type, _) in self.tensors.items():
            writer.add_tensor(name, data, raw_dtype=ggml_type if ggml_type in BLOCK_BYTES else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path

    def total_bytes(self) -> int:
        return sum(data.nbytes for data, _, _ in self.tensors.values())

    def total_params(self) -> int:
        return sum(n for _, _, n in self.tensors.values())


N_EMBD, N_FF, N_EXPERT, N_VOCAB = 64, 32, 4, 96


def _attention(model: Gguf, il: int) -> None:
    for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
        model.tensor(f"blk.{il}.{part}.weight", F16, N_EMBD, N_EMBD)
    model.tensor(f"blk.{il}.attn_norm.weight", F32, N_EMBD)
    model.tensor(f"blk.{il}.ffn_norm.weight", F32, N_EMBD)


def qwen3moe_model() -> Gguf:
    """3 MoE layers whose experts are Q8_0, Q4_0, and mixed F16/Q8_0/Q4_0."""
    model = Gguf("qwen3moe").hp(
        block_count=3, context_length=512, embedding_length=N_EMBD, feed_forward_length=128,
        attention__head_count=4, attention__head_count_kv=2, attention__key_length=16,
        attention__value_length=16, expert_count=N_EXPERT, expert_used_count=2,
        expert_feed_forward_length=N_FF, expert_gating_func=2,  # ignored by llama.cpp's qwen3moe graph
    )  # fmt: skip
    model.tensor("token_embd.weight", F16, N_EMBD, N_VOCAB)
    model.tensor("output_norm.weight", F32, N_EMBD)
    types = [(Q8_0, Q8_0, Q8_0), (Q4_0, Q4_0, Q4_0), (F16, Q8_0, Q4_0)]
    for il, (gate, up, down) in enumerate(types):
        _attention(model, il)
        model.tensor(f"blk.{il}.ffn_gate_inp.weight", F32, N_EMBD, N_EXPERT)
        model.tensor(f"blk.{il}.ffn_gate_exps.weight", gate, N_EMBD, N_FF, N_EXPERT)
        model.tensor(f"blk.{il}.ffn_up_exps.weight", up, N_EMBD, N_FF, N_EXPERT)
        model.tensor(f"blk.{il}.ffn_down_exps.weight", down, N_FF, N_EMBD, N_EXPERT)
    return model


def deepseek2_model(gating_func: int | None = 2) -> Gguf:
    """1 leading dense layer, then a merged gate_up layer and a split F16 layer; 2 shared experts; MLA."""
    model = Gguf("deepseek2").hp(
        block_count=3, context_length=1024, embedding_length=N_EMBD, feed_forward_length=96,
        attention__head_count=4, attention__head_count_kv=1, attention__key_length=24,
        attention__value_length=16, attention__key_length_mla=24, attention__value_length_mla=16,
        attention__kv_lora_rank=16, rope__dimension_count=8, leading_dense_block_count=1,
        expert_count=N_EXPERT, expert_used_count=2, expert_shared_count=2,
        expert_feed_forward_length=N_FF, expert_weights_scale=2.5, expert_weights_norm=True,
    )  # fmt: skip
    if gating_func is not None:
        model.hp(expert_gating_func=gating_func)
    model.tensor("token_embd.weight", F16, N_EMBD, N_VOCAB)
    model.tensor("output.weight", F16, N_EMBD, N_VOCAB)
    for il in range(3):
        _attention(model, il)
        if il == 0:
            for part, ne in (
                ("ffn_gate", (N_EMBD, 96)),
                ("ffn_up", (N_EMBD, 96)),
                ("ffn_down", (96, N_EMBD)),
            ):
                model.tensor(f"blk.0.{part}.weight", F16, *ne)
            continue
        model.tensor(f"blk.{il}.ffn_gate_inp.weight", F32, N_EMBD, N_EXPERT)
        model.tensor(f"blk.{il}.exp_probs_b.bias", F32, N_EXPERT)
        if il == 1:
            model.tensor("blk.1.ffn_gate_up_exps.weight", Q8_0, N_EMBD, 2 * N_FF, N_EXPERT)
            model.tensor("blk.1.ffn_down_exps.weight", Q4_0, N_FF, N_EMBD, N_EXPERT)
        else:
            model.tensor("blk.2.ffn_gate_exps.weight", F16, N_EMBD, N_FF, N_EXPERT)
            model.tensor("blk.2.ffn_up_exps.weight", F16, N_EMBD, N_FF, N_EXPERT)
            model.tensor("blk.2.ffn_down_exps.weight", F16, N_FF, N_EMBD, N_EXPERT)
        for part, ne in (
            ("gate", (N_EMBD, 2 * N_FF)),
            ("up", (N_EMBD, 2 * N_FF)),
            ("down", (2 * N_FF, N_EMBD)),
        ):
            model.tensor(f"blk.{il}.ffn_{part}_shexp.weight", F16, *ne)
    return model


def _check_slices(path: Path, layout: MoeLayout, model: Gguf) -> None:
    """Every expert's slice, read at expert_offset(e), is the bytes written for that expert."""
    raw = path.read_bytes()
    for layer in layout.moe_layers:
        for t in layer.tensors:
            data = model.tensors[t.name][0]
            for e in range(t.shape[2]):
                start = t.expert_offset(e)
                assert raw[start : start + t.bytes_per_expert] == data[e].tobytes(), (t.name, e)
            with pytest.raises(IndexError):
                t.expert_offset(t.shape[2])


def _data_start(path: Path) -> int:
    return gguf.GGUFReader(path).data_offset


# --- layouts ----------------------------------------------------------------------------------------


def test_qwen3moe_layout(tmp_path: Path) -> None:
    model = qwen3moe_model()
    path = model.write(tmp_path / "q3.gguf")
    layout = read_layout(path)

    assert (layout.arch, layout.n_layer, layout.n_embd) == ("qwen3moe", 3, 64)
    assert (layout.n_vocab, layout.n_ctx_train) == (96, 512)
    assert (layout.n_head, layout.n_head_kv, layout.head_dim_k, layout.head_dim_v) == (4, 2, 16, 16)
    assert (layout.n_expert, layout.n_expert_used, layout.n_shared_experts) == (4, 2, 0)
    assert layout.gating == "softmax"  # qwen3moe.cpp hard-codes softmax whatever the metadata says
    assert layout.norm_topk_prob is True
    assert layout.dense_layers == ()
    assert [layer.index for layer in layout.moe_layers] == [0, 1, 2]
    # q8_0: 34 B per 32 values, q4_0: 18 B per 32, f16: 2 B per value; 32 rows of 64 or 64 rows of 32
    q8_gate, q8_down, q4_gate, q4_down, f16_gate = 68 * 32, 34 * 64, 36 * 32, 18 * 64, 128 * 32
    expected = {
        0: [("gate", "Q8_0", q8_gate), ("up", "Q8_0", q8_gate), ("down", "Q8_0", q8_down)],
        1: [("gate", "Q4_0", q4_gate), ("up", "Q4_0", q4_gate), ("down", "Q4_0", q4_down)],
        2: [("gate", "F16", f16_gate), ("up", "Q8_0", q8_gate), ("down", "Q4_0", q4_down)],
    }
    assert (q8_gate, q8_down, q4_gate, q4_down, f16_gate) == (2176, 2176, 1152, 1152, 4096)
    for layer in layout.moe_layers:
        got = [(t.role, t.ggml_type, t.bytes_per_expert) for t in layer.tensors]
        assert got == expected[layer.index]
        assert layer.bytes_per_expert == sum(b for _, _, b in expected[layer.index])
        assert layer.router_name == f"blk.{layer.index}.ffn_gate_inp.weight"
        assert (layer.n_expert, layer.n_expert_used, layer.n_shared_experts) == (4, 2, 0)
        shapes = {t.role: t.shape for t in layer.tensors}
        assert shapes == {"gate": (64, 32, 4), "up": (64, 32, 4), "down": (32, 64, 4)}
    assert [layer.bytes_per_expert for layer in layout.moe_layers] == [6528, 3456, 7424]
    assert layout.expert_bytes == 4 * (6528 + 3456 + 7424) == 69632
    assert layout.non_expert_bytes == model.total_bytes() - 69632
    assert layout.total_params == model.total_params()
    assert layout.expert_params_per_expert_per_layer == 3 * 64 * 32
    assert layout.file_bytes == path.stat().st_size
    _check_slices(path, layout, model)

    header = path.read_bytes()[: _data_start(path)]
    assert layout.fingerprint == model_fingerprint(path) == hashlib.sha256(header).hexdigest()
    assert len(layout.fingerprint) == 64


def test_deepseek2_layout(tmp_path: Path) -> None:
    model = deepseek2_model()
    path = model.write(tmp_path / "ds2.gguf")
    layout = read_layout(path)

    assert layout.dense_layers == (0,)
    assert [layer.index for layer in layout.moe_layers] == [1, 2]
    assert layout.n_shared_experts == 2
    assert [layer.n_shared_experts for layer in layout.moe_layers] == [2, 2]
    assert (layout.gating, layout.norm_topk_prob, layout.expert_weights_scale) == ("sigmoid", True, 2.5)
    assert (layout.kv_lora_rank, layout.n_rot, layout.n_head_kv) == (16, 8, 1)
    assert layout.kv_cache_bytes(100) == 3 * 100 * (16 + 8) * 2  # MLA: compressed K only, f16
    merged, split = layout.moe_layers
    # gate_up: 2 * 32 rows of 64 q8_0 values; down: 64 rows of 32 q4_0 values
    assert [(t.role, t.ggml_type, t.shape, t.bytes_per_expert) for t in merged.tensors] == [
        ("gate_up", "Q8_0", (64, 64, 4), 64 * 68),
        ("down", "Q4_0", (32, 64, 4), 64 * 18),
    ]
    assert merged.bytes_per_expert == 4352 + 1152
    assert [(t.role, t.bytes_per_expert) for t in split.tensors] == [
        ("gate", 4096),
        ("up", 4096),
        ("down", 4096),
    ]
    assert layout.expert_bytes == 4 * (5504 + 12288)
    assert layout.non_expert_bytes == model.total_bytes() - layout.expert_bytes  # shared experts included
    assert layout.expert_params_per_expert_per_layer == 3 * 64 * 32
    _check_slices(path, layout, model)


def test_deepseek2_gating_default_is_softmax(tmp_path: Path) -> None:
    layout = read_layout(deepseek2_model(gating_func=None).write(tmp_path / "ds2.gguf"))
    assert layout.gating == "softmax"


@pytest.mark.parametrize(
    ("arch", "norm_topk_prob", "shared"),
    [
        ("qwen2moe", False, True),
        ("olmoe", False, False),
        ("phimoe", True, False),
        ("llama", True, False),
        ("granitemoe", True, True),
    ],
)
def test_other_archs(tmp_path: Path, arch: str, norm_topk_prob: bool, shared: bool) -> None:
    model = simple_moe(arch, shared)
    layout = read_layout(model.write(tmp_path / f"{arch}.gguf"))
    assert (layout.gating, layout.norm_topk_prob) == ("softmax", norm_topk_prob)
    assert layout.n_shared_experts == int(shared)
    assert (layout.head_dim_k, layout.n_head_kv) == (16, 4)  # defaults: n_embd / n_head, n_head
    assert [layer.bytes_per_expert for layer in layout.moe_layers] == [3 * 2176, 3 * 2176]
    assert layout.non_expert_bytes == model.total_bytes() - 2 * 4 * 3 * 2176


def simple_moe(arch: str, shared: bool = False) -> Gguf:
    """2 identical Q8_0 MoE layers; shared experts (qwen2moe's with their own gate) when asked."""
    model = Gguf(arch).hp(
        block_count=2, context_length=256, embedding_length=N_EMBD, attention__head_count=4,
        expert_count=N_EXPERT, expert_used_count=2,
    )  # fmt: skip
    model.tensor("token_embd.weight", F16, N_EMBD, N_VOCAB)
    for il in range(2):
        _attention(model, il)
        model.tensor(f"blk.{il}.ffn_gate_inp.weight", F32, N_EMBD, N_EXPERT)
        for role in ("gate", "up"):
            model.tensor(f"blk.{il}.ffn_{role}_exps.weight", Q8_0, N_EMBD, N_FF, N_EXPERT)
        model.tensor(f"blk.{il}.ffn_down_exps.weight", Q8_0, N_FF, N_EMBD, N_EXPERT)
        if shared:
            if arch == "qwen2moe":
                model.tensor(f"blk.{il}.ffn_gate_inp_shexp.weight", F32, N_EMBD)
            for role, ne in (("gate", (N_EMBD, 96)), ("up", (N_EMBD, 96)), ("down", (96, N_EMBD))):
                model.tensor(f"blk.{il}.ffn_{role}_shexp.weight", F16, *ne)
    return model


@pytest.mark.skipif(not REF_MODEL.is_file(), reason="moe-ref-a.gguf (../shared fixture) is absent")
def test_moe_ref_a() -> None:
    layout = read_layout(REF_MODEL)
    assert (layout.arch, layout.n_layer, layout.n_embd) == ("qwen3moe", 8, 384)
    assert (layout.n_expert, layout.n_expert_used, layout.n_shared_experts) == (64, 8, 0)
    assert len(layout.moe_layers) == 8 and layout.dense_layers == ()
    for layer in layout.moe_layers:
        assert {t.role: t.shape for t in layer.tensors} == {
            "gate": (384, 128, 64),
            "up": (384, 128, 64),
            "down": (128, 384, 64),
        }
        assert layer.bytes_per_expert == 3 * 128 * 384 // 32 * 34
    # our parser against gguf-py's on every tensor, and one expert slice byte for byte
    reader = gguf.GGUFReader(REF_MODEL)
    by_name = {t.name: t for t in reader.tensors}
    for layer in layout.moe_layers:
        for t in layer.tensors:
            assert (t.data_offset, t.bytes_per_expert * 64) == (
                by_name[t.name].data_offset,
                by_name[t.name].n_bytes,
            )
    t = layout.moe_layers[3].tensors[1]
    with REF_MODEL.open("rb") as file:
        file.seek(t.expert_offset(5))
        assert file.read(t.bytes_per_expert) == by_name[t.name].data[5].tobytes()
    assert layout.total_params == sum(int(t.n_elements) for t in reader.tensors)
    assert layout.expert_bytes + layout.non_expert_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    with REF_MODEL.open("rb") as file:
        assert layout.fingerprint == hashlib.sha256(file.read(reader.data_offset)).hexdigest()


# --- refusals ---------------------------------------------------------------------------------------


def _refused(path: Path, *fragments: str) -> str:
    with pytest.raises(UserError) as caught:
        read_layout(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _dense_llama() -> Gguf:
    model = Gguf("llama").hp(
        block_count=1, context_length=256, embedding_length=N_EMBD, attention__head_count=4
    )
    model.tensor("token_embd.weight", F16, N_EMBD, N_VOCAB)
    _attention(model, 0)
    for role, ne in (("gate", (N_EMBD, 96)), ("up", (N_EMBD, 96)), ("down", (96, N_EMBD))):
        model.tensor(f"blk.0.ffn_{role}.weight", F16, *ne)
    return model


def test_refuses_bad_files(tmp_path: Path) -> None:
    good = qwen3moe_model().write(tmp_path / "good.gguf")
    raw = good.read_bytes()

    def cut(name: str, n_bytes: int) -> Path:
        path = tmp_path / name
        path.write_bytes(raw[:n_bytes])
        return path

    (tmp_path / "text.gguf").write_text("just some text, not a model\n")
    _refused(tmp_path / "text.gguf", "is not a GGUF file")
    _refused(cut("empty.gguf", 0), "is not a GGUF file")
    _refused(cut("cut-header.gguf", 20), "truncated or corrupt in its header", "re-download")
    _refused(cut("cut-kv.gguf", 60), "truncated or corrupt in its KV metadata")
    _refused(cut("cut-infos.gguf", raw.index(b"token_embd.weight") + 5), "in its tensor infos")
    last = gguf.GGUFReader(good).tensors[-1]
    end = last.data_offset + last.n_bytes
    _refused(
        cut("cut-data.gguf", end - 10),
        f"is truncated: tensor {last.name} needs bytes up to {end} but the file has {end - 10}; "
        "re-download or re-create it",
    )
    v1 = tmp_path / "v1.gguf"
    v1.write_bytes(raw[:4] + struct.pack("<I", 1) + raw[8:])
    _refused(v1, "GGUF version 1")
    _refused(tmp_path, "is a directory")
    _refused(tmp_path / "missing.gguf", "does not exist")
    _refused(
        _dense_llama().write(tmp_path / "dense.gguf"),
        "is a dense llama model: no routed experts; edge-preattn needs a Mixture-of-Experts GGUF",
    )
    for arch, fragment in (
        ("dbrx", "architecture 'dbrx' is not supported; supported: qwen3moe"),
        ("moemoe", "nor does llama.cpp know it"),
    ):
        model = Gguf(arch).hp(
            block_count=1, embedding_length=N_EMBD, expert_count=N_EXPERT, expert_used_count=2
        )
        model.tensor("blk.0.ffn_gate_inp.weight", F32, N_EMBD, N_EXPERT)
        model.tensor("blk.0.ffn_up_exps.weight", F16, N_EMBD, N_FF, N_EXPERT)
        model.tensor("blk.0.ffn_down_exps.weight", F16, N_FF, N_EMBD, N_EXPERT)
        _refused(model.write(tmp_path / f"{arch}.gguf"), fragment)
    legacy = Gguf("llama").hp(block_count=1, embedding_length=N_EMBD, expert_count=2, expert_used_count=1)
    legacy.tensor("blk.0.ffn_gate_inp.weight", F32, N_EMBD, 2)
    legacy.tensor("blk.0.ffn_up.0.weight", F16, N_EMBD, N_FF)
    _refused(legacy.write(tmp_path / "legacy.gguf"), "re-convert")


def _inspect(monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    # the other verbs' modules may not exist yet; build the parser with inspect alone
    monkeypatch.setattr(cli, "VERBS", {"inspect": "edge_preattn.model.layout"})
    return cli.main(["inspect", *argv])


def test_cli_errors_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = qwen3moe_model().write(tmp_path / "good.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(raw[: len(raw) - 100])
    (tmp_path / "text.gguf").write_text("hello")
    dense = _dense_llama().write(tmp_path / "dense.gguf")
    good = str(tmp_path / "good.gguf")
    cases = [
        [str(tmp_path / "cut.gguf")],
        [str(tmp_path / "text.gguf")],
        [str(tmp_path)],
        [str(dense)],
        [good, "--vram-budget", "1MiB"],
        [good, "--vram-budget", "lots"],
        [],
    ]
    for argv in cases:
        assert _inspect(monkeypatch, *argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith("edge-preattn: error: ") and captured.err.count("\n") == 1, (
            captured.err
        )
        assert "Traceback" not in captured.err


def test_cli_inspect_and_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = deepseek2_model().write(tmp_path / "ds2.gguf")
    out = tmp_path / "layout.json"
    layout = read_layout(path)
    budget = plan_slots(layout, 2**40, 256).min_budget_bytes  # top-2 slots per layer and no more
    assert (
        _inspect(monkeypatch, str(path), "--vram-budget", str(budget), "-c", "256", "--json", str(out)) == 0
    )
    text = capsys.readouterr().out
    fragments = (
        "deepseek2",
        layout.fingerprint[:16],
        "gate_up",
        "MLA",
        "ESTIMATE",
        "sigmoid",
        "0         dense",
    )
    offset = str(layout.moe_layers[0].tensors[0].data_offset)  # of the gate_up tensor's expert 0
    for fragment in (
        *fragments,
        "2 of 4 slots per MoE layer",
        "Q8_0   64 64 4                           4352",
    ):
        assert fragment in text, fragment
    assert offset in text
    payload = json.loads(out.read_text())
    assert payload["layout"]["fingerprint"] == layout.fingerprint
    assert (
        payload["layout"]["moe_layers"][0]["tensors"][0]["data_offset"]
        == layout.moe_layers[0].tensors[0].data_offset
    )
    assert payload["plan"] == dataclasses.asdict(plan_slots(layout, budget, 256))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds2.gguf", "layout.json"]  # no temp file left

    olmoe = simple_moe("olmoe").write(tmp_path / "olmoe.gguf")
    assert _inspect(monkeypatch, "-m", str(olmoe)) == 0
    assert "  0-1       MoE           4      2       0        6.38 KiB" in capsys.readouterr().out


def test_fuzzed_headers_read_or_refuse(tmp_path: Path) -> None:
    """Random byte flips and cuts in the header: a layout or a one-line UserError, fast, nothing else."""
    raw = qwen3moe_model().write(tmp_path / "good.gguf").read_bytes()
    header_bytes = _data_start(tmp_path / "good.gguf")
    rng = np.random.default_rng(1234)
    path = tmp_path / "fuzz.gguf"
    outcomes = {"read": 0, "refused": 0}
    for case in range(200):
        data = bytearray(raw)
        if case % 4 == 3:
            data = data[: int(rng.integers(0, header_bytes + 64))]
        else:
            for _ in range(int(rng.integers(1, 5))):
                at = int(rng.integers(0, header_bytes))
                if rng.random() < 0.3 and at + 8 <= len(data):  # an absurd count or length
                    data[at : at + 8] = struct.pack("<Q", int(rng.choice([2**63 - 1, 2**40, 2**32 + 7, 0])))
                else:
                    data[at] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
        started = time.perf_counter()
        try:
            read_layout(path)
            outcomes["read"] += 1
        except UserError as error:
            assert "\n" not in str(error), str(error)
            outcomes["refused"] += 1
        assert time.perf_counter() - started < 2.0, case
    assert outcomes["refused"] > 50, outcomes
    for outcome, count in outcomes.items():
        record("fuzz (header only, read_layout, seed 1234)", "flips, absurd counts, cuts", outcome, count)


# --- slot planning ----------------------------------------------------------------------------------


def crafted_layout(**changes: object) -> MoeLayout:
    """4 layers, 3 of them MoE with 16 experts of exactly 1 MiB, top-2, 100 MiB resident weights."""
    tensor = ExpertTensor("blk.1.ffn_up_exps.weight", "up", "F16", (512, 1024, 16), MiB, 0)
    layers = tuple(
        MoeLayer(il, 16, 2, (tensor,), f"blk.{il}.ffn_gate_inp.weight", 0, MiB) for il in (1, 2, 3)
    )
    layout = MoeLayout(
        path="/models/crafted.gguf", arch="qwen3moe", n_layer=4, n_embd=512, n_vocab=1000, n_ctx_train=4096,
        n_head=8, n_head_kv=2, head_dim_k=64, head_dim_v=64, kv_lora_rank=0, n_rot=64, n_expert=16,
        n_expert_used=2, n_shared_experts=0, gating="softmax", norm_topk_prob=True, expert_weights_scale=0.0,
        dense_layers=(0,), moe_layers=layers, expert_bytes=3 * 16 * MiB, non_expert_bytes=100 * MiB,
        total_params=0, expert_params_per_expert_per_layer=512 * 1024, fingerprint="0" * 64,
        routing_fingerprint="0" * 64, file_bytes=0,
    )  # fmt: skip
    return dataclasses.replace(layout, **changes)


def test_plan_slots_numbers() -> None:
    layout = crafted_layout()
    kv = 4 * 1024 * 2 * (64 + 64) * 2  # layers * n_ctx * n_head_kv * (k + v) * f16
    compute = 512 * 4 * (1000 + 8 * 1024) + 64 * MiB  # logits + attention scores of a 512-token ubatch
    assert (kv, compute) == (2_097_152, 85_934_080)
    resident = 100 * MiB + kv + compute
    plan = plan_slots(layout, 220 * MiB, n_ctx=1024)
    assert (plan.kv_cache_bytes, plan.compute_buffer_bytes, plan.non_expert_bytes) == (kv, compute, 100 * MiB)
    assert plan.bytes_per_slot == MiB
    assert plan.slots_per_layer == (220 * MiB - resident) // (3 * MiB) == 12
    assert plan.fits_all is False
    assert plan.min_budget_bytes == resident + 3 * 2 * MiB
    assert plan.expert_cache_bytes == 12 * 3 * MiB

    roomy = plan_slots(layout, 1024 * MiB, n_ctx=1024)
    assert (roomy.slots_per_layer, roomy.fits_all) == (16, True)

    mla = plan_slots(crafted_layout(kv_lora_rank=512, n_rot=64), 1024 * MiB, n_ctx=1024)
    assert mla.kv_cache_bytes == 4 * 1024 * (512 + 64) * 2


def test_plan_slots_budget_too_small() -> None:
    layout = crafted_layout()
    minimum = 100 * MiB + 2_097_152 + 85_934_080 + 3 * 2 * MiB  # 0.1855 GiB
    plan_slots(layout, minimum, n_ctx=1024)  # exactly enough: k slots per layer
    with pytest.raises(UserError) as caught:
        plan_slots(layout, minimum - 1, n_ctx=1024)
    message = str(caught.value)
    assert "\n" not in message and "crafted.gguf" in message
    assert "raise --vram-budget to at least 0.19GiB or use a smaller -c" in message
    with pytest.raises(UserError):
        plan_slots(layout, 10**12, n_ctx=0)


@pytest.mark.parametrize(
    ("preset", "n_moe", "n_dense", "n_expert", "k", "shared", "expert_ff", "n_embd"),
    [
        ("qwen3-30b-a3b", 48, 0, 128, 8, 0, 768, 2048),
        ("deepseek-v2-lite", 26, 1, 64, 6, 2, 1408, 2048),
        ("phi-mini-moe", 32, 0, 16, 2, 0, 960, 4096),
    ],
)
def test_inspect_of_full_size_synthetic_presets(
    tmp_path, preset, n_moe, n_dense, n_expert, k, shared, expert_ff, n_embd
):
    """Layouts of config-faithful files at true size (sparse: no disk) equal numbers computed by hand."""
    from edge_preattn.model.presets import PRESETS
    from edge_preattn.model.synth import write_synthetic

    path = tmp_path / f"{preset}.gguf"
    write_synthetic(preset, path, qtype="q4_0", sparse=True, progress=False)
    layout = read_layout(path)
    assert (len(layout.moe_layers), len(layout.dense_layers)) == (n_moe, n_dense)
    assert (layout.n_expert, layout.n_expert_used, layout.n_shared_experts, layout.n_embd) == (
        n_expert,
        k,
        shared,
        n_embd,
    )
    params_per_tensor = expert_ff * n_embd
    q4_0_bytes = params_per_tensor // 32 * 18  # 18 bytes per block of 32 weights
    assert layout.expert_params_per_expert_per_layer == 3 * params_per_tensor
    for layer in layout.moe_layers:
        assert sorted(t.role for t in layer.tensors) == ["down", "gate", "up"]
        assert all(t.bytes_per_expert == q4_0_bytes for t in layer.tensors)
        assert layer.bytes_per_expert == 3 * q4_0_bytes
    assert layout.expert_bytes == n_moe * n_expert * 3 * q4_0_bytes
    card = PRESETS[preset].card_params
    assert abs(layout.total_params - card) / card < 0.01
