"""What `synth` writes: the configurations of real MoE models (their exact tensor layouts, hyper-
parameters and quantization), and the plan of every tensor of a file, in the order llama.cpp's loader
creates them, with the scale each is drawn at. Split from synth.py, which writes the file; moved
unchanged."""

from dataclasses import dataclass

import gguf
import numpy as np

from ..errors import UserError

QT = gguf.GGMLQuantizationType
QTYPES = {"q4_0": QT.Q4_0, "q8_0": QT.Q8_0, "f16": QT.F16}
ROUTER_GAIN = 2.0  # router logits of std ≈ 2: clear but not one-hot preferences


@dataclass(frozen=True)
class YarnRope:
    factor: float
    original_context: int
    log_mul: float  # as convert_hf_to_gguf writes it for deepseek2: 0.1 * mscale_all_dim
    beta_fast: float
    beta_slow: float


@dataclass(frozen=True)
class SynthConfig:
    """A model's config in the GGUF's own terms (deepseek2 MLA is written as MQA: n_head_kv 1)."""

    arch: str  # qwen3moe | deepseek2 | phimoe
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int  # width of one q/k/v head (MLA: see qk_*_head_dim, v_head_dim)
    n_expert: int
    n_expert_used: int
    n_ff_exp: int  # width of one routed (and one shared) expert
    n_vocab: int
    n_ctx_train: int
    rope_theta: float
    rms_eps: float
    default_qtype: str
    n_ff: int = 0  # feed_forward_length: dense FFN of deepseek2's leading layers; phimoe's expert width
    n_layer_dense_lead: int = 0
    n_expert_shared: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    expert_weights_scale: float = 0.0  # 0: key not written
    qkv_bias: bool = False
    sliding_window: int = 0
    yarn: YarnRope | None = None
    card_params: float = 0.0  # total parameters on the model card (0: a tiny preset, no card)
    source: str = ""


PRESETS: dict[str, SynthConfig] = {
    "qwen3-30b-a3b": SynthConfig(
        arch="qwen3moe", n_layer=48, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128, n_expert=128,
        n_expert_used=8, n_ff_exp=768, n_ff=6144, n_vocab=151936, n_ctx_train=40960, rope_theta=1e6,
        rms_eps=1e-6, default_qtype="q4_0", card_params=30.5e9, source="Qwen/Qwen3-30B-A3B",
    ),
    "deepseek-v2-lite": SynthConfig(
        arch="deepseek2", n_layer=27, n_embd=2048, n_head=16, n_head_kv=1, head_dim=0, n_expert=64,
        n_expert_used=6, n_ff_exp=1408, n_ff=10944, n_layer_dense_lead=1, n_expert_shared=2,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_vocab=102400,
        n_ctx_train=163840, rope_theta=10000.0, rms_eps=1e-6, expert_weights_scale=1.0,
        yarn=YarnRope(40.0, 4096, 0.0707, 32.0, 1.0), default_qtype="q4_0", card_params=15.7e9,
        source="deepseek-ai/DeepSeek-V2-Lite",
    ),
    "phi-mini-moe": SynthConfig(
        arch="phimoe", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, head_dim=128, n_expert=16,
        n_expert_used=2, n_ff_exp=960, n_ff=960, n_vocab=32064, n_ctx_train=4096, rope_theta=10000.0,
        rms_eps=1e-5, qkv_bias=True, sliding_window=2047, default_qtype="q4_0", card_params=7.6e9,
        source="microsoft/Phi-mini-MoE-instruct",
    ),
    "tiny": SynthConfig(
        arch="qwen3moe", n_layer=4, n_embd=128, n_head=4, n_head_kv=2, head_dim=32, n_expert=16,
        n_expert_used=4, n_ff_exp=64, n_ff=256, n_vocab=512, n_ctx_train=2048, rope_theta=1e6,
        rms_eps=1e-6, default_qtype="q8_0",
    ),
    "tiny-deepseek2": SynthConfig(
        arch="deepseek2", n_layer=4, n_embd=128, n_head=4, n_head_kv=1, head_dim=0, n_expert=16,
        n_expert_used=4, n_ff_exp=64, n_ff=256, n_layer_dense_lead=1, n_expert_shared=2, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, n_vocab=512, n_ctx_train=2048,
        rope_theta=10000.0, rms_eps=1e-6, expert_weights_scale=1.0, default_qtype="q8_0",
    ),
}  # fmt: skip


@dataclass(frozen=True)
class TensorSpec:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the contiguous (fan-in) dimension
    ggml_type: gguf.GGMLQuantizationType
    init: str  # "ones" (norm weights) | "normal" (F32: biases, routers) | "uniform" (quantized or f16)
    std: float

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.ne))

    @property
    def nbytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.ggml_type]
        return self.n_elements // block * type_size


