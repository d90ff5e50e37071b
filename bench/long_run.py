"""Long run of the tightest cache with a random predictor: same tokens as stock, memory flat.

Generates `--tokens` tokens in pieces of `--piece` (the context of small models is short: each
piece starts a fresh sequence from the next prompt), first with stock placement, then with the
expert cache at slots = k and a random-ranking predictor in mode exact; compares every token and
samples RSS (psutil) and device memory (the backend's own numbers) after each piece. Writes
bench/results/long-run-<model>-<backend>.json.

    python bench/long_run.py ../shared/models/moe-ref-a.gguf --tokens 20000 --piece 800
"""

import argparse
import sys
import time
from pathlib import Path

import psutil

from edge_preattn.files import write_json_atomic
from edge_preattn.model import native
from edge_preattn.model.engine import Engine, EngineConfig, Sampling, complete
from edge_preattn.model.layout import read_layout
from edge_preattn.runtime.cache_runtime import CacheRuntime, RandomRanking
from edge_preattn.runtime.options import CacheOptions

PROMPTS = ["def fibonacci(n):", "import os\n", "class Node:", "The weather today", "for i in range(10):"]


def device_used(engine: Engine) -> int:
    return sum(total - free for free, total in map(engine.api.device_memory, engine.api.gpus()))


def generate_all(engine: Engine, pieces: int, piece: int) -> tuple[list[list[int]], list[dict]]:
    outputs, samples = [], []
    process = psutil.Process()
    for index in range(pieces):
        record = complete(engine, PROMPTS[index % len(PROMPTS)], piece, Sampling())
        outputs.append(record.tokens)
        samples.append(
            {
                "piece": index,
                "rss_bytes": process.memory_info().rss,
                "device_bytes": device_used(engine),
                "decode_tok_s": round(record.decode_tok_s, 1),
            }
        )
    return outputs, samples


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--piece", type=int, default=800)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    layout = read_layout(args.model)
    llama_cpp = native.load_llama(offload_short_batches=True)
    gpu = bool(native.NativeApi(llama_cpp).gpus())
    pieces = max(1, args.tokens // args.piece)
    n_ctx = args.piece + 64
    stock_config = EngineConfig.host_experts(args.model, n_ctx, host=not gpu)
    started = time.monotonic()
    with Engine(llama_cpp, stock_config) as engine:
        stock, stock_samples = generate_all(engine, pieces, args.piece)
    cache_config = EngineConfig.host_experts(args.model, n_ctx)
    with (
        Engine(llama_cpp, cache_config) as engine,
        CacheRuntime.for_layout(
            engine,
            layout,
            CacheOptions(
                mode="exact", n_slots=layout.n_expert_used, predictors=RandomRanking(layout.n_expert)
            ),
        ) as runtime,
    ):
        cached, cached_samples = generate_all(engine, pieces, args.piece)
        bank = runtime.bank.stats()
    equal = sum(a == b for a, b in zip(stock, cached, strict=True))
    warm = cached_samples[len(cached_samples) // 4 :] or cached_samples
    result = {
        "model": args.model.name,
        "backend": "gpu" if gpu else "cpu",
        "command": " ".join(sys.argv),
        "generated_tokens": sum(map(len, cached)),
        "pieces": pieces,
        "pieces_equal_stock": equal,
        "slots": layout.n_expert_used,
        "forced_uploads": bank["forced_uploads"],
        "rss_growth_after_warmup_bytes": warm[-1]["rss_bytes"] - warm[0]["rss_bytes"],
        "device_growth_after_warmup_bytes": warm[-1]["device_bytes"] - warm[0]["device_bytes"],
        "seconds": round(time.monotonic() - started, 1),
        "stock": stock_samples,
        "cached": cached_samples,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / f"long-run-{args.model.stem}-{result['backend']}.json", result)
    print({key: value for key, value in result.items() if key not in ("stock", "cached")})
    return 0 if equal == pieces else 1


if __name__ == "__main__":
    sys.exit(main())
