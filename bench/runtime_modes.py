"""Per-mode decode speed and cache behaviour of `run`, on the same prompts, in one process.

For each slot count and mode: decode tok/s (median over prompts), ms/token p50/p95, hits / late /
misses per token, prefetches issued and wasted, bytes uploaded and stall ms per token, predictor ms
per call, and whether the greedy tokens equal mode `off` (stock placement: every layer on the GPU
with a GPU build; experts in host memory on the CPU build). Modes alternate within each round so
drift hits all alike. Writes bench/results/runtime-modes-<model>-<backend>.json and .md.

    python bench/runtime_modes.py ../shared/models/moe-ref-a.gguf --predictors preds/ --slots 16,64
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from edge_preattn import native
from edge_preattn.controller import CacheRuntime, record_routing
from edge_preattn.engine import Engine, EngineConfig, Sampling, complete
from edge_preattn.files import write_json_atomic, write_text_atomic
from edge_preattn.layout import read_layout
from edge_preattn.onnx_io import load_predictor_set
from edge_preattn.run import run_stats

PROMPTS = [
    "def fibonacci(n):",
    "import numpy as np\n\ndef softmax(x):",
    "class Stack:\n    def __init__(self):",
    "The three primary colors are",
]
STAT_KEYS = (
    "decode_tok_s",
    "ms_per_token_p50",
    "ms_per_token_p95",
    "hits_per_token",
    "late_per_token",
    "misses_per_token",
    "hit_rate",
    "prefetch_issued",
    "prefetch_wasted",
    "prefetch_late",  # predicted experts refused: the router had decided before the prediction landed
    "bytes_uploaded_per_token",
    "stall_ms_per_token",
    "predictor_ms_per_call",
    "forced_uploads",
)


def one_run(
    llama_cpp, model: Path, layout, *, mode: str, n_slots: int, n: int, prompt: str, predictors, gpu: bool
):
    host = mode != "off" or not gpu
    config = EngineConfig.host_experts(model, 512, host=host)
    with Engine(llama_cpp, config) as engine:
        sampling = Sampling()
        if mode == "off":
            record = complete(engine, prompt, n, sampling)
            return record.tokens, run_stats(record, engine, None)
        oracle = record_routing(engine, prompt, n, sampling) if mode == "oracle" else None
        with CacheRuntime.for_layout(
            engine,
            layout,
            n_slots=n_slots,
            mode=mode,
            predictors=predictors,
            extra=max(1, layout.n_expert_used // 2),
            oracle=oracle,
        ) as runtime:
            record = complete(engine, prompt, n, sampling)
            return record.tokens, run_stats(record, engine, runtime)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("--predictors", type=Path)
    parser.add_argument("--slots", default="16")
    parser.add_argument("--modes", default="off,lru,top1,exact,overprov,oracle")
    parser.add_argument("-n", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    layout = read_layout(args.model)
    llama_cpp = native.load_llama(offload_short_batches=True)
    api = native.NativeApi(llama_cpp)
    gpu = bool(api.gpus())
    predictors = (
        load_predictor_set(args.predictors, fingerprint=layout.fingerprint) if args.predictors else None
    )
    modes = [
        m for m in args.modes.split(",") if predictors is not None or m not in ("top1", "exact", "overprov")
    ]
    results: dict[tuple[int, str], list[dict]] = {}
    reference: dict[str, list[int]] = {}
    for _ in range(args.rounds):
        for n_slots in [int(s) for s in args.slots.split(",")]:
            for mode in modes:
                for prompt in PROMPTS:
                    tokens, stats = one_run(
                        llama_cpp,
                        args.model,
                        layout,
                        mode=mode,
                        n_slots=n_slots,
                        n=args.n,
                        prompt=prompt,
                        predictors=predictors,
                        gpu=gpu,
                    )
                    if mode == "off":
                        reference.setdefault(prompt, tokens)
                    stats["tokens_equal_off"] = tokens == reference.get(prompt)
                    results.setdefault((n_slots, mode), []).append(stats)
    rows = []
    for (n_slots, mode), runs in results.items():
        row = {
            "slots": n_slots if mode != "off" else None,
            "mode": mode,
            "runs": len(runs),
            "tokens_equal_off": all(r["tokens_equal_off"] for r in runs),
        }
        for key in STAT_KEYS:
            values = [r[key] for r in runs if key in r]
            if values:
                row[key] = round(float(np.median(values)), 4)
        if row not in rows and not (mode == "off" and any(r["mode"] == "off" for r in rows)):
            rows.append(row)
    result = {
        "model": args.model.name,
        "build": api.build_info(),
        "backend": "gpu" if gpu else "cpu",
        "k": layout.n_expert_used,
        "n_expert": layout.n_expert,
        "n_predict": args.n,
        "prompts": len(PROMPTS),
        "predictors": str(args.predictors) if args.predictors else None,
        "command": " ".join(sys.argv),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"runtime-modes-{args.model.stem}-{result['backend']}"
    write_json_atomic(args.out / f"{stem}.json", result)
    header = ["slots", "mode", "tokens_equal_off", *STAT_KEYS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row.get(key, "")) for key in header) + " |" for row in rows]
    write_text_atomic(
        args.out / f"{stem}.md", f"# {args.model.name}, {result['build']}\n\n" + "\n".join(lines) + "\n"
    )
    print("\n".join(lines))
    return 0 if all(row["tokens_equal_off"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
