#!/usr/bin/env python3
"""Train the package's default model: a compact qwen3moe causal LM, from scratch, in a fixed time budget.

Why a script of our own: the shipped model must fit in the wheel (GGUF <= 20 MB at q8_0), so its shape
differs from the reference recipe's; everything else follows that recipe (../shared/tools/reference-moe/):
GPT-2 tokens from `build_corpus.py`, Qwen3MoeForCausalLM with tied embeddings, bf16 autocast over fp32
master weights, AdamW with warm-up then cosine decay driven by elapsed time (so the run ends on time
whatever the throughput), and a Switch load-balancing loss computed per layer (the pooled loss transformers
offers left near-dead experts in some layers of the reference's first attempt; dead experts would make a
cache look better than it is).

Inputs: DATA_DIR with train_A.bin, train_B.bin, val.bin (uint16 token streams, from build_corpus.py); both
train slices are used. Output: OUT_DIR with the `save_pretrained` model, the tokenizer files and
`train_summary.json`.

usage: train_small_moe.py --data DIR --tokenizer DIR --out DIR [--seed 1 --time-s 240 ...]
       add --tiny --max-steps 3 for a CPU smoke test.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

VOCAB_ROWS = 50304  # GPT-2's 50257 ids padded to a multiple of 64; the padding rows are never produced
END_OF_TEXT_ID = 50256
SAMPLE_PROMPTS = ("def fibonacci(n):", "import numpy as np\n", "The capital of France is")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--time-s", type=float, default=240.0, help="training wall-clock budget")
    ap.add_argument(
        "--max-steps", type=int, default=0, help="stop earlier after this many steps (0: no limit)"
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup-frac", type=float, default=0.04)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument(
        "--aux-coef", type=float, default=0.01, help="weight of the per-layer load-balancing loss"
    )
    ap.add_argument("--hidden", type=int, default=160)
    ap.add_argument("--layers", type=int, default=7)
    ap.add_argument("--q-heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=40)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--expert-ffn", type=int, default=64)
    ap.add_argument("--val-windows", type=int, default=512)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: short sequences, small batch")
    return ap.parse_args()


def build_model(args: argparse.Namespace, device: str):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    shape = {
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.q_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "num_experts": args.experts,
        "num_experts_per_tok": args.top_k,
        "moe_intermediate_size": args.expert_ffn,
        "intermediate_size": 4 * args.expert_ffn,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "rope_theta": 10000.0,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
    }
    config = Qwen3MoeConfig(
        **shape,
        vocab_size=VOCAB_ROWS,
        tie_word_embeddings=True,
        max_position_embeddings=args.seqlen,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        bos_token_id=END_OF_TEXT_ID,
        eos_token_id=END_OF_TEXT_ID,
        pad_token_id=None,
        attention_dropout=0.0,
        use_cache=True,
    )
    return Qwen3MoeForCausalLM(config).to(device), shape


def cast_grouped_mm_to_bf16_under_autocast() -> None:
    """transformers' grouped expert matmul ignores autocast; with fp32 master weights it would run in fp32
    (or fail on CUDA), so under CUDA autocast both operands go to bf16, as every other matmul does."""
    import transformers.integrations.moe as hf_moe

    fp32_grouped_mm = hf_moe._grouped_mm

    def grouped_mm(input, weight, offs):
        if input.is_cuda and torch.is_autocast_enabled("cuda"):
            return fp32_grouped_mm(input.to(torch.bfloat16), weight.to(torch.bfloat16), offs)
        return fp32_grouped_mm(input, weight, offs)

    hf_moe._grouped_mm = grouped_mm


def load_balancing_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch loss for one layer: n_experts * sum_e (share of routed slots to e) * (mean router prob of e);
    1 when balanced."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    n_experts = probs.shape[-1]
    chosen = probs.topk(top_k, dim=-1).indices.reshape(-1)
    slot_share = torch.bincount(chosen, minlength=n_experts).float() / chosen.numel()
    return n_experts * (slot_share * probs.mean(0)).sum()


def lr_at(args: argparse.Namespace, time_frac: float) -> float:
    if time_frac < args.warmup_frac:
        return args.lr * max(time_frac / args.warmup_frac, 0.01)
    p = min(1.0, (time_frac - args.warmup_frac) / (1.0 - args.warmup_frac))
    return args.lr * (args.min_lr_frac + (1.0 - args.min_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * p)))


def main() -> None:
    args = parse_args()
    if args.tiny:
        args.seqlen, args.batch, args.val_windows = 128, 4, 8
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    import transformers

    model, shape = build_model(args, device)
    cast_grouped_mm_to_bf16_under_autocast()
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"transformers {transformers.__version__} torch {torch.__version__} on {device}; "
        f"params {n_params / 1e6:.2f}M (tied embeddings once)",
        flush=True,
    )

    train_np = np.concatenate([np.fromfile(args.data / f"train_{s}.bin", dtype=np.uint16) for s in "AB"])
    val_np = np.fromfile(args.data / "val.bin", dtype=np.uint16)
    print(f"train {len(train_np) / 1e6:.1f}M tokens, val {len(val_np) / 1e6:.2f}M tokens", flush=True)
    train_tokens = torch.from_numpy(train_np.astype(np.int32)).to(device)
    offsets = torch.arange(args.seqlen, device=device)
    batch_rng = torch.Generator(device=device)
    batch_rng.manual_seed(args.seed)
    val_rng = np.random.default_rng(1234)
    n_val = min(args.val_windows, max(1, (len(val_np) - args.seqlen - 1) // 8))
    val_starts = val_rng.integers(0, len(val_np) - args.seqlen - 1, n_val)
    val_windows = torch.from_numpy(
        np.stack([val_np[s : s + args.seqlen] for s in val_starts]).astype(np.int64)
    )

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=device == "cuda",
    )
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")

    def losses(ids: torch.Tensor):
        out = model(input_ids=ids, output_router_logits=True)
        logits = out.logits[:, :-1].float()
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        aux = torch.stack([load_balancing_loss(r, args.top_k) for r in out.router_logits]).mean()
        return ce, aux, out.router_logits

    log: list[dict] = []
    model.train()
    started = time.time()
    step = tokens_seen = 0
    while True:
        time_frac = (time.time() - started) / args.time_s
        if time_frac >= 1.0 or (args.max_steps and step >= args.max_steps):
            break
        lr = lr_at(args, time_frac)
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(
            0, len(train_tokens) - args.seqlen - 1, (args.batch,), device=device, generator=batch_rng
        )
        ids = train_tokens[starts[:, None] + offsets].long()
        with autocast:
            ce, aux, _ = losses(ids)
        optimizer.zero_grad(set_to_none=True)
        (ce + args.aux_coef * aux).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        tokens_seen += ids.numel()
        if step == 1 or step % args.log_every == 0:
            elapsed_s = time.time() - started
            record = {
                "step": step,
                "tokens": tokens_seen,
                "ce": round(ce.item(), 4),
                "aux": round(aux.item(), 4),
                "grad_norm": round(float(grad_norm), 3),
                "lr": round(lr, 6),
                "elapsed_s": round(elapsed_s, 1),
                "tokens_per_s": int(tokens_seen / max(elapsed_s, 1e-9)),
            }
            log.append(record)
            print(json.dumps(record), flush=True)
    train_s = time.time() - started
    print(f"trained {step} steps, {tokens_seen} tokens in {train_s:.1f} s", flush=True)

    model.eval()
    ce_sum = ce_tokens = 0.0
    counts = torch.zeros(args.layers, args.experts, dtype=torch.long, device=device)
    with torch.no_grad():
        for i in range(0, len(val_windows), args.batch):
            ids = val_windows[i : i + args.batch].to(device)
            with autocast:
                ce, _, router_logits = losses(ids)
            n = ids.numel() - ids.shape[0]
            ce_sum += ce.item() * n
            ce_tokens += n
            for layer, logits in enumerate(router_logits):
                counts[layer] += torch.bincount(
                    logits.float().topk(args.top_k, -1).indices.reshape(-1), minlength=args.experts
                )
    val_ce = ce_sum / ce_tokens
    share = (counts.float() / counts.sum(1, keepdim=True)).cpu()
    entropy = -(share.clamp_min(1e-12) * share.clamp_min(1e-12).log()).sum(1) / math.log(args.experts)
    print(f"val CE {val_ce:.4f} nats (ppl {math.exp(val_ce):.2f}) on {int(ce_tokens)} tokens", flush=True)
    for layer in range(args.layers):
        print(
            f"layer {layer}: expert share {share[layer].min():.4f}..{share[layer].max():.4f} "
            f"(uniform {1 / args.experts:.4f}), normalized entropy {entropy[layer]:.3f}",
            flush=True,
        )

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(args.tokenizer / "tokenizer.json"))
    samples = {}
    with torch.no_grad():
        for prompt in SAMPLE_PROMPTS:
            ids = torch.tensor([tokenizer.encode(prompt).ids], device=device)
            for _ in range(32):
                with autocast:
                    next_id = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, next_id], 1)
            samples[prompt] = tokenizer.decode(ids[0].tolist())
            print("SAMPLE", json.dumps(samples[prompt]), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(args.tokenizer / name, args.out / name)
    summary = {
        "hf_class": "Qwen3MoeForCausalLM",
        "shape": shape,
        "vocab_rows": VOCAB_ROWS,
        "params": n_params,
        "seed": args.seed,
        "time_budget_s": args.time_s,
        "batch": args.batch,
        "seqlen": args.seqlen,
        "lr": args.lr,
        "min_lr_frac": args.min_lr_frac,
        "warmup_frac": args.warmup_frac,
        "weight_decay": args.weight_decay,
        "aux_coef": args.aux_coef,
        "aux_mode": "switch loss per layer, averaged",
        "steps": step,
        "tokens_seen": tokens_seen,
        "train_s": round(train_s, 1),
        "val_ce_nats": round(val_ce, 4),
        "val_tokens": int(ce_tokens),
        "routing_normalized_entropy": [round(float(e), 3) for e in entropy],
        "routing_share_min": [round(float(s.min()), 4) for s in share],
        "routing_share_max": [round(float(s.max()), 4) for s in share],
        "samples": samples,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "log": log,
    }
    (args.out / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("saved", args.out, flush=True)


if __name__ == "__main__":
    main()
