"""Decode speed with a slot for every expert (slots = E) against stock placement, interleaved rounds.

Issue 5's overhead target: with slots = E and prediction on, decode tok/s at least 0.95x stock llama.cpp
with every layer on the GPU. Each round runs stock, then every mode, each in a fresh context that
first generates a warm-up run (CUDA graphs, lazily loaded kernels) and then the timed one; decode
tok/s excludes the prompt. The rounds interleave, so a drifting machine slows every configuration
alike, and the ratio of medians is the figure. A random ranking stands in for the predictors: at
slots = E the banks are full from the start and no prediction is ever asked for (`quiet_ubatches`
counts the ubatches computed without any observation). On a CPU build the reference is stock with
experts in host memory. Writes <out>/slots-e-overhead-<model>-<backend>.json and .md.

    python bench/slots_e_overhead.py edge_preattn/data/edge-moe-default.gguf -n 128 --rounds 3
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from edge_preattn import native
from edge_preattn.controller import CacheRuntime, RandomRanking
from edge_preattn.engine import Engine, EngineConfig
from edge_preattn.files import write_json_atomic, write_text_atomic
from edge_preattn.layout import read_layout

PROMPT = "The history of the printing press"
WARMUP_TOKENS = 16


def decode_tok_s(engine: Engine, n: int) -> float:
    *_, (_, record) = engine.generate(PROMPT, n)
    return record.decode_tok_s


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("-n", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="lru,top1,exact")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    layout = read_layout(args.model)
    llama_cpp = native.load_llama(offload_short_batches=True)
    api = native.NativeApi(llama_cpp)
    gpu = bool(api.gpus())
    stock_config = EngineConfig.host_experts(args.model, 512, host=not gpu)
    cache_config = EngineConfig.host_experts(args.model, 512)
    modes = args.modes.split(",")
    rates: dict[str, list[float]] = {name: [] for name in ["stock", *modes]}
    quiet: dict[str, list[int]] = {mode: [] for mode in modes}
    for round_index in range(args.rounds):
        for name, values in rates.items():
            with Engine(llama_cpp, stock_config if name == "stock" else cache_config) as engine:
                runtime = None
                if name != "stock":
                    runtime = CacheRuntime.for_layout(
                        engine,
                        layout,
                        n_slots=layout.n_expert,
                        mode=name,
                        predictors=RandomRanking(layout.n_expert),
                    )
                try:
                    decode_tok_s(engine, WARMUP_TOKENS)
                    values.append(decode_tok_s(engine, args.n))
                    if runtime is not None:
                        quiet[name].append(runtime.bank.stats()["quiet_ubatches"])
                finally:
                    if runtime is not None:
                        runtime.close()
            print(f"round {round_index + 1}: {name} {values[-1]:.1f} tok/s", file=sys.stderr)
    stock = float(np.median(rates["stock"]))
    rows = [
        {
            "config": name,
            "decode_tok_s_median": round(float(np.median(values)), 1),
            "decode_tok_s": [round(v, 1) for v in values],
            "over_stock": round(float(np.median(values)) / stock, 3),
            "quiet_ubatches": quiet.get(name),
        }
        for name, values in rates.items()
    ]
    result = {
        "model": args.model.name,
        "build": api.build_info(),
        "backend": "gpu" if gpu else "cpu",
        "reference": "stock, all layers on the GPU" if gpu else "stock, experts in host memory",
        "slots": layout.n_expert,
        "n_predict": args.n,
        "rounds": args.rounds,
        "warmup_tokens": WARMUP_TOKENS,
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    lines = [
        f"# slots = E overhead: {args.model.name} ({result['backend']}, {layout.n_expert} slots per layer)",
        "",
        f"{result['build']} · {args.rounds} interleaved rounds × {args.n} tokens after a "
        f"{WARMUP_TOKENS}-token warm-up · reference: {result['reference']}",
        "",
        "| config | decode tok/s (median) | per round | × stock | quiet ubatches (warm-up + timed) |",
        "|---|---:|---|---:|---|",
    ]
    for row in rows:
        per_round = ", ".join(f"{v:.1f}" for v in row["decode_tok_s"])
        quiet_runs = ", ".join(map(str, row["quiet_ubatches"])) if row["quiet_ubatches"] else "–"
        lines.append(
            f"| {row['config']} | {row['decode_tok_s_median']:.1f} | {per_round} | "
            f"{row['over_stock']:.3f} | {quiet_runs} |"
        )
    lines += ["", f"Command: `{result['command']}`", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"slots-e-overhead-{args.model.stem}-{result['backend']}"
    write_json_atomic(args.out / f"{stem}.json", result)
    write_text_atomic(args.out / f"{stem}.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
