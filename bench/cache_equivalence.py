"""Greedy tokens of every cache mode against stock placement, on whatever backend the build has.

On the CPU build the reference is stock with experts in host memory (logits must match bit for bit);
on a GPU build it is stock with every layer on the GPU (the slot banks run the same kernels on the
same bytes, so greedy tokens must match). A random-ranking predictor stands in where a mode needs
one: output must not depend on it. Writes bench/results/cache-equivalence-<model>-<backend>.json.

    python bench/cache_equivalence.py ../shared/models/moe-ref-a.gguf -n 64 --slots 16,64
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from edge_preattn import native
from edge_preattn.controller import CacheRuntime, RandomRanking, record_routing
from edge_preattn.engine import Engine, EngineConfig, Sampling
from edge_preattn.files import write_json_atomic
from edge_preattn.layout import read_layout

PROMPTS = ["def fibonacci(n):", "import numpy as np\n\ndef softmax(x):", "The three primary colors are"]


def generate(engine: Engine, prompt: str, n: int) -> tuple[list[int], float]:
    started = time.perf_counter()
    tokens = [token for token, _ in engine.generate(prompt, n, Sampling())]
    return tokens, len(tokens) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("-n", type=int, default=64)
    parser.add_argument("--slots", default="16")
    parser.add_argument("--modes", default="lru,top1,exact,overprov,oracle")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--keep-late-predictions",
        action="store_true",
        help="prediction stays on when it is late or idle (measures the prediction path's own cost)",
    )
    args = parser.parse_args()
    layout = read_layout(args.model)
    llama_cpp = native.load_llama(offload_short_batches=True)
    api = native.NativeApi(llama_cpp)
    gpu = bool(api.gpus())
    reference_config = EngineConfig.host_experts(args.model, 512, host=not gpu)
    host_config = EngineConfig.host_experts(args.model, 512)
    with Engine(llama_cpp, reference_config) as engine:
        reference = {prompt: generate(engine, prompt, args.n) for prompt in PROMPTS}
    rows = []
    for n_slots in [int(s) for s in args.slots.split(",")]:
        for mode in args.modes.split(","):
            agree, rates, switched_off = 0, [], []
            for prompt in PROMPTS:  # a fresh context per prompt: the cache is enabled once per context
                with Engine(llama_cpp, host_config) as engine:
                    oracle = record_routing(engine, prompt, args.n, Sampling()) if mode == "oracle" else None
                    with CacheRuntime.for_layout(
                        engine,
                        layout,
                        n_slots=n_slots,
                        mode=mode,
                        predictors=RandomRanking(layout.n_expert),
                        extra=2,
                        oracle=oracle,
                        late_fallback=not args.keep_late_predictions,
                    ) as runtime:
                        tokens, tok_s = generate(engine, prompt, args.n)
                        forced = runtime.bank.stats()["forced_uploads"]
                        switched_off.append(runtime.controller.prediction_off_at)
                agree += tokens == reference[prompt][0]
                rates.append(tok_s)
            rows.append(
                {
                    "mode": mode,
                    "slots": n_slots,
                    "prompts_equal": agree,
                    "prompts": len(PROMPTS),
                    "decode_tok_s": round(float(np.median(rates)), 1),
                    "forced_uploads_last": forced,
                    "prediction_off_at_ubatch": switched_off,  # per prompt; None: stayed on
                }
            )
            print(json.dumps(rows[-1]))
    result = {
        "model": args.model.name,
        "build": api.build_info(),
        "backend": "gpu" if gpu else "cpu",
        "reference": "stock, all layers on the GPU" if gpu else "stock, experts in host memory",
        "reference_tok_s": round(float(np.median([r[1] for r in reference.values()])), 1),
        "n_predict": args.n,
        "late_fallback": not args.keep_late_predictions,
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-keep-late" if args.keep_late_predictions else ""
    name = f"cache-equivalence-{args.model.stem}-{result['backend']}{suffix}.json"
    write_json_atomic(args.out / name, result)
    return 0 if all(r["prompts_equal"] == r["prompts"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
