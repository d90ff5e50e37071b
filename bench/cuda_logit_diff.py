"""Where the slot cache's logits leave stock all-on-GPU on CUDA: per decode step, max |Δlogit|.

Stock places every layer on the GPU; the cache run keeps experts in host memory and reads them from
slot banks (lru; a warm-up pass first). Steps after the first differing greedy token compare
different inputs: read the diff up to there. Run it once per environment to test a cause, e.g.
GGML_CUDA_DISABLE_FUSION=1. Prints one JSON line.

    python bench/cuda_logit_diff.py M.gguf --slots 128 -n 16
"""

import argparse
import json
import os

import numpy as np

from edge_preattn import native
from edge_preattn.controller import CacheRuntime
from edge_preattn.engine import Engine, EngineConfig, Sampling
from edge_preattn.layout import read_layout

PROMPT = "def fibonacci(n):"


def logits_of(engine: Engine, prompt: str, n: int) -> tuple[list[int], np.ndarray]:
    rows: list[np.ndarray] = []
    tokens = [t for t, _ in engine.generate(prompt, n, Sampling(), on_logits=rows.append)]
    return tokens, np.stack(rows)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model")
    parser.add_argument("--slots", type=int, required=True)
    parser.add_argument("-n", type=int, default=16)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument(
        "--bypass-tokens", type=int, default=32, help="ubatches above this take the stock path"
    )
    args = parser.parse_args()
    llama_cpp = native.load_llama(offload_short_batches=True)
    layout = read_layout(args.model)
    with Engine(llama_cpp, EngineConfig(args.model, n_ctx=256, use_extra_bufts=False)) as engine:
        ref_tokens, ref = logits_of(engine, args.prompt, args.n)
    host = EngineConfig.host_experts(args.model, 256)
    with (
        Engine(llama_cpp, host) as engine,
        CacheRuntime.for_layout(
            engine, layout, n_slots=args.slots, mode="lru", max_batch_tokens=args.bypass_tokens
        ),
    ):
        logits_of(engine, args.prompt, args.n)  # warm-up: every expert it meets becomes resident
        tokens, got = logits_of(engine, args.prompt, args.n)
    steps = min(len(ref), len(got))
    diff = np.abs(ref[:steps] - got[:steps]).max(axis=1)
    first_token_diff = next(
        (i for i, (a, b) in enumerate(zip(ref_tokens, tokens, strict=False)) if a != b), None
    )
    print(
        json.dumps(
            {
                "model": os.path.basename(args.model),
                "slots": args.slots,
                "prompt": args.prompt,
                "bypass_tokens": args.bypass_tokens,
                "env": {k: v for k, v in os.environ.items() if k.startswith("GGML_")},
                "max_abs_logit_diff_per_step": [float(f"{d:.3g}") for d in diff],
                "first_differing_token": first_token_diff,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