def expected_params(config: SynthConfig, n_layers: int | None = None) -> int:
    """Total parameters, counted by hand from the config (independently of `tensor_plan`)."""
    c, n_layer = config, n_layers or config.n_layer
    e, v = c.n_embd, c.n_vocab
    total = 2 * v * e + e  # token_embd, output, output_norm
    if c.arch == "qwen3moe":
        q, kv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        attn = 2 * e * q + 2 * e * kv + 2 * c.head_dim + 2 * e  # q o, k v, q/k norms, attn/ffn norms
    elif c.arch == "deepseek2":
        h, r, rope = c.n_head, c.kv_lora_rank, c.qk_rope_head_dim
        attn = e * h * (c.qk_nope_head_dim + rope) + e * (r + rope) + r  # q, kv_a_mqa, kv_a_norm
        attn += h * r * (c.qk_nope_head_dim + c.v_head_dim) + h * c.v_head_dim * e + 2 * e  # k_b v_b, o
    else:  # phimoe: q o (e x e), k v, their biases, and LayerNorm-style norms with biases
        kv = c.n_head_kv * c.head_dim
        attn = 2 * e * e + 2 * e * kv + (2 * e + 2 * kv) + 4 * e
        total += e + v  # output_norm.bias, output.bias
    n_dense = min(c.n_layer_dense_lead, n_layer)
    moe = e * c.n_expert + 3 * c.n_expert * e * c.n_ff_exp + 3 * e * c.n_ff_exp * c.n_expert_shared
    return total + n_layer * attn + n_dense * 3 * e * c.n_ff + (n_layer - n_dense) * moe


def tensor_plan(
    config: SynthConfig, n_layers: int | None = None, qtype: str | None = None
) -> list[TensorSpec]:
    """Every tensor of the file, in file order, as llama.cpp's loader creates them for the arch."""
    c, n_layer = config, n_layers or config.n_layer
    mat = QTYPES[qtype or c.default_qtype]
    e, specs = c.n_embd, []

    # std 1/sqrt(fan_in) keeps each matmul's output at the scale of its input; matrices that write into
    # the residual stream get a further 1/sqrt(2 n_layer) (GPT-2's init), so the stream keeps the token
    # embedding (std 1) in view through all layers instead of drifting into one shared direction
    resid = 1 / np.sqrt(2 * c.n_layer)  # the full model's depth: --layers N keeps the same weights
    stds = {"weight": 1.0, "resid": resid, "router": ROUTER_GAIN, "bias": 0.02, "embed": 1.0, "ones": 0.0}

    def add(name: str, ne: tuple[int, ...], kind: str = "weight", ggml_type: QT | None = None) -> None:
        std = stds[kind] / np.sqrt(ne[0]) if kind in ("weight", "resid", "router") else stds[kind]
        if kind in ("ones", "bias", "router"):
            specs.append(TensorSpec(name, ne, QT.F32, "ones" if kind == "ones" else "normal", std))
        else:
            specs.append(TensorSpec(name, ne, ggml_type or mat, "uniform", std))

    add("token_embd.weight", (e, c.n_vocab), "embed")
    for i in range(n_layer):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", (e,), "ones")
        if c.arch == "phimoe":
            add(b + "attn_norm.bias", (e,), "bias")
        if c.arch == "deepseek2":  # MLA, no q LoRA (Lite); k_b/v_b split as the current converter writes
            h, r, rope, nope = c.n_head, c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim
            add(b + "attn_q.weight", (e, h * (nope + rope)))
            add(b + "attn_kv_a_mqa.weight", (e, r + rope))
            add(b + "attn_kv_a_norm.weight", (r,), "ones")
            add(b + "attn_k_b.weight", (nope, r, h))
            add(b + "attn_v_b.weight", (r, c.v_head_dim, h))
            add(b + "attn_output.weight", (h * c.v_head_dim, e), "resid")
        else:
            q, kv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
            for part, width in (("q", q), ("k", kv), ("v", kv)):
                add(b + f"attn_{part}.weight", (e, width))
                if c.qkv_bias:
                    add(b + f"attn_{part}.bias", (width,), "bias")
            add(b + "attn_output.weight", (q, e), "resid")
            if c.arch == "phimoe":
                add(b + "attn_output.bias", (e,), "bias")
            if c.arch == "qwen3moe":
                add(b + "attn_q_norm.weight", (c.head_dim,), "ones")
                add(b + "attn_k_norm.weight", (c.head_dim,), "ones")
        add(b + "ffn_norm.weight", (e,), "ones")
        if c.arch == "phimoe":
            add(b + "ffn_norm.bias", (e,), "bias")
        if i < c.n_layer_dense_lead:
            add(b + "ffn_gate.weight", (e, c.n_ff))
            add(b + "ffn_down.weight", (c.n_ff, e), "resid")
            add(b + "ffn_up.weight", (e, c.n_ff))
            continue
        f, x = c.n_ff_exp, c.n_expert
        add(b + "ffn_gate_inp.weight", (e, x), "router")
        add(b + "ffn_gate_exps.weight", (e, f, x))
        add(b + "ffn_down_exps.weight", (f, e, x), "resid")
        add(b + "ffn_up_exps.weight", (e, f, x))
        if c.n_expert_shared:
            fs = f * c.n_expert_shared
            add(b + "ffn_gate_shexp.weight", (e, fs))
            add(b + "ffn_down_shexp.weight", (fs, e), "resid")
            add(b + "ffn_up_shexp.weight", (e, fs))
    add("output_norm.weight", (e,), "ones")
    if c.arch == "phimoe":
        add("output_norm.bias", (e,), "bias")
    # llama-quantize keeps the output matrix at higher precision (q6_K in a q4_0 file)
    add("output.weight", (e, c.n_vocab), ggml_type=QT.Q8_0 if mat == QT.Q4_0 else mat)
    if c.arch == "phimoe":
        add("output.bias", (c.n_vocab,), "bias")
    for spec in specs:
        block = gguf.GGML_QUANT_SIZES[spec.ggml_type][0]
        if spec.ne[0] % block:
            raise UserError(
                f"{spec.name}: width {spec.ne[0]} is not a multiple of {block} ({spec.ggml_type.name})"
            )
    return specs
